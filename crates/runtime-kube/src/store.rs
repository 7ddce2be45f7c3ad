//! [`PodStore`]: the bucket as the snapshot store of the Kubernetes runtime. Builds are made
//! in build pods and published from them (the runner uploads its stopped data); instances
//! restore in their pods. The controller keeps no data directory of its own.

use std::sync::Arc;

use taidon_core::{CloneStrategy, DataArea, StateId};
use taidon_store::{
    BoxFuture, Build, ByteProgress, CloneStats, Manifest, PublishMeta, SnapshotStore, StoreError,
    StoreInfo,
};
use taidon_store_object::{store_error, RemoteStore};

use crate::cluster::Cluster;
use crate::control::Publish;
use crate::pods::{self, Phase};
use crate::runtime::BuildArea;

/// Snapshots in the bucket, published by build pods.
pub struct PodStore {
    pub(crate) cluster: Arc<Cluster>,
    pub(crate) remote: RemoteStore,
    /// `s3://bucket/prefix`.
    pub(crate) url: String,
}

/// A build's handle: dropping it (published or abandoned) deletes its pod.
struct PodBuildGuard {
    area: BuildArea,
    cluster: Arc<Cluster>,
}

impl Drop for PodBuildGuard {
    fn drop(&mut self) {
        let (cluster, pod) = (Arc::clone(&self.cluster), self.area.pod.clone());
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                if let Err(e) = cluster.delete(&pod, Some(0)).await {
                    tracing::warn!(pod = %pod, error = %e, "cannot delete an unpublished build's pod");
                }
            });
        }
    }
}

fn remote_error(what: String) -> impl FnOnce(taidon_store_object::RemoteError) -> StoreError {
    move |e| store_error(what, e)
}

impl PodStore {
    async fn publish_from_pod(
        &self,
        area: &BuildArea,
        meta: PublishMeta,
    ) -> Result<Manifest, StoreError> {
        let failed = |detail: String| StoreError::Remote {
            message: format!(
                "cannot publish state {} from pod {}: {detail}",
                area.state, area.pod
            ),
            source: None,
        };
        let pod = self
            .cluster
            .seen(&area.pod)
            .ok_or_else(|| failed("the pod is gone".into()))?;
        let ip = match pods::phase_of(&pod) {
            Phase::Ready(ip) => ip,
            // Stopped postgres: the probe may say "not ready" by now on a real kubelet.
            _ => pod
                .status
                .and_then(|s| s.pod_ip)
                .ok_or_else(|| failed("the pod has no IP".into()))?,
        };
        let manifest = self
            .cluster
            .client(&area.pod, &ip)
            .publish(&Publish {
                state: area.state,
                parent: meta.parent,
                engine: meta.engine,
                build_cost_ms: meta.build_cost_ms,
            })
            .await
            .map_err(|e| failed(e.to_string()))?;
        // What the bucket holds now is the truth: a racing controller's upload may have won.
        let winner = self
            .remote
            .manifest(&area.state)
            .await
            .map_err(remote_error(format!(
                "cannot read the manifest of {}",
                area.state
            )))?
            .map(|m| m.snapshot)
            .unwrap_or(manifest);
        Ok(winner)
    }
}

impl SnapshotStore for PodStore {
    fn describe(&self) -> StoreInfo {
        StoreInfo {
            strategy: CloneStrategy::Copy,
            location: self.url.clone(),
        }
    }

    fn begin(
        &self,
        id: StateId,
        parent: Option<StateId>,
        _progress: Option<ByteProgress>,
    ) -> BoxFuture<'_, Result<Build, StoreError>> {
        Box::pin(async move {
            let area = BuildArea::new(id, parent);
            let guard = PodBuildGuard {
                area: area.clone(),
                cluster: Arc::clone(&self.cluster),
            };
            Ok(Build::new(id, parent, area.area(), guard))
        })
    }

    fn publish(
        &self,
        build: Build,
        meta: PublishMeta,
    ) -> BoxFuture<'_, Result<Manifest, StoreError>> {
        Box::pin(async move {
            let area = BuildArea::parse(build.area())
                .map_err(|_| StoreError::ForeignArea(build.area().clone()))?;
            let result = self.publish_from_pod(&area, meta).await;
            // Published or not, the pod's work is over: the guard deletes it when dropped.
            drop(build);
            result
        })
    }

    /// The runner restores the snapshot itself; this checks that the bucket has it.
    fn restore_for<'a>(
        &'a self,
        id: StateId,
        _target: &'a DataArea,
    ) -> BoxFuture<'a, Result<CloneStats, StoreError>> {
        Box::pin(async move {
            let manifest = self
                .remote
                .manifest(&id)
                .await
                .map_err(remote_error(format!("cannot read the manifest of {id}")))?
                .ok_or(StoreError::UnknownState(id))?;
            Ok(CloneStats {
                strategy: CloneStrategy::Copy,
                bytes: manifest.snapshot.size_bytes,
                files: 0,
            })
        })
    }

    fn manifest(&self, id: StateId) -> BoxFuture<'_, Result<Option<Manifest>, StoreError>> {
        Box::pin(async move {
            Ok(self
                .remote
                .manifest(&id)
                .await
                .map_err(remote_error(format!("cannot read the manifest of {id}")))?
                .map(|m| m.snapshot))
        })
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<Manifest>, StoreError>> {
        Box::pin(async move {
            let url = &self.url;
            let ids = self
                .remote
                .list_states()
                .await
                .map_err(remote_error(format!("cannot list {url}")))?;
            let mut out = Vec::with_capacity(ids.len());
            for id in ids {
                if let Some(m) = self
                    .remote
                    .manifest(&id)
                    .await
                    .map_err(remote_error(format!("cannot read the manifest of {id}")))?
                {
                    out.push(m.snapshot);
                }
            }
            out.sort_by_key(|m| m.state_id);
            Ok(out)
        })
    }

    fn remove(&self, id: StateId) -> BoxFuture<'_, Result<bool, StoreError>> {
        Box::pin(async move {
            self.remote
                .remove_state(&id)
                .await
                .map_err(remote_error(format!("cannot remove {id}")))
        })
    }

    fn usage(&self) -> BoxFuture<'_, Result<u64, StoreError>> {
        Box::pin(async move {
            Ok(self
                .remote
                .usage()
                .await
                .map_err(remote_error(format!("cannot measure {}", self.url)))?
                .chunk_bytes)
        })
    }

    /// Build pods a crashed controller left are ended by the runtime after adoption.
    fn leftover_builds(&self) -> BoxFuture<'_, Result<Vec<DataArea>, StoreError>> {
        Box::pin(async { Ok(Vec::new()) })
    }

    fn discard_leftovers(&self) -> BoxFuture<'_, Result<usize, StoreError>> {
        Box::pin(async { Ok(0) })
    }
}
