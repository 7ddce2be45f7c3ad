use super::*;

fn parse_strs(args: &[&str]) -> Result<Parsed, UsageError> {
    parse(args.iter().map(OsString::from))
}

fn ok(args: &[&str]) -> Cli {
    match parse_strs(args) {
        Ok(Parsed::Cli(cli)) => *cli,
        Ok(Parsed::Print(text)) => panic!("{args:?} printed {text}"),
        Err(e) => panic!("{args:?}: {e}"),
    }
}

fn printed(args: &[&str]) -> String {
    match parse_strs(args) {
        Ok(Parsed::Print(text)) => text,
        other => panic!("{args:?}: {other:?}"),
    }
}

fn err(args: &[&str]) -> UsageError {
    match parse_strs(args) {
        Ok(parsed) => panic!("{args:?} parsed as {parsed:?}"),
        Err(e) => e,
    }
}

fn prep(args: &[&str]) -> Prepare {
    match ok(args).command {
        Command::Prepare(p) => p,
        other => panic!("{args:?}: {other:?}"),
    }
}

fn os(args: &[&str]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

fn file(p: &str) -> Input {
    Input::File(p.into())
}

fn cmd(s: &str) -> Input {
    Input::Command(s.into())
}

#[test]
fn the_first_example_is_a_prepare_with_a_psql_run_stage() {
    let cli = ok(&[
        "prepare:psql",
        "--",
        "-f",
        "schema.sql",
        "-f",
        "seed.sql",
        "run:psql",
        "--",
        "-c",
        "select count(*) from film",
    ]);
    assert_eq!(cli.global, Global::default());
    let Command::Prepare(p) = cli.command else {
        panic!("{cli:?}")
    };
    assert_eq!(p.psql().inputs, [file("schema.sql"), file("seed.sql")]);
    assert!(!p.keep);
    assert_eq!(
        p.run,
        Some(Run {
            kind: RunKind::Psql,
            keep: false,
            instance: None,
            args: os(&["-c", "select count(*) from film"]),
        })
    );
}

#[test]
fn plain_run_stage_runs_any_command_with_all_its_arguments() {
    let p = prep(&[
        "prepare:psql",
        "--",
        "-f",
        "schema.sql",
        "run",
        "--",
        "pytest",
        "-q",
        "--",
        "run",
        "-v",
        "--help",
    ]);
    let run = p.run.expect("run stage");
    assert_eq!(run.kind, RunKind::Command);
    assert_eq!(run.args, os(&["pytest", "-q", "--", "run", "-v", "--help"]));
}

#[test]
fn prepare_without_kind_or_run_stage_is_psql_only() {
    let p = prep(&["prepare", "--", "-f", "schema.sql"]);
    assert_eq!(p.psql().inputs, [file("schema.sql")]);
    assert_eq!(p.run, None);
    assert_eq!(
        prep(&["prepare", "--", "-f", "schema.sql"]),
        prep(&["prepare:psql", "--", "-f", "schema.sql"])
    );
}

#[test]
fn every_file_and_command_form_is_one_step_in_order() {
    let p = prep(&[
        "prepare",
        "--",
        "-f",
        "a.sql",
        "-fb.sql",
        "--file",
        "c.sql",
        "--file=d.sql",
        "-c",
        "select 1",
        "-cselect 2",
        "--command",
        "select 3",
        "--command=select 4",
        "-f",
        "e.sql",
    ]);
    assert_eq!(
        p.psql().inputs,
        [
            file("a.sql"),
            file("b.sql"),
            file("c.sql"),
            file("d.sql"),
            cmd("select 1"),
            cmd("select 2"),
            cmd("select 3"),
            cmd("select 4"),
            file("e.sql"),
        ]
    );
    assert!(p.psql().variables.is_empty());
    assert!(!p.psql().single_transaction);
}

#[test]
fn variables_and_single_transaction_apply_to_all_steps() {
    let p = prep(&[
        "prepare",
        "--",
        "-v",
        "a=1",
        "-f",
        "x.sql",
        "-vb=2",
        "--set",
        "c=3",
        "--set=d=4=4",
        "--variable",
        "e=",
        "--variable=a=last",
        "-1",
    ]);
    assert_eq!(p.psql().inputs, [file("x.sql")]);
    let vars: Vec<(&str, &str)> = p
        .psql()
        .variables
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        vars,
        [
            ("a", "last"),
            ("b", "2"),
            ("c", "3"),
            ("d", "4=4"),
            ("e", "")
        ]
    );
    assert!(p.psql().single_transaction);
    assert!(
        prep(&["prepare", "--", "--single-transaction", "-c", "x"])
            .psql()
            .single_transaction
    );
}

