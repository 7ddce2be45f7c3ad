//! The runtime boundary: a trait a local or (later) Kubernetes runtime implements. It runs
//! builds (initdb, a server that applies a step, a clean stop) and instances, and cleans up
//! after a crash. Data lives in [`DataArea`]s it shares with the snapshot store; nothing in the
//! contract is a local path, a pid or a loopback address.

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;

use taidon_core::{DataArea, EngineFingerprint, InstanceId, LiquibaseStep, StateId, Step};
use tokio::io::AsyncRead;

use crate::engine::Engine;
use crate::error::RuntimeError;
use crate::health::Health;
use crate::psql::{StepError, StepOutput};
use crate::run_as::create_private_dir;
use crate::run_as::RunAs;
use crate::server::{Server, ServerConfig};

/// A boxed, sendable future, so the traits stay object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What `sqlrs status` shows about a runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeInfo {
    /// "PostgreSQL 15.18".
    pub engine_version: String,
    /// Where the engine's binaries are, where its servers run.
    pub bin_dir: PathBuf,
    /// The user servers run as.
    pub server_user: String,
}

/// One installed PostgreSQL, as `sqlrs status` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineInfo {
    pub major: u32,
    pub minor: u32,
    /// The output of `postgres --version`.
    pub version_line: String,
    pub bin_dir: PathBuf,
}

/// Where clients (the gateway) reach an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

/// What a previous process left of an instance, once [`Runtime::reclaim_instance`] has dealt
/// with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reclaimed {
    /// The server it stopped (a previous process's), described for the log.
    pub stopped: Option<String>,
    /// Whether the instance's data is still there to start a server on.
    pub has_data: bool,
}

/// Something that runs PostgreSQL builds and instances.
pub trait Runtime: Send + Sync {
    /// The default engine: the one a recipe that names none is built on.
    fn engine(&self) -> &EngineFingerprint;
    /// Every engine this runtime can run, the default first.
    fn engines(&self) -> Vec<EngineInfo>;
    /// The engine, its binaries and the server user, for people.
    fn describe(&self) -> RuntimeInfo;
    /// Checks, before anything is built, that `engine` (its major and minor) is installed and
    /// accepts its server settings.
    fn check_engine<'a>(
        &'a self,
        engine: &'a EngineFingerprint,
    ) -> BoxFuture<'a, Result<(), RuntimeError>>;

    /// Makes `data` (an empty area a store began) a new cluster of `engine`: the base state.
    /// The engine's settings go into its `postgresql.conf`, so every server started on a
    /// descendant of it runs with them.
    fn init_data<'a>(
        &'a self,
        data: &'a DataArea,
        engine: &'a EngineFingerprint,
    ) -> BoxFuture<'a, Result<(), RuntimeError>>;
    /// Starts a server that builds `state` on `data` (a clone of its parent's snapshot),
    /// reachable by the build only.
    fn start_build<'a>(
        &'a self,
        state: StateId,
        data: &'a DataArea,
    ) -> BoxFuture<'a, Result<Box<dyn BuildServer>, RuntimeError>>;

    /// Makes room for instance `iid`'s data: the area a store restores a snapshot into.
    fn prepare_instance(&self, iid: InstanceId) -> BoxFuture<'_, Result<DataArea, RuntimeError>>;
    /// Starts a server on `iid`'s data (restored from `state`'s snapshot, or kept from an
    /// earlier start) and waits until it accepts connections. The handle is how the caller
    /// reaches, watches and stops it.
    fn start_instance(
        &self,
        iid: InstanceId,
        state: StateId,
    ) -> BoxFuture<'_, Result<Box<dyn Instance>, RuntimeError>>;
    /// Deletes `iid`'s data, first stopping any server a previous process left on it (its own
    /// server the caller stops or discards first).
    fn remove_instance(&self, iid: InstanceId) -> BoxFuture<'_, Result<(), RuntimeError>>;
    /// After a restart: takes over the server a previous process left running for `iid`, if
    /// it runs as this runtime would run it, so that its clients stay connected. `None` when
    /// there is none to take over; [`Runtime::reclaim_instance`] then clears the way for a
    /// new one.
    fn adopt_instance(
        &self,
        iid: InstanceId,
    ) -> BoxFuture<'_, Result<Option<Box<dyn Instance>>, RuntimeError>> {
        let _ = iid;
        Box::pin(async { Ok(None) })
    }

    /// After a restart: stops the server a previous process left on `iid`'s data, if any, so
    /// that this one can start it as its own, and says whether the data survived.
    fn reclaim_instance(&self, iid: InstanceId) -> BoxFuture<'_, Result<Reclaimed, RuntimeError>>;
    /// After a restart: stops the server a previous process left building on `data` (a build
    /// the store lists as left over), if any; what it stopped.
    fn stop_leftover<'a>(
        &'a self,
        data: &'a DataArea,
    ) -> BoxFuture<'a, Result<Option<String>, RuntimeError>>;
    /// After a restart, once leftover servers are stopped: deletes what builds of a previous
    /// process left of the runtime's own (sockets, work directories).
    fn discard_leftovers(&self) -> BoxFuture<'_, Result<(), RuntimeError>>;
    /// After a restart, once the instances in `keep` are adopted: ends whatever else the
    /// runtime runs for this controller (a pod a crashed controller left); what it ended.
    fn end_unadopted<'a>(
        &'a self,
        keep: &'a [InstanceId],
    ) -> BoxFuture<'a, Result<Vec<String>, RuntimeError>> {
        let _ = keep;
        Box::pin(async { Ok(Vec::new()) })
    }
    /// For a consistency check: the entries where this runtime keeps instances' data, each
    /// with whether it holds a data directory; `None` when it keeps none to look at.
    fn instance_entries(&self) -> BoxFuture<'_, Result<Option<Vec<InstanceEntry>>, RuntimeError>> {
        Box::pin(async { Ok(None) })
    }
}

