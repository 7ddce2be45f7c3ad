//! Request and response types of the controller's HTTP/JSON API, shared by the controller, the
//! gateway and `sqlrs`.
//!
//! Every route is under `/v1` and, except `GET /v1/health`, needs `Authorization: Bearer
//! <token>`: the home's `<home>/api.token` (an admin), or a token from `taidon token create`
//! whose [`TokenRole`] decides which routes it may use.
//!
//! | route | body | answer |
//! |---|---|---|
//! | `GET /v1/health` | | [`Health`] |
//! | `GET /v1/status` | | [`Status`] |
//! | `POST /v1/prepare` | [`PrepareRequest`] | NDJSON stream of [`PrepareEvent`] |
//! | `GET /v1/states` | | `Vec<`[`StateInfo`]`>` |
//! | `DELETE /v1/states/{id-or-prefix}` | | [`Removed`] |
//! | `GET /v1/instances` | | `Vec<`[`InstanceInfo`]`>` |
//! | `POST /v1/instances` | [`CreateInstance`] | [`InstanceInfo`] |
//! | `GET /v1/instances/{id-or-prefix}` | | [`InstanceInfo`] |
//! | `DELETE /v1/instances/{id-or-prefix}` | | [`Removed`] |
//! | `POST /v1/resolve` | [`ResolveRequest`] | [`ResolveResponse`] |
//! | `POST /v1/touch` | [`Leases`] | `{}` |
//! | `POST /v1/release` | [`Leases`] | `{}` |
//! | `POST /v1/park` | [`Leases`] | `{}` |
//! | `POST /v1/unpark` | [`Leases`] | `{}` |
//! | `POST /v1/dsn` | [`DsnRequest`] | [`DsnResponse`] |
//! | `POST /v1/shutdown` | | `{}` |
//! | `POST /v1/warmup` | [`WarmupRequest`] | NDJSON stream of [`PrepareEvent`] |
//! | `POST /v1/pins` | [`PinRequest`] | [`PinsChanged`] |
//! | `POST /v1/unpin` | [`UnpinRequest`] | [`PinsChanged`] |
//! | `GET /v1/events?state=ID` | | `Vec<`[`EventInfo`]`>` |
//! | `POST /v1/webhook` | a GitHub event, `X-Hub-Signature-256` | `{...}` (no bearer token) |
//! | `GET /v1/keys` | | [`PublicKeys`] |
//! | `POST /v1/builds/{build}/done` | [`CommandDone`] | `{}` |
//! | `POST /v1/plan` | [`PrepareRequest`] | [`Plan`] (builds nothing) |
//! | `POST /v1/leases` | [`LeaseRequest`] | [`LeaseInfo`] (201) |
//! | `GET /v1/leases` | | `Vec<`[`LeaseInfo`]`>` (the caller's; an admin's: all) |
//! | `DELETE /v1/leases/{id}` | | [`LeaseInfo`] (the copy is destroyed) |
//!
//! Errors answer with a 4xx or 5xx status and an [`ApiError`] body: 401 for a missing, wrong,
//! expired or revoked token, 403 for a token that may not do what it asks (see [`TokenRole`]).
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(clippy::todo, clippy::dbg_macro)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
pub use taidon_core::token::Scope;
pub use taidon_core::CloneStrategy;
use taidon_core::{InstanceId, LeaseId, StateId, Step};

/// The API version prefix.
pub const PREFIX: &str = "/v1";

/// What kind of failure an [`ApiError`] is; the CLI picks its exit code from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request itself is wrong: bad arguments, unreadable input, unknown kind (exit 2).
    BadInput,
    /// No state or instance matches the id (exit 2).
    NotFound,
    /// An id prefix matches more than one thing (exit 2).
    Ambiguous,
    /// A prepare step failed: SQL error in the user's script (exit 1).
    StepFailed,
    /// The PostgreSQL binaries are missing or unusable (exit 1).
    Engine,
    /// A limit of the installation is reached, such as running instances (exit 1).
    Capacity,
    /// The API token is missing or wrong (exit 1).
    Unauthorized,
    /// The token is good but may not do this: another user's instance, a gateway token on a
    /// user's route (exit 1).
    Forbidden,
    /// Anything else inside Taidon (exit 1).
    Internal,
}

