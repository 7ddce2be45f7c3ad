//! The command line, hand-parsed into plain values. Nothing here touches the environment: files
//! are read, homes found and daemons started only after parsing succeeded.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::PathBuf;

/// `sqlrs --help`.
pub(crate) const HELP: &str = "\
sqlrs: the exact PostgreSQL database state for every developer, test and CI job

Usage:
  sqlrs [--home DIR] [--json] [-v] <command>

Commands:
  prepare[:psql] [--keep] -- <psql args> [run[:KIND] [--keep] -- <args>]
      Build (or find cached) the state that the psql steps make and start an instance of it.
      Without a run stage, prints DSN=postgres://... of the new instance (it keeps running).
      With a run stage, runs the command against it, then removes the instance if the
      command succeeded (unless --keep).
      psql args: -f FILE / --file=FILE and -c SQL / --command=SQL are steps, in order;
      -v NAME=VALUE / --set / --variable and -1 / --single-transaction apply to every step.
      No other psql argument is accepted: it would not be part of the state's identity.
  run[:psql|:pgbench] [--instance ID] -- <args>
      Run a command with DATABASE_URL, PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE set.
      run:psql runs psql <args>, run:pgbench runs pgbench <args>, run runs <args> itself.
      Stand-alone, it needs --instance ID (8 or more hex digits of an instance id).
  ls                         List states and instances.
  rm [--force] <id-or-prefix>
                             Remove a state or an instance (--force: even if in use).
  dsn <id-or-prefix> [--scope ro|rw] [--ttl 30m] [--plain|--user]
                             Print a DSN with a fresh token: for a state, read-only (ro) on
                             an instance its readers share; for an instance, read-write (rw).
                             TLS verified (sslmode=verify-full) unless --plain; --user puts
                             the token in the user name instead of the password.
  pin <id-or-prefix> --reason main|tag|pr|manual [--ref NAME]
                             Pin a state: it is never evicted. --ref tags it with a branch,
                             tag or pull request number that the webhook can name.
  unpin <id-or-prefix> [--reason R] [--ref NAME]
                             Release its pins (a released PR state is evicted first).
  warmup [--hot] <id-or-prefix>
  warmup [--hot] prepare:psql -- <psql args>
                             Build (or restore) a state to WARM without an instance; with
                             --hot also start a standby instance the next run takes at once.
  events [<id-or-prefix>]    Show recorded lifecycle events (of one state).
  status                     Show the local daemon's status (starting it if needed).
  shutdown                   Stop the local daemon, if one runs.
  --help, --version

Global options (before or right after the command):
  --home DIR    Where Taidon keeps its data (default: $SQLRS_HOME, else /var/lib/taidon
                as root, else $XDG_DATA_HOME/taidon, else ~/.local/share/taidon).
  --json        Print machine-readable JSON.
  -v            Say more (state ids, timings).

Examples:
  sqlrs prepare:psql -- -f schema.sql -f seed.sql run:psql -- -c 'select count(*) from film'
  sqlrs prepare:psql -- -f schema.sql -f seed.sql run -- pytest -q
  sqlrs prepare:psql -- -f schema.sql
  sqlrs run:psql --instance 3f2a9c1e -- -c 'select 1'

Exit status: 0 ok, 1 failure, 2 bad usage or input; run: the command's own status.
";

/// The short usage printed under a usage error.
pub(crate) const USAGE: &str = "\
usage: sqlrs [--home DIR] [--json] [-v] <command>
  prepare[:psql] [--keep] -- <psql args> [run[:KIND] [--keep] -- <args>]
  run[:psql|:pgbench] [--instance ID] -- <args>
  ls | rm [--force] <id-or-prefix> | status | shutdown | --help | --version";

/// Flags that apply to every command.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Global {
    pub(crate) home: Option<PathBuf>,
    pub(crate) json: bool,
    pub(crate) verbose: u8,
}

