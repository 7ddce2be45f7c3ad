//! The command line as a user meets it: generated help (golden files), usage errors, and shell
//! completion through the real bash, fish and zsh sourcing the generated scripts.
//!
//! `UPDATE_GOLDEN=1 cargo test -p sqlrs --test cli` rewrites the golden files.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{sqlrs_bin, Env};

/// Every command and kind, as `sqlrs <words> --help` takes them.
const HELP_PAGES: &[&[&str]] = &[
    &[],
    &["prepare:psql"],
    &["run"],
    &["run:psql"],
    &["run:pgbench"],
    &["ls"],
    &["rm"],
    &["push"],
    &["dsn"],
    &["pin"],
    &["unpin"],
    &["warmup"],
    &["lease"],
    &["events"],
    &["fsck"],
    &["status"],
    &["shutdown"],
    &["completions"],
];

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/help")
}

fn sqlrs(args: &[&str]) -> common::Run {
    let env = Env::new();
    env.run(args)
}

#[test]
fn help_pages_match_their_golden_files() {
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut stale = Vec::new();
    for words in HELP_PAGES {
        let mut args = words.to_vec();
        args.push("--help");
        let r = sqlrs(&args);
        assert_eq!(r.code, 0, "{}", r.describe());
        assert_eq!(r.stderr, "", "{}", r.describe());
        let name = if words.is_empty() {
            "sqlrs".to_owned()
        } else {
            words.join("_").replace(':', "_")
        };
        let path = golden_dir().join(format!("{name}.txt"));
        if update {
            fs::create_dir_all(golden_dir()).expect("mkdir");
            fs::write(&path, &r.stdout).expect("write golden");
            continue;
        }
        let want = fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (UPDATE_GOLDEN=1 writes it)", path.display()));
        if r.stdout != want {
            stale.push(format!("--- {}\n{}", path.display(), r.stdout));
        }
        // Every page has examples.
        assert!(r.stdout.contains("\nExamples"), "{}", r.describe());
    }
    assert!(
        stale.is_empty(),
        "help differs from its golden file (UPDATE_GOLDEN=1 rewrites them):\n{}",
        stale.join("\n")
    );
}