/// One entry where a runtime keeps instances' data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceEntry {
    /// Its name there.
    pub name: String,
    /// The instance it belongs to, when the name is one.
    pub instance: Option<InstanceId>,
    /// Where it is, for people.
    pub location: String,
    /// Whether it holds a PostgreSQL data directory.
    pub has_data: bool,
}

/// A running build server: it applies steps to the data it runs on.
pub trait BuildServer: Send + Sync + std::fmt::Debug {
    /// Runs `step`: psql (`ON_ERROR_STOP=1`) or Liquibase, its input files laid out from
    /// `inputs` so that `-f`, `\i` and the changelog's includes find them where the user had
    /// them.
    fn apply<'a>(
        &'a self,
        step: &'a Step,
        inputs: &'a dyn StepInputs,
    ) -> BoxFuture<'a, Result<StepOutput, StepError>>;
    /// Opens the server to a client that runs a step's command itself (`prepare:cmd`):
    /// where the gateway reaches it, and a fresh superuser password for the run.
    fn open_to_client(&self) -> BoxFuture<'_, Result<(Endpoint, String), RuntimeError>>;
    /// Closes it again: the password is removed, so none is published with the snapshot.
    fn close_to_client(&self) -> BoxFuture<'_, Result<(), RuntimeError>>;
    /// Stops cleanly (a fast shutdown writes a checkpoint): the data is then ready to publish,
    /// and an instance started on a clone of it needs no recovery.
    fn stop(self: Box<Self>) -> BoxFuture<'static, Result<(), RuntimeError>>;
}

/// Where a build reads the content of a step's input files: by SHA-256, never by a client's
/// path.
pub trait StepInputs: Send + Sync {
    /// The content of the blob `sha256`.
    fn open<'a>(
        &'a self,
        sha256: &'a str,
    ) -> BoxFuture<'a, io::Result<Box<dyn AsyncRead + Send + Unpin>>>;
}

/// A running instance, whatever runs it: the runtime's handle on one server.
pub trait Instance: Send + Sync + std::fmt::Debug {
    /// Where clients (the gateway) connect.
    fn endpoint(&self) -> Endpoint;
    /// Set `role`'s password; only its SCRAM verifier reaches the server.
    fn set_password<'a>(
        &'a self,
        role: &'a str,
        password: &'a str,
    ) -> BoxFuture<'a, Result<(), RuntimeError>>;
    /// Run `sql` (statements, no rows back) as the superuser.
    fn execute<'a>(&'a self, sql: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>>;
    /// Whether the server still runs. A server that ended on its own (killed, crashed) reports
    /// how, on this and every later call.
    fn health(&mut self) -> Health;
    /// Stop the instance cleanly (a checkpoint), keeping its data.
    fn stop(self: Box<Self>) -> BoxFuture<'static, Result<(), RuntimeError>>;
    /// End an instance whose data is about to be deleted: no checkpoint worth waiting for.
    fn discard(self: Box<Self>) -> BoxFuture<'static, Result<(), RuntimeError>>;
    /// Lets go of the server without stopping it, for a process that exits and leaves it to
    /// the next one (which reclaims it, see [`Runtime::reclaim_instance`]).
    fn leave_running(self: Box<Self>);
}

