//! The command line, parsed into plain values. argv is split at its stage boundaries (a
//! prepare stage, its psql arguments, a run stage), clap parses each stage against the tree in
//! `cli`, and the psql arguments, which follow psql's own grammar, are read here. Nothing here
//! touches the environment: files are read, homes found and daemons started only after parsing
//! succeeded.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{ColorChoice, CommandFactory, FromArgMatches};

use crate::cli::{self, OutputFormat, Sqlrs, Verb};

pub(crate) use crate::cli::Shell;

/// Flags that apply to every command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Global {
    pub(crate) home: Option<PathBuf>,
    pub(crate) json: bool,
    pub(crate) verbose: u8,
    pub(crate) server: Option<String>,
    pub(crate) token_file: Option<PathBuf>,
    pub(crate) ca: Option<PathBuf>,
    pub(crate) profile: Option<String>,
}

impl Global {
    fn merge(&mut self, flags: cli::GlobalFlags) {
        if flags.home.is_some() {
            self.home = flags.home;
        }
        self.json |= flags.json || flags.output == Some(OutputFormat::Json);
        self.verbose = self.verbose.saturating_add(flags.verbose);
        self.server = flags.server.or(self.server.take());
        self.token_file = flags.token_file.or(self.token_file.take());
        self.ca = flags.ca.or(self.ca.take());
        self.profile = flags.profile.or(self.profile.take());
    }
}

/// A whole parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cli {
    pub(crate) global: Global,
    pub(crate) command: Command,
}

/// What a command line asks for: a command to run, or text to print and exit 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Parsed {
    Cli(Box<Cli>),
    /// `--help`, `help`, `--version`.
    Print(String),
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    Prepare(Prepare),
    /// `plan[:KIND] ...` (explain: false) or `cache explain prepare[:KIND] ...`.
    Plan {
        prepare: Prepare,
        explain: bool,
    },
    Run(Run),
    Ls,
    Rm {
        id: String,
        force: bool,
    },
    /// `push ID`.
    Push {
        id: String,
    },
    Dsn(Dsn),
    Status,
    /// `fsck [--repair]`.
    Fsck {
        repair: bool,
    },
    Shutdown,
    Version,
    /// `pin ID --reason R [--ref NAME]`.
    Pin(PinArgs),
    /// `unpin ID [--reason R] [--ref NAME]`.
    Unpin(PinArgs),
    /// `warmup [--hot] (ID | prepare[:psql] -- <psql args>)`.
    Warmup(Warmup),
    /// `events [ID]`.
    Events {
        id: Option<String>,
    },
    /// `lease RECIPE|ID [--ttl D] [--isolation I] [--wait D]`.
    Lease(LeaseArgs),
    /// `release LEASE`.
    Release {
        lease: String,
    },
    /// `leases`.
    Leases,
    /// `completions SHELL`.
    Completions(Shell),
    /// `__complete WORDS...`: what the completion scripts ask.
    Complete(Vec<String>),
}

/// The arguments of `pin` and `unpin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PinArgs {
    pub(crate) id: String,
    pub(crate) reason: Option<taidon_api::PinReason>,
    pub(crate) ref_name: Option<String>,
}

/// `lease`: what to copy and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaseArgs {
    /// A recipe of sqlrs.toml, or a state id or prefix.
    pub(crate) what: String,
    pub(crate) ttl_s: Option<u64>,
    pub(crate) isolation: taidon_api::Isolation,
    pub(crate) wait_s: Option<u64>,
}

/// `warmup`: a known state by id, or the state a prepare stage names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Warmup {
    pub(crate) hot: bool,
    pub(crate) id: Option<String>,
    pub(crate) psql: Option<PsqlArgs>,
}

/// `dsn <state-or-instance> [--scope ro|rw] [--ttl 30m] [--plain|--user]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Dsn {
    pub(crate) target: String,
    pub(crate) scope: Option<taidon_core::token::Scope>,
    pub(crate) ttl_s: Option<u64>,
    pub(crate) form: DsnForm,
}

/// Which DSN `sqlrs dsn` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DsnForm {
    /// Token as the password, TLS verified when the gateway speaks it.
    Password,
    /// Token as the password, `sslmode=disable`.
    Plain,
    /// Token as the user name.
    User,
}

/// `prepare[:KIND] [--keep] [--engine V] [--pg-setting N=V] -- <tool args> [run ...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Prepare {
    pub(crate) keep: bool,
    pub(crate) engine: EngineArgs,
    pub(crate) what: PrepareWhat,
    pub(crate) run: Option<Run>,
}

#[cfg(test)]
impl Prepare {
    /// The psql arguments of a `prepare:psql`.
    pub(crate) fn psql(&self) -> &PsqlArgs {
        match &self.what {
            PrepareWhat::Psql(p) => p,
            other => panic!("not a psql prepare: {other:?}"),
        }
    }
}