/// A whole parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cli {
    pub(crate) global: Global,
    pub(crate) command: Command,
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Command {
    Prepare(Prepare),
    Run(Run),
    Ls,
    Rm {
        id: String,
        force: bool,
    },
    Dsn(Dsn),
    Status,
    Shutdown,
    Help,
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
}

/// The arguments of `pin` and `unpin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PinArgs {
    pub(crate) id: String,
    pub(crate) reason: Option<taidon_api::PinReason>,
    pub(crate) ref_name: Option<String>,
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

/// `30m`, `2h`, `7d`, `45s` or plain seconds.
pub(crate) fn parse_ttl(s: &str) -> Option<u64> {
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let n: u64 = num.parse().ok()?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(mult).filter(|&t| t > 0)
}

/// `prepare[:psql] [--keep] -- <psql args> [run ...]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Prepare {
    pub(crate) keep: bool,
    pub(crate) psql: PsqlArgs,
    pub(crate) run: Option<Run>,
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

/// A command line that cannot be obeyed (exit 2).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub(crate) struct UsageError {
    pub(crate) message: String,
    /// Whether the short usage should follow the message.
    pub(crate) show_usage: bool,
}

impl UsageError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            show_usage: false,
        }
    }

    fn with_usage(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            show_usage: true,
        }
    }
}

const PREPARE_KINDS: &str = "known kinds: prepare:psql";
const RUN_KINDS: &str = "known kinds: run:psql, run:pgbench, and plain run for any command";