#[test]
fn short_options_cluster_like_getopt() {
    let p = prep(&["prepare", "--", "-1f", "x.sql", "-1cselect 1"]);
    assert!(p.psql().single_transaction);
    assert_eq!(p.psql().inputs, [file("x.sql"), cmd("select 1")]);
}

#[test]
fn values_are_values_even_when_they_look_like_a_stage_or_an_option() {
    let p = prep(&[
        "prepare", "--", "-c", "run", "-c", "run:psql", "-f", "--", "-c", "-1", "-v", "x=run",
    ]);
    assert_eq!(
        p.psql().inputs,
        [cmd("run"), cmd("run:psql"), file("--"), cmd("-1")]
    );
    assert!(!p.psql().single_transaction);
    assert_eq!(p.run, None);
}

#[test]
fn keep_is_accepted_on_either_stage() {
    let p = prep(&["prepare", "--keep", "--", "-c", "x", "run", "--", "true"]);
    assert!(p.keep);
    assert!(!p.run.as_ref().expect("run").keep);
    let p = prep(&[
        "prepare",
        "--",
        "-c",
        "x",
        "run:pgbench",
        "--keep",
        "--",
        "-i",
    ]);
    assert!(!p.keep);
    let run = p.run.expect("run");
    assert!(run.keep);
    assert_eq!(run.kind, RunKind::Pgbench);
    assert_eq!(run.args, os(&["-i"]));
}

#[test]
fn run_stage_of_psql_may_have_no_arguments() {
    let p = prep(&["prepare", "--", "-c", "x", "run:psql"]);
    assert_eq!(p.run.expect("run").args, Vec::<OsString>::new());
    let p = prep(&["prepare", "--", "-c", "x", "run:psql", "--"]);
    assert_eq!(p.run.expect("run").args, Vec::<OsString>::new());
}

#[test]
fn global_flags_go_anywhere_in_a_stage_in_either_form() {
    let want = Global {
        home: Some("/h".into()),
        json: true,
        verbose: 1,
        ..Global::default()
    };
    for args in [
        &["--home", "/h", "--json", "-v", "ls"][..],
        &["ls", "--home=/h", "-v", "--json"],
        &["-v", "status", "--home", "/h", "--json"],
        &["--output", "json", "--home", "/h", "-v", "ls"],
        &["ls", "--output=json", "--home=/h", "--verbose"],
        &["prepare", "--json", "--home", "/h", "-v", "--", "-c", "x"],
        // The run stage's globals count too.
        &[
            "prepare",
            "--",
            "-c",
            "x",
            "run",
            "--json",
            "--home=/h",
            "-v",
            "--",
            "true",
        ],
    ] {
        assert_eq!(ok(args).global, want, "{args:?}");
    }
    let cli = ok(&["rm", "--json", "abcdef01", "-v", "--home=/h", "--force"]);
    assert_eq!(cli.global, want);
    assert_eq!(
        cli.command,
        Command::Rm {
            id: "abcdef01".into(),
            force: true
        }
    );
    assert_eq!(ok(&["-vv", "--verbose", "ls"]).global.verbose, 3);
    let remote = ok(&[
        "--server=https://t:7443",
        "ls",
        "--token-file",
        "/t",
        "--ca=/ca.pem",
        "--profile",
        "team",
    ])
    .global;
    assert_eq!(remote.server.as_deref(), Some("https://t:7443"));
    assert_eq!(remote.token_file, Some(PathBuf::from("/t")));
    assert_eq!(remote.ca, Some(PathBuf::from("/ca.pem")));
    assert_eq!(remote.profile.as_deref(), Some("team"));
    assert!(!ok(&["ls", "--output", "text"]).global.json);
}

