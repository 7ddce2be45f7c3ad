//! The canonical encoding behind state ids.
//!
//! A state id is `sha256(record)` in lowercase hex, where `record` is:
//!
//! ```text
//! record := "taidon.state.v1" LF field*
//! field  := key ":" len ":" value LF        ; len: byte length of value, decimal
//! ```
//!
//! The fields of a **base** state, in this order:
//! `kind=base`, `engine.name=postgresql`, `engine.major`, `engine.minor`, `initdb.encoding`,
//! `initdb.locale`, `initdb.data_checksums` (`on`/`off`), then one `setting.NAME` per server
//! setting of the recipe, in byte order of NAME (none without settings, so a base without
//! settings has the id it had before settings existed).
//!
//! The fields of a **step** state, in this order: `parent` (the parent's 64-hex id),
//! `kind` (`psql.file` or `psql.command`), `param.single_transaction` (`on`/`off`), one
//! `param.var.NAME` per psql variable in byte order of NAME, and then `input.sha256` (the
//! SHA-256 of the file's content, lowercase hex) for a file or `input.sql` (the text) for a
//! command. A file that pulls in others (`\i`, `\ir`, `\include`, `\include_relative`) adds
//! one `input.include.sha256` field per included file, in the order psql reads them (depth
//! first; a file included twice counts twice). A file without includes has none, so its
//! record is what it was before includes were hashed.
//!
//! The fields of a **Liquibase changeset** state, in this order: `parent`,
//! `kind=liquibase.changeset`, `changeset.file`, `changeset.id`, `changeset.author`,
//! `changeset.checksum` (Liquibase's own, `9:…`), then one `param.arg` per Liquibase argument
//! in the order given. The closure's files are not fields: the checksum covers what the
//! changeset runs.
//!
//! The fields of a **command** state (`prepare:cmd`), in this order: `parent`, `kind=command`,
//! one `param.argv` per word of the command line, then for each declared input file, in the
//! order given, `input.path` (relative to the working directory: a migration tool reads
//! names) and `input.sha256`.
//!
//! Paths, modification times, the machine and the checkout never enter the record, so equal
//! inputs give equal ids anywhere. The length prefix makes the encoding injective: no value can
//! forge a field boundary. Changing any of this changes every id; bump `v1` when you do.

use sha2::{Digest, Sha256};

use crate::engine::EngineFingerprint;
use crate::id::StateId;
use crate::plan::{PsqlInput, Step};

const MAGIC: &str = "taidon.state.v1";

/// Builds one canonical record.
struct Record(Vec<u8>);

impl Record {
    fn new() -> Self {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(MAGIC.as_bytes());
        buf.push(b'\n');
        Self(buf)
    }

    fn field(mut self, key: &str, value: &str) -> Self {
        self.0.extend_from_slice(key.as_bytes());
        self.0.push(b':');
        self.0.extend_from_slice(value.len().to_string().as_bytes());
        self.0.push(b':');
        self.0.extend_from_slice(value.as_bytes());
        self.0.push(b'\n');
        self
    }

