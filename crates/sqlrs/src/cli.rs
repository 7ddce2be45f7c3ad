//! The command line as clap sees it: one derive tree from which parsing, `--help` and shell
//! completion are all generated. `args` splits argv into stages and turns these into plain
//! values; nothing here touches the environment.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};

/// `value_name`s whose values are ids, so completion knows to ask the daemon.
pub(crate) const ID_ANY: &str = "ID";
pub(crate) const ID_STATE: &str = "STATE";
pub(crate) const ID_INSTANCE: &str = "INSTANCE";

const ABOUT: &str = "The exact PostgreSQL database state for every developer, test and CI job";

const TOP_EXAMPLES: &str = "\
Examples:
  sqlrs prepare:psql -- -f schema.sql -f seed.sql run:psql -- -c 'select count(*) from film'
  sqlrs prepare:psql -- -f schema.sql -f seed.sql run -- pytest -q
  sqlrs prepare:psql -- -f schema.sql
  sqlrs run:psql --instance 3f2a9c1e -- -c 'select 1'
  sqlrs ls --json

A run stage may follow a prepare stage: prepare[:KIND] ... run[:KIND] ... -- ARGS.
Ids are 8 or more hex digits of a state or instance id.
Home: --home, else $SQLRS_HOME, else /var/lib/taidon as root, else $XDG_DATA_HOME/taidon,
else ~/.local/share/taidon.

Exit status: 0 ok, 1 failure, 2 bad usage or input; run: the command's own status.";

const PREPARE_PSQL_EXAMPLES: &str = "\
psql arguments (after '--'):
  -f, --file FILE        a script: one step, hashed into the state's identity
  -c, --command SQL      an SQL command: one step
  -v, --set, --variable NAME=VALUE
                         a psql variable, for every step (a later one wins)
  -1, --single-transaction
                         run every step in one transaction
Steps apply in the order given; each leaves a checkpoint that later prepares reuse. No other
psql argument is accepted: it would not be part of the state's identity.

Without a run stage, prints DSN=postgres://... of a new instance, which keeps running. With
one, runs the command against it, then removes the instance if the command succeeded (unless
--keep).

--engine and --pg-setting are part of the state's identity, as the steps are; without them,
the [engine] section of sqlrs.toml (found by walking up from the working directory) applies.