/// What a prepare builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PrepareWhat {
    Psql(PsqlArgs),
    Liquibase(LbArgs),
    Command(CmdArgs),
    /// A recipe of sqlrs.toml, by name: read once the file is found.
    Recipe(String),
}

/// `prepare:cmd --input PATH... -- COMMAND ARGS`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CmdArgs {
    pub(crate) inputs: Vec<String>,
    pub(crate) argv: Vec<String>,
}

/// What a recipe's `prepare = [KIND, ARGS...]` asks, parsed as the same words on the command
/// line would be.
pub(crate) fn recipe_what(kind: &str, args: &[String]) -> Result<PrepareWhat, UsageError> {
    let os: Vec<OsString> = args.iter().map(OsString::from).collect();
    match kind {
        "psql" => Ok(PrepareWhat::Psql(psql_all(&os, PREPARE)?)),
        "lb" => Ok(PrepareWhat::Liquibase(lb_args(&os)?)),
        "cmd" => {
            let mut inputs = Vec::new();
            let mut it = args.iter();
            let mut argv = Vec::new();
            while let Some(word) = it.next() {
                if word == "--" {
                    argv = it.by_ref().cloned().collect();
                    break;
                }
                match word.strip_prefix("--input") {
                    Some("") => inputs.push(
                        it.next()
                            .cloned()
                            .ok_or_else(|| UsageError::new(PREPARE_CMD, "--input needs a path"))?,
                    ),
                    Some(v) if v.starts_with('=') => inputs.push(v[1..].to_owned()),
                    _ => {
                        return Err(UsageError::new(
                            PREPARE_CMD,
                            format!(
                                "a cmd recipe takes --input PATH ... -- COMMAND ARGS, got '{word}'"
                            ),
                        ))
                    }
                }
            }
            if argv.is_empty() {
                return Err(UsageError::new(
                    PREPARE_CMD,
                    "a cmd recipe needs '--' and a command: [\"cmd\", \"--input\", \"db\", \"--\", \"dbmate\", \"up\"]",
                ));
            }
            Ok(PrepareWhat::Command(CmdArgs { inputs, argv }))
        }
        other => Err(UsageError::new(
            "prepare",
            format!("unknown prepare kind '{other}' (psql, lb or cmd)"),
        )),
    }
}

/// `--engine` and `--pg-setting`, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct EngineArgs {
    pub(crate) version: Option<String>,
    pub(crate) settings: BTreeMap<String, String>,
}

/// `prepare:lb -- update --changelog-file FILE [args]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LbArgs {
    pub(crate) changelog: String,
    /// Everything else, in order, for Liquibase.
    pub(crate) args: Vec<String>,
}

/// The psql arguments of a prepare, before any file is read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PsqlArgs {
    pub(crate) inputs: Vec<Input>,
    pub(crate) variables: BTreeMap<String, String>,
    pub(crate) single_transaction: bool,
}

/// One step's input, as typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Input {
    File(String),
    Command(String),
}

/// What a run stage starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RunKind {
    /// `run:psql`: `psql <args>`.
    Psql,
    /// `run:pgbench`: `pgbench <args>`.
    Pgbench,
    /// `run`: `<args>` is the command.
    Command,
}

/// `run[:KIND] [--keep] [--instance ID] -- <args>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Run {
    pub(crate) kind: RunKind,
    pub(crate) keep: bool,
    /// The instance to run against; `None` after a prepare stage.
    pub(crate) instance: Option<String>,
    pub(crate) args: Vec<OsString>,
}

/// A command line that cannot be obeyed (exit 2): one line, and a hint under it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub(crate) struct UsageError {
    pub(crate) message: String,
    /// Where to look next: a tip, or the help command of the verb at fault.
    pub(crate) hint: String,
}

impl UsageError {
    fn new(verb: &str, message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            hint: help_hint(verb),
        }
    }
}

fn help_hint(verb: &str) -> String {
    if verb.is_empty() {
        "see 'sqlrs --help'".to_owned()
    } else {
        format!("see 'sqlrs {verb} --help'")
    }
}

const PREPARE: &str = "prepare:psql";
const PREPARE_LB: &str = "prepare:lb";
const PREPARE_CMD: &str = "prepare:cmd";