#[test]
fn the_separator_after_prepare_is_optional() {
    let with = prep(&[
        "prepare:psql",
        "--",
        "-f",
        "a.sql",
        "-c",
        "x",
        "run",
        "--",
        "true",
    ]);
    for args in [
        &[
            "prepare:psql",
            "-f",
            "a.sql",
            "-c",
            "x",
            "run",
            "--",
            "true",
        ][..],
        &["prepare", "--file=a.sql", "-c", "x", "run", "--", "true"],
        &["prepare", "-fa.sql", "-cx", "run", "--", "true"],
    ] {
        assert_eq!(prep(args), with, "{args:?}");
    }
    // -v NAME=VALUE is psql's; a bare -v is sqlrs's verbosity.
    let cli = ok(&["prepare", "-v", "-v", "x=1", "-f", "a.sql"]);
    assert_eq!(cli.global.verbose, 1);
    let Command::Prepare(p) = cli.command else {
        panic!()
    };
    assert_eq!(p.psql().variables.get("x").map(String::as_str), Some("1"));
    assert_eq!(p.psql().inputs, [file("a.sql")]);
    let p = prep(&["prepare", "--keep", "--json", "-1", "-f", "a.sql"]);
    assert!(p.keep && p.psql().single_transaction);
    // stdin is a script too.
    assert_eq!(prep(&["prepare", "-f", "-"]).psql().inputs, [file("-")]);
    let w = ok(&["warmup", "--hot", "prepare:psql", "-f", "a.sql"]);
    let Command::Warmup(w) = w.command else {
        panic!()
    };
    assert!(w.hot);
    assert_eq!(w.psql.expect("psql").inputs, [file("a.sql")]);
}

#[test]
fn psql_v_after_the_separator_is_a_variable_not_verbosity() {
    let cli = ok(&["prepare", "--", "-v", "x=1", "-c", "select :x"]);
    assert_eq!(cli.global.verbose, 0);
    let Command::Prepare(p) = cli.command else {
        panic!()
    };
    assert_eq!(p.psql().variables.get("x").map(String::as_str), Some("1"));
}

#[test]
fn run_with_instance() {
    let cli = ok(&["run:psql", "--instance", "3F2A9C1E", "--", "-c", "select 1"]);
    assert_eq!(
        cli.command,
        Command::Run(Run {
            kind: RunKind::Psql,
            keep: false,
            instance: Some("3f2a9c1e".into()),
            args: os(&["-c", "select 1"]),
        })
    );
    let cli = ok(&["run", "--instance=3f2a9c1e00000001", "--json", "--", "env"]);
    assert!(cli.global.json);
    let Command::Run(run) = cli.command else {
        panic!()
    };
    assert_eq!(run.kind, RunKind::Command);
    assert_eq!(run.instance.as_deref(), Some("3f2a9c1e00000001"));
    assert_eq!(run.args, os(&["env"]));
    let Command::Run(run) = ok(&["run:pgbench", "--instance", "3f2a9c1e"]).command else {
        panic!()
    };
    assert_eq!(run.kind, RunKind::Pgbench);
}