`sqlrs prepare NAME` builds the recipe NAME of sqlrs.toml, for example
  [recipes.dev]
  prepare = [\"psql\", \"-f\", \"schema.sql\", \"-f\", \"seed.sql\"]
(the first word is the kind: psql, lb or cmd; paths are relative to the file's directory,
where the recipe runs). Flags given here override the file's.

Examples:
  sqlrs prepare:psql -- -f schema.sql -f seed.sql
  sqlrs prepare:psql -- -v schema=app -1 -f schema.sql -c 'analyze'
  sqlrs prepare:psql --keep -- -f schema.sql run:psql -- -c 'select 1'
  sqlrs prepare:psql --engine 16 --pg-setting max_prepared_transactions=10 -- -f schema.sql
  sqlrs prepare -- -f schema.sql run -- pytest -q
  sqlrs prepare dev run -- pytest -q";

const PREPARE_LB_EXAMPLES: &str = "\
Liquibase arguments (after '--'): update --changelog-file FILE [--contexts=...] [--labels=...]
[-DNAME=VALUE ...]. Taidon supplies the database (--url, --username, --password).

The changelog and every file it pulls in (include, includeAll, sqlFile, loadData) are hashed
and sent. Liquibase plans the pending changesets offline; each changeset is applied on its own
(update-count --count=1) and leaves a checkpoint: a state whose id covers the changeset's id,
author, file and checksum, and its parent. Liquibase is SQLRS_LIQUIBASE, else `liquibase` on
PATH, where Taidon runs.

Examples:
  sqlrs prepare:lb -- update --changelog-file db/changelog.xml
  sqlrs prepare:lb --engine 16 -- update --changelog-file db/changelog.xml --contexts=test
  sqlrs prepare:lb -- update --changelog-file db/changelog.xml run -- pytest -q";

const PREPARE_CMD_EXAMPLES: &str = "\
The command (after '--') runs here, where its inputs are, against a build server of the
state: through the gateway, with DATABASE_URL, PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE
and the TLS settings in its environment, and a token good for this build only. Its exit code
decides: 0 publishes the state, anything else publishes nothing and shows what it printed.

The state's id covers the command line, the parent, and every --input: a file, a directory
(walked), or a glob (*, ?, [..], **), by name and content. Only names and hashes leave this
machine, so only a client can rebuild such a state (sqlrs ls marks it).

A run stage starts at 'run' or 'run:KIND' followed by '--' (or its own flags), so that a
command such as 'npm run migrate' stays whole.

Examples:
  sqlrs prepare:cmd --input alembic.ini --input migrations -- alembic upgrade head
  sqlrs prepare:cmd --input db/migrations -- dbmate --no-dump-schema up
  sqlrs prepare:cmd --input sqitch.plan --input deploy -- sqitch deploy db:pg: run -- pytest -q";

const PLAN_EXAMPLES: &str = "\
plan:KIND takes the arguments of prepare:KIND (or a recipe: plan NAME) and prints each state
the prepare would make, base first, with its id and where it is cached: local, remote,
local+remote, or missing. Nothing is built (a Liquibase changelog is planned offline).

Examples:
  sqlrs plan:psql -- -f schema.sql -f seed.sql
  sqlrs --json plan:lb -- update --changelog-file db/changelog.xml
  sqlrs plan dev";

const CACHE_EXAMPLES: &str = "\
cache explain says, for each step of a prepare, why it hits or misses: what differs from the
nearest cached sibling (a state built on the same parent), such as
  db/002.sql changed (sha256 1a2b3c4d… → 3c4d5e6f…)
  engine 15.18 → 16.14
  changeset db/changelog.xml::29::alice: checksum 9:… → 9:… (its content changed)
or that its parent is not cached.

Examples:
  sqlrs cache explain prepare:psql -- -f schema.sql -f seed.sql
  sqlrs cache explain prepare:lb --engine 16 -- update --changelog-file db/changelog.xml";

const RUN_EXAMPLES: &str = "\
The command gets DATABASE_URL, PGHOST, PGPORT, PGUSER, PGPASSWORD, PGDATABASE (and the TLS
settings of the DSN) in its environment. Stand-alone, run needs --instance; after a prepare
stage it uses the instance the prepare made.

Examples:
  sqlrs prepare:psql -- -f schema.sql run -- pytest -q
  sqlrs run --instance 3f2a9c1e -- ./manage.py test";

const RUN_PSQL_EXAMPLES: &str = "\
Runs psql ARGS with the instance's connection settings in its environment.

Examples:
  sqlrs run:psql --instance 3f2a9c1e -- -c 'select count(*) from film'
  sqlrs prepare:psql -- -f schema.sql run:psql";

const RUN_PGBENCH_EXAMPLES: &str = "\
Runs pgbench ARGS with the instance's connection settings in its environment.

Examples:
  sqlrs prepare:psql -- -f schema.sql run:pgbench -- -i -s 10
  sqlrs run:pgbench --instance 3f2a9c1e -- -S -c 4 -T 10";

const LS_EXAMPLES: &str = "\
Examples:
  sqlrs ls
  sqlrs ls --json | jq '.states[].state_id'";

const RM_EXAMPLES: &str = "\
Removing a state removes its descendants; an instance or state in use is refused unless
--force.

Examples:
  sqlrs rm 3f2a9c1e
  sqlrs rm --force 3f2a9c1e00000001";

const PUSH_EXAMPLES: &str = "\
Uploads the state's snapshot to the bucket of [store.remote] now and waits (snapshots are
uploaded in the background anyway); only the chunks the bucket lacks are sent.

Examples:
  sqlrs push 3f2a9c1e
  sqlrs push 3f2a9c1e --json";