impl ErrorKind {
    /// The exit code `sqlrs` uses for this kind.
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorKind::BadInput | ErrorKind::NotFound | ErrorKind::Ambiguous => 2,
            _ => 1,
        }
    }

    /// The HTTP status for this kind.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::BadInput | ErrorKind::Ambiguous => 400,
            ErrorKind::Unauthorized => 401,
            ErrorKind::Forbidden => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::StepFailed => 422,
            ErrorKind::Capacity => 503,
            ErrorKind::Engine | ErrorKind::Internal => 500,
        }
    }
}

/// An error as the API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[error("{message}")]
pub struct ApiError {
    pub kind: ErrorKind,
    /// One line for the user: what failed, where (file, step), and why.
    pub message: String,
    /// Further lines (psql's own output, for a failed step).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl ApiError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            detail: None,
        }
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }
}

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    pub ok: bool,
    pub pid: u32,
    pub version: String,
}

/// `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Status {
    pub pid: u32,
    pub version: String,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub home: PathBuf,
    pub api_url: String,
    /// `host:port` of the gateway.
    pub gateway: String,
    /// "PostgreSQL 15.18".
    pub engine_version: String,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub engine_bin_dir: PathBuf,
    pub clone_strategy: CloneStrategy,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub store_path: PathBuf,
    pub store_bytes: u64,
    pub states: u64,
    pub instances_running: u64,
    /// The user PostgreSQL servers run as.
    pub server_user: String,
    /// Eviction starts above this; 0 when the store has no limit.
    #[serde(default)]
    pub store_capacity_bytes: u64,
    /// How many instances may run (standbys included).
    #[serde(default)]
    pub max_instances: u64,
    /// Pre-started instances waiting to be handed out.
    #[serde(default)]
    pub standby_instances: u64,
    /// The object-storage tier, when one is configured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteInfo>,
    /// Every installed engine, the default first.
    #[serde(default)]
    pub engines: Vec<EngineStatus>,
}

/// The object-storage tier as `sqlrs status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RemoteInfo {
    /// `s3://bucket/prefix`.
    pub url: String,
    /// Whether the bucket answered just now.
    pub reachable: bool,
    /// Why it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Snapshots published here and not yet uploaded.
    pub pending_uploads: u64,
    /// Compressed bytes of the chunks in the bucket.
    pub bytes: u64,
    /// Snapshots in the bucket.
    #[serde(default)]
    pub snapshots: u64,
    /// Remote eviction starts above this; 0 when the bucket has no limit.
    #[serde(default)]
    pub capacity_bytes: u64,
}

/// `POST /v1/states/{id}/push`: what uploading a state's snapshot did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Pushed {
    pub state_id: StateId,
    pub url: String,
    pub chunks_uploaded: u64,
    pub chunks_skipped: u64,
    pub bytes_uploaded: u64,
    /// True when the bucket had the snapshot already.
    pub already_there: bool,
}

/// Where a state is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "UPPERCASE")]
pub enum StateStatus {
    Hot,
    Warm,
    Cold,
    Building,
    Starting,
    Failed,
}

impl std::fmt::Display for StateStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            StateStatus::Hot => "HOT",
            StateStatus::Warm => "WARM",
            StateStatus::Cold => "COLD",
            StateStatus::Building => "BUILDING",
            StateStatus::Starting => "STARTING",
            StateStatus::Failed => "FAILED",
        })
    }
}

/// One state, as `GET /v1/states` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StateInfo {
    pub state_id: StateId,
    /// `None` for a base state.
    pub parent: Option<StateId>,
    /// The step's label (file or command), or the engine for a base.
    pub label: String,
    pub status: StateStatus,
    pub size_bytes: u64,
    pub build_cost_ms: u64,
    pub restore_cost_ms: u64,
    pub created_ms: u64,
    pub last_access_ms: u64,
    pub access_count: u64,
    pub instances: u64,
    /// The retention score: the lowest is evicted first.
    #[serde(default)]
    pub score: f64,
    /// `main`, `tag`, `pr` or `manual` (with `:REF`) when pinned; `released` for a closed PR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<String>,
    /// Why it is COLD or FAILED.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_reason: Option<String>,
    /// Where its snapshot is: `local`, `remote`, `local+remote`, or `-` (none).
    #[serde(default)]
    pub location: String,
    /// Made by a command a client ran (`prepare:cmd`): only a client can rebuild it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub client_only: bool,
}