/// Where a [`LocalRuntime`] keeps what it owns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalLayout {
    /// `<instances>/<id>/data` and `<instances>/<id>/sock` of each instance.
    pub instances: PathBuf,
    /// Socket directories of build servers.
    pub run: PathBuf,
    /// `instances/<id>.log` and `builds/<state>.log`.
    pub logs: PathBuf,
    /// Where each step's input files are laid out while it runs.
    pub work: PathBuf,
    /// What tools keep between runs: Liquibase's JVM class archive.
    pub cache: PathBuf,
}

/// Builds and instances as direct child processes of this one, their data in local
/// directories.
#[derive(Debug, Clone)]
pub struct LocalRuntime {
    /// Every installed engine, the default first; never empty.
    engines: Vec<Engine>,
    run_as: Option<RunAs>,
    layout: LocalLayout,
    /// Instances also listen on this address and are reached there.
    advertise: Option<std::net::IpAddr>,
    /// Settings the engines accepted already (a cache hit asks again): engine and settings.
    accepted: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<EngineFingerprint>>>,
}

impl LocalRuntime {
    /// A runtime running `engine`'s servers as `run_as` (when root), keeping its files where
    /// `layout` says (the directories are created as needed).
    pub fn new(engine: Engine, run_as: Option<RunAs>, layout: LocalLayout) -> Self {
        Self {
            engines: vec![engine],
            run_as,
            layout,
            advertise: None,
            accepted: Default::default(),
        }
    }

    /// Also runs these engines (beside the default one `new` was given), for recipes that
    /// name another version.
    pub fn with_other_engines(mut self, others: Vec<Engine>) -> Self {
        self.engines.extend(others);
        self
    }

    /// "15.18, 16.14": the versions installed, for messages.
    fn installed(&self) -> String {
        self.engines
            .iter()
            .map(|e| format!("{}.{}", e.fingerprint.major, e.fingerprint.minor))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn default_engine(&self) -> &Engine {
        &self.engines[0]
    }

    /// The installation that makes `fingerprint`'s states, carrying its settings.
    fn engine_for(&self, fingerprint: &EngineFingerprint) -> Result<Engine, RuntimeError> {
        self.engines
            .iter()
            .find(|e| {
                e.fingerprint.major == fingerprint.major && e.fingerprint.minor == fingerprint.minor
            })
            .map(|e| e.with_fingerprint(fingerprint))
            .ok_or_else(|| RuntimeError::EngineMissing {
                asked: fingerprint.version(),
                major: fingerprint.major,
                installed: self.installed(),
            })
    }

    /// The installation that runs the cluster in `data_dir`: the one of its `PG_VERSION`
    /// (the default when the file cannot be read; the server then says what is wrong).
    fn engine_of(&self, data_dir: &Path) -> Result<&Engine, RuntimeError> {
        let Ok(text) = std::fs::read_to_string(data_dir.join("PG_VERSION")) else {
            return Ok(self.default_engine());
        };
        let major: u32 = text.trim().parse().unwrap_or(0);
        self.engines
            .iter()
            .find(|e| e.fingerprint.major == major)
            .ok_or_else(|| RuntimeError::EngineMissing {
                asked: format!("PostgreSQL {major}"),
                major,
                installed: self.installed(),
            })
    }

    /// Instances also listen on `addr` and report it as their host, for a gateway on another
    /// machine.
    pub fn with_instance_host(mut self, addr: Option<std::net::IpAddr>) -> Self {
        self.advertise = addr;
        self
    }

    fn instance_dir(&self, iid: &InstanceId) -> PathBuf {
        self.layout.instances.join(iid.to_string())
    }

    fn instance_config(&self, iid: &InstanceId) -> ServerConfig {
        let dir = self.instance_dir(iid);
        ServerConfig {
            data_dir: dir.join("data"),
            socket_dir: dir.join("sock"),
            tcp: true,
            advertise: self.advertise,
            port: None,
            log_file: self.instance_logs().join(format!("{iid}.log")),
        }
    }

    /// Where instances' server logs are: `<id>.log` each.
    fn instance_logs(&self) -> PathBuf {
        self.layout.logs.join("instances")
    }

    /// Runs `f` on a blocking thread (it waits for processes or walks directories).
    async fn blocking<T, F>(f: F) -> Result<T, RuntimeError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, RuntimeError> + Send + 'static,
    {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| RuntimeError::Task(e.to_string()))?
    }
}

