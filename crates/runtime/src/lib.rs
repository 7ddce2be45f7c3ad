//! The runtime boundary ([`Runtime`]: builds and instances, whatever runs them) and the local
//! runtime: find the PostgreSQL engine, create data directories with initdb, run `postgres`
//! servers as direct children, apply psql steps, set role passwords, and clean up servers that
//! a crashed daemon left behind. A `FakeRuntime` is behind the `testing` feature.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(clippy::todo, clippy::dbg_macro)]

mod engine;
mod error;
mod health;
pub mod liquibase;
mod orphan;
mod psql;
mod run_as;
mod runtime;
mod server;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use engine::Engine;
pub use error::{EngineError, RuntimeError};
pub use health::{Exit, Health};
pub use orphan::kill_orphan;
pub use psql::{run_psql_step, run_psql_step_at, PsqlTarget, StepError, StepOutput};
pub use run_as::RunAs;
pub use runtime::{
    lay_out_step, BoxFuture, BuildServer, Endpoint, EngineInfo, Instance, InstanceEntry,
    LocalLayout, LocalRuntime, Reclaimed, Runtime, RuntimeInfo, StepInputs,
};
pub use server::{free_port, Server, ServerConfig};
