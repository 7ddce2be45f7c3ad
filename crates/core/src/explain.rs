//! Why a step misses the cache: what differs between the step asked for and the nearest cached
//! sibling (a state built on the same parent), or between two engines. Pure: the controller
//! finds the sibling, this says the difference in one line.

use std::collections::BTreeMap;

use crate::engine::EngineFingerprint;
use crate::plan::{Included, PsqlInput, Step};

/// The first 8 hex digits of a hash, as people compare them.
fn short(sha: &str) -> &str {
    sha.get(..8).unwrap_or(sha)
}

/// How `wanted` differs from `cached` (another base), e.g. `engine 15.18 → 16.4`.
pub fn engine_difference(cached: &EngineFingerprint, wanted: &EngineFingerprint) -> String {
    let mut parts = Vec::new();
    if (cached.major, cached.minor) != (wanted.major, wanted.minor) {
        parts.push(format!(
            "engine {}.{} → {}.{}",
            cached.major, cached.minor, wanted.major, wanted.minor
        ));
    }
    if cached.initdb != wanted.initdb {
        parts.push(format!(
            "initdb options {} → {}",
            cached.initdb.initdb_args().join(" "),
            wanted.initdb.initdb_args().join(" ")
        ));
    }
    parts.extend(map_difference(
        "setting",
        &cached.settings,
        &wanted.settings,
    ));
    if parts.is_empty() {
        "the same engine (another encoding of it)".to_owned()
    } else {
        parts.join(", ")
    }
}

/// `NAME a → b`, `NAME (unset) → b`, `NAME a → (unset)` for every key that differs.
fn map_difference(
    what: &str,
    cached: &BTreeMap<String, String>,
    wanted: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut out = Vec::new();
    for key in cached
        .keys()
        .chain(wanted.keys().filter(|k| !cached.contains_key(*k)))
    {
        let (a, b) = (cached.get(key), wanted.get(key));
        if a != b {
            let show = |v: Option<&String>| v.map_or("(unset)".to_owned(), |v| v.clone());
            out.push(format!("{what} {key} {} → {}", show(a), show(b)));
        }
    }
    out
}

/// Files added, removed or changed between two lists of (path, sha256).
fn files_difference(cached: &[Included], wanted: &[Included]) -> Vec<String> {
    let a: BTreeMap<&str, &str> = cached
        .iter()
        .map(|f| (f.path.as_str(), f.sha256.as_str()))
        .collect();
    let b: BTreeMap<&str, &str> = wanted
        .iter()
        .map(|f| (f.path.as_str(), f.sha256.as_str()))
        .collect();
    let mut out = Vec::new();
    for (path, sha) in &b {
        match a.get(path) {
            None => out.push(format!("{path} added")),
            Some(old) if old != sha => out.push(format!(
                "{path} changed (sha256 {}… → {}…)",
                short(old),
                short(sha)
            )),
            Some(_) => {}
        }
    }
    for path in a.keys().filter(|p| !b.contains_key(*p)) {
        out.push(format!("{path} removed"));
    }
    if out.is_empty() && cached != wanted {
        out.push("the files are read in another order".to_owned());
    }
    out
}

/// Joins differences, at most `MAX` of them named.
fn listed(mut parts: Vec<String>) -> String {
    const MAX: usize = 4;
    if parts.len() > MAX {
        let more = parts.len() - MAX;
        parts.truncate(MAX);
        parts.push(format!("{more} more"));
    }
    parts.join(", ")
}

/// How `wanted` differs from `cached`, a step built on the same parent, e.g.
/// `db/002.sql changed (sha256 1a2b3c4d… → 3c4d5e6f…)`.
pub fn step_difference(cached: &Step, wanted: &Step) -> String {
    match (cached, wanted) {
        (Step::Psql(a), Step::Psql(b)) => {
            let mut parts = Vec::new();
            match (&a.input, &b.input) {
                (
                    PsqlInput::File {
                        path: pa,
                        sha256: sa,
                        includes: ia,
                        ..
                    },
                    PsqlInput::File {
                        path: pb,
                        sha256: sb,
                        includes: ib,
                        ..
                    },
                ) => {
                    if sa != sb {
                        let name = if pa == pb {
                            pb.clone()
                        } else {
                            format!("{pa} → {pb}")
                        };
                        parts.push(format!(
                            "{name} changed (sha256 {}… → {}…)",
                            short(sa),
                            short(sb)
                        ));
                    }
                    if ia != ib {
                        parts.extend(
                            files_difference(ia, ib)
                                .into_iter()
                                .map(|d| format!("included {d}")),
                        );
                    }
                }
                (PsqlInput::Command { sql: x }, PsqlInput::Command { sql: y }) if x != y => {
                    parts.push("the SQL of -c changed".to_owned());
                }
                (PsqlInput::Command { .. }, PsqlInput::Command { .. }) => {}
                _ => parts.push("a file step where a -c step was, or the other way".to_owned()),
            }
            parts.extend(map_difference("variable", &a.variables, &b.variables));
            if a.single_transaction != b.single_transaction {
                parts.push(format!(
                    "--single-transaction {} → {}",
                    on_off(a.single_transaction),
                    on_off(b.single_transaction)
                ));
            }
            or_same(parts)
        }
        (Step::Liquibase(a), Step::Liquibase(b)) => {
            if a.name() != b.name() {
                return format!("another changeset: {} → {}", a.name(), b.name());
            }
            let mut parts = Vec::new();
            if a.checksum != b.checksum {
                parts.push(format!(
                    "changeset {}: checksum {} → {} (its content changed)",
                    b.name(),
                    a.checksum,
                    b.checksum
                ));
            }
            if a.args != b.args {
                parts.push(format!(
                    "Liquibase arguments {:?} → {:?}",
                    a.args.join(" "),
                    b.args.join(" ")
                ));
            }
            or_same(parts)
        }
        (Step::Command(a), Step::Command(b)) => {
            let mut parts = Vec::new();
            if a.argv != b.argv {
                parts.push(format!(
                    "the command `{}` → `{}`",
                    a.argv.join(" "),
                    b.argv.join(" ")
                ));
            }
            parts.extend(files_difference(&a.inputs, &b.inputs));
            or_same(parts)
        }
        (a, b) => format!("another kind of step: {} → {}", kind(a), kind(b)),
    }
}

