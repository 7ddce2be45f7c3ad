//! The Kubernetes runtime: every instance and every build is a runner pod that restores its
//! snapshot from the object store and runs PostgreSQL as its direct child; the controller
//! decides when pods come and go (never an autoscaler), talks to each runner over a small
//! authenticated control endpoint, and, with the bucket as its snapshot store, publishes
//! builds from the build pods. One controller is active at a time: a Lease elects it.
#![cfg_attr(not(test), deny(clippy::unwrap_used))]
#![deny(clippy::todo, clippy::dbg_macro)]

mod cluster;
pub mod control;
pub mod lease;
pub mod pods;
pub mod rbac;
pub mod runner;
mod runtime;
mod store;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;

pub use lease::LeaderLease;
pub use pods::PodSettings;
pub use runtime::KubernetesRuntime;
pub use store::PodStore;
use taidon_runtime::{Engine, RuntimeError};

/// The runtime and the snapshot store of one namespace, sharing one API client and one
/// watch of the runner pods (which runs until the process ends).
pub fn connect(
    client: kube::Client,
    settings: PodSettings,
    engine: Engine,
    secret: Vec<u8>,
    work: PathBuf,
) -> Result<(Arc<KubernetesRuntime>, Arc<PodStore>), RuntimeError> {
    let mut bucket = settings.bucket.clone();
    bucket.validate().map_err(|e| RuntimeError::Remote {
        what: "[store.remote]".into(),
        detail: e.to_string(),
    })?;
    let remote =
        taidon_store_object::RemoteStore::connect(&bucket).map_err(|e| RuntimeError::Remote {
            what: format!("cannot reach {}", bucket.url),
            detail: e.to_string(),
        })?;
    let cluster = cluster::Cluster::new(client, settings, engine, secret, work);
    cluster.spawn_watch();
    let store = PodStore {
        cluster: Arc::clone(&cluster),
        remote,
        url: bucket.url.clone(),
    };
    Ok((Arc::new(KubernetesRuntime { cluster }), Arc::new(store)))
}