/// The directory of a local area; another kind of area is not this runtime's.
fn local_dir(data: &DataArea) -> Result<&Path, RuntimeError> {
    data.as_local()
        .ok_or_else(|| RuntimeError::ForeignArea(data.clone()))
}

fn describe_killed(pid: Option<u32>) -> Option<String> {
    pid.map(|pid| format!("postgres (pid {pid})"))
}

/// Creates `dir` and its parents (a missing log directory must not fail a start).
fn ensure_dir(dir: &Path) -> Result<(), RuntimeError> {
    std::fs::create_dir_all(dir).map_err(RuntimeError::io("cannot create", dir))
}

impl Runtime for LocalRuntime {
    fn engine(&self) -> &EngineFingerprint {
        &self.default_engine().fingerprint
    }

    fn engines(&self) -> Vec<EngineInfo> {
        self.engines
            .iter()
            .map(|e| EngineInfo {
                major: e.fingerprint.major,
                minor: e.fingerprint.minor,
                version_line: e.version_line.clone(),
                bin_dir: e.bin_dir.clone(),
            })
            .collect()
    }

    fn check_engine<'a>(
        &'a self,
        engine: &'a EngineFingerprint,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let installed = self.engine_for(engine)?;
            let known = |set: &std::collections::HashSet<EngineFingerprint>| set.contains(engine);
            if engine.settings.is_empty()
                || known(&self.accepted.lock().unwrap_or_else(|p| p.into_inner()))
            {
                return Ok(());
            }
            ensure_dir(&self.layout.run)?;
            let scratch = self
                .layout
                .run
                .join(format!("check-{:08x}", rand::random::<u32>()));
            create_private_dir(&scratch, self.run_as.as_ref())?;
            let checked = installed
                .check_settings(&scratch, self.run_as.as_ref())
                .await;
            let _ = std::fs::remove_dir_all(&scratch);
            if checked.is_ok() {
                self.accepted
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(engine.clone());
            }
            checked
        })
    }

    fn describe(&self) -> RuntimeInfo {
        RuntimeInfo {
            engine_version: self.default_engine().fingerprint.version(),
            bin_dir: self.default_engine().bin_dir.clone(),
            server_user: match &self.run_as {
                Some(u) => u.user.clone(),
                None => current_user_name(),
            },
        }
    }

    fn init_data<'a>(
        &'a self,
        data: &'a DataArea,
        engine: &'a EngineFingerprint,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let dir = local_dir(data)?;
            self.engine_for(engine)?
                .initdb(dir, self.run_as.as_ref())
                .await
        })
    }

    fn start_build<'a>(
        &'a self,
        state: StateId,
        data: &'a DataArea,
    ) -> BoxFuture<'a, Result<Box<dyn BuildServer>, RuntimeError>> {
        Box::pin(async move {
            let data_dir = local_dir(data)?.to_path_buf();
            let builds_log = self.layout.logs.join("builds");
            ensure_dir(&self.layout.run)?;
            ensure_dir(&builds_log)?;
            let config = ServerConfig {
                data_dir,
                socket_dir: self.layout.run.join(format!(
                    "b-{}-{:08x}",
                    state.short(),
                    rand::random::<u32>()
                )),
                // Loopback TCP too, for tools that cannot use a socket (Liquibase's JDBC),
                // and the instances' address, where a gateway on another host reaches a
                // build opened to a client (prepare:cmd). SCRAM only, and the superuser has
                // no password unless a step sets one for its run.
                tcp: true,
                advertise: self.advertise,
                port: None,
                log_file: builds_log.join(format!("{state}.log")),
            };
            let engine = self.engine_of(&config.data_dir)?.clone();
            let server = engine.start(config, self.run_as.as_ref()).await?;
            Ok(Box::new(LocalBuild {
                server,
                engine,
                work: self.layout.work.clone(),
                cache: self.layout.cache.clone(),
            }) as Box<dyn BuildServer>)
        })
    }

    fn prepare_instance(&self, iid: InstanceId) -> BoxFuture<'_, Result<DataArea, RuntimeError>> {
        Box::pin(async move {
            let dir = self.instance_dir(&iid);
            ensure_dir(&dir)?;
            crate::run_as::chown_to(&dir, self.run_as.as_ref())?;
            Ok(DataArea::local(dir.join("data")))
        })
    }

    fn start_instance(
        &self,
        iid: InstanceId,
        _state: StateId,
    ) -> BoxFuture<'_, Result<Box<dyn Instance>, RuntimeError>> {
        Box::pin(async move {
            let config = self.instance_config(&iid);
            if let Some(logs) = config.log_file.parent() {
                ensure_dir(logs)?;
            }
            let engine = self.engine_of(&config.data_dir)?;
            let server = engine.start(config, self.run_as.as_ref()).await?;
            Ok(Box::new(server) as Box<dyn Instance>)
        })
    }

    fn remove_instance(&self, iid: InstanceId) -> BoxFuture<'_, Result<(), RuntimeError>> {
        let dir = self.instance_dir(&iid);
        let log = self.instance_config(&iid).log_file;
        Box::pin(Self::blocking(move || {
            crate::orphan::kill_orphan(&dir.join("data"))?;
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(RuntimeError::io("cannot remove", &dir)(e)),
            }
            // Its log goes with it: nothing reads the log of an instance that is gone.
            match std::fs::remove_file(&log) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(RuntimeError::io("cannot remove", &log)(e)),
            }
        }))
    }

    fn adopt_instance(
        &self,
        iid: InstanceId,
    ) -> BoxFuture<'_, Result<Option<Box<dyn Instance>>, RuntimeError>> {
        let config = self.instance_config(&iid);
        Box::pin(async move {
            let adopted = Engine::adopt(&config).await?;
            Ok(adopted.map(|server| Box::new(server) as Box<dyn Instance>))
        })
    }

    fn reclaim_instance(&self, iid: InstanceId) -> BoxFuture<'_, Result<Reclaimed, RuntimeError>> {
        let data = self.instance_dir(&iid).join("data");
        Box::pin(Self::blocking(move || {
            let stopped = describe_killed(crate::orphan::kill_orphan(&data)?);
            Ok(Reclaimed {
                stopped,
                has_data: data.join("PG_VERSION").exists(),
            })
        }))
    }

    fn stop_leftover<'a>(
        &'a self,
        data: &'a DataArea,
    ) -> BoxFuture<'a, Result<Option<String>, RuntimeError>> {
        Box::pin(async move {
            let dir = local_dir(data)?.to_path_buf();
            Self::blocking(move || Ok(describe_killed(crate::orphan::kill_orphan(&dir)?))).await
        })
    }

    fn discard_leftovers(&self) -> BoxFuture<'_, Result<(), RuntimeError>> {
        let dirs = [self.layout.run.clone(), self.layout.work.clone()];
        Box::pin(Self::blocking(move || {
            for dir in dirs {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let path = entry.path();
                    let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        std::fs::remove_dir_all(&path)
                    } else {
                        std::fs::remove_file(&path)
                    };
                    if let Err(e) = removed {
                        tracing::warn!(path = %path.display(), error = %e, "cannot remove a leftover");
                    }
                }
            }
            Ok(())
        }))
    }

    fn instance_entries(&self) -> BoxFuture<'_, Result<Option<Vec<InstanceEntry>>, RuntimeError>> {
        let dir = self.layout.instances.clone();
        Box::pin(Self::blocking(move || {
            let entries = match std::fs::read_dir(&dir) {
                Ok(entries) => entries,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Some(Vec::new())),
                Err(e) => return Err(RuntimeError::io("cannot list", &dir)(e)),
            };
            let mut out = Vec::new();
            for entry in entries {
                let entry = entry.map_err(RuntimeError::io("cannot list", &dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let path = entry.path();
                out.push(InstanceEntry {
                    instance: name.parse().ok(),
                    has_data: path.join("data").join("PG_VERSION").exists(),
                    location: path.display().to_string(),
                    name,
                });
            }
            out.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(Some(out))
        }))
    }

    /// Local instances run as children of the controller and end with it; what is left of an
    /// instance nobody keeps is its log, which goes.
    fn end_unadopted<'a>(
        &'a self,
        keep: &'a [InstanceId],
    ) -> BoxFuture<'a, Result<Vec<String>, RuntimeError>> {
        let logs = self.instance_logs();
        let keep: Vec<String> = keep.iter().map(|iid| format!("{iid}.log")).collect();
        Box::pin(Self::blocking(move || {
            remove_logs_but(&logs, &keep);
            Ok(Vec::new())
        }))
    }
}

