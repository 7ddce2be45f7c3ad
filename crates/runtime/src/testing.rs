//! A fake runtime for the tests of what sits above the runtime (the controller): its servers
//! run nothing. A build "applies" a step by recording it (after reading its input files), an
//! instance is an entry in a table, and a test can kill servers, make stops or steps fail, and
//! hold steps while it arranges a race. Its data areas are named, as the fake store's are.

use std::collections::{HashMap, HashSet};
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use taidon_core::{
    DataArea, EngineFingerprint, InitdbOptions, InstanceId, PsqlInput, PsqlStep, StateId, Step,
};
use tokio::io::AsyncReadExt;

use crate::error::RuntimeError;
use crate::health::{Exit, Health};
use crate::psql::{StepError, StepOutput};
use crate::runtime::{
    BoxFuture, BuildServer, Endpoint, Instance, Reclaimed, Runtime, RuntimeInfo, StepInputs,
};

/// A runtime whose builds and instances are entries in a table the test can read and change.
#[derive(Debug, Clone)]
pub struct FakeRuntime {
    shared: Arc<Mutex<Fakes>>,
    engine: EngineFingerprint,
    /// Steps wait for permits here while the test holds them (see [`FakeRuntime::hold_steps`]).
    gate: Arc<tokio::sync::Semaphore>,
}

/// One step a fake build applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The state being built.
    pub state: StateId,
    /// The step's label (the file as given, or the command).
    pub label: String,
    /// The input files as laid out: path relative to the closure's root, and content.
    pub files: Vec<(String, Vec<u8>)>,
}

#[derive(Debug, Default)]
struct Fakes {
    next_port: u16,
    /// Every instance start, in order.
    starts: Vec<InstanceId>,
    /// The latest server of each instance.
    servers: HashMap<InstanceId, FakeServer>,
    /// Instances whose data exists (prepared, not removed).
    data: HashSet<InstanceId>,
    /// Areas initialised as base states, in order.
    inits: Vec<DataArea>,
    /// Build servers started, in order, by state.
    builds: Vec<StateId>,
    /// Build servers running now, by state.
    building: HashMap<StateId, usize>,
    applied: Vec<Applied>,
    /// Steps waiting at the gate or running now.
    applying: usize,
    /// A step whose label contains one of these fails, as psql would with an SQL error.
    failing: Vec<String>,
    fail_init: bool,
    /// Leftover build servers stopped after a restart, by area.
    leftovers_stopped: Vec<DataArea>,
    /// Leftover build areas that still have a server of a "previous process".
    leftover_servers: HashSet<DataArea>,
    discarded_leftovers: usize,
}

#[derive(Debug, Clone)]
struct FakeServer {
    health: Health,
    stopped: bool,
    stop_fails: bool,
    executed: Vec<String>,
}

fn locked(shared: &Mutex<Fakes>) -> MutexGuard<'_, Fakes> {
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

impl Default for FakeRuntime {
    fn default() -> Self {
        Self {
            shared: Arc::default(),
            engine: EngineFingerprint {
                major: 15,
                minor: 0,
                initdb: InitdbOptions::default(),
                settings: Default::default(),
            },
            gate: Arc::new(tokio::sync::Semaphore::new(
                tokio::sync::Semaphore::MAX_PERMITS,
            )),
        }
    }
}

/// The fake name of an instance's data area.
pub fn instance_area(iid: &InstanceId) -> DataArea {
    DataArea::named(format!("fake-instance/{iid}"))
}

impl FakeRuntime {
    pub fn new() -> Self {
        Self::default()
    }

    /// Ends the server of `iid` as `exit` says (SIGKILL: `Exit::Signal(9)`); false if none
    /// runs.
    pub fn kill(&self, iid: &InstanceId, exit: Exit) -> bool {
        let mut fakes = locked(&self.shared);
        match fakes.servers.get_mut(iid) {
            Some(s) if !s.stopped && s.health == Health::Running => {
                s.health = Health::Exited { status: exit };
                true
            }
            _ => false,
        }
    }

    /// Makes stopping or discarding the server of `iid` fail (it keeps running).
    pub fn fail_stops(&self, iid: &InstanceId) {
        if let Some(s) = locked(&self.shared).servers.get_mut(iid) {
            s.stop_fails = true;
        }
    }

    /// Makes every step whose label contains `needle` fail, as an SQL error would.
    pub fn fail_steps(&self, needle: &str) {
        locked(&self.shared).failing.push(needle.to_owned());
    }