const DSN_EXAMPLES: &str = "\
For a state, the DSN is read-only (ro) on an instance all its readers share; for an instance,
read-write (rw). TLS is verified (sslmode=verify-full) unless --plain.

Examples:
  sqlrs dsn 3f2a9c1e --ttl 2h
  sqlrs dsn 3f2a9c1e00000001 --plain
  psql \"$(sqlrs dsn 3f2a9c1e --json | jq -r .dsn)\"";

const PIN_EXAMPLES: &str = "\
A pinned state is never evicted. --ref tags the pin with a branch, tag or pull request that
the webhook can later release.

Examples:
  sqlrs pin 3f2a9c1e --reason main --ref main
  sqlrs pin 3f2a9c1e --reason=pr --ref=1234";

const UNPIN_EXAMPLES: &str = "\
Releases the state's pins (those of one reason or ref when given); a released PR state is
evicted first.

Examples:
  sqlrs unpin 3f2a9c1e
  sqlrs unpin 3f2a9c1e --reason pr --ref 1234";

const WARMUP_EXAMPLES: &str = "\
Builds (or restores) a state to WARM without an instance; with --hot also starts a standby
instance that the next prepare takes at once.

Examples:
  sqlrs warmup 3f2a9c1e
  sqlrs warmup --hot prepare:psql -- -f schema.sql -f seed.sql";

const EVENTS_EXAMPLES: &str = "\
Examples:
  sqlrs events
  sqlrs events 3f2a9c1e --json";

const LEASE_EXAMPLES: &str = "\
Prints LEASE=<id> and DSN=<dsn>. Every lease is a fresh copy: no lease sees another's writes.
With --isolation database (the default) the copy is a database of its own in an instance that
other leases of the state share, so cluster-wide objects (roles, tablespaces) are shared too;
with --isolation instance it is an instance of its own. A copy nobody releases is reclaimed
when its TTL ends.

Examples:
  sqlrs lease pagila
  psql \"$(sqlrs lease pagila --ttl 5m | sed -n 's/^DSN=//p')\" -c 'select count(*) from film'
  sqlrs lease 3f2a9c1e --isolation instance --ttl 30m --json";

const RELEASE_EXAMPLES: &str = "\
Examples:
  sqlrs release 9b1f0c2d4e5a67788990aabbccddeeff";

const LEASES_EXAMPLES: &str = "\
Examples:
  sqlrs leases
  sqlrs leases --json";

const FSCK_EXAMPLES: &str = "\
Checks every snapshot's checksum, every snapshot against the metadata, and the store's and
the instances' directories. Exits 1 with the list when something is found and not repaired;
--repair quarantines damaged snapshots (their states are rebuilt when next asked for), marks
states without a snapshot COLD, recovers metadata from manifests and clears orphans.

Examples:
  sqlrs fsck
  sqlrs fsck --repair
  sqlrs fsck --json | jq '.findings[]'";

const STATUS_EXAMPLES: &str = "\
Starts the local daemon if none runs.

Examples:
  sqlrs status
  sqlrs status --output json";

const SHUTDOWN_EXAMPLES: &str = "\
Instances stop with the daemon; the next daemon starts them again when their DSNs are used.

Examples:
  sqlrs shutdown";

const COMPLETIONS_EXAMPLES: &str = "\
Completes commands, kinds, flags and their values, and state and instance ids (asking the
daemon when one runs).

Examples (install for bash, zsh, fish):
  sqlrs completions bash > ~/.local/share/bash-completion/completions/sqlrs
  sqlrs completions zsh > \"${fpath[1]}/_sqlrs\"
  sqlrs completions fish > ~/.config/fish/completions/sqlrs.fish";

/// `sqlrs`.
#[derive(Debug, Parser)]
#[command(
    name = "sqlrs",
    version,
    about = ABOUT,
    after_help = TOP_EXAMPLES,
    subcommand_required = true,
    arg_required_else_help = true,
    max_term_width = 100
)]
pub(crate) struct Sqlrs {
    #[command(flatten)]
    pub(crate) global: GlobalFlags,
    #[command(subcommand)]
    pub(crate) verb: Verb,
}