#[test]
fn every_option_takes_its_value_in_both_forms() {
    let pin = |args: &[&str]| match ok(args).command {
        Command::Pin(p) | Command::Unpin(p) => p,
        other => panic!("{other:?}"),
    };
    let want = PinArgs {
        id: "abcdef01".into(),
        reason: Some(taidon_api::PinReason::Pr),
        ref_name: Some("12".into()),
    };
    assert_eq!(
        pin(&["pin", "abcdef01", "--reason", "pr", "--ref", "12"]),
        want
    );
    assert_eq!(pin(&["pin", "abcdef01", "--reason=pr", "--ref=12"]), want);
    assert_eq!(
        pin(&["pin", "--reason=pr", "abcdef01", "--ref", "12"]),
        want
    );
    assert_eq!(pin(&["unpin", "abcdef01", "--reason=pr", "--ref=12"]), want);
    let bare = pin(&["unpin", "ABCDEF01"]);
    assert_eq!((bare.reason, bare.ref_name), (None, None));
    assert_eq!(bare.id, "abcdef01");

    let dsn = Command::Dsn(Dsn {
        target: "abcdef01".into(),
        scope: Some(taidon_core::token::Scope::Ro),
        ttl_s: Some(1800),
        form: DsnForm::User,
    });
    assert_eq!(
        ok(&["dsn", "abcdef01", "--scope", "ro", "--ttl=30m", "--user"]).command,
        dsn
    );
    assert_eq!(
        ok(&["dsn", "--scope=ro", "--ttl", "30m", "--user", "abcdef01"]).command,
        dsn
    );
    let Command::Dsn(d) = ok(&["dsn", "abcdef01", "--plain"]).command else {
        panic!()
    };
    assert_eq!((d.form, d.scope, d.ttl_s), (DsnForm::Plain, None, None));
}

#[test]
fn simple_verbs() {
    assert_eq!(ok(&["ls"]).command, Command::Ls);
    assert_eq!(ok(&["status"]).command, Command::Status);
    assert_eq!(ok(&["shutdown"]).command, Command::Shutdown);
    assert_eq!(ok(&["version"]).command, Command::Version);
    assert_eq!(
        ok(&["rm", "abcdef01"]).command,
        Command::Rm {
            id: "abcdef01".into(),
            force: false
        }
    );
    assert_eq!(
        ok(&["rm", "-f", "abcdef01"]).command,
        Command::Rm {
            id: "abcdef01".into(),
            force: true
        }
    );
    assert_eq!(ok(&["events"]).command, Command::Events { id: None });
    assert_eq!(
        ok(&["events", "abcdef01"]).command,
        Command::Events {
            id: Some("abcdef01".into())
        }
    );
    assert_eq!(
        ok(&["completions", "bash"]).command,
        Command::Completions(Shell::Bash)
    );
    assert_eq!(
        ok(&["__complete", "--", "rm", "--home", "x"]).command,
        Command::Complete(vec!["rm".into(), "--home".into(), "x".into()])
    );
}

#[test]
fn warmup_takes_an_id_or_a_prepare_stage() {
    let w = |args: &[&str]| match ok(args).command {
        Command::Warmup(w) => w,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        w(&["warmup", "--hot", "abcdef01"]),
        Warmup {
            hot: true,
            id: Some("abcdef01".into()),
            psql: None
        }
    );
    let psql = PsqlArgs {
        inputs: vec![file("a.sql")],
        ..PsqlArgs::default()
    };
    for args in [
        &["warmup", "prepare:psql", "--", "-f", "a.sql"][..],
        &["warmup", "prepare", "--", "-f", "a.sql"],
        &["warmup", "--", "-f", "a.sql"],
        &[
            "warmup", "--home", "prepare", "prepare", "--", "-f", "a.sql",
        ],
    ] {
        assert_eq!(
            w(args),
            Warmup {
                hot: false,
                id: None,
                psql: Some(psql.clone())
            },
            "{args:?}"
        );
    }
    assert_eq!(
        ok(&["warmup", "--home", "prepare", "prepare", "--", "-f", "a.sql"])
            .global
            .home,
        Some(PathBuf::from("prepare"))
    );
}