    /// Makes initdb fail.
    pub fn fail_init(&self) {
        locked(&self.shared).fail_init = true;
    }

    /// Holds every step at its start until [`FakeRuntime::release_steps`]; call it before
    /// any step runs.
    pub fn hold_steps(&self) {
        let held = self.gate.available_permits();
        self.gate.forget_permits(held);
    }

    /// Lets held steps (and every later one) run.
    pub fn release_steps(&self) {
        self.gate
            .add_permits(tokio::sync::Semaphore::MAX_PERMITS - self.gate.available_permits());
    }

    /// Steps waiting at the gate or running now.
    pub fn applying(&self) -> usize {
        locked(&self.shared).applying
    }

    /// The instances whose servers run: started, neither stopped nor killed.
    pub fn running(&self) -> Vec<InstanceId> {
        let mut ids: Vec<InstanceId> = locked(&self.shared)
            .servers
            .iter()
            .filter(|(_, s)| !s.stopped && s.health == Health::Running)
            .map(|(i, _)| *i)
            .collect();
        ids.sort();
        ids
    }

    /// How many servers were started for `iid`.
    pub fn starts(&self, iid: &InstanceId) -> usize {
        locked(&self.shared)
            .starts
            .iter()
            .filter(|i| *i == iid)
            .count()
    }

    /// The SQL run on the latest server of `iid`.
    pub fn executed(&self, iid: &InstanceId) -> Vec<String> {
        locked(&self.shared)
            .servers
            .get(iid)
            .map_or_else(Vec::new, |s| s.executed.clone())
    }

    /// Whether `iid` has data (prepared and not removed).
    pub fn has_data(&self, iid: &InstanceId) -> bool {
        locked(&self.shared).data.contains(iid)
    }

    /// The areas initialised as base states, in order.
    pub fn inits(&self) -> Vec<DataArea> {
        locked(&self.shared).inits.clone()
    }

    /// The states build servers were started for, in order.
    pub fn builds(&self) -> Vec<StateId> {
        locked(&self.shared).builds.clone()
    }

    /// Build servers running now.
    pub fn builds_running(&self) -> usize {
        locked(&self.shared).building.values().sum()
    }

    /// Every step applied, in order.
    pub fn applied(&self) -> Vec<Applied> {
        locked(&self.shared).applied.clone()
    }

    /// Pretends a previous process left a build server running on `area`.
    pub fn leave_build_server(&self, area: DataArea) {
        locked(&self.shared).leftover_servers.insert(area);
    }

    /// The leftover build servers stopped after a restart, in order.
    pub fn leftovers_stopped(&self) -> Vec<DataArea> {
        locked(&self.shared).leftovers_stopped.clone()
    }

    /// How often the runtime's own leftovers were discarded.
    pub fn discarded_leftovers(&self) -> usize {
        locked(&self.shared).discarded_leftovers
    }

    fn instance_of(area: &DataArea) -> Option<InstanceId> {
        area.as_named()?
            .strip_prefix("fake-instance/")?
            .parse()
            .ok()
    }
}

impl Runtime for FakeRuntime {
    fn engine(&self) -> &EngineFingerprint {
        &self.engine
    }

    fn engines(&self) -> Vec<crate::EngineInfo> {
        vec![crate::EngineInfo {
            major: self.engine.major,
            minor: self.engine.minor,
            version_line: format!(
                "postgres (PostgreSQL) {}.{}",
                self.engine.major, self.engine.minor
            ),
            bin_dir: PathBuf::from("/fake/bin"),
        }]
    }

    fn describe(&self) -> RuntimeInfo {
        RuntimeInfo {
            engine_version: self.engine.version(),
            bin_dir: PathBuf::from("/fake/bin"),
            server_user: "fake".to_owned(),
        }
    }

