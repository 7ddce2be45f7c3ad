//! Taidon's domain: state identity, prepare plans, token claims, id prefixes and the
//! lifecycle policy.
//!
//! Nothing in this crate does I/O: every function is a pure computation over its arguments, so
//! the same inputs give the same answers on any machine.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(clippy::todo, clippy::dbg_macro)]

pub mod changelog;
pub mod engine;
pub mod explain;
pub mod id;
pub mod identity;
pub mod include;
pub mod plan;
pub mod policy;
pub mod prefix;
pub mod project;
pub mod store;
pub mod token;

pub use engine::{EngineFingerprint, InitdbOptions};
pub use id::{InstanceId, LeaseId, ParseIdError, StateId};
pub use plan::{LiquibaseStep, PsqlInput, PsqlStep, Step};
pub use store::{CloneStrategy, DataArea};