/// Parses the arguments after the program name.
pub(crate) fn parse<I>(args: I) -> Result<Cli, UsageError>
where
    I: IntoIterator<Item = OsString>,
{
    let mut p = Tokens {
        args: args.into_iter().collect(),
        pos: 0,
    };
    let mut global = Global::default();
    let verb = loop {
        let Some(tok) = p.next_str()? else {
            return Err(UsageError::with_usage("no command given"));
        };
        match tok.as_str() {
            "-h" | "--help" => return Ok(cli(global, Command::Help)),
            "-V" | "--version" => return Ok(cli(global, Command::Version)),
            _ => {}
        }
        if !global_flag(&mut p, &tok, &mut global)? {
            if tok.starts_with('-') {
                return Err(UsageError::with_usage(format!("unknown option '{tok}'")));
            }
            break tok;
        }
    };
    let (name, kind) = match verb.split_once(':') {
        Some((name, kind)) => (name, Some(kind)),
        None => (verb.as_str(), None),
    };
    let command = match name {
        "prepare" => Command::Prepare(prepare(&mut p, kind, &mut global)?),
        "run" => Command::Run(run_stage(&mut p, kind, &mut global, false)?),
        "ls" | "status" | "shutdown" | "help" | "version" => {
            no_kind(name, kind)?;
            while let Some(tok) = p.next_str()? {
                if !global_flag(&mut p, &tok, &mut global)? {
                    return Err(UsageError::new(format!("{name} does not take '{tok}'")));
                }
            }
            match name {
                "ls" => Command::Ls,
                "status" => Command::Status,
                "shutdown" => Command::Shutdown,
                "help" => Command::Help,
                _ => Command::Version,
            }
        }
        "rm" => {
            no_kind(name, kind)?;
            let mut force = false;
            let mut id = None;
            while let Some(tok) = p.next_str()? {
                if tok == "--force" || tok == "-f" {
                    force = true;
                } else if global_flag(&mut p, &tok, &mut global)? {
                } else if tok.starts_with('-') {
                    return Err(UsageError::new(format!("rm does not take '{tok}'")));
                } else if id.is_some() {
                    return Err(UsageError::new(format!(
                        "rm takes one id, got a second: '{tok}'"
                    )));
                } else {
                    id = Some(tok);
                }
            }
            let id = id.ok_or_else(|| UsageError::new("rm needs an id or id prefix"))?;
            Command::Rm { id, force }
        }
        "pin" | "unpin" => {
            no_kind(name, kind)?;
            let mut a = PinArgs {
                id: String::new(),
                reason: None,
                ref_name: None,
            };
            let mut id = None;
            while let Some(tok) = p.next_str()? {
                if tok == "--reason" {
                    let v = p.value("", "--reason")?;
                    a.reason = Some(v.parse().map_err(UsageError::new)?);
                } else if tok == "--ref" {
                    a.ref_name = Some(p.value("", "--ref")?);
                } else if global_flag(&mut p, &tok, &mut global)? {
                } else if tok.starts_with('-') || id.is_some() {
                    return Err(UsageError::new(format!("{name} does not take '{tok}'")));
                } else {
                    id = Some(tok);
                }
            }
            a.id =
                id.ok_or_else(|| UsageError::new(format!("{name} needs a state id or prefix")))?;
            if name == "pin" {
                if a.reason.is_none() {
                    return Err(UsageError::new("pin needs --reason main|tag|pr|manual"));
                }
                Command::Pin(a)
            } else {
                Command::Unpin(a)
            }
        }
        "warmup" => {
            no_kind(name, kind)?;
            let mut w = Warmup {
                hot: false,
                id: None,
                psql: None,
            };
            while let Some(tok) = p.next_str()? {
                if tok == "--hot" {
                    w.hot = true;
                } else if tok == "prepare" || tok == "prepare:psql" || tok == "--" {
                    if tok != "--" && p.next_str()?.as_deref() != Some("--") {
                        return Err(UsageError::new(
                            "warmup prepare:psql needs '--' and psql arguments",
                        ));
                    }
                    let psql = psql_args(&mut p)?;
                    if psql.inputs.is_empty() {
                        return Err(UsageError::new(
                            "warmup prepare:psql needs at least one step: -f FILE or -c SQL",
                        ));
                    }
                    if let Some(extra) = p.next_str()? {
                        return Err(UsageError::new(format!(
                            "warmup takes no run stage, got '{extra}'"
                        )));
                    }
                    w.psql = Some(psql);
                } else if global_flag(&mut p, &tok, &mut global)? {
                } else if tok.starts_with('-') || w.id.is_some() {
                    return Err(UsageError::new(format!("warmup does not take '{tok}'")));
                } else {
                    w.id = Some(tok);
                }
            }
            if w.id.is_some() == w.psql.is_some() {
                return Err(UsageError::new(
                    "warmup needs a state id, or prepare:psql -- <psql args> (not both)",
                ));
            }
            Command::Warmup(w)
        }
        "events" => {
            no_kind(name, kind)?;
            let mut id = None;
            while let Some(tok) = p.next_str()? {
                if global_flag(&mut p, &tok, &mut global)? {
                } else if tok.starts_with('-') || id.is_some() {
                    return Err(UsageError::new(format!("events does not take '{tok}'")));
                } else {
                    id = Some(tok);
                }
            }
            Command::Events { id }
        }
        "dsn" => {
            no_kind(name, kind)?;
            let mut d = Dsn {
                target: String::new(),
                scope: None,
                ttl_s: None,
                form: DsnForm::Password,
            };
            let mut target = None;
            while let Some(tok) = p.next_str()? {
                let (flag, inline) = match tok.split_once('=') {
                    Some((f, v)) if f.starts_with("--") => (f.to_owned(), Some(v.to_owned())),
                    _ => (tok.clone(), None),
                };
                match flag.as_str() {
                    "--scope" | "--ttl" => {
                        let value = match inline {
                            Some(v) => v,
                            None => p.next_str()?.ok_or_else(|| {
                                UsageError::new(format!("dsn {flag} needs a value"))
                            })?,
                        };
                        if flag == "--scope" {
                            d.scope = Some(value.parse().map_err(UsageError::new)?);
                        } else {
                            d.ttl_s = Some(parse_ttl(&value).ok_or_else(|| {
                                UsageError::new(format!(
                                    "dsn --ttl takes a duration such as 30m, 2h or 7d, not '{value}'"
                                ))
                            })?);
                        }
                    }
                    "--plain" => d.form = DsnForm::Plain,
                    "--user" => d.form = DsnForm::User,
                    _ if global_flag(&mut p, &tok, &mut global)? => {}
                    _ if tok.starts_with('-') => {
                        return Err(UsageError::new(format!("dsn does not take '{tok}'")))
                    }
                    _ if target.is_some() => {
                        return Err(UsageError::new(format!(
                            "dsn takes one id, got a second: '{tok}'"
                        )))
                    }
                    _ => target = Some(tok),
                }
            }
            d.target = target
                .ok_or_else(|| UsageError::new("dsn needs a state or instance id (or prefix)"))?;
            Command::Dsn(d)
        }
        _ => return Err(UsageError::with_usage(format!("unknown command '{verb}'"))),
    };
    Ok(cli(global, command))
}

