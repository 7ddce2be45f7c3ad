//! A fake runtime for the tests of what sits above the runtime (the controller): its
//! instances run nothing, and a test can kill them or make them fail to stop.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::error::RuntimeError;
use crate::health::{Exit, Health};
use crate::runtime::{BoxFuture, Instance, Runtime};
use crate::server::ServerConfig;

/// A runtime whose instances are entries in a table the test can change.
#[derive(Debug, Clone, Default)]
pub struct FakeRuntime {
    shared: Arc<Mutex<Fakes>>,
}

#[derive(Debug, Default)]
struct Fakes {
    next_port: u16,
    /// Every start, in order, by data directory.
    starts: Vec<PathBuf>,
    /// The latest server on each data directory.
    servers: HashMap<PathBuf, FakeServer>,
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

impl FakeRuntime {
    pub fn new() -> Self {
        Self::default()
    }

    /// Ends the server on `data_dir` as `exit` says (SIGKILL: `Exit::Signal(9)`); false if
    /// none runs there.
    pub fn kill(&self, data_dir: &Path, exit: Exit) -> bool {
        let mut fakes = locked(&self.shared);
        match fakes.servers.get_mut(data_dir) {
            Some(s) if !s.stopped && s.health == Health::Running => {
                s.health = Health::Exited { status: exit };
                true
            }
            _ => false,
        }
    }

    /// Makes stopping or discarding the server on `data_dir` fail (it keeps running).
    pub fn fail_stops(&self, data_dir: &Path) {
        if let Some(s) = locked(&self.shared).servers.get_mut(data_dir) {
            s.stop_fails = true;
        }
    }

    /// The data directories of the servers that run: started, neither stopped nor killed.
    pub fn running(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = locked(&self.shared)
            .servers
            .iter()
            .filter(|(_, s)| !s.stopped && s.health == Health::Running)
            .map(|(d, _)| d.clone())
            .collect();
        dirs.sort();
        dirs
    }

    /// How many servers were started on `data_dir`.
    pub fn starts(&self, data_dir: &Path) -> usize {
        locked(&self.shared)
            .starts
            .iter()
            .filter(|d| d.as_path() == data_dir)
            .count()
    }

    /// The SQL run on the latest server of `data_dir`.
    pub fn executed(&self, data_dir: &Path) -> Vec<String> {
        locked(&self.shared)
            .servers
            .get(data_dir)
            .map_or_else(Vec::new, |s| s.executed.clone())
    }
}

impl Runtime for FakeRuntime {
    fn start_instance(
        &self,
        cfg: ServerConfig,
    ) -> BoxFuture<'_, Result<Box<dyn Instance>, RuntimeError>> {
        Box::pin(async move {
            let mut fakes = locked(&self.shared);
            fakes.next_port += 1;
            let port = cfg.port.unwrap_or(40_000 + fakes.next_port);
            fakes.starts.push(cfg.data_dir.clone());
            fakes.servers.insert(
                cfg.data_dir.clone(),
                FakeServer {
                    health: Health::Running,
                    stopped: false,
                    stop_fails: false,
                    executed: Vec::new(),
                },
            );
            Ok(Box::new(FakeInstance {
                data_dir: cfg.data_dir,
                port,
                shared: Arc::clone(&self.shared),
            }) as Box<dyn Instance>)
        })
    }
}

/// An instance of [`FakeRuntime`].
#[derive(Debug)]
pub struct FakeInstance {
    data_dir: PathBuf,
    port: u16,
    shared: Arc<Mutex<Fakes>>,
}

impl FakeInstance {
    /// Stops the fake server; as the real one, a server that is gone already is an error for
    /// a clean stop and nothing for a discard.
    fn end(&self, clean: bool) -> Result<(), RuntimeError> {
        let mut fakes = locked(&self.shared);
        let Some(s) = fakes.servers.get_mut(&self.data_dir) else {
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
            data_dir: self.data_dir.clone(),
            reason,
        })
    }
}

impl Instance for FakeInstance {
    fn port(&self) -> u16 {
        self.port
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
            if let Some(s) = locked(&self.shared).servers.get_mut(&self.data_dir) {
                s.executed.push(sql.to_owned());
            }
            Ok(())
        })
    }

    fn health(&mut self) -> Health {
        locked(&self.shared)
            .servers
            .get(&self.data_dir)
            .map_or(Health::Running, |s| s.health)
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, Result<(), RuntimeError>> {
        Box::pin(async move { self.end(true) })
    }

    fn discard(self: Box<Self>) -> BoxFuture<'static, Result<(), RuntimeError>> {
        Box::pin(async move { self.end(false) })
    }
}
