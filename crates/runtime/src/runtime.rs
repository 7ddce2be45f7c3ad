//! The instance boundary: a trait a local or (later) Kubernetes runtime implements.

use std::future::Future;
use std::pin::Pin;
use std::process::ExitStatus;

use crate::engine::Engine;
use crate::error::RuntimeError;
use crate::run_as::RunAs;
use crate::server::{Server, ServerConfig};

/// A boxed, sendable future, so the traits stay object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something that runs PostgreSQL instances.
pub trait Runtime: Send + Sync {
    /// Start a server for `cfg` and wait until it accepts connections.
    fn start_instance(
        &self,
        cfg: ServerConfig,
    ) -> BoxFuture<'_, Result<Box<dyn Instance>, RuntimeError>>;
}

/// A running instance, whatever runs it.
pub trait Instance: Send + Sync + std::fmt::Debug {
    /// The TCP port clients (the gateway) connect to.
    fn port(&self) -> u16;
    /// Set `role`'s password; only its SCRAM verifier reaches the server.
    fn set_password<'a>(
        &'a self,
        role: &'a str,
        password: &'a str,
    ) -> BoxFuture<'a, Result<(), RuntimeError>>;
    /// The exit status if the instance has stopped on its own.
    fn try_exited(&mut self) -> Option<ExitStatus>;
    /// Stop the instance cleanly.
    fn stop(self: Box<Self>) -> BoxFuture<'static, Result<(), RuntimeError>>;
}

/// Instances as direct child processes of this one.
#[derive(Debug, Clone)]
pub struct LocalRuntime {
    pub engine: Engine,
    pub run_as: Option<RunAs>,
}

impl Runtime for LocalRuntime {
    fn start_instance(
        &self,
        cfg: ServerConfig,
    ) -> BoxFuture<'_, Result<Box<dyn Instance>, RuntimeError>> {
        Box::pin(async move {
            let server = self.engine.start(cfg, self.run_as.as_ref()).await?;
            Ok(Box::new(server) as Box<dyn Instance>)
        })
    }
}

impl Instance for Server {
    fn port(&self) -> u16 {
        self.port
    }

    fn set_password<'a>(
        &'a self,
        role: &'a str,
        password: &'a str,
    ) -> BoxFuture<'a, Result<(), RuntimeError>> {
        Box::pin(Server::set_password(self, role, password))
    }

    fn try_exited(&mut self) -> Option<ExitStatus> {
        Server::try_exited(self)
    }

    fn stop(self: Box<Self>) -> BoxFuture<'static, Result<(), RuntimeError>> {
        Box::pin(Server::stop(*self))
    }
}