#[test]
fn help_and_version_are_printed_not_run() {
    let top = printed(&["--help"]);
    assert!(
        top.starts_with("The exact PostgreSQL database state"),
        "{top}"
    );
    assert_eq!(printed(&["-h"]), printed(&["help"]));
    assert_eq!(printed(&["--json", "--help", "bogus"]), top);
    assert_eq!(
        printed(&["--version"]),
        format!("sqlrs {}\n", env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(printed(&["-V"]), printed(&["--version"]));
    let prepare = printed(&["prepare:psql", "--help"]);
    assert!(prepare.contains("Usage: sqlrs prepare:psql"), "{prepare}");
    assert_eq!(printed(&["prepare", "--help"]), prepare);
    assert_eq!(printed(&["help", "prepare:psql"]), prepare);
    // Help of the run stage of a composite line.
    let run = printed(&["prepare", "--", "-c", "x", "run:psql", "--help"]);
    assert!(run.contains("Usage: sqlrs run:psql"), "{run}");
    // After `--`, --help belongs to the tool.
    let Command::Run(r) = ok(&["run", "--instance", "3f2a9c1e", "--", "x", "--help"]).command
    else {
        panic!()
    };
    assert_eq!(r.args, os(&["x", "--help"]));
}

/// Every rejected form: its message and its hint (the caller exits 2 for all of them).
#[test]
fn rejected_forms_name_the_cause_and_a_hint() {
    let table: &[(&[&str], &str, &str)] = &[
        (
            &["frobnicate"],
            "unrecognized subcommand 'frobnicate'",
            "see 'sqlrs --help'",
        ),
        (
            &["prepar"],
            "unrecognized subcommand 'prepar'",
            "tip: some similar subcommands exist: 'prepare:psql', 'prepare:cmd', 'prepare:lb', 'prepare'",
        ),
        (
            &["--bogus", "ls"],
            "unexpected argument '--bogus' found",
            "see 'sqlrs ls --help'",
        ),
        (
            &["ls", "extra"],
            "unexpected argument 'extra' found",
            "see 'sqlrs ls --help'",
        ),
        (
            &["status", "-x"],
            "unexpected argument '-x' found",
            "see 'sqlrs status --help'",
        ),
        (
            &["ls:x"],
            "unknown command 'ls:x': ls has no kinds",
            "see 'sqlrs ls --help'",
        ),
        (
            &["prepare:foo", "--", "-c", "x"],
            "unknown prepare kind 'foo' (known kinds: prepare:cmd, prepare:lb, prepare:psql)",
            "see 'sqlrs --help'",
        ),
        (
            &["prepare:liquibase", "--", "update"],
            "unknown prepare kind 'liquibase' (known kinds: prepare:cmd, prepare:lb, prepare:psql)",
            "see 'sqlrs --help'",
        ),
        (
            &["prepare", "--", "-c", "x", "run:foo", "--", "x"],
            "unknown run kind 'foo' (known kinds: run, run:pgbench, run:psql)",
            "see 'sqlrs --help'",
        ),
        (
            &["run:foo", "--instance", "3f2a9c1e", "--", "x"],
            "unknown run kind 'foo' (known kinds: run, run:pgbench, run:psql)",
            "see 'sqlrs --help'",
        ),
        (
            &["prepare"],
            "prepare needs '--' and psql arguments: sqlrs prepare:psql -- -f FILE",
            "see 'sqlrs prepare:psql --help'",
        ),
        (
            &["prepare", "--"],
            "prepare:psql needs at least one step: -f FILE or -c SQL",
            "see 'sqlrs prepare:psql --help'",
        ),
        (
            &["prepare", "--", "-v", "a=1", "-1", "run", "--", "true"],
            "prepare:psql needs at least one step: -f FILE or -c SQL",
            "see 'sqlrs prepare:psql --help'",
        ),
        (
            &["prepare", "--", "-f", ""],
            "prepare:psql: -f needs a file name",
            "see 'sqlrs prepare:psql --help'",
        ),
        (
            &["prepare", "--", "-f"],
            "prepare:psql: option -f needs a value",
            "see 'sqlrs prepare:psql --help'",
        ),
        (
            &["prepare", "--", "-c", "x", "--set"],
            "prepare:psql: option --set needs a value",
            "see 'sqlrs prepare:psql --help'",
        ),
        (
            &["prepare", "--", "-c", "x", "-v", "novalue"],
            "prepare:psql: -v wants NAME=VALUE, got 'novalue'",
            "see 'sqlrs prepare:psql --help'",
        ),
        (
            &["prepare", "--", "-c", "x", "-v", "=1"],
            "prepare:psql: -v wants NAME=VALUE, got '=1'",
            "see 'sqlrs prepare:psql --help'",
        ),
        (
            &["run", "--", "true"],
            "run needs --instance ID, or a prepare stage before it: \
             sqlrs prepare:psql -- -f FILE run -- CMD",
            "see 'sqlrs run --help'",
        ),
        (
            &["run:psql", "--instance", "abc", "--"],
            "invalid value 'abc' for '--instance <INSTANCE>': \"abc\" is not an id: use at \
             least 8 hex digits",
            "see 'sqlrs run:psql --help'",
        ),
        (
            &["run:psql", "--instance"],
            "a value is required for '--instance <INSTANCE>' but none was supplied",
            "see 'sqlrs run:psql --help'",
        ),
        (
            &["run", "--instance", "3f2a9c1e", "--"],
            "run needs a command after '--': run -- CMD ARGS (or run:psql, run:pgbench)",
            "see 'sqlrs run --help'",
        ),
        (
            &["prepare", "--", "-c", "x", "run"],
            "run needs a command after '--': run -- CMD ARGS (or run:psql, run:pgbench)",
            "see 'sqlrs run --help'",
        ),
        (
            &[
                "prepare",
                "--",
                "-c",
                "x",
                "run",
                "--instance",
                "3f2a9c1e",
                "--",
                "x",
            ],
            "run does not take '--instance' after prepare: it uses the instance the prepare made",
            "see 'sqlrs run --help'",
        ),
        (
            &["run:psql", "--instance", "3f2a9c1e", "--keep", "--"],
            "run does not take '--keep' without a prepare stage: run --instance never removes \
             the instance",
            "see 'sqlrs run:psql --help'",
        ),
        (
            &["run:psql", "--instance", "3f2a9c1e", "-c", "select 1"],
            "unexpected argument '-c' found",
            "tip: to pass '-c' as a value, use '-- -c'",
        ),
        (
            &["rm"],
            "the following required arguments were not provided: <ID>",
            "see 'sqlrs rm --help'",
        ),
        (
            &["rm", "a", "b"],
            "unexpected argument 'b' found",
            "see 'sqlrs rm --help'",
        ),
        (
            &["rm", "abcdef01", "abcdef02"],
            "unexpected argument 'abcdef02' found",
            "see 'sqlrs rm --help'",
        ),
        (
            &["rm", "--all"],
            "unexpected argument '--all' found",
            "tip: to pass '--all' as a value, use '-- --all'",
        ),
        (
            &["dsn"],
            "the following required arguments were not provided: <ID>",
            "see 'sqlrs dsn --help'",
        ),
        (
            &["dsn", "abcdef01", "--scope", "admin"],
            "invalid value 'admin' for '--scope <SCOPE>' [possible values: ro, rw]",
            "see 'sqlrs dsn --help'",
        ),
        (
            &["dsn", "abcdef01", "--ttl", "5x"],
            "invalid value '5x' for '--ttl <DURATION>': use a duration such as 45s, 30m, 2h \
             or 7d",
            "see 'sqlrs dsn --help'",
        ),
        (
            &["dsn", "abcdef01", "--plain", "--user"],
            "the argument '--plain' cannot be used with '--user'",
            "see 'sqlrs dsn --help'",
        ),
        (
            &["pin", "abcdef01"],
            "the following required arguments were not provided: --reason <REASON>",
            "see 'sqlrs pin --help'",
        ),
        (
            &["pin", "abcdef01", "--reason=forever"],
            "invalid value 'forever' for '--reason <REASON>' [possible values: main, tag, pr, \
             manual]",
            "see 'sqlrs pin --help'",
        ),
        (
            &["warmup"],
            "warmup needs a state id, or prepare:psql -- <psql args> (not both)",
            "see 'sqlrs warmup --help'",
        ),
        (
            &["warmup", "abcdef01", "prepare:psql", "--", "-c", "x"],
            "warmup needs a state id, or prepare:psql -- <psql args> (not both)",
            "see 'sqlrs warmup --help'",
        ),
        (
            &[
                "warmup",
                "prepare:psql",
                "--",
                "-c",
                "x",
                "run",
                "--",
                "true",
            ],
            "warmup takes no run stage, got 'run'",
            "see 'sqlrs warmup --help'",
        ),
        (
            &["warmup", "prepare:psql", "--hot"],
            "warmup prepare:psql needs psql arguments: -f FILE or -c SQL",
            "see 'sqlrs warmup --help'",
        ),
        (
            &["prepare", "--kep", "--", "-c", "x"],
            "unexpected argument '--kep' found",
            "tip: a similar argument exists: '--keep'",
        ),
        (
            &["warmup", "prepare:foo", "--", "-c", "x"],
            "unknown prepare kind 'foo' (known kinds: prepare:cmd, prepare:lb, prepare:psql)",
            "see 'sqlrs --help'",
        ),
        (
            &["--home"],
            "a value is required for '--home <DIR>' but none was supplied",
            "see 'sqlrs --help'",
        ),
        (
            &["--home=", "ls"],
            "invalid value '' for '--home <DIR>': a directory is needed",
            "see 'sqlrs ls --help'",
        ),
        (
            &["ls", "--output", "yaml"],
            "invalid value 'yaml' for '--output <FORMAT>' [possible values: text, json]",
            "see 'sqlrs ls --help'",
        ),
        (
            &["completions", "powershell"],
            "invalid value 'powershell' for '<SHELL>' [possible values: bash, zsh, fish]",
            "see 'sqlrs completions --help'",
        ),
    ];
    let mut wrong = Vec::new();
    for (args, message, hint) in table {
        let e = err(args);
        if (e.message.as_str(), e.hint.as_str()) != (*message, *hint) {
            wrong.push(format!("{args:?}: {:?} / {:?}", e.message, e.hint));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn other_psql_arguments_are_refused_because_they_are_not_identity() {
    for bad in [
        "-X",
        "-d",
        "mydb",
        "--echo-all",
        "-1X",
        "--single-transaction=on",
        "--",
        "--fil",
    ] {
        let e = err(&["prepare", "--", "-f", "a.sql", bad]);
        assert_eq!(
            e.message,
            format!(
                "prepare:psql does not take '{bad}' (it would not be part of the state's identity)"
            )
        );
    }
}

#[test]
fn no_command_shows_the_whole_help() {
    for args in [&[][..], &["--json"], &["-v", "--home", "/h"]] {
        let e = err(args);
        assert_eq!(e.message, "no command given", "{args:?}");
        assert!(
            e.hint.contains("Usage: sqlrs [OPTIONS] <COMMAND>"),
            "{}",
            e.hint
        );
    }
}

#[test]
fn non_utf8_run_arguments_pass_through_but_psql_arguments_must_be_text() {
    use std::os::unix::ffi::OsStringExt;
    let raw = OsString::from_vec(vec![0x66, 0xff]);
    let args = vec![
        OsString::from("run"),
        OsString::from("--instance"),
        OsString::from("3f2a9c1e"),
        OsString::from("--"),
        OsString::from("cat"),
        raw.clone(),
    ];
    let Ok(Parsed::Cli(cli)) = parse(args) else {
        panic!()
    };
    let Command::Run(run) = cli.command else {
        panic!()
    };
    assert_eq!(run.args[1], raw);
    let args = vec![
        OsString::from("prepare"),
        OsString::from("--"),
        OsString::from("-f"),
        raw.clone(),
    ];
    let e = parse(args).expect_err("not utf-8");
    assert!(e.message.contains("not valid UTF-8"), "{e}");
    // A run stage after psql arguments still passes raw bytes through.
    let args = vec![
        OsString::from("prepare"),
        OsString::from("--"),
        OsString::from("-c"),
        OsString::from("x"),
        OsString::from("run"),
        OsString::from("--"),
        OsString::from("cat"),
        raw.clone(),
    ];
    let Ok(Parsed::Cli(cli)) = parse(args) else {
        panic!()
    };
    let Command::Prepare(p) = cli.command else {
        panic!()
    };
    assert_eq!(p.run.expect("run").args[1], raw);
}

#[test]
fn liquibase_arguments_keep_their_order_and_refuse_another_database() {
    let p = prep(&[
        "prepare:lb",
        "--engine",
        "16",
        "--pg-setting",
        "max_prepared_transactions=10",
        "--",
        "update",
        "--changelog-file",
        "db/changelog.xml",
        "--contexts=test",
        "-Dschema=app",
        "run:psql",
        "--",
        "-c",
        "select 1",
    ]);
    assert_eq!(p.engine.version.as_deref(), Some("16"));
    assert_eq!(
        p.engine
            .settings
            .get("max_prepared_transactions")
            .map(String::as_str),
        Some("10")
    );
    let PrepareWhat::Liquibase(lb) = &p.what else {
        panic!("{p:?}")
    };
    assert_eq!(lb.changelog, "db/changelog.xml");
    assert_eq!(lb.args, ["--contexts=test", "-Dschema=app"]);
    assert!(p.run.is_some());
    assert_eq!(
        prep(&["prepare:lb", "--", "update", "--changelog-file=c.yaml"]).what,
        PrepareWhat::Liquibase(LbArgs {
            changelog: "c.yaml".into(),
            args: vec![]
        })
    );
    for bad in [
        &["prepare:lb", "--", "rollback", "--changelog-file", "c.xml"][..],
        &["prepare:lb", "--", "update"],
        &[
            "prepare:lb",
            "--",
            "update",
            "--changelog-file",
            "c.xml",
            "--url=jdbc:x",
        ],
        &[
            "prepare:lb",
            "--",
            "update",
            "--changelog-file",
            "c.xml",
            "--password",
            "p",
        ],
        &[
            "prepare:lb",
            "--engine",
            "x16",
            "--",
            "update",
            "--changelog-file",
            "c.xml",
        ],
        &[
            "prepare:lb",
            "--pg-setting",
            "fsync=off",
            "--",
            "update",
            "--changelog-file",
            "c.xml",
        ],
    ] {
        let e = err(bad);
        assert!(e.hint.contains("prepare:lb"), "{bad:?}: {e:?}");
    }
}

#[test]
fn a_command_keeps_its_own_run_word_and_a_recipe_is_a_word_after_prepare() {
    let p = prep(&[
        "prepare:cmd",
        "--input",
        "db",
        "--input",
        "package.json",
        "--",
        "npm",
        "run",
        "migrate",
        "run",
        "--",
        "pytest",
    ]);
    let PrepareWhat::Command(c) = &p.what else {
        panic!("{p:?}")
    };
    assert_eq!(c.inputs, ["db", "package.json"]);
    assert_eq!(c.argv, ["npm", "run", "migrate"]);
    assert_eq!(
        p.run.as_ref().map(|r| r.args.clone()),
        Some(os(&["pytest"]))
    );
    assert!(err(&["prepare:cmd", "--input", "db"])
        .message
        .contains("needs '--'"));

    let p = prep(&["prepare", "--engine", "16", "dev", "run", "--", "pytest"]);
    assert_eq!(p.what, PrepareWhat::Recipe("dev".into()));
    assert_eq!(p.engine.version.as_deref(), Some("16"));
    assert!(p.run.is_some());
    assert_eq!(
        prep(&["prepare", "dev"]).what,
        PrepareWhat::Recipe("dev".into())
    );
    assert!(err(&["prepare", "dev", "extra"])
        .message
        .contains("takes no more arguments"));
    // psql arguments still mean psql.
    assert!(matches!(
        prep(&["prepare", "-c", "x"]).what,
        PrepareWhat::Psql(_)
    ));

    assert!(matches!(
        recipe_what(
            "cmd",
            &["--input".into(), "db".into(), "--".into(), "dbmate".into()]
        ),
        Ok(PrepareWhat::Command(CmdArgs { .. }))
    ));
    assert!(recipe_what("cmd", &["dbmate".into()]).is_err());
    assert!(recipe_what("flyway", &[]).is_err());
}