/// Flags every command takes, before or after its name.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct GlobalFlags {
    /// Where Taidon keeps its data
    #[arg(long, global = true, value_name = "DIR", value_parser = non_empty_path)]
    pub(crate) home: Option<PathBuf>,
    /// Print machine-readable JSON (with -v, progress events as NDJSON on stderr)
    #[arg(long, global = true)]
    pub(crate) json: bool,
    /// Output format; --output json is --json
    #[arg(long, global = true, value_name = "FORMAT", value_enum)]
    pub(crate) output: Option<OutputFormat>,
    /// Say more (state ids, timings)
    #[arg(short, long, global = true, action = ArgAction::Count)]
    pub(crate) verbose: u8,
    /// A shared Taidon server instead of the local daemon [env: SQLRS_SERVER]
    #[arg(long, global = true, value_name = "URL")]
    pub(crate) server: Option<String>,
    /// A file holding the server's API token (else SQLRS_TOKEN)
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) token_file: Option<PathBuf>,
    /// A private CA that signed the server's certificate
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) ca: Option<PathBuf>,
    /// A profile of ~/.config/sqlrs/config.toml: server, token_file, ca [env: SQLRS_PROFILE]
    #[arg(long, global = true, value_name = "NAME")]
    pub(crate) profile: Option<String>,
}

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum OutputFormat {
    Text,
    Json,
}

/// The shells `sqlrs completions` writes a script for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Shell {
    Bash,
    Zsh,
    Fish,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub(crate) enum Verb {
    /// Build (or find) the state psql steps make; start an instance of it
    #[command(
        name = "prepare:psql",
        visible_alias = "prepare",
        after_help = PREPARE_PSQL_EXAMPLES,
        override_usage = "sqlrs prepare:psql [OPTIONS] -- <PSQL_ARGS>... [run[:KIND] [OPTIONS] [-- <ARGS>...]]\n       \
                          sqlrs prepare [OPTIONS] RECIPE [run[:KIND] [OPTIONS] [-- <ARGS>...]]"
    )]
    PreparePsql(PrepareArgs),
    /// Build (or find) the state a Liquibase changelog makes, one checkpoint per changeset
    #[command(
        name = "prepare:lb",
        after_help = PREPARE_LB_EXAMPLES,
        override_usage = "sqlrs prepare:lb [OPTIONS] -- update --changelog-file FILE [LIQUIBASE_ARGS]... [run[:KIND] [OPTIONS] [-- <ARGS>...]]"
    )]
    PrepareLb(PrepareLbArgs),
    /// Build (or find) the state any migration tool makes, run here as one step
    #[command(
        name = "prepare:cmd",
        after_help = PREPARE_CMD_EXAMPLES,
        override_usage = "sqlrs prepare:cmd [OPTIONS] --input PATH... -- COMMAND [ARGS]... [run[:KIND] [OPTIONS] -- <ARGS>...]"
    )]
    PrepareCmd(PrepareCmdArgs),
    /// Show the states a prepare would make and which are cached (builds nothing)
    #[command(
        name = "plan",
        after_help = PLAN_EXAMPLES,
        override_usage = "sqlrs plan[:KIND] [OPTIONS] ... (the arguments of prepare[:KIND])"
    )]
    Plan {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<OsString>,
    },
    /// Say why each step of a prepare hits or misses the cache
    #[command(
        name = "cache",
        after_help = CACHE_EXAMPLES,
        override_usage = "sqlrs cache explain prepare[:KIND] [OPTIONS] ..."
    )]
    Cache {
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "ARGS"
        )]
        args: Vec<OsString>,
    },
    /// Run a command against an instance
    #[command(name = "run", after_help = RUN_EXAMPLES)]
    Run(RunArgs),
    /// Run psql against an instance
    #[command(name = "run:psql", after_help = RUN_PSQL_EXAMPLES)]
    RunPsql(RunArgs),
    /// Run pgbench against an instance
    #[command(name = "run:pgbench", after_help = RUN_PGBENCH_EXAMPLES)]
    RunPgbench(RunArgs),
    /// List states and instances
    #[command(after_help = LS_EXAMPLES)]
    Ls,
    /// Remove a state or an instance
    #[command(after_help = RM_EXAMPLES)]
    Rm(RmArgs),
    /// Upload a state's snapshot to the object store now
    #[command(after_help = PUSH_EXAMPLES)]
    Push(PushArgs),
    /// Print a DSN with a fresh token for a state (ro) or an instance (rw)
    #[command(after_help = DSN_EXAMPLES)]
    Dsn(DsnArgs),
    /// Pin a state so that it is never evicted
    #[command(after_help = PIN_EXAMPLES)]
    Pin(PinArgs),
    /// Release a state's pins
    #[command(after_help = UNPIN_EXAMPLES)]
    Unpin(UnpinArgs),
    /// Build or restore a state to WARM (--hot: with a standby instance)
    #[command(
        after_help = WARMUP_EXAMPLES,
        override_usage = "sqlrs warmup [OPTIONS] <STATE>\n       \
                          sqlrs warmup [OPTIONS] prepare:psql -- <PSQL_ARGS>..."
    )]
    Warmup(WarmupArgs),
    /// Show recorded lifecycle events
    #[command(after_help = EVENTS_EXAMPLES)]
    Events(EventsArgs),
    /// Lease a fresh, isolated copy of a state or recipe for one test; prints its DSN
    #[command(after_help = LEASE_EXAMPLES)]
    Lease(LeaseArgs),
    /// Give a lease back: its copy is destroyed
    #[command(after_help = RELEASE_EXAMPLES)]
    Release(ReleaseArgs),
    /// List your leases
    #[command(after_help = LEASES_EXAMPLES)]
    Leases,
    /// Check the snapshots and the metadata for damage; --repair fixes what it can
    #[command(after_help = FSCK_EXAMPLES)]
    Fsck(FsckArgs),
    /// Show the local daemon's status (starting it if needed)
    #[command(after_help = STATUS_EXAMPLES)]
    Status,
    /// Stop the local daemon, if one runs
    #[command(after_help = SHUTDOWN_EXAMPLES)]
    Shutdown,
    /// Print a shell completion script
    #[command(after_help = COMPLETIONS_EXAMPLES)]
    Completions {
        #[arg(value_enum)]
        shell: Shell,
    },
    /// Print the version
    #[command(hide = true)]
    Version,
    /// What the completion scripts call: candidates for the last of WORDS
    #[command(name = "__complete", hide = true)]
    Complete {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        words: Vec<String>,
    },
}