fn or_same(parts: Vec<String>) -> String {
    if parts.is_empty() {
        "the same step (another encoding of it)".to_owned()
    } else {
        listed(parts)
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

fn kind(step: &Step) -> &'static str {
    match step {
        Step::Psql(_) => "psql",
        Step::Liquibase(_) => "liquibase",
        Step::Command(_) => "cmd",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::content_sha256;
    use crate::plan::{CommandStep, LiquibaseStep, PsqlStep};

    fn file(path: &str, content: &str, includes: &[(&str, &str)]) -> Step {
        Step::Psql(PsqlStep {
            input: PsqlInput::File {
                path: path.into(),
                sha256: content_sha256(content.as_bytes()),
                workdir: String::new(),
                includes: includes
                    .iter()
                    .map(|(p, c)| Included {
                        path: (*p).into(),
                        sha256: content_sha256(c.as_bytes()),
                    })
                    .collect(),
            },
            variables: BTreeMap::new(),
            single_transaction: false,
        })
    }

    #[test]
    fn a_changed_file_is_named_with_both_hashes() {
        let a = file("db/002.sql", "x", &[]);
        let b = file("db/002.sql", "y", &[]);
        let (ha, hb) = (content_sha256(b"x"), content_sha256(b"y"));
        assert_eq!(
            step_difference(&a, &b),
            format!("db/002.sql changed (sha256 {}… → {}…)", &ha[..8], &hb[..8])
        );
        let c = file("main.sql", "m", &[("lib/a.sql", "1")]);
        let d = file("main.sql", "m", &[("lib/a.sql", "2"), ("lib/b.sql", "3")]);
        let why = step_difference(&c, &d);
        assert!(
            why.starts_with("included lib/a.sql changed (sha256 "),
            "{why}"
        );
        assert!(why.ends_with("included lib/b.sql added"), "{why}");
        let Step::Psql(mut v) = a.clone() else {
            unreachable!()
        };
        v.variables.insert("n".into(), "1".into());
        v.single_transaction = true;
        assert_eq!(
            step_difference(&a, &Step::Psql(v)),
            "variable n (unset) → 1, --single-transaction off → on"
        );
    }

    #[test]
    fn engines_changesets_and_commands() {
        let e = |major, minor, s: &[(&str, &str)]| EngineFingerprint {
            major,
            minor,
            initdb: Default::default(),
            settings: s.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect(),
        };
        assert_eq!(
            engine_difference(&e(15, 18, &[]), &e(16, 4, &[])),
            "engine 15.18 → 16.4"
        );
        assert_eq!(
            engine_difference(
                &e(15, 18, &[("max_prepared_transactions", "10")]),
                &e(15, 18, &[])
            ),
            "setting max_prepared_transactions 10 → (unset)"
        );
        let cs = |checksum: &str| {
            Step::Liquibase(LiquibaseStep {
                id: "29".into(),
                author: "a".into(),
                file: "c.xml".into(),
                checksum: checksum.into(),
                changelog: "c.xml".into(),
                args: vec![],
                files: vec![],
            })
        };
        assert_eq!(
            step_difference(&cs("9:aa"), &cs("9:bb")),
            "changeset c.xml::29::a: checksum 9:aa → 9:bb (its content changed)"
        );
        let cmd = |argv: &[&str], files: &[(&str, &str)]| {
            Step::Command(CommandStep {
                argv: argv.iter().map(|a| (*a).to_owned()).collect(),
                inputs: files
                    .iter()
                    .map(|(p, c)| Included {
                        path: (*p).into(),
                        sha256: content_sha256(c.as_bytes()),
                    })
                    .collect(),
            })
        };
        assert_eq!(
            step_difference(
                &cmd(&["dbmate", "up"], &[("m/1.sql", "a")]),
                &cmd(&["dbmate", "up"], &[("m/1.sql", "a"), ("m/2.sql", "b")])
            ),
            "m/2.sql added"
        );
        assert_eq!(
            step_difference(&cs("9:aa"), &cmd(&["x"], &[])),
            "another kind of step: liquibase → cmd"
        );
    }
}