    /// The fake runs its one engine only, and refuses a setting named `fake_refused`.
    fn check_engine<'a>(
        &'a self,
        engine: &'a EngineFingerprint,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            if (engine.major, engine.minor) != (self.engine.major, self.engine.minor) {
                return Err(RuntimeError::EngineMissing {
                    asked: engine.version(),
                    major: engine.major,
                    installed: format!("{}.{}", self.engine.major, self.engine.minor),
                });
            }
            if engine.settings.contains_key("fake_refused") {
                return Err(RuntimeError::Setting {
                    engine: engine.version(),
                    reason: "unrecognized configuration parameter \"fake_refused\"".into(),
                });
            }
            Ok(())
        })
    }

    fn init_data<'a>(
        &'a self,
        data: &'a DataArea,
        _engine: &'a EngineFingerprint,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            let mut fakes = locked(&self.shared);
            if fakes.fail_init {
                return Err(RuntimeError::Task(
                    "the fake was told to fail initdb".into(),
                ));
            }
            fakes.inits.push(data.clone());
            Ok(())
        })
    }

    fn start_build<'a>(
        &'a self,
        state: StateId,
        data: &'a DataArea,
    ) -> BoxFuture<'a, Result<Box<dyn BuildServer>, RuntimeError>> {
        Box::pin(async move {
            if data.as_named().is_none() {
                return Err(RuntimeError::ForeignArea(data.clone()));
            }
            let mut fakes = locked(&self.shared);
            fakes.builds.push(state);
            *fakes.building.entry(state).or_default() += 1;
            Ok(Box::new(FakeBuild {
                state,
                shared: Arc::clone(&self.shared),
                gate: Arc::clone(&self.gate),
            }) as Box<dyn BuildServer>)
        })
    }

    fn prepare_instance(&self, iid: InstanceId) -> BoxFuture<'_, Result<DataArea, RuntimeError>> {
        Box::pin(async move {
            locked(&self.shared).data.insert(iid);
            Ok(instance_area(&iid))
        })
    }

    fn start_instance(
        &self,
        iid: InstanceId,
        _state: StateId,
    ) -> BoxFuture<'_, Result<Box<dyn Instance>, RuntimeError>> {
        Box::pin(async move {
            let mut fakes = locked(&self.shared);
            if !fakes.data.contains(&iid) {
                return Err(RuntimeError::Start {
                    data_dir: PathBuf::from(instance_area(&iid).to_string()),
                    reason: "no data".into(),
                    log_tail: String::new(),
                });
            }
            fakes.next_port += 1;
            let port = 40_000 + fakes.next_port;
            fakes.starts.push(iid);
            fakes.servers.insert(
                iid,
                FakeServer {
                    health: Health::Running,
                    stopped: false,
                    stop_fails: false,
                    executed: Vec::new(),
                },
            );
            Ok(Box::new(FakeInstance {
                iid,
                port,
                shared: Arc::clone(&self.shared),
            }) as Box<dyn Instance>)
        })
    }

    fn remove_instance(&self, iid: InstanceId) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async move {
            let mut fakes = locked(&self.shared);
            if let Some(s) = fakes.servers.get_mut(&iid) {
                s.stopped = true;
            }
            fakes.data.remove(&iid);
            Ok(())
        })
    }

    fn reclaim_instance(&self, iid: InstanceId) -> BoxFuture<'_, Result<Reclaimed, RuntimeError>> {
        Box::pin(async move {
            let mut fakes = locked(&self.shared);
            let stopped = match fakes.servers.get_mut(&iid) {
                Some(s) if !s.stopped && s.health == Health::Running => {
                    s.stopped = true;
                    Some(format!("fake server of {iid}"))
                }
                _ => None,
            };
            Ok(Reclaimed {
                stopped,
                has_data: fakes.data.contains(&iid),
            })
        })
    }

    fn stop_leftover<'a>(
        &'a self,
        data: &'a DataArea,
    ) -> BoxFuture<'a, Result<Option<String>, RuntimeError>> {
        Box::pin(async move {
            if let Some(iid) = Self::instance_of(data) {
                return self.reclaim_instance(iid).await.map(|r| r.stopped);
            }
            let mut fakes = locked(&self.shared);
            if fakes.leftover_servers.remove(data) {
                fakes.leftovers_stopped.push(data.clone());
                return Ok(Some(format!("fake build server on {data}")));
            }
            Ok(None)
        })
    }

    fn discard_leftovers(&self) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async move {
            locked(&self.shared).discarded_leftovers += 1;
            Ok(())
        })
    }
}

/// A build server of [`FakeRuntime`].
#[derive(Debug)]
struct FakeBuild {
    state: StateId,
    shared: Arc<Mutex<Fakes>>,
    gate: Arc<tokio::sync::Semaphore>,
}

impl FakeBuild {
    /// Reads every input file, as laying the closure out would.
    async fn read_inputs(
        step: &Step,
        inputs: &dyn StepInputs,
    ) -> io::Result<Vec<(String, Vec<u8>)>> {
        let mut files = Vec::new();
        for (path, sha256) in step.files() {
            let mut content = Vec::new();
            inputs.open(sha256).await?.read_to_end(&mut content).await?;
            files.push((path, content));
        }
        Ok(files)
    }
}