/// Parses the arguments after the program name.
pub(crate) fn parse<I>(args: I) -> Result<Parsed, UsageError>
where
    I: IntoIterator<Item = OsString>,
{
    let args: Vec<OsString> = args.into_iter().collect();
    if let Some(planned) = plan_form(&args)? {
        return Ok(planned);
    }
    let stages = split(&args)?;
    let first = match clap_parse(stages.first, &stages.verb)? {
        Ok(parsed) => parsed,
        Err(print) => return Ok(Parsed::Print(print)),
    };
    let mut global = Global::default();
    global.merge(first.global);
    // Only a prepare has a run stage after it (`split` finds one nowhere else).
    let run = match stages.run {
        None => None,
        Some(run) => {
            let run = match clap_parse(run, &stages.run_verb)? {
                Ok(parsed) => parsed,
                Err(print) => return Ok(Parsed::Print(print)),
            };
            global.merge(run.global);
            Some(run_stage(run.verb, true)?)
        }
    };
    let command = match first.verb {
        Verb::PreparePsql(a) if a.recipe.is_some() => Command::Prepare(Prepare {
            keep: a.keep,
            engine: engine_args(a.engine, "prepare")?,
            what: PrepareWhat::Recipe(a.recipe.unwrap_or_default()),
            run,
        }),
        Verb::PreparePsql(a) => {
            if !stages.separator {
                return Err(UsageError::new(
                    PREPARE,
                    "prepare needs '--' and psql arguments: sqlrs prepare:psql -- -f FILE",
                ));
            }
            let psql = psql_all(&a.psql, PREPARE)?;
            Command::Prepare(Prepare {
                keep: a.keep,
                engine: engine_args(a.engine, PREPARE)?,
                what: PrepareWhat::Psql(psql),
                run,
            })
        }
        Verb::PrepareLb(a) => {
            if !stages.separator {
                return Err(UsageError::new(
                    PREPARE_LB,
                    "prepare:lb needs '--' and Liquibase arguments: sqlrs prepare:lb -- update --changelog-file FILE",
                ));
            }
            let lb = lb_args(&a.lb)?;
            Command::Prepare(Prepare {
                keep: a.keep,
                engine: engine_args(a.engine, PREPARE_LB)?,
                what: PrepareWhat::Liquibase(lb),
                run,
            })
        }
        Verb::PrepareCmd(a) => {
            if !stages.separator || a.command.is_empty() {
                return Err(UsageError::new(
                    PREPARE_CMD,
                    "prepare:cmd needs '--' and a command: sqlrs prepare:cmd --input DIR -- COMMAND ARGS",
                ));
            }
            let mut argv = Vec::with_capacity(a.command.len());
            for word in &a.command {
                argv.push(
                    word.to_str()
                        .ok_or_else(|| {
                            UsageError::new(
                                PREPARE_CMD,
                                format!("prepare:cmd: argument is not valid UTF-8: {word:?}"),
                            )
                        })?
                        .to_owned(),
                );
            }
            Command::Prepare(Prepare {
                keep: a.keep,
                engine: engine_args(a.engine, PREPARE_CMD)?,
                what: PrepareWhat::Command(CmdArgs {
                    inputs: a.inputs,
                    argv,
                }),
                run,
            })
        }
        v @ (Verb::Run(_) | Verb::RunPsql(_) | Verb::RunPgbench(_)) => {
            Command::Run(run_stage(v, false)?)
        }
        Verb::Ls => Command::Ls,
        Verb::Status => Command::Status,
        Verb::Shutdown => Command::Shutdown,
        Verb::Version => Command::Version,
        Verb::Rm(a) => Command::Rm {
            id: a.id,
            force: a.force,
        },
        Verb::Push(a) => Command::Push { id: a.id },
        Verb::Dsn(a) => Command::Dsn(Dsn {
            target: a.target,
            scope: a.scope,
            ttl_s: a.ttl,
            form: if a.plain {
                DsnForm::Plain
            } else if a.user {
                DsnForm::User
            } else {
                DsnForm::Password
            },
        }),
        Verb::Pin(a) => Command::Pin(PinArgs {
            id: a.id,
            reason: Some(a.reason),
            ref_name: a.ref_name,
        }),
        Verb::Unpin(a) => Command::Unpin(PinArgs {
            id: a.id,
            reason: a.reason,
            ref_name: a.ref_name,
        }),
        Verb::Warmup(a) => Command::Warmup(warmup(a, stages.separator)?),
        Verb::Events(a) => Command::Events { id: a.id },
        Verb::Lease(a) => Command::Lease(LeaseArgs {
            what: a.what,
            ttl_s: a.ttl,
            isolation: a.isolation.unwrap_or_default(),
            wait_s: a.wait,
        }),
        Verb::Release(a) => Command::Release { lease: a.lease },
        Verb::Leases => Command::Leases,
        Verb::Fsck(a) => Command::Fsck { repair: a.repair },
        // Reached only for their help: plan_form parses them.
        Verb::Plan { .. } | Verb::Cache { .. } => {
            return Err(UsageError::new(
                "",
                "plan and cache take a prepare's arguments",
            ))
        }
        Verb::Completions { shell } => Command::Completions(shell),
        Verb::Complete { words } => Command::Complete(words),
    };
    Ok(Parsed::Cli(Box::new(Cli { global, command })))
}