/// `prepare:psql`.
#[derive(Debug, Args)]
pub(crate) struct PrepareArgs {
    /// Keep the instance after a run stage, even when the command succeeds
    #[arg(long)]
    pub(crate) keep: bool,
    #[command(flatten)]
    pub(crate) engine: EngineFlags,
    /// A recipe of sqlrs.toml (`sqlrs prepare dev`), instead of psql arguments
    #[arg(value_name = "RECIPE")]
    pub(crate) recipe: Option<String>,
    /// psql arguments: -f FILE, -c SQL, -v NAME=VALUE, -1 (see below)
    #[arg(last = true, value_name = "PSQL_ARGS")]
    pub(crate) psql: Vec<OsString>,
}

/// The engine flags of every prepare kind.
#[derive(Debug, Clone, Default, Args)]
pub(crate) struct EngineFlags {
    /// The PostgreSQL version: a major (16) or major.minor (16.4); default: sqlrs.toml's, else
    /// the newest installed
    #[arg(long, value_name = "VERSION")]
    pub(crate) engine: Option<String>,
    /// A server setting for the build servers and every instance (repeatable)
    #[arg(long = "pg-setting", value_name = "NAME=VALUE")]
    pub(crate) pg_setting: Vec<String>,
}

/// `prepare:lb`.
#[derive(Debug, Args)]
pub(crate) struct PrepareLbArgs {
    /// Keep the instance after a run stage, even when the command succeeds
    #[arg(long)]
    pub(crate) keep: bool,
    #[command(flatten)]
    pub(crate) engine: EngineFlags,
    /// Liquibase arguments: update --changelog-file FILE [...] (see below)
    #[arg(last = true, value_name = "LIQUIBASE_ARGS")]
    pub(crate) lb: Vec<OsString>,
}