fn cli(global: Global, command: Command) -> Cli {
    Cli { global, command }
}

fn no_kind(name: &str, kind: Option<&str>) -> Result<(), UsageError> {
    match kind {
        None => Ok(()),
        Some(kind) => Err(UsageError::with_usage(format!(
            "unknown command '{name}:{kind}': {name} has no kinds"
        ))),
    }
}

/// The arguments, with a cursor.
struct Tokens {
    args: Vec<OsString>,
    pos: usize,
}

impl Tokens {
    fn peek_str(&self) -> Result<Option<&str>, UsageError> {
        match self.args.get(self.pos) {
            None => Ok(None),
            Some(arg) => arg.to_str().map(Some).ok_or_else(|| not_utf8(arg)),
        }
    }

    fn next_str(&mut self) -> Result<Option<String>, UsageError> {
        let tok = self.peek_str()?.map(str::to_owned);
        if tok.is_some() {
            self.pos += 1;
        }
        Ok(tok)
    }

    /// The value of option `opt`: the next argument, whatever it looks like.
    fn value(&mut self, context: &str, opt: &str) -> Result<String, UsageError> {
        self.next_str()?
            .ok_or_else(|| UsageError::new(format!("{context}option {opt} needs a value")))
    }

    fn rest(&mut self) -> Vec<OsString> {
        let rest = self.args.split_off(self.pos.min(self.args.len()));
        self.pos = self.args.len();
        rest
    }
}

fn not_utf8(arg: &OsString) -> UsageError {
    UsageError::new(format!("argument is not valid UTF-8: {arg:?}"))
}

/// Applies `tok` if it is a global flag (reading its value from `p`); false if it is not one.
fn global_flag(p: &mut Tokens, tok: &str, global: &mut Global) -> Result<bool, UsageError> {
    if tok == "--json" {
        global.json = true;
    } else if tok == "--verbose" {
        global.verbose = global.verbose.saturating_add(1);
    } else if tok.len() >= 2 && tok.starts_with('-') && tok[1..].bytes().all(|b| b == b'v') {
        let n = u8::try_from(tok.len() - 1).unwrap_or(u8::MAX);
        global.verbose = global.verbose.saturating_add(n);
    } else if tok == "--home" {
        global.home = Some(PathBuf::from(p.value("", "--home")?));
    } else if let Some(dir) = tok.strip_prefix("--home=") {
        if dir.is_empty() {
            return Err(UsageError::new("option --home needs a value"));
        }
        global.home = Some(PathBuf::from(dir));
    } else {
        return Ok(false);
    }
    Ok(true)
}