/// `plan[:KIND] ARGS` and `cache explain prepare[:KIND] ARGS`: the prepare they name, parsed
/// as a prepare is (`None`: neither form).
fn plan_form(args: &[OsString]) -> Result<Option<Parsed>, UsageError> {
    let globals = value_flags(&command());
    let Some(v) = next_positional(args, 0, &globals) else {
        return Ok(None);
    };
    let word = args[v].to_str().unwrap_or_default();
    let help = |a: &OsString| a == "--help" || a == "-h";
    let (explain, at, prepare_word) = if word == "plan" || word.starts_with("plan:") {
        if args[v + 1..].iter().any(help) && word == "plan" {
            return Ok(None);
        }
        (false, v, word.replacen("plan", "prepare", 1))
    } else if word == "cache" {
        let Some(e) = next_positional(args, v + 1, &globals) else {
            return Ok(None);
        };
        if args[e] != "explain" {
            return Err(UsageError::new(
                "cache",
                format!(
                    "unknown cache command '{}' (known: explain)",
                    args[e].to_string_lossy()
                ),
            ));
        }
        let Some(p) = next_positional(args, e + 1, &globals) else {
            if args[e + 1..].iter().any(help) {
                return Ok(None);
            }
            return Err(UsageError::new(
                "cache",
                "cache explain needs a prepare: sqlrs cache explain prepare:psql -- -f FILE",
            ));
        };
        let w = args[p].to_str().unwrap_or_default();
        if !is_prepare(w) {
            return Err(UsageError::new(
                "cache",
                format!("cache explain takes a prepare (prepare[:KIND] ...), not '{w}'"),
            ));
        }
        let mut rest: Vec<OsString> = args[..v].to_vec();
        rest.extend_from_slice(&args[v + 1..e]);
        rest.extend_from_slice(&args[p..]);
        let at = rest.len() - (args.len() - p);
        return wrap_plan(rest, at, w.to_owned(), true);
    } else {
        return Ok(None);
    };
    wrap_plan(args.to_vec(), at, prepare_word, explain)
}

/// Parses `args` with the prepare word at `at` (as `prepare_word`) and wraps it as a plan.
fn wrap_plan(
    mut args: Vec<OsString>,
    at: usize,
    prepare_word: String,
    explain: bool,
) -> Result<Option<Parsed>, UsageError> {
    args[at] = OsString::from(&prepare_word);
    match parse(args)? {
        Parsed::Print(text) => Ok(Some(Parsed::Print(text))),
        Parsed::Cli(cli) => {
            let Cli { global, command } = *cli;
            let Command::Prepare(prepare) = command else {
                return Err(UsageError::new("", "plan takes a prepare's arguments"));
            };
            if prepare.run.is_some() {
                return Err(UsageError::new(
                    "plan",
                    "plan builds nothing and runs nothing: drop the run stage",
                ));
            }
            Ok(Some(Parsed::Cli(Box::new(Cli {
                global,
                command: Command::Plan { prepare, explain },
            }))))
        }
    }
}

/// The clap tree, uncoloured so that errors and help read the same everywhere.
pub(crate) fn command() -> clap::Command {
    Sqlrs::command().color(ColorChoice::Never)
}

/// One stage through clap: its values, or the text of `--help`/`--version` (`Err`).
fn clap_parse(args: Vec<OsString>, verb: &str) -> Result<Result<Sqlrs, String>, UsageError> {
    let argv = std::iter::once(OsString::from("sqlrs")).chain(args);
    let parsed = command()
        .try_get_matches_from(argv)
        .and_then(|m| Sqlrs::from_arg_matches(&m));
    match parsed {
        Ok(sqlrs) => Ok(Ok(sqlrs)),
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => Ok(Err(e.render().to_string())),
            _ => Err(from_clap(&e, verb)),
        },
    }
}

/// clap's error, as one line and a hint; `verb` is the stage's verb as typed, if known.
fn from_clap(e: &clap::Error, verb: &str) -> UsageError {
    let text = e.render().to_string();
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand
    ) && verb.is_empty()
    {
        return UsageError {
            message: "no command given".to_owned(),
            hint: command().render_help().to_string().trim_end().to_owned(),
        };
    }
    // The message runs up to the first blank line; its indented lines continue it
    // ("  <ID>", "  [possible values: ro, rw]").
    let mut lines = text.lines();
    let mut message = lines
        .by_ref()
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect::<Vec<_>>()
        .join(" ");
    if let Some(rest) = message.strip_prefix("error: ") {
        message = rest.to_owned();
    }
    let tip = lines
        .map(str::trim)
        .find_map(|l| l.strip_prefix("tip: "))
        .map(|t| format!("tip: {t}"));
    let verb = cli_verb(verb).unwrap_or_default();
    UsageError {
        message,
        hint: tip.unwrap_or_else(|| help_hint(&verb)),
    }
}

/// The name `--help` knows a typed verb by, if it is one.
fn cli_verb(typed: &str) -> Option<String> {
    command()
        .find_subcommand(typed)
        .map(|c| c.get_name().to_owned())
}