#[test]
fn help_reaches_the_same_page_every_way() {
    let page = sqlrs(&["prepare:psql", "--help"]).stdout;
    assert_eq!(sqlrs(&["prepare", "--help"]).stdout, page);
    assert_eq!(sqlrs(&["help", "prepare:psql"]).stdout, page);
    assert_eq!(sqlrs(&["prepare:psql", "-h"]).stdout, page);
    assert_eq!(sqlrs(&["--help"]).stdout, sqlrs(&["help"]).stdout);
    let version = sqlrs(&["--version"]);
    assert_eq!(version.code, 0);
    assert_eq!(
        version.stdout,
        format!("sqlrs {}\n", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn usage_errors_are_one_line_and_a_hint_with_exit_2_and_start_nothing() {
    let env = Env::new();
    for (args, first) in [
        (&["ls", "--bogus"][..], "sqlrs: unexpected argument '--bogus' found"),
        (&["pin", "abcdef01", "--reason=never"][..], "sqlrs: invalid value 'never' for '--reason <REASON>' [possible values: main, tag, pr, manual]"),
        (&["prepare:psql", "--kep", "-f", "x.sql"][..], "sqlrs: unexpected argument '--kep' found"),
        (&["run:nope", "--", "x"][..], "sqlrs: unknown run kind 'nope' (known kinds: run, run:pgbench, run:psql)"),
        (&["rm", "xyz"][..], "sqlrs: invalid value 'xyz' for '<ID>': \"xyz\" is not an id: use at least 8 hex digits"),
    ] {
        let r = env.fails(2, args);
        let lines: Vec<&str> = r.stderr.lines().collect();
        assert_eq!(lines.len(), 2, "{}", r.describe());
        assert_eq!(lines[0], first, "{}", r.describe());
        assert!(
            lines[1].starts_with("  tip: ") || lines[1].starts_with("  see 'sqlrs "),
            "{}",
            r.describe()
        );
        assert_eq!(r.stdout, "", "{}", r.describe());
    }
    // No command: the whole help, on stderr, exit 2.
    let r = env.fails(2, &[]);
    assert!(
        r.stderr.starts_with("sqlrs: no command given\n\n"),
        "{}",
        r.describe()
    );
    assert!(r.stderr.contains("Commands:"), "{}", r.describe());
    assert!(
        !env.home.join("daemon.json").exists(),
        "a usage error started a daemon"
    );
}

/// A directory holding only `sqlrs`, for the shells' PATH.
fn bin_dir() -> PathBuf {
    sqlrs_bin()
        .parent()
        .expect("the binary's directory")
        .to_owned()
}

fn path_with_sqlrs() -> String {
    format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// What bash's completion offers for `line` (the cursor at its end), through the generated
/// script sourced into a clean bash.
fn bash_complete(env: &Env, line: &str) -> Vec<String> {
    let script = env.ok(&["completions", "bash"]).stdout;
    let file = env.work.with_file_name("sqlrs.bash");
    fs::write(&file, script).expect("write script");
    let program = r#"source "$1"
COMP_LINE="$2"; COMP_POINT=${#COMP_LINE}
read -ra COMP_WORDS <<< "$COMP_LINE"; COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 ))
_sqlrs sqlrs
printf '%s\n' "${COMPREPLY[@]}""#;
    let out = Command::new("bash")
        .args(["--norc", "--noprofile", "-c", program, "bash"])
        .arg(&file)
        .arg(line)
        .env("PATH", path_with_sqlrs())
        .env("SQLRS_HOME", &env.home)
        .current_dir(&env.work)
        .output()
        .expect("bash runs");
    assert!(
        out.status.success(),
        "bash failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

#[test]
fn bash_completes_commands_kinds_flags_and_values() {
    let env = Env::new();
    let got = bash_complete(&env, "sqlrs pre");
    assert_eq!(
        got,
        ["prepare", "prepare:psql", "prepare:lb", "prepare:cmd"]
    );
    assert_eq!(bash_complete(&env, "sqlrs prepare:l"), ["lb"]);
    // bash breaks words at ':', so what follows the colon is completed.
    assert_eq!(bash_complete(&env, "sqlrs run:p"), ["psql", "pgbench"]);
    assert_eq!(bash_complete(&env, "sqlrs dsn abcdef01 --sc"), ["--scope"]);
    assert_eq!(
        bash_complete(&env, "sqlrs dsn abcdef01 --scope "),
        ["ro", "rw"]
    );
    assert_eq!(
        bash_complete(&env, "sqlrs prepare:psql -- -f x.sql run"),
        ["run", "run:psql", "run:pgbench"]
    );
    env.write("schema.sql", "select 1;");
    env.write("seed.sql", "select 1;");
    let mut files = bash_complete(&env, "sqlrs prepare -- -f s");
    files.sort();
    assert_eq!(files, ["schema.sql", "seed.sql"]);
    // No daemon runs: no ids, and completion did not start one.
    assert_eq!(bash_complete(&env, "sqlrs rm "), Vec::<String>::new());
    assert!(!env.home.join("daemon.json").exists());
}

#[test]
fn ids_come_from_the_running_daemon() {
    let env = Env::new();
    env.write("schema.sql", "create table t (x int);");
    let dsn = env.ok(&["prepare:psql", "--", "-f", "schema.sql"]).dsn();
    assert!(!dsn.is_empty());
    let ls = env.ls();
    let state = ls["states"][1]["state_id"]
        .as_str()
        .expect("a state")
        .to_owned();
    let instance = ls["instances"][0]["instance_id"]
        .as_str()
        .expect("an instance")
        .to_owned();
    let mut any = bash_complete(&env, "sqlrs rm ");
    any.sort();
    let mut want: Vec<String> = ls["states"]
        .as_array()
        .expect("states")
        .iter()
        .map(|s| s["state_id"].as_str().expect("id")[..12].to_owned())
        .chain(
            ls["instances"]
                .as_array()
                .expect("instances")
                .iter()
                .map(|i| i["instance_id"].as_str().expect("id").to_owned()),
        )
        .collect();
    want.sort();
    assert_eq!(any, want);
    // A state's prefix narrows; twelve digits give the whole id.
    assert_eq!(
        bash_complete(&env, &format!("sqlrs pin {}", &state[..12])),
        [state.as_str()]
    );
    // Instances only where an instance is taken.
    assert_eq!(
        bash_complete(
            &env,
            &format!("sqlrs run:psql --instance {}", &instance[..4])
        ),
        [instance.as_str()]
    );
    // --home on the line is the home asked.
    let other = Env::new();
    assert_eq!(
        bash_complete(
            &other,
            &format!("sqlrs --home {} pin {}", env.home.display(), &state[..8])
        ),
        [state[..12].to_owned()]
    );
    env.ok(&["shutdown"]);
}

#[test]
fn fish_completes_through_the_generated_script() {
    let env = Env::new();
    let script = env.ok(&["completions", "fish"]).stdout;
    let file = env.work.join("sqlrs.fish");
    fs::write(&file, script).expect("write script");
    let complete = |line: &str| -> Vec<String> {
        let out = Command::new("fish")
            .args(["--no-config", "-c", "source $argv[1]; complete -C $argv[2]"])
            .arg(&file)
            .arg(line)
            .env("PATH", path_with_sqlrs())
            .env("SQLRS_HOME", &env.home)
            .output()
            .expect("fish runs: scripts/setup.sh installs it");
        assert!(
            out.status.success(),
            "fish failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| l.split('\t').next().unwrap_or_default().to_owned())
            .collect()
    };
    assert_eq!(
        complete("sqlrs pre"),
        ["prepare", "prepare:cmd", "prepare:lb", "prepare:psql"]
    );
    assert_eq!(complete("sqlrs run:p"), ["run:pgbench", "run:psql"]);
    assert_eq!(
        complete("sqlrs pin abcdef01 --reason m"),
        ["main", "manual"]
    );
}

#[test]
fn zsh_completes_through_the_generated_script() {
    let env = Env::new();
    let script = env.ok(&["completions", "zsh"]).stdout;
    let file = env.work.join("_sqlrs");
    fs::write(&file, script).expect("write script");
    // zpty drives an interactive zsh: type the line, press TAB, read the screen.
    let program = r#"
zmodload zsh/zpty
zpty z zsh -f -i
zpty -w z "PS1='> '; autoload -Uz compinit; compinit -u -D; source ${(q)1}"
zpty -w z "print READY"
zpty -r z line '*READY*'
zpty -r z line '*READY*'
zpty -w -n z $'sqlrs completions \t'
sleep 1
out=""
while zpty -r -t z chunk; do out+=$chunk; done
print -r -- "$out"
zpty -d z
"#;
    let out = Command::new("zsh")
        .args(["-f", "-c", program, "zsh"])
        .arg(&file)
        .env("PATH", path_with_sqlrs())
        .env("SQLRS_HOME", &env.home)
        .env("TERM", "dumb")
        .output()
        .expect("zsh runs: scripts/setup.sh installs it");
    let screen = String::from_utf8_lossy(&out.stdout);
    // The three shells are listed under the line.
    for shell in ["bash", "fish", "zsh"] {
        assert!(screen.contains(shell), "{shell} not offered:\n{screen}");
    }
}

#[test]
fn verbose_json_progress_is_ndjson_with_the_bytes_of_each_copy() {
    let env = Env::new();
    env.write("schema.sql", "create table t (x int);");
    env.write("seed.sql", "insert into t select generate_series(1, 1000);");
    let r = env.ok(&[
        "-v",
        "--json",
        "prepare:psql",
        "--",
        "-f",
        "schema.sql",
        "-f",
        "seed.sql",
    ]);
    // stdout: the one result document.
    let result = r.json();
    assert!(result["dsn"].as_str().is_some(), "{}", r.describe());
    // stderr: one event per line, in order.
    let events: Vec<serde_json::Value> = r
        .stderr
        .lines()
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not an NDJSON event ({e}): {l:?}\n{}", r.describe()))
        })
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().expect("event"))
        .collect();
    assert_eq!(kinds[..2], ["inputs", "plan"], "{kinds:?}");
    assert_eq!(events[0]["uploaded"], 2, "{}", r.describe());
    assert_eq!(kinds.last(), Some(&"done"), "{kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| **k == "step_done").count(),
        2,
        "{kinds:?}"
    );
    // The second step starts on a copy of the first one's snapshot (/tmp is ext4, no reflink):
    // its bytes are reported, rising to the total.
    let transfers: Vec<(u64, u64)> = events
        .iter()
        .filter(|e| e["event"] == "transfer")
        .map(|e| {
            (
                e["done_bytes"].as_u64().expect("done"),
                e["total_bytes"].as_u64().expect("total"),
            )
        })
        .collect();
    assert!(!transfers.is_empty(), "{kinds:?}");
    let (done, total) = *transfers.last().expect("a transfer");
    assert_eq!(done, total, "{transfers:?}");
    assert!(total > 10 << 20, "a data directory is tens of MiB: {total}");
    env.ok(&["shutdown"]);
}