/// Removes the `*.log` files in `dir` whose names are not in `keep`.
fn remove_logs_but(dir: &Path, keep: &[String]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.ends_with(".log") || keep.iter().any(|k| k == name) {
            continue;
        }
        let path = entry.path();
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "removed the log of an instance that is gone")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot remove the log of an instance that is gone")
            }
        }
    }
}

/// A local build: a server on the build's data directory, reachable over its unix socket only.
#[derive(Debug)]
struct LocalBuild {
    server: Server,
    engine: Engine,
    work: PathBuf,
    cache: PathBuf,
}

/// A fresh directory under `work` with the input closure of `step` laid out in it (removed
/// when dropped), and the directory the step's tool runs in.
pub async fn lay_out_step(
    work: &Path,
    step: &Step,
    inputs: &dyn StepInputs,
) -> Result<(tempfile::TempDir, PathBuf), String> {
    tokio::fs::create_dir_all(work)
        .await
        .map_err(|e| format!("cannot create {}: {e}", work.display()))?;
    let dir = tempfile::Builder::new()
        .prefix("step-")
        .tempdir_in(work)
        .map_err(|e| format!("cannot make a step's work directory: {e}"))?;
    let root = dir.path();
    let cwd = root.join(workdir_of(step));
    tokio::fs::create_dir_all(&cwd)
        .await
        .map_err(|e| format!("cannot make a step's work directory: {e}"))?;
    for (rel, sha256) in step.files() {
        if rel.is_empty() || rel.starts_with('/') || rel.split('/').any(|p| p == "..") {
            return Err(format!("input {rel:?} leaves its closure's root"));
        }
        let dest = root.join(&rel);
        if tokio::fs::try_exists(&dest).await.unwrap_or(false) {
            continue; // a file the closure lists twice
        }
        if let Some(parent) = dest.parent() {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| format!("cannot lay out {rel}: {e}"))?;
        }
        let copy = async {
            let mut content = inputs.open(sha256).await?;
            let mut file = tokio::fs::File::create(&dest).await?;
            tokio::io::copy(&mut content, &mut file).await?;
            io::Result::Ok(())
        };
        copy.await
            .map_err(|e| format!("cannot lay out input {rel} ({sha256}): {e}"))?;
    }
    Ok((dir, cwd))
}