fn prepare(p: &mut Tokens, kind: Option<&str>, global: &mut Global) -> Result<Prepare, UsageError> {
    match kind {
        None | Some("psql") => {}
        Some(other) => {
            return Err(UsageError::new(format!(
                "unknown prepare kind '{other}' ({PREPARE_KINDS})"
            )))
        }
    }
    let mut keep = false;
    loop {
        match p.next_str()?.as_deref() {
            None => {
                return Err(UsageError::new(
                    "prepare needs '--' and psql arguments: sqlrs prepare:psql -- -f FILE",
                ))
            }
            Some("--") => break,
            Some("--keep") => keep = true,
            Some(tok) => {
                if !global_flag(p, tok, global)? {
                    return Err(UsageError::new(format!(
                        "prepare does not take '{tok}' (psql arguments go after '--')"
                    )));
                }
            }
        }
    }
    let psql = psql_args(p)?;
    if psql.inputs.is_empty() {
        return Err(UsageError::new(
            "prepare:psql needs at least one step: -f FILE or -c SQL",
        ));
    }
    let run = match p.next_str()? {
        None => None,
        Some(tok) => {
            let kind = tok.strip_prefix("run").and_then(|k| k.strip_prefix(':'));
            Some(run_stage(p, kind, global, true)?)
        }
    };
    Ok(Prepare { keep, psql, run })
}

/// Whether `tok` starts the run stage of a composite command.
fn is_run_stage(tok: &str) -> bool {
    tok == "run" || tok.starts_with("run:")
}

fn not_identity(tok: &str) -> UsageError {
    UsageError::new(format!(
        "prepare:psql does not take '{tok}' (it would not be part of the state's identity)"
    ))
}

const PSQL: &str = "prepare:psql: ";

/// Reads psql arguments up to the end or up to a run stage, which it leaves unread.
fn psql_args(p: &mut Tokens) -> Result<PsqlArgs, UsageError> {
    let mut out = PsqlArgs::default();
    while let Some(tok) = p.peek_str()? {
        if is_run_stage(tok) {
            break;
        }
        let tok = tok.to_owned();
        p.pos += 1;
        if let Some(long) = tok.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((name, value)) => (name, Some(value.to_owned())),
                None => (long, None),
            };
            let opt = format!("--{name}");
            let value = |p: &mut Tokens| match &inline {
                Some(v) => Ok(v.clone()),
                None => p.value(PSQL, &opt),
            };
            match name {
                "file" => out.inputs.push(file_input(value(p)?)?),
                "command" => out.inputs.push(Input::Command(value(p)?)),
                "set" | "variable" => variable(&mut out, &value(p)?)?,
                "single-transaction" if inline.is_none() => out.single_transaction = true,
                _ => return Err(not_identity(&tok)),
            }
        } else if tok.len() > 1 && tok.starts_with('-') {
            // Short options cluster as with psql's getopt: `-1f FILE`, `-fFILE`.
            for (i, c) in tok.char_indices().skip(1) {
                let takes_value = matches!(c, 'f' | 'c' | 'v');
                if c == '1' {
                    out.single_transaction = true;
                    continue;
                }
                if !takes_value {
                    return Err(not_identity(&tok));
                }
                let attached = &tok[i + c.len_utf8()..];
                let value = if attached.is_empty() {
                    p.value(PSQL, &format!("-{c}"))?
                } else {
                    attached.to_owned()
                };
                match c {
                    'f' => out.inputs.push(file_input(value)?),
                    'c' => out.inputs.push(Input::Command(value)),
                    _ => variable(&mut out, &value)?,
                }
                break;
            }
        } else {
            return Err(not_identity(&tok));
        }
    }
    Ok(out)
}

fn file_input(path: String) -> Result<Input, UsageError> {
    if path == "-" {
        return Err(UsageError::new(
            "prepare:psql cannot read a script from stdin ('-f -'): give a file",
        ));
    }
    if path.is_empty() {
        return Err(UsageError::new("prepare:psql: -f needs a file name"));
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
        _ => Err(UsageError::new(format!(
            "prepare:psql: -v wants NAME=VALUE, got '{assignment}'"
        ))),
    }
}

