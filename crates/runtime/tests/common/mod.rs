//! Shared setup for the runtime tests: a temp dir the server user can traverse and an engine.
// Each test binary uses a part of these helpers.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use taidon_core::InitdbOptions;
use taidon_runtime::{Engine, RunAs, Server, ServerConfig};
use tempfile::TempDir;

pub struct Fixture {
    pub dir: TempDir,
    pub engine: Engine,
    pub run_as: Option<RunAs>,
}

impl Fixture {
    pub fn setup() -> Fixture {
        let dir = tempfile::Builder::new().prefix("rt").tempdir().unwrap();
        // The server runs as `postgres` when we are root: it must be able to enter the dir.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let engine = Engine::discover(None, InitdbOptions::default()).unwrap();
        let run_as = RunAs::for_this_process().unwrap();
        Fixture {
            dir,
            engine,
            run_as,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn config(&self, tcp: bool) -> ServerConfig {
        ServerConfig {
            data_dir: self.data_dir(),
            socket_dir: self.dir.path().join("sock"),
            tcp,
            advertise: None,
            port: None,
            log_file: self.dir.path().join("server.log"),
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// A fresh cluster, started.
    pub async fn started(&self, tcp: bool) -> Server {
        self.engine
            .initdb(&self.data_dir(), self.run_as.as_ref())
            .await
            .unwrap();
        self.start(tcp).await
    }

    pub async fn start(&self, tcp: bool) -> Server {
        match self
            .engine
            .start(self.config(tcp), self.run_as.as_ref())
            .await
        {
            Ok(s) => s,
            Err(e) => panic!("start failed: {e}\nlog:\n{}", self.log()),
        }
    }
}