impl BuildServer for FakeBuild {
    fn apply<'a>(
        &'a self,
        step: &'a Step,
        inputs: &'a dyn StepInputs,
    ) -> BoxFuture<'a, Result<StepOutput, StepError>> {
        Box::pin(async move {
            locked(&self.shared).applying += 1;
            let permit = self.gate.acquire().await;
            drop(permit);
            let label = step.label();
            let files = Self::read_inputs(step, inputs).await;
            let mut fakes = locked(&self.shared);
            fakes.applying -= 1;
            let files = files.map_err(|e| StepError {
                message: format!("cannot lay out the input files: {e}"),
                output: String::new(),
                exit_code: None,
            })?;
            if fakes.failing.iter().any(|f| label.contains(f.as_str())) {
                let line = match step {
                    Step::Psql(PsqlStep {
                        input: PsqlInput::File { path, .. },
                        ..
                    }) => format!("psql:{path}:1: ERROR:  the fake fails"),
                    _ => "ERROR:  the fake fails".to_owned(),
                };
                return Err(StepError {
                    message: line.clone(),
                    output: format!("{line}\n"),
                    exit_code: Some(3),
                });
            }
            fakes.applied.push(Applied {
                state: self.state,
                label,
                files,
            });
            Ok(StepOutput {
                stdout: String::new(),
                stderr: String::new(),
            })
        })
    }

    /// The fake's build is "open" at a loopback address nothing listens on.
    fn open_to_client(&self) -> BoxFuture<'_, Result<(crate::Endpoint, String), RuntimeError>> {
        Box::pin(async {
            Ok((
                crate::Endpoint {
                    host: "127.0.0.1".into(),
                    port: 9,
                },
                "fake-build-password".into(),
            ))
        })
    }

    fn close_to_client(&self) -> BoxFuture<'_, Result<(), RuntimeError>> {
        Box::pin(async { Ok(()) })
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, Result<(), RuntimeError>> {
        Box::pin(async move {
            let mut fakes = locked(&self.shared);
            if let Some(n) = fakes.building.get_mut(&self.state) {
                *n -= 1;
                if *n == 0 {
                    fakes.building.remove(&self.state);
                }
            }
            Ok(())
        })
    }
}

/// An instance of [`FakeRuntime`].
#[derive(Debug)]
pub struct FakeInstance {
    iid: InstanceId,
    port: u16,
    shared: Arc<Mutex<Fakes>>,
}

impl FakeInstance {
    /// Stops the fake server; as the real one, a server that is gone already is an error for
    /// a clean stop and nothing for a discard.
    fn end(&self, clean: bool) -> Result<(), RuntimeError> {
        let mut fakes = locked(&self.shared);
        let Some(s) = fakes.servers.get_mut(&self.iid) else {
            return Ok(());
        };
        let reason = match s.health {
            _ if s.stop_fails => "the fake was told to fail".to_owned(),
            Health::Exited { .. } if !clean => return Ok(()),
            Health::Exited { status } => format!("it had already exited ({status})"),
            Health::Running => {
                s.stopped = true;
                return Ok(());
            }
        };
        Err(RuntimeError::Stop {
            pid: 0,
            data_dir: PathBuf::from(instance_area(&self.iid).to_string()),
            reason,
        })
    }
}

impl Instance for FakeInstance {
    fn endpoint(&self) -> Endpoint {
        Endpoint {
            host: "fake.invalid".to_owned(),
            port: self.port,
        }
    }

    fn set_password<'a>(
        &'a self,
        role: &'a str,
        _password: &'a str,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move { self.execute(&format!("ALTER ROLE {role} PASSWORD …")).await })
    }

    fn execute<'a>(&'a self, sql: &'a str) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(async move {
            if let Some(s) = locked(&self.shared).servers.get_mut(&self.iid) {
                s.executed.push(sql.to_owned());
            }
            Ok(())
        })
    }

    fn health(&mut self) -> Health {
        locked(&self.shared)
            .servers
            .get(&self.iid)
            .map_or(Health::Running, |s| s.health)
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, Result<(), RuntimeError>> {
        Box::pin(async move { self.end(true) })
    }

    fn discard(self: Box<Self>) -> BoxFuture<'static, Result<(), RuntimeError>> {
        Box::pin(async move { self.end(false) })
    }

    /// The fake server runs on, as far as the table says, until reclaimed.
    fn leave_running(self: Box<Self>) {}
}
