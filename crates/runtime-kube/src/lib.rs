//! The Kubernetes runtime: every instance and every build is a runner pod that restores its
//! snapshot from the object store and runs PostgreSQL as its direct child; the controller
//! decides when pods come and go (never an autoscaler), talks to each runner over a small
//! authenticated control endpoint, and, with the bucket as its snapshot store, publishes
//! builds from the build pods. One controller is active at a time: a Lease elects it.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(clippy::todo, clippy::dbg_macro)]

pub mod control;
pub mod rbac;
pub mod runner;