/// Why a state is pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum PinReason {
    Main,
    Tag,
    Pr,
    Manual,
}

impl std::fmt::Display for PinReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PinReason::Main => "main",
            PinReason::Tag => "tag",
            PinReason::Pr => "pr",
            PinReason::Manual => "manual",
        })
    }
}

impl std::str::FromStr for PinReason {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "main" => Ok(PinReason::Main),
            "tag" => Ok(PinReason::Tag),
            "pr" => Ok(PinReason::Pr),
            "manual" => Ok(PinReason::Manual),
            other => Err(format!(
                "unknown pin reason '{other}' (main, tag, pr or manual)"
            )),
        }
    }
}

/// `POST /v1/pins`: pin a state (tagging it with a ref a webhook can name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PinRequest {
    /// A state id or a prefix of one.
    pub state: String,
    pub reason: PinReason,
    /// A branch, tag or pull request number; empty for none.
    #[serde(default)]
    pub ref_name: String,
}

/// `POST /v1/unpin`: release a state's pins (all of them, or those matching).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct UnpinRequest {
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<PinReason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ref_name: Option<String>,
}

/// One pin of a state; an inactive one is a tag a webhook can re-activate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PinInfo {
    pub reason: PinReason,
    pub ref_name: String,
    pub active: bool,
}

/// A state's pins after a pin or unpin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PinsChanged {
    pub state_id: StateId,
    pub pins: Vec<PinInfo>,
}

/// `POST /v1/warmup`: build a state (from steps, or a known state by id) to WARM, and with
/// `hot` also start a standby instance ready to hand out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WarmupRequest {
    /// A known state id or prefix; when absent, `steps` name the state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default)]
    pub steps: Vec<Step>,
    #[serde(default)]
    pub hot: bool,
    #[serde(default)]
    pub engine: EngineRequest,
}

/// One recorded lifecycle event (`GET /v1/events`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EventInfo {
    pub ts_ms: u64,
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_id: Option<StateId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<InstanceId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InstanceInfo {
    pub instance_id: InstanceId,
    pub state_id: StateId,
    /// `running`, `stopped` or `failed`.
    pub status: String,
    /// The gateway DSN, with a token as the password.
    pub dsn: String,
    pub created_ms: u64,
    /// How long cloning the snapshot took.
    pub clone_ms: u64,
    /// How long starting the server took, until it accepted connections.
    pub start_ms: u64,
    /// The subject of the API token that created it (`admin` for the home's own token); empty
    /// for standbys and instances from before owners were recorded.
    #[serde(default)]
    pub owner: String,
}

/// The engine a recipe is built on: a PostgreSQL version and server settings. Both are part
/// of every state id of the recipe.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EngineRequest {
    /// `"16"` (the newest 16.x installed) or `"16.4"`; none: the controller's default engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// `NAME = VALUE` server settings, such as `max_prepared_transactions = 10`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub settings: BTreeMap<String, String>,
}

/// One installed engine, as `GET /v1/status` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EngineStatus {
    /// "PostgreSQL 16.14".
    pub version: String,
    pub major: u32,
    pub minor: u32,
    #[cfg_attr(feature = "openapi", schema(value_type = String))]
    pub bin_dir: PathBuf,
    /// Whether a recipe that names no version gets it.
    pub default: bool,
}

/// A Liquibase changelog (`prepare:lb`): the controller plans it into one step per pending
/// changeset (offline, with Liquibase's own checksums) and appends them to the steps.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LiquibaseRequest {
    /// The master changelog, relative to the closure's root (Liquibase's search path).
    pub changelog: String,
    /// Liquibase arguments besides the changelog (`--contexts=…`, `-DNAME=VALUE`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Every file of the changelog's closure, each a blob the controller has.
    pub files: Vec<taidon_core::plan::Included>,
}