/// argv cut at its stage boundaries.
#[derive(Debug, Default, PartialEq, Eq)]
struct Stages {
    /// What clap parses first: globals, the verb, its flags, and its tool arguments.
    first: Vec<OsString>,
    /// Whether the first stage had `--` (a prepare needs one).
    separator: bool,
    /// A run stage after a prepare: `run[:KIND] ...`.
    run: Option<Vec<OsString>>,
    /// The verbs of the stages, as typed.
    verb: String,
    run_verb: String,
}

/// Flags of `cmd` (globals included) that take a value, so that the value is not taken for a
/// verb or a stage: `--home`, `--output`, ...
fn value_flags(cmd: &clap::Command) -> Vec<String> {
    let mut out = Vec::new();
    for arg in cmd.get_arguments() {
        if arg.is_positional() || !arg.get_action().takes_values() {
            continue;
        }
        if let Some(long) = arg.get_long() {
            out.push(format!("--{long}"));
        }
        if let Some(short) = arg.get_short() {
            out.push(format!("-{short}"));
        }
    }
    out
}

/// The index of the first positional argument at or after `from`, or of `--`, skipping flags
/// and the values of those in `takes`.
fn next_positional(args: &[OsString], from: usize, takes: &[String]) -> Option<usize> {
    let mut i = from;
    while let Some(arg) = args.get(i) {
        let Some(s) = arg.to_str() else {
            return Some(i);
        };
        if s == "--" || !s.starts_with('-') || s == "-" {
            return Some(i);
        }
        i += if takes.iter().any(|t| t == s) { 2 } else { 1 };
    }
    None
}

/// Refuses `verb:kind` where `verb` exists but `kind` is not one of its kinds, naming the
/// kinds there are; an unknown verb is left to clap, which suggests a near one.
fn check_kind(word: &str, cmd: &clap::Command) -> Result<(), UsageError> {
    let Some((name, kind)) = word.split_once(':') else {
        return Ok(());
    };
    let names: Vec<&str> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .flat_map(|s| std::iter::once(s.get_name()).chain(s.get_visible_aliases()))
        .collect();
    if names.contains(&word) {
        return Ok(());
    }
    let mut kinds: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| n.split_once(':').is_some_and(|(v, _)| v == name))
        .collect();
    if kinds.is_empty() {
        if names.contains(&name) {
            return Err(UsageError::new(
                name,
                format!("unknown command '{word}': {name} has no kinds"),
            ));
        }
        return Ok(());
    }
    kinds.sort_unstable();
    if names.contains(&name)
        && !kinds
            .iter()
            .any(|k| command_of(cmd, k) == command_of(cmd, name))
    {
        kinds.insert(0, name);
    }
    Err(UsageError::new(
        "",
        format!(
            "unknown {name} kind '{kind}' (known kinds: {})",
            kinds.join(", ")
        ),
    ))
}

fn command_of<'a>(cmd: &'a clap::Command, name: &str) -> Option<&'a str> {
    cmd.find_subcommand(name).map(clap::Command::get_name)
}

/// Whether `args[i]` is a psql argument, where a prepare's own flags could also be: `-f`,
/// `-c`, `-1` (also clustered), their long forms, `--set`, `--variable`, and `-v` with a
/// `NAME=VALUE` (a bare `-v` is sqlrs's own verbosity).
fn starts_psql(args: &[OsString], i: usize) -> bool {
    let Some(arg) = args.get(i).and_then(|a| a.to_str()) else {
        return false;
    };
    let long = [
        "--file",
        "--command",
        "--set",
        "--variable",
        "--single-transaction",
    ];
    if long
        .iter()
        .any(|l| arg == *l || arg.strip_prefix(l).is_some_and(|r| r.starts_with('=')))
    {
        return true;
    }
    if arg.starts_with("-f") || arg.starts_with("-c") || arg.starts_with("-1") {
        return true;
    }
    if arg == "-v" {
        return args
            .get(i + 1)
            .and_then(|a| a.to_str())
            .is_some_and(|a| a.contains('='));
    }
    arg.starts_with("-v") && arg.contains('=')
}

fn is_prepare(word: &str) -> bool {
    word == "prepare" || word.starts_with("prepare:")
}

/// Whether `word` starts the run stage of a composite command.
fn is_run_stage(word: &str) -> bool {
    word == "run" || word.starts_with("run:")
}

