//! The instance boundary: a trait a local or (later) Kubernetes runtime implements.

use std::future::Future;
use std::pin::Pin;

use crate::engine::Engine;
use crate::error::RuntimeError;
use crate::health::Health;
use crate::run_as::RunAs;
use crate::server::{Server, ServerConfig};

/// A boxed, sendable future, so the traits stay object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Something that runs PostgreSQL instances.
pub trait Runtime: Send + Sync {
    /// Start a server for `cfg` and wait until it accepts connections. The handle it returns
    /// is how the caller reaches, watches and stops that server.
    fn start_instance(
        &self,
        cfg: ServerConfig,
    ) -> BoxFuture<'_, Result<Box<dyn Instance>, RuntimeError>>;
}

/// A running instance, whatever runs it: the runtime's handle on one server.
pub trait Instance: Send + Sync + std::fmt::Debug {
    /// The TCP port clients (the gateway) connect to.
    fn port(&self) -> u16;
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
}