/// `POST /v1/prepare`: build (or find) the state of `steps` and, if asked, start an instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PrepareRequest {
    /// The steps; every file they name is a blob the controller already has (see
    /// `POST /v1/blobs/missing`).
    pub steps: Vec<Step>,
    pub create_instance: bool,
    #[serde(default)]
    pub engine: EngineRequest,
    /// Changesets to build after `steps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liquibase: Option<LiquibaseRequest>,
}

/// `POST /v1/blobs/missing`: which of these content hashes the controller lacks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BlobsMissingRequest {
    pub sha256: Vec<String>,
}

/// The answer to `POST /v1/blobs/missing`, in the order asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BlobsMissing {
    pub missing: Vec<String>,
}

/// One line of the `POST /v1/prepare` NDJSON stream. The stream ends with `Done` or `Failed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum PrepareEvent {
    /// The chain: which steps are already cached.
    Plan {
        total: usize,
        cached: usize,
        state_id: StateId,
    },
    /// The base state is being created with initdb.
    Initdb {
        state_id: StateId,
    },
    /// The wanted state is COLD (its snapshot was evicted): it is rebuilt from `from`, its
    /// nearest surviving ancestor (`None`: from initdb), replaying `steps` steps.
    Restoring {
        state_id: StateId,
        from: Option<StateId>,
        steps: usize,
    },
    /// Another prepare is building this state; this one waits for it.
    Waiting {
        index: usize,
        state_id: StateId,
    },
    /// Step `index` (1-based) of `total` started.
    StepStarted {
        index: usize,
        total: usize,
        label: String,
        state_id: StateId,
    },
    /// A snapshot missing here is downloaded from the bucket instead of being built: step
    /// `index` (0: the base) of the chain.
    Downloading {
        index: usize,
        state_id: StateId,
        /// `s3://bucket/prefix`.
        from: String,
    },
    /// The download finished and the snapshot is published here.
    Downloaded {
        index: usize,
        state_id: StateId,
        bytes: u64,
        elapsed_ms: u64,
    },
    /// Something the user should know that does not stop the prepare (a corrupt snapshot
    /// in the bucket, skipped): one line.
    Notice {
        message: String,
    },
    /// Bytes of a long transfer so far: a snapshot copied for a step or an instance.
    Transfer {
        /// What is moved: `copying snapshot 3f2a9c1e`.
        what: String,
        done_bytes: u64,
        total_bytes: u64,
    },
    /// Step `index` is a command the client runs itself (`prepare:cmd`), where its inputs
    /// are: against `dsn` (the build server, through the gateway, with a token for this build
    /// only), then it reports with `POST /v1/builds/{build}/done`. Nothing more comes until then.
    RunCommand {
        index: usize,
        total: usize,
        label: String,
        state_id: StateId,
        build: InstanceId,
        argv: Vec<String>,
        dsn: String,
    },
    /// Nothing new: sent every few seconds while a client's command runs, so that a client
    /// that left is noticed (its stream fails) and its build ends. Clients ignore it.
    Heartbeat {},
    /// Step `index` finished and its snapshot is published.
    StepDone {
        index: usize,
        total: usize,
        state_id: StateId,
        elapsed_ms: u64,
    },
    /// An instance is being cloned and started.
    InstanceStarting {
        state_id: StateId,
    },
    Done {
        state_id: StateId,
        /// Whether every step was already cached.
        cache_hit: bool,
        instance: Option<InstanceInfo>,
    },
    Failed {
        error: ApiError,
    },
}

/// `POST /v1/plan`: the states a prepare would make, and which are cached; nothing is built.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Plan {
    /// "PostgreSQL 15.18", with its settings.
    pub engine: String,
    /// The base first (index 0), then one per step.
    pub steps: Vec<PlannedStep>,
}

/// One state of a [`Plan`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlannedStep {
    /// 0 for the base, else the step's 1-based index.
    pub index: usize,
    pub label: String,
    pub state_id: StateId,
    /// `local`, `remote`, `local+remote`, or `missing`.
    pub cached: String,
    /// Why it hits or misses: against the nearest cached sibling (a state built on the same
    /// parent), or the parent that is missing.
    pub why: String,
}