/// `prepare:cmd`.
#[derive(Debug, Args)]
pub(crate) struct PrepareCmdArgs {
    /// Keep the instance after a run stage, even when the command succeeds
    #[arg(long)]
    pub(crate) keep: bool,
    #[command(flatten)]
    pub(crate) engine: EngineFlags,
    /// A file, directory or glob the command reads: part of the state's identity (repeatable)
    #[arg(long = "input", value_name = "PATH")]
    pub(crate) inputs: Vec<String>,
    /// The command and its arguments
    #[arg(last = true, value_name = "COMMAND")]
    pub(crate) command: Vec<OsString>,
}

/// `run`, `run:psql`, `run:pgbench`.
#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The instance to run against; stand-alone only (after a prepare, its instance is used)
    #[arg(long, value_name = ID_INSTANCE, value_parser = id_prefix)]
    pub(crate) instance: Option<String>,
    /// After a prepare stage: keep the instance even when the command succeeds
    #[arg(long)]
    pub(crate) keep: bool,
    /// The command and its arguments (run), or the arguments of psql or pgbench
    #[arg(last = true, value_name = "ARGS")]
    pub(crate) args: Vec<OsString>,
}

/// `rm`.
#[derive(Debug, Args)]
pub(crate) struct RmArgs {
    /// A state or instance id (8 or more hex digits)
    #[arg(value_name = ID_ANY, value_parser = id_prefix)]
    pub(crate) id: String,
    /// Remove it even if it is in use
    #[arg(short, long)]
    pub(crate) force: bool,
}

/// `fsck`.
#[derive(Debug, Args)]
pub(crate) struct FsckArgs {
    /// Quarantine damaged snapshots and fix what else can be fixed
    #[arg(long)]
    pub(crate) repair: bool,
}

/// `push`.
#[derive(Debug, Args)]
pub(crate) struct PushArgs {
    /// The state to upload
    #[arg(value_name = ID_STATE, value_parser = id_prefix)]
    pub(crate) id: String,
}

/// `dsn`.
#[derive(Debug, Args)]
pub(crate) struct DsnArgs {
    /// A state (read-only DSN) or an instance (read-write DSN)
    #[arg(value_name = ID_ANY, value_parser = id_prefix)]
    pub(crate) target: String,
    /// The token's scope [default: ro for a state, rw for an instance]
    #[arg(
        long,
        value_name = "SCOPE",
        value_parser = PossibleValuesParser::new(["ro", "rw"])
            .try_map(|s| s.parse::<taidon_core::token::Scope>())
    )]
    pub(crate) scope: Option<taidon_core::token::Scope>,
    /// How long the token is valid: 45s, 30m, 2h, 7d
    #[arg(long, value_name = "DURATION", value_parser = ttl)]
    pub(crate) ttl: Option<u64>,
    /// sslmode=disable instead of verify-full
    #[arg(long, conflicts_with = "user")]
    pub(crate) plain: bool,
    /// The token in the user name instead of the password
    #[arg(long)]
    pub(crate) user: bool,
}

fn reason_parser() -> impl TypedValueParser<Value = taidon_api::PinReason> {
    PossibleValuesParser::new(["main", "tag", "pr", "manual"])
        .try_map(|s| s.parse::<taidon_api::PinReason>())
}

/// `pin`.
#[derive(Debug, Args)]
pub(crate) struct PinArgs {
    /// The state to pin
    #[arg(value_name = ID_STATE, value_parser = id_prefix)]
    pub(crate) id: String,
    /// Why it is pinned
    #[arg(long, value_name = "REASON", value_parser = reason_parser())]
    pub(crate) reason: taidon_api::PinReason,
    /// The branch, tag or pull request the pin belongs to
    #[arg(long = "ref", value_name = "NAME")]
    pub(crate) ref_name: Option<String>,
}