fn run_stage(
    p: &mut Tokens,
    kind: Option<&str>,
    global: &mut Global,
    after_prepare: bool,
) -> Result<Run, UsageError> {
    let kind = match kind {
        None => RunKind::Command,
        Some("psql") => RunKind::Psql,
        Some("pgbench") => RunKind::Pgbench,
        Some(other) => {
            return Err(UsageError::new(format!(
                "unknown run kind '{other}' ({RUN_KINDS})"
            )))
        }
    };
    let mut keep = false;
    let mut instance = None;
    while let Some(tok) = p.next_str()? {
        if tok == "--" {
            break;
        }
        if tok == "--keep" && after_prepare {
            keep = true;
        } else if (tok == "--instance" || tok.starts_with("--instance=")) && !after_prepare {
            let id = match tok.strip_prefix("--instance=") {
                Some(id) => id.to_owned(),
                None => p.value("", "--instance")?,
            };
            let id = taidon_core::prefix::normalize(&id)
                .map_err(|e| UsageError::new(format!("--instance: {e}")))?;
            instance = Some(id);
        } else if !global_flag(p, &tok, global)? {
            let hint = match tok.as_str() {
                "--instance" => " (after prepare, run uses the instance it made)",
                "--keep" => " (--keep applies after prepare; run --instance never removes it)",
                _ => " (the command's arguments go after '--')",
            };
            return Err(UsageError::new(format!("run does not take '{tok}'{hint}")));
        }
    }
    let args = p.rest();
    if kind == RunKind::Command && args.is_empty() {
        return Err(UsageError::new(
            "run needs a command after '--': run -- CMD ARGS (or run:psql, run:pgbench)",
        ));
    }
    if !after_prepare && instance.is_none() {
        return Err(UsageError::new(
            "run needs --instance ID, or a prepare stage before it: \
             sqlrs prepare -- -f FILE run -- CMD",
        ));
    }
    Ok(Run {
        kind,
        keep,
        instance,
        args,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_strs(args: &[&str]) -> Result<Cli, UsageError> {
        parse(args.iter().map(OsString::from))
    }

    fn ok(args: &[&str]) -> Cli {
        match parse_strs(args) {
            Ok(cli) => cli,
            Err(e) => panic!("{args:?}: {e}"),
        }
    }

    fn err(args: &[&str]) -> UsageError {
        match parse_strs(args) {
            Ok(cli) => panic!("{args:?} parsed as {cli:?}"),
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
        assert_eq!(p.psql.inputs, [file("schema.sql"), file("seed.sql")]);
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
        ]);
        let run = p.run.expect("run stage");
        assert_eq!(run.kind, RunKind::Command);
        assert_eq!(run.args, os(&["pytest", "-q", "--", "run", "-v"]));
    }

    #[test]
    fn prepare_without_kind_or_run_stage_is_psql_only() {
        let p = prep(&["prepare", "--", "-f", "schema.sql"]);
        assert_eq!(p.psql.inputs, [file("schema.sql")]);
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
            p.psql.inputs,
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
        assert!(p.psql.variables.is_empty());
        assert!(!p.psql.single_transaction);
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
        assert_eq!(p.psql.inputs, [file("x.sql")]);
        let vars: Vec<(&str, &str)> = p
            .psql
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
        assert!(p.psql.single_transaction);
        assert!(
            prep(&["prepare", "--", "--single-transaction", "-c", "x"])
                .psql
                .single_transaction
        );
    }

    #[test]
    fn short_options_cluster_like_getopt() {
        let p = prep(&["prepare", "--", "-1f", "x.sql", "-1cselect 1"]);
        assert!(p.psql.single_transaction);
        assert_eq!(p.psql.inputs, [file("x.sql"), cmd("select 1")]);
    }

    #[test]
    fn values_are_values_even_when_they_look_like_a_stage_or_an_option() {
        let p = prep(&[
            "prepare", "--", "-c", "run", "-c", "run:psql", "-f", "--", "-c", "-1", "-v", "x=run",
        ]);
        assert_eq!(
            p.psql.inputs,
            [cmd("run"), cmd("run:psql"), file("--"), cmd("-1")]
        );
        assert!(!p.psql.single_transaction);
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
    fn global_flags_go_before_or_right_after_the_verb() {
        let want = Global {
            home: Some("/h".into()),
            json: true,
            verbose: 1,
        };
        assert_eq!(ok(&["--home", "/h", "--json", "-v", "ls"]).global, want);
        assert_eq!(ok(&["ls", "--home=/h", "-v", "--json"]).global, want);
        assert_eq!(ok(&["-v", "status", "--home", "/h", "--json"]).global, want);
        let cli = ok(&["prepare", "--json", "--home", "/h", "-v", "--", "-c", "x"]);
        assert_eq!(cli.global, want);
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
    }

    #[test]
    fn psql_v_after_the_separator_is_a_variable_not_verbosity() {
        let cli = ok(&["prepare", "--", "-v", "x=1", "-c", "select :x"]);
        assert_eq!(cli.global.verbose, 0);
        let Command::Prepare(p) = cli.command else {
            panic!()
        };
        assert_eq!(p.psql.variables.get("x").map(String::as_str), Some("1"));
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
    fn simple_verbs() {
        assert_eq!(ok(&["ls"]).command, Command::Ls);
        assert_eq!(ok(&["status"]).command, Command::Status);
        assert_eq!(ok(&["shutdown"]).command, Command::Shutdown);
        assert_eq!(ok(&["--help"]).command, Command::Help);
        assert_eq!(ok(&["-h"]).command, Command::Help);
        assert_eq!(ok(&["help"]).command, Command::Help);
        assert_eq!(ok(&["--json", "--help", "bogus"]).command, Command::Help);
        assert_eq!(ok(&["--version"]).command, Command::Version);
        assert_eq!(ok(&["-V"]).command, Command::Version);
        assert_eq!(
            ok(&["rm", "abcdef01"]).command,
            Command::Rm {
                id: "abcdef01".into(),
                force: false
            }
        );
    }

    #[test]
    fn unknown_verbs_and_missing_commands_show_usage() {
        let e = err(&["frobnicate"]);
        assert_eq!(e.message, "unknown command 'frobnicate'");
        assert!(e.show_usage);
        assert!(err(&[]).show_usage);
        assert!(err(&["--json"]).show_usage);
        assert!(err(&["--bogus", "ls"]).show_usage);
        assert!(err(&["ls:x"]).show_usage);
    }

    #[test]
    fn unknown_kinds_name_the_known_ones() {
        let e = err(&["prepare:foo", "--", "-c", "x"]);
        assert_eq!(
            e.message,
            "unknown prepare kind 'foo' (known kinds: prepare:psql)"
        );
        let e = err(&["prepare", "--", "-c", "x", "run:foo", "--", "x"]);
        assert!(e.message.starts_with("unknown run kind 'foo'"), "{e}");
        assert!(e.message.contains("run:psql, run:pgbench"), "{e}");
        let e = err(&["run:foo", "--instance", "3f2a9c1e", "--", "x"]);
        assert!(e.message.starts_with("unknown run kind 'foo'"), "{e}");
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
            assert!(!e.show_usage);
        }
    }

    #[test]
    fn missing_values_and_bad_variables_are_errors() {
        for (args, want) in [
            (&["-f"][..], "prepare:psql: option -f needs a value"),
            (
                &["-c", "x", "-c"][..],
                "prepare:psql: option -c needs a value",
            ),
            (&["--file"][..], "prepare:psql: option --file needs a value"),
            (
                &["-c", "x", "--set"][..],
                "prepare:psql: option --set needs a value",
            ),
            (
                &["-c", "x", "-v", "novalue"][..],
                "prepare:psql: -v wants NAME=VALUE, got 'novalue'",
            ),
            (
                &["-c", "x", "-v", "=1"][..],
                "prepare:psql: -v wants NAME=VALUE, got '=1'",
            ),
        ] {
            let mut full = vec!["prepare", "--"];
            full.extend_from_slice(args);
            assert_eq!(err(&full).message, want, "{args:?}");
        }
        assert!(err(&["prepare", "--", "-f", "-"]).message.contains("stdin"));
        assert!(err(&["--home"]).message.contains("--home needs a value"));
        assert!(err(&["--home=", "ls"])
            .message
            .contains("--home needs a value"));
    }

    #[test]
    fn prepare_needs_steps_and_the_separator() {
        let e = err(&["prepare", "--"]);
        assert_eq!(
            e.message,
            "prepare:psql needs at least one step: -f FILE or -c SQL"
        );
        let e = err(&["prepare", "--", "-v", "a=1", "-1", "run", "--", "true"]);
        assert!(e.message.contains("at least one step"), "{e}");
        assert!(err(&["prepare"]).message.contains("needs '--'"));
        let e = err(&["prepare", "-f", "x.sql"]);
        assert_eq!(
            e.message,
            "prepare does not take '-f' (psql arguments go after '--')"
        );
    }

    #[test]
    fn run_errors() {
        let e = err(&["run", "--", "true"]);
        assert!(e.message.starts_with("run needs --instance ID"), "{e}");
        let e = err(&["run:psql", "--instance", "abc", "--"]);
        assert!(e.message.contains("at least 8 hex digits"), "{e}");
        let e = err(&["run:psql", "--instance"]);
        assert_eq!(e.message, "option --instance needs a value");
        let e = err(&["run", "--instance", "3f2a9c1e", "--"]);
        assert!(e.message.starts_with("run needs a command"), "{e}");
        let e = err(&["prepare", "--", "-c", "x", "run"]);
        assert!(e.message.starts_with("run needs a command"), "{e}");
        let e = err(&[
            "prepare",
            "--",
            "-c",
            "x",
            "run",
            "--instance",
            "3f2a9c1e",
            "--",
            "x",
        ]);
        assert!(e.message.contains("uses the instance it made"), "{e}");
        let e = err(&["run:psql", "--instance", "3f2a9c1e", "--keep", "--"]);
        assert!(e.message.starts_with("run does not take '--keep'"), "{e}");
        let e = err(&["run:psql", "--instance", "3f2a9c1e", "-c", "select 1"]);
        assert!(e.message.contains("after '--'"), "{e}");
    }

    #[test]
    fn rm_and_plain_verb_errors() {
        assert_eq!(err(&["rm"]).message, "rm needs an id or id prefix");
        assert_eq!(
            ok(&["dsn", "abcdef01", "--scope", "ro", "--ttl=30m", "--user"]).command,
            Command::Dsn(Dsn {
                target: "abcdef01".into(),
                scope: Some(taidon_core::token::Scope::Ro),
                ttl_s: Some(1800),
                form: DsnForm::User,
            })
        );
        assert!(err(&["dsn"]).message.contains("needs a state or instance"));
        assert!(err(&["dsn", "abcdef01", "--scope", "admin"])
            .message
            .contains("unknown scope"));
        assert!(err(&["dsn", "abcdef01", "--ttl", "5x"])
            .message
            .contains("30m"));
        assert_eq!(parse_ttl("7d"), Some(7 * 86_400));
        assert_eq!(parse_ttl("90"), Some(90));
        assert_eq!(parse_ttl("0m"), None);
        assert!(err(&["rm", "a", "b"]).message.contains("second"));
        assert_eq!(err(&["rm", "--all"]).message, "rm does not take '--all'");
        assert_eq!(err(&["ls", "extra"]).message, "ls does not take 'extra'");
        assert_eq!(err(&["status", "-x"]).message, "status does not take '-x'");
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
        let Command::Run(run) = parse(args).expect("parses").command else {
            panic!()
        };
        assert_eq!(run.args[1], raw);
        let args = vec![
            OsString::from("prepare"),
            OsString::from("--"),
            OsString::from("-f"),
            raw,
        ];
        let e = parse(args).expect_err("not utf-8");
        assert!(e.message.contains("not valid UTF-8"), "{e}");
    }
}