/// `POST /v1/builds/{build}/done`: how the client's command for a build ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CommandDone {
    /// The command's exit code (`-1` when it could not start or was killed).
    pub exit_code: i32,
    /// What it printed (the end of it), shown when it failed.
    #[serde(default)]
    pub output: String,
}

/// `POST /v1/instances`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CreateInstance {
    /// A state id or a prefix of one.
    pub state: String,
}

/// How far one lease's copy is kept apart from the others'.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// A database of its own (`CREATE DATABASE … TEMPLATE`) inside a running instance of the
    /// state, which other leases share: their cluster-wide objects (roles, tablespaces,
    /// settings changed with `ALTER SYSTEM`) are shared too.
    #[default]
    Database,
    /// A whole instance of its own (a clone of the snapshot and its own `postgres`).
    Instance,
}

impl std::fmt::Display for Isolation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Isolation::Database => "database",
            Isolation::Instance => "instance",
        })
    }
}

impl std::str::FromStr for Isolation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "database" => Ok(Isolation::Database),
            "instance" => Ok(Isolation::Instance),
            _ => Err(format!(
                "unknown isolation {s:?}: expected database or instance"
            )),
        }
    }
}

/// `POST /v1/leases`: a fresh, isolated copy of a state for one test. Exactly one of `state`
/// and `prepare` is given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LeaseRequest {
    /// A state id or a prefix of one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    /// A recipe, as the prepare it expands to (its files are blobs already): the state is
    /// built first if it is missing, once however many leases ask at the same time.
    /// `create_instance` is ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prepare: Option<PrepareRequest>,
    /// How long the lease lives, in seconds; the configured default when absent. Over the
    /// configured maximum is a 400.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<u64>,
    #[serde(default)]
    pub isolation: Isolation,
    /// How long to wait for a copy when none is ready, in seconds; the configured default
    /// when absent. Past it: 503.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_s: Option<u64>,
}

/// A lease: a fresh copy of a state that nobody else writes to, until released or expired.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct LeaseInfo {
    pub lease: LeaseId,
    pub state_id: StateId,
    pub isolation: Isolation,
    /// The gateway DSN, with a token for this copy only as the password.
    pub dsn: String,
    /// The instance the copy lives in (shared with other leases when `isolation` is
    /// `database`).
    pub instance_id: InstanceId,
    /// The copy's database: the lease's own when `isolation` is `database`, else `postgres`.
    pub database: String,
    pub created_ms: u64,
    pub expires_ms: u64,
    /// How long the request waited for a ready copy (0 when one was ready).
    pub waited_ms: u64,
    /// The subject of the API token that took it.
    pub owner: String,
}

/// What a `DELETE` removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Removed {
    pub states: Vec<StateId>,
    pub instances: Vec<InstanceId>,
}

/// `POST /v1/resolve`: where the gateway finds an instance a verified token names. A `Ready`
/// answer counts one more active connection on the instance until `POST /v1/release`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ResolveRequest {
    pub state_id: StateId,
    /// The instance of an `rw` token; `ro` tokens name none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<InstanceId>,
    #[serde(default = "scope_rw")]
    pub scope: Scope,
    /// The token's own connection limit, a ceiling on the controller's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_conn: Option<u32>,
}

fn scope_rw() -> Scope {
    Scope::Rw
}

/// `POST /v1/touch` (connections still open), `POST /v1/release` (connections closed),
/// `POST /v1/park` (clients gone, their server sessions kept by the gateway for reuse: they
/// count against the limits but not as activity) and `POST /v1/unpark` (kept sessions closed,
/// or handed to a client that Resolve counted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Leases {
    /// One entry per connection: an instance appears as often as it has connections.
    pub instance_ids: Vec<InstanceId>,
}

/// `POST /v1/dsn`: a DSN with a fresh token for a state or an instance that exists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DsnRequest {
    /// A state or instance id, or a prefix of one.
    pub target: String,
    /// `ro` by default for a state, `rw` for an instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    /// Token lifetime; the controller's default when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<u64>,
}