/// Cuts argv into the stages clap parses one by one.
fn split(args: &[OsString]) -> Result<Stages, UsageError> {
    let cmd = command();
    let globals = value_flags(&cmd);
    let Some(v) = next_positional(args, 0, &globals) else {
        return Ok(Stages {
            first: args.to_vec(),
            ..Stages::default()
        });
    };
    let verb = args[v].to_str().unwrap_or_default();
    check_kind(verb, &cmd)?;
    let Some(sub) = cmd.find_subcommand(verb) else {
        return Ok(Stages {
            first: args.to_vec(),
            verb: verb.to_owned(),
            ..Stages::default()
        });
    };
    let mut takes = value_flags(sub);
    takes.extend(globals);
    let mut stages = Stages {
        verb: verb.to_owned(),
        ..Stages::default()
    };
    if verb == "prepare" {
        // `prepare RECIPE [run ...]`: a word where psql arguments would start names a recipe.
        let mut at = v + 1;
        let mut recipe = None;
        while let Some(arg) = args.get(at).and_then(|a| a.to_str()) {
            if arg == "--" || starts_psql(args, at) {
                break;
            }
            if arg.starts_with('-') {
                at += if takes.iter().any(|t| t == arg) { 2 } else { 1 };
                continue;
            }
            recipe = Some(at);
            break;
        }
        if let Some(r) = recipe {
            let word = args[r].to_str().unwrap_or_default();
            if !is_run_stage(word) {
                stages.first = args[..=r].to_vec();
                if r + 1 < args.len() {
                    let next = args[r + 1].to_str().unwrap_or_default();
                    if !is_run_stage(next) {
                        return Err(UsageError::new(
                            "prepare",
                            format!("prepare {word} takes no more arguments, got '{next}' (a run stage starts with run or run:KIND)"),
                        ));
                    }
                    check_kind(next, &cmd)?;
                    stages.run_verb = next.to_owned();
                    stages.run = Some(args[r + 1..].to_vec());
                }
                return Ok(stages);
            }
        }
    }
    if is_prepare(verb) {
        // The verb's own flags end at `--` (or at the first psql argument: `--` is optional);
        // the psql arguments end at a run stage.
        let mut args = args.to_vec();
        let mut i = v + 1;
        let sep = loop {
            let Some(arg) = args.get(i) else {
                break None;
            };
            if arg == "--" {
                break Some(i);
            }
            if starts_psql(&args, i) {
                args.insert(i, OsString::from("--"));
                break Some(i);
            }
            let flag = arg.to_str().unwrap_or_default();
            i += if takes.iter().any(|t| t == flag) {
                2
            } else {
                1
            };
        };
        let Some(sep) = sep else {
            stages.first = args;
            return Ok(stages);
        };
        let end = if verb == PREPARE_CMD {
            // The command runs up to a run stage that looks like one: `run` followed by `--`
            // or a run flag (`npm run migrate` stays whole).
            let rest = &args[sep + 1..];
            (1..rest.len())
                .find(|&i| {
                    let word = rest[i].to_str().unwrap_or_default();
                    let next = rest.get(i + 1).and_then(|a| a.to_str()).unwrap_or_default();
                    is_run_stage(word)
                        && (next == "--"
                            || next.starts_with("--keep")
                            || next.starts_with("--instance")
                            || next.is_empty() && word != "run")
                })
                .map_or(args.len(), |n| sep + 1 + n)
        } else if verb == PREPARE_LB {
            // Liquibase's arguments run up to a run stage.
            args[sep + 1..]
                .iter()
                .position(|a| a.to_str().is_some_and(is_run_stage))
                .map_or(args.len(), |n| sep + 1 + n)
        } else {
            sep + 1 + psql_len(&args[sep + 1..])
        };
        stages.separator = true;
        stages.first = args[..end].to_vec();
        if end < args.len() {
            let word = args[end].to_str().unwrap_or_default();
            check_kind(word, &cmd)?;
            stages.run_verb = word.to_owned();
            stages.run = Some(args[end..].to_vec());
        }
        return Ok(stages);
    }
    if verb == "warmup" {
        // `warmup [--hot] prepare[:psql] -- <psql args>`: clap sees `warmup [--hot] -- ...`.
        let mut first = args.to_vec();
        let mut i = v + 1;
        while let Some(j) = next_positional(&first, i, &takes) {
            if first[j] == "--" {
                stages.separator = true;
                break;
            }
            let word = first[j].to_str().unwrap_or_default();
            if is_prepare(word) {
                check_kind(word, &cmd)?;
                if starts_psql(&first, j + 1) {
                    first.insert(j + 1, OsString::from("--"));
                }
                if !matches!(first.get(j + 1), Some(a) if a == "--") {
                    return Err(UsageError::new(
                        "warmup",
                        "warmup prepare:psql needs psql arguments: -f FILE or -c SQL",
                    ));
                }
                first.remove(j);
                stages.separator = true;
                break;
            }
            i = j + 1;
        }
        stages.first = first;
        return Ok(stages);
    }
    stages.first = args.to_vec();
    Ok(stages)
}