/// `unpin`.
#[derive(Debug, Args)]
pub(crate) struct UnpinArgs {
    /// The state to unpin
    #[arg(value_name = ID_STATE, value_parser = id_prefix)]
    pub(crate) id: String,
    /// Release only the pins of this reason
    #[arg(long, value_name = "REASON", value_parser = reason_parser())]
    pub(crate) reason: Option<taidon_api::PinReason>,
    /// Release only the pins of this branch, tag or pull request
    #[arg(long = "ref", value_name = "NAME")]
    pub(crate) ref_name: Option<String>,
}

/// `warmup`. `args` takes `prepare[:psql]` out of the line before clap sees it, so that the
/// psql arguments land in `psql`.
#[derive(Debug, Args)]
pub(crate) struct WarmupArgs {
    /// Also start a standby instance that the next prepare takes at once
    #[arg(long)]
    pub(crate) hot: bool,
    /// The state to warm up
    #[arg(value_name = ID_STATE, value_parser = id_prefix)]
    pub(crate) id: Option<String>,
    /// After prepare:psql --: the psql arguments of the state to warm up
    #[arg(last = true, value_name = "PSQL_ARGS")]
    pub(crate) psql: Vec<OsString>,
}

/// `lease`.
#[derive(Debug, Args)]
pub(crate) struct LeaseArgs {
    /// A recipe of sqlrs.toml (built first if missing), or a state id or prefix
    #[arg(value_name = "RECIPE|ID")]
    pub(crate) what: String,
    /// How long the lease lives unless released: 90s, 10m, 2h (default: the server's, 10m)
    #[arg(long, value_name = "DURATION", value_parser = ttl)]
    pub(crate) ttl: Option<u64>,
    /// database: a database of its own in a shared instance (fastest); instance: an instance of its own
    #[arg(long, value_name = "ISOLATION", value_parser = isolation)]
    pub(crate) isolation: Option<taidon_api::Isolation>,
    /// How long to wait for a copy when none is ready (default: the server's, 60s)
    #[arg(long, value_name = "DURATION", value_parser = ttl)]
    pub(crate) wait: Option<u64>,
}

/// `release`.
#[derive(Debug, Args)]
pub(crate) struct ReleaseArgs {
    /// The lease id `sqlrs lease` printed (LEASE=...)
    #[arg(value_name = "LEASE")]
    pub(crate) lease: String,
}

fn isolation(s: &str) -> Result<taidon_api::Isolation, String> {
    s.parse()
}

/// `events`.
#[derive(Debug, Args)]
pub(crate) struct EventsArgs {
    /// Only the events of this state
    #[arg(value_name = ID_STATE, value_parser = id_prefix)]
    pub(crate) id: Option<String>,
}

fn non_empty_path(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        Err("a directory is needed".to_owned())
    } else {
        Ok(PathBuf::from(s))
    }
}

/// An id or id prefix: 8 to 64 hex digits, lowercased.
pub(crate) fn id_prefix(s: &str) -> Result<String, String> {
    taidon_core::prefix::normalize(s).map_err(|e| e.to_string())
}

fn ttl(s: &str) -> Result<u64, String> {
    parse_ttl(s).ok_or_else(|| "use a duration such as 45s, 30m, 2h or 7d".to_owned())
}

/// `30m`, `2h`, `7d`, `45s` or plain seconds; zero is no duration.
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn the_clap_tree_is_consistent() {
        Sqlrs::command().debug_assert();
    }

    #[test]
    fn ttls() {
        assert_eq!(parse_ttl("7d"), Some(7 * 86_400));
        assert_eq!(parse_ttl("90"), Some(90));
        assert_eq!(parse_ttl("45s"), Some(45));
        assert_eq!(parse_ttl("2h"), Some(7200));
        assert_eq!(parse_ttl("0m"), None);
        assert_eq!(parse_ttl("5x"), None);
        assert_eq!(parse_ttl(""), None);
        assert_eq!(parse_ttl("99999999999999999999d"), None);
    }
}