/// The answer to `POST /v1/dsn`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DsnResponse {
    /// The token in the password, `sslmode=verify-full` with `sslrootcert` when the gateway
    /// speaks TLS.
    pub dsn: String,
    /// The same without TLS (`sslmode=disable`).
    pub dsn_plain: String,
    /// The token as the user name, for clients whose password is taken by something else.
    pub dsn_user: String,
    pub state_id: StateId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<InstanceId>,
    pub scope: Scope,
    /// Expiry, seconds since the Unix epoch.
    pub expires_s: u64,
    /// The CA certificate that signs the gateway's, when it speaks TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<String>))]
    pub sslrootcert: Option<PathBuf>,
}

/// The answer to a resolve.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ResolveResponse {
    /// The instance runs; connect to it with these credentials.
    Ready(Target),
    /// An instance is being started for the state: ask again after this long.
    Starting { retry_after_ms: u64 },
    /// No such state or instance, or it is not running.
    Missing,
    /// The token may not reach this (an `rw` token without its instance, a wrong scope).
    Forbidden { reason: String },
    /// As many connections as allowed are open on the state or instance.
    TooManyConnections { limit: u32 },
}

impl std::fmt::Debug for ResolveResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ResolveResponse::Ready(t) => f.debug_tuple("Ready").field(t).finish(),
            ResolveResponse::Starting { retry_after_ms } => f
                .debug_struct("Starting")
                .field("retry_after_ms", retry_after_ms)
                .finish(),
            ResolveResponse::Missing => f.write_str("Missing"),
            ResolveResponse::Forbidden { reason } => {
                f.debug_struct("Forbidden").field("reason", reason).finish()
            }
            ResolveResponse::TooManyConnections { limit } => f
                .debug_struct("TooManyConnections")
                .field("limit", limit)
                .finish(),
        }
    }
}

/// A running server and the credentials the gateway uses for it. Never shown to a client.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Target {
    /// The instance, for `POST /v1/release` when the connection closes.
    pub instance_id: InstanceId,
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("instance_id", &self.instance_id)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// `<home>/daemon.json`: how a client finds the running daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DaemonInfo {
    pub pid: u32,
    /// `http://127.0.0.1:PORT`.
    pub api_url: String,
    /// `host:port` of the gateway.
    pub gateway: String,
}

/// What an API token may do. Tokens other than the home's own `api.token` (an admin) are made
/// with `taidon token create` and kept, hashed, in the controller's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum TokenRole {
    /// Everything, on every user's instances.
    Admin,
    /// States (shared) and the user's own instances; no resolve, touch, release or shutdown.
    User,
    /// A standalone gateway: resolve, touch, release and the public keys, nothing else.
    Gateway,
}

impl TokenRole {
    /// `admin`, `user` or `gateway`.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenRole::Admin => "admin",
            TokenRole::User => "user",
            TokenRole::Gateway => "gateway",
        }
    }
}

impl std::fmt::Display for TokenRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for TokenRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(TokenRole::Admin),
            "user" => Ok(TokenRole::User),
            "gateway" => Ok(TokenRole::Gateway),
            other => Err(format!("unknown token role {other:?}")),
        }
    }
}

/// An API token as `taidon token list` shows it: never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenInfo {
    /// The token's public id (also its second `_`-separated part).
    pub id: String,
    pub sub: String,
    pub role: TokenRole,
    pub created_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_ms: Option<u64>,
}

/// One public key DSN tokens may be signed with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PublicKey {
    pub kid: String,
    /// Always `EdDSA`: HS256 secrets never leave the controller.
    pub alg: taidon_core::token::Algorithm,
    /// The Ed25519 public key, 32 bytes in hex.
    pub public_hex: String,
}

/// `GET /v1/keys`: what a standalone gateway verifies DSN tokens with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PublicKeys {
    /// The installation id tokens must name as `aud`.
    pub audience: String,
    /// The `kid` new tokens are signed with.
    pub current: String,
    pub keys: Vec<PublicKey>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_tagged_ndjson_lines() {
        let e = PrepareEvent::StepStarted {
            index: 1,
            total: 2,
            label: "schema.sql".into(),
            state_id: StateId::from_bytes([0; 32]),
        };
        let line = serde_json::to_string(&e).unwrap();
        assert!(
            line.starts_with(r#"{"event":"step_started","index":1"#),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<PrepareEvent>(&line).unwrap(), e);
    }

    #[test]
    fn target_debug_hides_the_password() {
        let t = Target {
            instance_id: InstanceId::from_bytes([1; 8]),
            host: "127.0.0.1".into(),
            port: 5432,
            user: "postgres".into(),
            password: "s3cret".into(),
        };
        assert!(!format!("{:?}", ResolveResponse::Ready(t)).contains("s3cret"));
    }

    #[test]
    fn exit_codes_follow_kind() {
        assert_eq!(ErrorKind::BadInput.exit_code(), 2);
        assert_eq!(ErrorKind::Ambiguous.exit_code(), 2);
        assert_eq!(ErrorKind::StepFailed.exit_code(), 1);
    }
}

/// `POST /v1/fsck`: check the store against the metadata; with `repair`, fix what can be.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsckRequest {
    #[serde(default)]
    pub repair: bool,
}