fn warmup(a: cli::WarmupArgs, separator: bool) -> Result<Warmup, UsageError> {
    let psql = if separator {
        let psql = psql_all(&a.psql, "warmup")?;
        if psql.inputs.is_empty() {
            return Err(UsageError::new(
                "warmup",
                "warmup prepare:psql needs at least one step: -f FILE or -c SQL",
            ));
        }
        Some(psql)
    } else {
        None
    };
    if a.id.is_some() == psql.is_some() {
        return Err(UsageError::new(
            "warmup",
            "warmup needs a state id, or prepare:psql -- <psql args> (not both)",
        ));
    }
    Ok(Warmup {
        hot: a.hot,
        id: a.id,
        psql,
    })
}

/// A run stage, stand-alone or after a prepare.
fn run_stage(verb: Verb, after_prepare: bool) -> Result<Run, UsageError> {
    let (kind, a, name) = match verb {
        Verb::Run(a) => (RunKind::Command, a, "run"),
        Verb::RunPsql(a) => (RunKind::Psql, a, "run:psql"),
        Verb::RunPgbench(a) => (RunKind::Pgbench, a, "run:pgbench"),
        // `split` starts a second stage only at a run word.
        other => {
            return Err(UsageError::new(
                "",
                format!("only a run stage may follow a prepare, not {other:?}"),
            ))
        }
    };
    if after_prepare && a.instance.is_some() {
        return Err(UsageError::new(
            name,
            "run does not take '--instance' after prepare: it uses the instance the prepare made",
        ));
    }
    if !after_prepare && a.keep {
        return Err(UsageError::new(
            name,
            "run does not take '--keep' without a prepare stage: run --instance never removes \
             the instance",
        ));
    }
    if kind == RunKind::Command && a.args.is_empty() {
        return Err(UsageError::new(
            name,
            "run needs a command after '--': run -- CMD ARGS (or run:psql, run:pgbench)",
        ));
    }
    if !after_prepare && a.instance.is_none() {
        return Err(UsageError::new(
            name,
            "run needs --instance ID, or a prepare stage before it: \
             sqlrs prepare:psql -- -f FILE run -- CMD",
        ));
    }
    Ok(Run {
        kind,
        keep: a.keep,
        instance: a.instance,
        args: a.args,
    })
}

fn not_identity(tok: &str) -> UsageError {
    UsageError::new(
        PREPARE,
        format!(
            "prepare:psql does not take '{tok}' (it would not be part of the state's identity)"
        ),
    )
}

fn not_utf8(arg: &OsStr) -> UsageError {
    UsageError::new(
        PREPARE,
        format!("prepare:psql: argument is not valid UTF-8: {arg:?}"),
    )
}

/// How many of `args` are psql arguments: up to a run stage, or all; also on an error, which
/// `psql_all` then reports.
fn psql_len(args: &[OsString]) -> usize {
    match psql_args(args) {
        Ok((_, n)) => n,
        Err(_) => args.len(),
    }
}

/// All of `args` as psql arguments; a run stage among them is out of place.
fn psql_all(args: &[OsString], verb: &str) -> Result<PsqlArgs, UsageError> {
    let (psql, n) = psql_args(args)?;
    if let Some(extra) = args.get(n) {
        return Err(UsageError::new(
            verb,
            format!(
                "{verb} takes no run stage, got '{}'",
                extra.to_string_lossy()
            ),
        ));
    }
    Ok(psql)
}

/// Reads psql arguments up to the end or up to a run stage; returns them and how many
/// arguments they were.
fn psql_args(args: &[OsString]) -> Result<(PsqlArgs, usize), UsageError> {
    let mut out = PsqlArgs::default();
    let mut pos = 0;
    let text = |i: usize| -> Result<Option<&str>, UsageError> {
        match args.get(i) {
            None => Ok(None),
            Some(a) => a.to_str().map(Some).ok_or_else(|| not_utf8(a)),
        }
    };
    let value = |i: usize, opt: &str| -> Result<String, UsageError> {
        text(i)?.map(str::to_owned).ok_or_else(|| {
            UsageError::new(PREPARE, format!("prepare:psql: option {opt} needs a value"))
        })
    };
    while let Some(tok) = text(pos)? {
        if is_run_stage(tok) {
            break;
        }
        pos += 1;
        if let Some(long) = tok.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((name, value)) => (name, Some(value.to_owned())),
                None => (long, None),
            };
            let opt = format!("--{name}");
            let mut take = || match &inline {
                Some(v) => Ok(v.clone()),
                None => {
                    pos += 1;
                    value(pos - 1, &opt)
                }
            };
            match name {
                "file" => out.inputs.push(file_input(take()?)?),
                "command" => out.inputs.push(Input::Command(take()?)),
                "set" | "variable" => variable(&mut out, &take()?)?,
                "single-transaction" if inline.is_none() => out.single_transaction = true,
                _ => return Err(not_identity(tok)),
            }
        } else if tok.len() > 1 && tok.starts_with('-') {
            // Short options cluster as with psql's getopt: `-1f FILE`, `-fFILE`.
            for (i, c) in tok.char_indices().skip(1) {
                if c == '1' {
                    out.single_transaction = true;
                    continue;
                }
                if !matches!(c, 'f' | 'c' | 'v') {
                    return Err(not_identity(tok));
                }
                let attached = &tok[i + c.len_utf8()..];
                let v = if attached.is_empty() {
                    pos += 1;
                    value(pos - 1, &format!("-{c}"))?
                } else {
                    attached.to_owned()
                };
                match c {
                    'f' => out.inputs.push(file_input(v)?),
                    'c' => out.inputs.push(Input::Command(v)),
                    _ => variable(&mut out, &v)?,
                }
                break;
            }
        } else {
            return Err(not_identity(tok));
        }
    }
    if out.inputs.is_empty() {
        return Err(UsageError::new(
            PREPARE,
            "prepare:psql needs at least one step: -f FILE or -c SQL",
        ));
    }
    Ok((out, pos))
}