    fn id(self) -> StateId {
        StateId::from_bytes(Sha256::digest(&self.0).into())
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// The id of the base state an engine starts from.
pub fn base_state_id(engine: &EngineFingerprint) -> StateId {
    let mut rec = Record::new()
        .field("kind", "base")
        .field("engine.name", "postgresql")
        .field("engine.major", &engine.major.to_string())
        .field("engine.minor", &engine.minor.to_string())
        .field("initdb.encoding", &engine.initdb.encoding)
        .field("initdb.locale", &engine.initdb.locale)
        .field(
            "initdb.data_checksums",
            on_off(engine.initdb.data_checksums),
        );
    for (name, value) in &engine.settings {
        rec = rec.field(&format!("setting.{name}"), value);
    }
    rec.id()
}

/// The id of the state that `step` makes from `parent`.
pub fn step_state_id(parent: &StateId, step: &Step) -> StateId {
    match step {
        Step::Command(c) => {
            let mut rec = Record::new()
                .field("parent", &parent.to_string())
                .field("kind", "command");
            for word in &c.argv {
                rec = rec.field("param.argv", word);
            }
            for input in &c.inputs {
                rec = rec
                    .field("input.path", &input.path)
                    .field("input.sha256", &input.sha256);
            }
            rec.id()
        }
        Step::Liquibase(lb) => {
            let mut rec = Record::new()
                .field("parent", &parent.to_string())
                .field("kind", "liquibase.changeset")
                .field("changeset.file", &lb.file)
                .field("changeset.id", &lb.id)
                .field("changeset.author", &lb.author)
                .field("changeset.checksum", &lb.checksum);
            for arg in &lb.args {
                rec = rec.field("param.arg", arg);
            }
            rec.id()
        }
        Step::Psql(psql) => {
            let kind = match psql.input {
                PsqlInput::File { .. } => "psql.file",
                PsqlInput::Command { .. } => "psql.command",
            };
            let mut rec = Record::new()
                .field("parent", &parent.to_string())
                .field("kind", kind)
                .field("param.single_transaction", on_off(psql.single_transaction));
            // BTreeMap iterates in byte order of the names.
            for (name, value) in &psql.variables {
                rec = rec.field(&format!("param.var.{name}"), value);
            }
            match &psql.input {
                PsqlInput::File {
                    sha256, includes, ..
                } => {
                    rec = rec.field("input.sha256", sha256);
                    for inc in includes {
                        rec = rec.field("input.include.sha256", &inc.sha256);
                    }
                    rec
                }
                PsqlInput::Command { sql } => rec.field("input.sql", sql),
            }
            .id()
        }
    }
}

/// The SHA-256 of an input file's content, lowercase hex, as `input.sha256` wants it.
pub fn content_sha256(content: &[u8]) -> String {
    hex::encode(Sha256::digest(content))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::engine::InitdbOptions;
    use crate::plan::PsqlStep;

    fn pg15() -> EngineFingerprint {
        EngineFingerprint {
            major: 15,
            minor: 18,
            initdb: InitdbOptions::default(),
            settings: Default::default(),
        }
    }

    fn file(path: &str, content: &str) -> Step {
        Step::Psql(PsqlStep {
            input: PsqlInput::File {
                path: path.into(),
                sha256: content_sha256(content.as_bytes()),
                workdir: String::new(),
                includes: Vec::new(),
            },
            variables: BTreeMap::new(),
            single_transaction: false,
        })
    }

    // Golden ids, computed apart from this code with `printf '<record>' | sha256sum` over the
    // documented bytes: they pin the encoding. If one changes, every stored state's id changed with
    // it; that needs a new version tag, not a new golden value.
    #[test]
    fn golden_base_id() {
        assert_eq!(
            base_state_id(&pg15()).to_string(),
            "d34bc1219bdc1a98e3802dc5e57c5c6c07c0b51146b427f76386f2636e39c710"
        );
    }

    #[test]
    fn golden_step_ids() {
        let base = base_state_id(&pg15());
        let schema = step_state_id(&base, &file("schema.sql", "create table t(x int);\n"));
        assert_eq!(
            schema.to_string(),
            "59b264f10939952da87f6074afe2a6108f1b1dd9d481e0f8573b767e4f066043"
        );
        let cmd = Step::Psql(PsqlStep {
            input: PsqlInput::Command {
                sql: "insert into t values (1)".into(),
            },
            variables: BTreeMap::from([("a".into(), "1".into())]),
            single_transaction: true,
        });
        assert_eq!(
            step_state_id(&schema, &cmd).to_string(),
            "f6ea1e4396cdb73dfede87566d1ab92f7f3fed69c86cab0f4535cb674514e79d"
        );
    }

    #[test]
    fn a_changeset_is_its_identity_and_checksum_not_its_files() {
        let base = base_state_id(&pg15());
        let cs = |id: &str, checksum: &str, files: &[&str], args: &[&str]| {
            Step::Liquibase(crate::plan::LiquibaseStep {
                id: id.into(),
                author: "alice".into(),
                file: "db/changelog.xml".into(),
                checksum: checksum.into(),
                changelog: "db/changelog.xml".into(),
                args: args.iter().map(|a| (*a).to_owned()).collect(),
                files: files
                    .iter()
                    .map(|f| crate::plan::Included {
                        path: (*f).into(),
                        sha256: content_sha256(f.as_bytes()),
                    })
                    .collect(),
            })
        };
        let one = step_state_id(&base, &cs("1", "9:aa", &["db/changelog.xml"], &[]));
        // Computed apart: printf 'taidon.state.v1\nparent:64:%s\nkind:19:liquibase.changeset\n
        // changeset.file:16:db/changelog.xml\nchangeset.id:1:1\nchangeset.author:5:alice\n
        // changeset.checksum:4:9:aa\n' "$base" | sha256sum
        assert_eq!(
            one.to_string(),
            "e6a1e0a2ff31041c8eac2f205c11939e237e6cbf5c23fc2458840e9d73c3de0c"
        );
        let moved = step_state_id(&base, &cs("1", "9:aa", &["other.xml", "x.sql"], &[]));
        assert_eq!(one, moved);
        for other in [
            cs("2", "9:aa", &[], &[]),
            cs("1", "9:bb", &[], &[]),
            cs("1", "9:aa", &[], &["--contexts=test"]),
        ] {
            assert_ne!(step_state_id(&base, &other), one);
        }
    }

    #[test]
    fn a_command_is_its_words_and_its_inputs_names_and_contents() {
        let base = base_state_id(&pg15());
        let cmd = |argv: &[&str], inputs: &[(&str, &str)]| {
            Step::Command(crate::plan::CommandStep {
                argv: argv.iter().map(|a| (*a).to_owned()).collect(),
                inputs: inputs
                    .iter()
                    .map(|(p, c)| crate::plan::Included {
                        path: (*p).into(),
                        sha256: content_sha256(c.as_bytes()),
                    })
                    .collect(),
            })
        };
        let one = step_state_id(&base, &cmd(&["dbmate", "up"], &[("db/1.sql", "a")]));
        // Computed apart: printf 'taidon.state.v1\nparent:64:%s\nkind:7:command\n
        // param.argv:6:dbmate\nparam.argv:2:up\ninput.path:8:db/1.sql\ninput.sha256:64:%s\n'
        // "$base" "$(printf a | sha256sum | cut -c1-64)" | sha256sum
        assert_eq!(
            one.to_string(),
            "7de5d8879dfd46ab7af0b8b4b2c46cd88e320fbbe50b0a7840ae03d570d78074"
        );
        for other in [
            cmd(&["dbmate", "up"], &[("db/2.sql", "a")]),
            cmd(&["dbmate", "up"], &[("db/1.sql", "b")]),
            cmd(&["dbmate", "migrate"], &[("db/1.sql", "a")]),
            cmd(&["dbmate up"], &[("db/1.sql", "a")]),
        ] {
            assert_ne!(step_state_id(&base, &other), one);
        }
    }

    fn with_includes(step: Step, includes: &[(&str, &str)]) -> Step {
        let Step::Psql(mut p) = step else {
            unreachable!("a psql step")
        };
        if let PsqlInput::File { includes: inc, .. } = &mut p.input {
            *inc = includes
                .iter()
                .map(|(path, content)| crate::plan::Included {
                    path: (*path).into(),
                    sha256: content_sha256(content.as_bytes()),
                })
                .collect();
        }
        Step::Psql(p)
    }

    // Computed apart:
    //   a=$(printf 'create table t(x int);\n' | sha256sum | cut -c1-64)  # 6aff9186...
    //   b=$(printf '\\i b.sql\n' | sha256sum | cut -c1-64)
    //   c=$(printf 'insert into t values (1);\n' | sha256sum | cut -c1-64)
    //   printf 'taidon.state.v1\nparent:64:%s\nkind:9:psql.file\nparam.single_transaction:3:off\ninput.sha256:64:%s\ninput.include.sha256:64:%s\ninput.include.sha256:64:%s\n' \
    //     "$base" "$b" "$a" "$c" | sha256sum
    #[test]
    fn golden_id_with_includes() {
        let base = base_state_id(&pg15());
        let step = with_includes(
            file("main.sql", "\\i b.sql\n"),
            &[
                ("sub/a.sql", "create table t(x int);\n"),
                ("c.sql", "insert into t values (1);\n"),
            ],
        );
        assert_eq!(
            step_state_id(&base, &step).to_string(),
            "516c2ae35e7e5909a5fe2c91d913911d78aabcc80721106c478155e2c68b7e69"
        );
    }

    #[test]
    fn an_included_file_is_identity_but_not_its_place() {
        let base = base_state_id(&pg15());
        let plain = file("main.sql", "\\i a.sql\n");
        let a = with_includes(plain.clone(), &[("a.sql", "create table t();")]);
        let moved = with_includes(plain.clone(), &[("lib/a.sql", "create table t();")]);
        let edited = with_includes(plain.clone(), &[("a.sql", "create table u();")]);
        let twice = with_includes(
            plain.clone(),
            &[
                ("a.sql", "create table t();"),
                ("a.sql", "create table t();"),
            ],
        );
        assert_eq!(step_state_id(&base, &a), step_state_id(&base, &moved));
        let ids = [
            step_state_id(&base, &plain),
            step_state_id(&base, &a),
            step_state_id(&base, &edited),
            step_state_id(&base, &twice),
        ];
        for i in 0..ids.len() {
            for j in i + 1..ids.len() {
                assert_ne!(ids[i], ids[j], "{i} vs {j}");
            }
        }
    }

    #[test]
    fn the_record_is_the_documented_bytes() {
        let rec = Record::new().field("kind", "base").field("k", "a:b\n");
        assert_eq!(rec.0, b"taidon.state.v1\nkind:4:base\nk:4:a:b\n\n");
    }

    #[test]
    fn path_is_not_identity_but_content_is() {
        let base = base_state_id(&pg15());
        let a = step_state_id(&base, &file("a/schema.sql", "create table t();"));
        let b = step_state_id(&base, &file("/elsewhere/x.sql", "create table t();"));
        let c = step_state_id(&base, &file("a/schema.sql", "create table u();"));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn every_engine_field_and_parameter_changes_the_id() {
        let base = base_state_id(&pg15());
        let mut e = pg15();
        e.minor = 19;
        assert_ne!(base_state_id(&e), base);
        let mut e = pg15();
        e.initdb.locale = "en_US.UTF-8".into();
        assert_ne!(base_state_id(&e), base);
        let mut e = pg15();
        e.initdb.data_checksums = true;
        assert_ne!(base_state_id(&e), base);
        let mut e = pg15();
        e.settings
            .insert("max_prepared_transactions".into(), "10".into());
        let with_setting = base_state_id(&e);
        assert_ne!(with_setting, base);
        e.settings
            .insert("max_prepared_transactions".into(), "11".into());
        assert_ne!(base_state_id(&e), with_setting);

        let plain = file("s.sql", "select 1");
        let Step::Psql(mut one_tx) = plain.clone() else {
            unreachable!()
        };
        one_tx.single_transaction = true;
        let Step::Psql(mut with_var) = plain.clone() else {
            unreachable!()
        };
        with_var.variables.insert("v".into(), "1".into());
        let ids = [
            step_state_id(&base, &plain),
            step_state_id(&base, &Step::Psql(one_tx)),
            step_state_id(&base, &Step::Psql(with_var)),
            step_state_id(&step_state_id(&base, &plain), &plain),
        ];
        for i in 0..ids.len() {
            for j in i + 1..ids.len() {
                assert_ne!(ids[i], ids[j], "{i} vs {j}");
            }
        }
    }

    #[test]
    fn a_file_and_a_command_with_the_same_text_differ() {
        let base = base_state_id(&pg15());
        let sql = "select 1";
        let as_cmd = Step::Psql(PsqlStep {
            input: PsqlInput::Command { sql: sql.into() },
            variables: BTreeMap::new(),
            single_transaction: false,
        });
        assert_ne!(
            step_state_id(&base, &as_cmd),
            step_state_id(&base, &file("x.sql", sql))
        );
    }
}