/// What kind of damage or inconsistency `fsck` found.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// A snapshot's data differs from the checksum its manifest records.
    ChecksumMismatch,
    /// A published snapshot the metadata has no row for.
    ManifestWithoutState,
    /// A WARM or HOT state whose snapshot is neither here nor in the bucket.
    StateWithoutSnapshot,
    /// A directory in the store or among the instances that nothing explains.
    OrphanDirectory,
    /// An instance whose data directory is gone.
    InstanceWithoutData,
}

impl FindingKind {
    /// The name the API and the CLI use (`checksum_mismatch`).
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::ChecksumMismatch => "checksum_mismatch",
            FindingKind::ManifestWithoutState => "manifest_without_state",
            FindingKind::StateWithoutSnapshot => "state_without_snapshot",
            FindingKind::OrphanDirectory => "orphan_directory",
            FindingKind::InstanceWithoutData => "instance_without_data",
        }
    }
}

impl std::fmt::Display for FindingKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One thing `fsck` found, and whether it repaired it.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub kind: FindingKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_id: Option<StateId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<InstanceId>,
    /// The directory concerned, for orphans (relative to the home when under it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// What is wrong, and with `repair`, what was done.
    pub detail: String,
    pub repaired: bool,
}

/// `POST /v1/fsck`'s answer.
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsckReport {
    pub findings: Vec<Finding>,
    /// Snapshots whose checksum was computed.
    pub snapshots_checked: u64,
    /// Snapshots skipped because a build or a removal held them.
    #[serde(default)]
    pub snapshots_skipped: u64,
    /// Bytes read to compute them.
    pub bytes_read: u64,
    pub elapsed_ms: u64,
    /// Whether repairs were asked for.
    pub repair: bool,
}

impl FsckReport {
    /// The findings not repaired: `sqlrs fsck` fails when there are any.
    pub fn unrepaired(&self) -> usize {
        self.findings.iter().filter(|f| !f.repaired).count()
    }

    /// Whether the home is (now) consistent.
    pub fn clean(&self) -> bool {
        self.unrepaired() == 0
    }
}

#[cfg(test)]
mod fsck_tests {
    use super::*;

    #[test]
    fn findings_serialize_with_snake_case_kinds_and_omit_empty_ids() {
        let f = Finding {
            kind: FindingKind::ChecksumMismatch,
            state_id: Some(StateId::from_bytes([7; 32])),
            instance_id: None,
            path: None,
            detail: "differs".into(),
            repaired: false,
        };
        let json = serde_json::to_string(&f).unwrap();
        assert!(json.contains(r#""kind":"checksum_mismatch""#), "{json}");
        assert!(!json.contains("instance_id"), "{json}");
        assert_eq!(serde_json::from_str::<Finding>(&json).unwrap(), f);
        assert_eq!(FindingKind::OrphanDirectory.to_string(), "orphan_directory");
    }

    #[test]
    fn a_report_is_clean_when_everything_found_was_repaired() {
        let mut r = FsckReport::default();
        assert!(r.clean());
        let finding = |repaired| Finding {
            kind: FindingKind::OrphanDirectory,
            state_id: None,
            instance_id: None,
            path: Some("snapshots/junk".into()),
            detail: String::new(),
            repaired,
        };
        r.findings.push(finding(true));
        assert!(r.clean());
        r.findings.push(finding(false));
        assert_eq!(r.unrepaired(), 1);
        assert!(!r.clean());
    }
}