/// `--engine` and `--pg-setting`, checked (a setting PostgreSQL itself refuses is refused by
/// the controller, before any build).
fn engine_args(flags: cli::EngineFlags, verb: &str) -> Result<EngineArgs, UsageError> {
    let mut out = EngineArgs {
        version: flags.engine,
        settings: BTreeMap::new(),
    };
    if let Some(v) = &out.version {
        v.parse::<taidon_core::project::EngineVersion>()
            .map_err(|e| UsageError::new(verb, format!("--engine: {e}")))?;
    }
    for s in flags.pg_setting {
        let (name, value) = taidon_core::engine::parse_setting(&s)
            .map_err(|e| UsageError::new(verb, e.to_string()))?;
        out.settings.insert(name, value);
    }
    Ok(out)
}

/// Liquibase's arguments: `update`, `--changelog-file FILE`, and what Liquibase may be told
/// besides; what would point it at another database is refused.
fn lb_args(args: &[OsString]) -> Result<LbArgs, UsageError> {
    let mut words = Vec::with_capacity(args.len());
    for a in args {
        words.push(
            a.to_str()
                .ok_or_else(|| {
                    UsageError::new(
                        PREPARE_LB,
                        format!("prepare:lb: argument is not valid UTF-8: {a:?}"),
                    )
                })?
                .to_owned(),
        );
    }
    let mut it = words.into_iter().peekable();
    match it.next().as_deref() {
        Some("update") => {}
        Some(other) => {
            return Err(UsageError::new(
                PREPARE_LB,
                format!(
                    "prepare:lb runs Liquibase's 'update' (one changeset at a time), not '{other}'"
                ),
            ))
        }
        None => {
            return Err(UsageError::new(
                PREPARE_LB,
                "prepare:lb needs Liquibase arguments: update --changelog-file FILE",
            ))
        }
    }
    let mut changelog = None;
    let mut rest = Vec::new();
    while let Some(word) = it.next() {
        let (name, inline) = match word.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(v.to_owned())),
            _ => (word.clone(), None),
        };
        let normal = name.to_ascii_lowercase().replace(['-', '_'], "");
        match normal.as_str() {
            "changelogfile" => {
                let v = match inline {
                    Some(v) => v,
                    None => it.next().ok_or_else(|| {
                        UsageError::new(PREPARE_LB, "prepare:lb: --changelog-file needs a file")
                    })?,
                };
                changelog = Some(v);
            }
            "url" | "username" | "password" | "referenceurl" | "referenceusername"
            | "referencepassword" | "searchpath" | "defaultsfile" | "count" => {
                return Err(UsageError::new(
                    PREPARE_LB,
                    format!("prepare:lb does not take '{name}': Taidon supplies the database, the files and the count"),
                ))
            }
            _ => rest.push(word),
        }
    }
    let changelog = changelog.filter(|c| !c.is_empty()).ok_or_else(|| {
        UsageError::new(
            PREPARE_LB,
            "prepare:lb needs --changelog-file FILE: update --changelog-file db/changelog.xml",
        )
    })?;
    Ok(LbArgs {
        changelog,
        args: rest,
    })
}

fn file_input(path: String) -> Result<Input, UsageError> {
    if path.is_empty() {
        return Err(UsageError::new(
            PREPARE,
            "prepare:psql: -f needs a file name",
        ));
    }
    Ok(Input::File(path))
}

fn variable(out: &mut PsqlArgs, assignment: &str) -> Result<(), UsageError> {
    match assignment.split_once('=') {
        Some((name, value)) if !name.is_empty() => {
            // As in psql, a later assignment of the same name wins.
            out.variables.insert(name.to_owned(), value.to_owned());
            Ok(())
        }
        _ => Err(UsageError::new(
            PREPARE,
            format!("prepare:psql: -v wants NAME=VALUE, got '{assignment}'"),
        )),
    }
}

#[cfg(test)]
mod tests;