/// Where the step's tool runs, relative to its closure's root: psql where the user ran it,
/// Liquibase in its search path (the root).
fn workdir_of(step: &Step) -> &str {
    match step {
        Step::Psql(p) => match &p.input {
            taidon_core::PsqlInput::File { workdir, .. } => workdir,
            taidon_core::PsqlInput::Command { .. } => "",
        },
        Step::Liquibase(_) | Step::Command(_) => "",
    }
}

impl BuildServer for LocalBuild {
    fn apply<'a>(
        &'a self,
        step: &'a Step,
        inputs: &'a dyn StepInputs,
    ) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        Box::pin(async move {
            let (_work, cwd) = lay_out_step(&self.work, step, inputs)
                .await
                .map_err(StepError::setup)?;
            match step {
                Step::Psql(psql) => {
                    crate::psql::run_psql_step(&self.engine, &self.server, psql, &cwd).await
                }
                Step::Liquibase(lb) => self.apply_changeset(lb, &cwd).await,
                Step::Command(_) => Err(StepError::setup(format!(
                    "{}: a command runs on the client, not in the build server",
                    step.label()
                ))),
            }
        })
    }

    fn open_to_client(&self) -> BoxFuture<'_, Result<(Endpoint, String), RuntimeError>> {
        Box::pin(async move {
            let password = format!("{:032x}", rand::random::<u128>());
            self.server.set_password("postgres", &password).await?;
            Ok((
                Endpoint {
                    host: self.server.host.clone(),
                    port: self.server.port,
                },
                password,
            ))
        })
    }

    fn close_to_client(&self) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(self.server.execute("ALTER ROLE postgres PASSWORD NULL"))
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, Result<(), RuntimeError>> {
        Box::pin(self.server.stop())
    }
}

impl LocalBuild {
    /// Applies one changeset with Liquibase over loopback TCP: the superuser gets a password
    /// for the run and loses it after, so none is published with the snapshot.
    async fn apply_changeset(
        &self,
        lb: &LiquibaseStep,
        cwd: &Path,
    ) -> Result<StepOutput, StepError> {
        let tool = crate::liquibase::Liquibase::find()
            .map_err(|e| StepError::setup(e.to_string()))?
            .with_class_archive(&self.cache);
        let (at, password) = self
            .open_to_client()
            .await
            .map_err(|e| StepError::setup(format!("cannot prepare the build server: {e}")))?;
        let url = format!("jdbc:postgresql://{}:{}/postgres", at.host, at.port);
        let ran = tool
            .update_one(cwd, &lb.changelog, &lb.args, &url, "postgres", &password)
            .await;
        let forget = self.close_to_client().await;
        let stdout = changeset_outcome(lb, ran)?;
        forget.map_err(|e| StepError::setup(format!("cannot reset the build password: {e}")))?;
        Ok(StepOutput {
            stdout,
            stderr: String::new(),
        })
    }
}

/// What one Liquibase run means for `lb`'s step: it must have run exactly the planned
/// changeset.
pub fn changeset_outcome(
    lb: &LiquibaseStep,
    ran: Result<(String, Option<String>), crate::liquibase::LiquibaseError>,
) -> Result<String, StepError> {
    let who = format!(
        "changeset {} (id {}, author {}, file {})",
        lb.name(),
        lb.id,
        lb.author,
        lb.file
    );
    match ran {
        Ok((output, Some(name))) if name == lb.name() => Ok(output),
        Ok((output, other)) => Err(StepError {
            message: format!(
                "{who}: Liquibase applied {} instead; did the changelog change while it ran?",
                other.as_deref().unwrap_or("no changeset")
            ),
            output,
            exit_code: Some(0),
        }),
        Err(crate::liquibase::LiquibaseError::Failed { message, output }) => Err(StepError {
            message: format!("{who} failed: {message}"),
            output,
            exit_code: Some(1),
        }),
        Err(other) => Err(StepError::setup(format!("{who}: {other}"))),
    }
}

impl Instance for Server {
    /// Instances listen on loopback, and on the advertised address when one is set.
    fn endpoint(&self) -> Endpoint {
        Endpoint {
            host: self.host.clone(),
            port: self.port,
        }
    }

    fn set_password<'a>(
        &'a self,
        role: &'a str,
        password: &'a str,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(Server::set_password(self, role, password))
    }

    fn execute<'a>(&'a self, sql: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(Server::execute(self, sql))
    }

    /// A local child: its wait status, which this process reaps itself.
    fn health(&mut self) -> Health {
        Server::health(self)
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, Result<(), RuntimeError>> {
        Box::pin(Server::stop(*self))
    }

    fn discard(self: Box<Self>) -> BoxFuture<'static, Result<(), RuntimeError>> {
        Box::pin(Server::discard(*self))
    }

    fn leave_running(self: Box<Self>) {
        tracing::debug!(pid = self.pid, data_dir = ?self.data_dir, "left running");
        // Dropping it would stop it (SIGQUIT); the process is about to exit anyway.
        std::mem::forget(self);
    }
}

fn current_user_name() -> String {
    // SAFETY: geteuid cannot fail and touches no memory.
    std::env::var("USER").unwrap_or_else(|_| format!("uid {}", unsafe { libc::geteuid() }))
}
