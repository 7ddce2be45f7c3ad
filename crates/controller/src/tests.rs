//! The controller over a fake runtime: instances that die, stops that fail, and the maps that
//! must not outgrow what exists. The store and the metadata are real (in a temporary home);
//! no PostgreSQL server runs, only engine discovery looks for the binaries.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use taidon_api::{ResolveRequest, ResolveResponse, StateStatus};
use taidon_core::token::Scope;
use taidon_core::{InstanceId, StateId};
use taidon_runtime::testing::FakeRuntime;
use taidon_runtime::Exit;
use taidon_store::{PublishMeta, SnapshotStore};

use crate::config::Config;
use crate::meta::StateRow;
use crate::{now_ms, Controller, ControllerConfig};

struct Fixture {
    ctl: Arc<Controller>,
    fake: FakeRuntime,
    _dir: tempfile::TempDir,
}

/// A controller on a fresh home with `config` (TOML); its own lifecycle loop never ticks, the
/// tests tick it themselves.
async fn fixture(config: &str) -> Fixture {
    let dir = tempfile::Builder::new().prefix("ctl").tempdir().unwrap();
    // The home must be traversable by the server user when the tests run as root.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let mut cfg = ControllerConfig::new(dir.path().join("home"));
    let text = format!("[lifecycle]\ntick_ms = 3600000\n{config}");
    cfg.lifecycle = Some(Config::parse(&text, "test").unwrap());
    let fake = FakeRuntime::new();
    let ctl = Controller::open_with(cfg, Some(Arc::new(fake.clone())))
        .await
        .unwrap();
    Fixture {
        ctl,
        fake,
        _dir: dir,
    }
}

impl Fixture {
    /// A published base state whose data is `bytes` long, WARM in the metadata.
    fn state(&self, tag: u8, bytes: usize) -> StateId {
        let id = StateId::from_bytes([tag; 32]);
        let build = self.ctl.store.begin(&id, None).unwrap();
        std::fs::write(build.data_dir().join("PG_VERSION"), "15\n").unwrap();
        std::fs::write(build.data_dir().join("filler"), vec![tag; bytes]).unwrap();
        let manifest = self
            .ctl
            .store
            .publish(
                build,
                PublishMeta {
                    parent: None,
                    engine: self.ctl.engine.fingerprint.clone(),
                    build_cost_ms: 1,
                },
            )
            .unwrap();
        let now = now_ms();
        self.ctl
            .meta
            .upsert_state(&StateRow {
                state_id: id,
                parent: None,
                label: format!("state {tag}"),
                inputs_fingerprint: String::new(),
                engine_fingerprint: String::new(),
                status: StateStatus::Warm,
                status_reason: None,
                size_bytes: manifest.size_bytes,
                build_cost_ms: 1,
                restore_cost_ms: 0,
                created_ms: now,
                last_access_ms: now,
                access_count: 0,
            })
            .unwrap();
        id
    }

    fn data_dir(&self, iid: &InstanceId) -> PathBuf {
        self.ctl.instance_dir(iid).join("data")
    }

    fn status(&self, iid: &InstanceId) -> String {
        self.ctl.get_instance(&iid.to_string()).unwrap().status
    }

    fn state_status(&self, sid: &StateId) -> StateStatus {
        self.ctl
            .list_states()
            .unwrap()
            .into_iter()
            .find(|s| &s.state_id == sid)
            .unwrap()
            .status
    }

    /// `(kind, detail)` of the events about `iid`.
    fn events_of(&self, iid: &InstanceId) -> Vec<(String, String)> {
        self.ctl
            .events(None, 1000)
            .unwrap()
            .into_iter()
            .filter(|e| e.instance_id.as_ref() == Some(iid))
            .map(|e| (e.kind, e.detail.unwrap_or_default()))
            .collect()
    }

    fn is_live(&self, iid: &InstanceId) -> bool {
        self.ctl
            .live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(iid)
    }

    /// Resolves until READY (the wait a gateway does), giving the instance it names.
    async fn resolve_ready(&self, req: &ResolveRequest) -> InstanceId {
        for _ in 0..500 {
            match self.ctl.resolve(req) {
                ResolveResponse::Ready(target) => return target.instance_id,
                ResolveResponse::Starting { .. } => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                other => panic!("resolve answered {other:?}"),
            }
        }
        panic!("still starting after 5 s");
    }
}

fn rw(sid: StateId, iid: InstanceId) -> ResolveRequest {
    ResolveRequest {
        state_id: sid,
        instance_id: Some(iid),
        scope: Scope::Rw,
        max_conn: None,
    }
}

fn ro(sid: StateId) -> ResolveRequest {
    ResolveRequest {
        state_id: sid,
        instance_id: None,
        scope: Scope::Ro,
        max_conn: None,
    }
}

#[tokio::test]
async fn a_killed_instance_is_failed_with_its_signal_and_resolve_starts_it_again() {
    let fx = fixture("").await;
    let sid = fx.state(1, 10);
    let iid = fx.ctl.create_instance_of(sid).await.unwrap().instance_id;
    let data = fx.data_dir(&iid);
    assert_eq!(fx.fake.running(), vec![data.clone()]);
    assert_eq!(fx.state_status(&sid), StateStatus::Hot);

    assert!(fx.fake.kill(&data, Exit::Signal(9)));
    fx.ctl.lifecycle_tick().await.unwrap();

    // One tick: no longer running, and the event says how it ended.
    assert_eq!(fx.status(&iid), "failed");
    assert!(!fx.is_live(&iid));
    assert_eq!(fx.state_status(&sid), StateStatus::Warm);
    let died: Vec<_> = fx
        .events_of(&iid)
        .into_iter()
        .filter(|(k, _)| k == "instance_died")
        .collect();
    assert_eq!(
        died,
        [(
            "instance_died".to_owned(),
            "postgres exited: killed by signal 9 (SIGKILL)".to_owned()
        )]
    );
    let transition = fx
        .ctl
        .events(Some(&sid.to_string()), 100)
        .unwrap()
        .into_iter()
        .rfind(|e| e.kind == "transition")
        .unwrap();
    assert_eq!(
        transition.detail.unwrap(),
        format!("HOT -> WARM: instance {iid} died: killed by signal 9 (SIGKILL)")
    );
    // A second tick finds nothing new.
    fx.ctl.lifecycle_tick().await.unwrap();
    assert_eq!(fx.events_of(&iid).len(), 2, "{:?}", fx.events_of(&iid));

    // Its DSN: the client waits while it starts again on the same data.
    let req = rw(sid, iid);
    assert!(matches!(
        fx.ctl.resolve(&req),
        ResolveResponse::Starting { .. }
    ));
    assert_eq!(fx.resolve_ready(&req).await, iid);
    assert_eq!(fx.fake.starts(&data), 2);
    assert_eq!(fx.status(&iid), "running");
    assert_eq!(fx.state_status(&sid), StateStatus::Hot);
    assert!(fx
        .events_of(&iid)
        .iter()
        .any(|(k, _)| k == "instance_restarted"));
    fx.ctl.release(&[iid]);
}

#[tokio::test]
async fn the_shared_read_only_instance_is_started_again_on_its_data_not_replaced() {
    let fx = fixture("").await;
    let sid = fx.state(1, 10);
    let iid = fx.resolve_ready(&ro(sid)).await;
    fx.ctl.release(&[iid]);
    assert!(fx.fake.kill(&fx.data_dir(&iid), Exit::Code(1)));
    fx.ctl.lifecycle_tick().await.unwrap();
    assert_eq!(fx.status(&iid), "failed");
    assert!(fx.events_of(&iid).contains(&(
        "instance_died".into(),
        "postgres exited: exited with code 1".into()
    )));

    assert_eq!(fx.resolve_ready(&ro(sid)).await, iid, "the same instance");
    assert_eq!(fx.ctl.list_instances().unwrap().len(), 1);
    assert_eq!(fx.fake.starts(&fx.data_dir(&iid)), 2);
    fx.ctl.release(&[iid]);
}

#[tokio::test]
async fn a_dead_standby_is_removed() {
    let fx = fixture("").await;
    let sid = fx.state(1, 10);
    let iid = fx.ctl.start_standby(sid).await.unwrap();
    assert!(fx.fake.kill(&fx.data_dir(&iid), Exit::Signal(11)));
    fx.ctl.reap_dead_instances().await;
    assert!(fx.ctl.list_instances().unwrap().is_empty());
    assert_eq!(fx.ctl.standby_count(), 0);
    assert!(!fx.data_dir(&iid).exists());
    let kinds: Vec<String> = fx.events_of(&iid).into_iter().map(|(k, _)| k).collect();
    assert!(kinds.contains(&"instance_died".to_owned()), "{kinds:?}");
    assert!(kinds.contains(&"instance_removed".to_owned()), "{kinds:?}");
}

#[tokio::test]
async fn a_failing_stop_does_not_skip_eviction_or_the_standby_pool() {
    // Room for two instances, and a store of 2 MiB.
    let fx = fixture("[instances]\nmax = 2\n[store]\ncapacity_mb = 2\nlow_water = 1.0\n").await;
    let used = fx.state(1, 10);
    let big = fx.state(2, 2 << 20);
    let stuck = fx.state(3, 600 << 10);
    let spare = fx.state(4, 10);
    let held = fx.ctl.create_instance_of(used).await.unwrap().instance_id;
    // Two standbys started past the limit (as a smaller limit after a restart would leave
    // them): the lower-scored (larger) one is stopped first, and that stop fails.
    let stuck_standby = fx.ctl.start_standby(stuck).await.unwrap();
    let spare_standby = fx.ctl.start_standby(spare).await.unwrap();
    fx.fake.fail_stops(&fx.data_dir(&stuck_standby));

    fx.ctl.lifecycle_tick().await.unwrap();

    let errors: Vec<_> = fx
        .events_of(&stuck_standby)
        .into_iter()
        .filter(|(k, _)| k == "lifecycle_error")
        .collect();
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0]
            .1
            .starts_with("stopping an instance: cannot stop instance"),
        "{errors:?}"
    );
    // Eviction ran: the big WARM snapshot is gone.
    assert!(!fx.ctl.store.contains(&big));
    assert_eq!(fx.state_status(&big), StateStatus::Cold);
    // The pool ran: the standby nobody wants (target 0) is stopped.
    assert!(!fx.is_live(&spare_standby));
    assert!(!fx.fake.running().contains(&fx.data_dir(&spare_standby)));
    // The instance in use is untouched.
    assert!(fx.is_live(&held));
}

#[tokio::test]
async fn maps_keep_no_entry_for_what_is_gone() {
    // No standby wanted, whatever the state's accesses: the test takes its own.
    let fx = fixture("[policy.standby]\npinned = 0\nbusy = 0\nother = 0\n").await;
    let sid = fx.state(1, 10);
    let iid = fx.ctl.create_instance_of(sid).await.unwrap().instance_id;
    assert_eq!(fx.resolve_ready(&rw(sid, iid)).await, iid);
    assert_eq!(fx.ctl.access_entries(), [1, 1, 0, 0]);
    fx.ctl.release(&[iid]);
    // The state's count is gone at zero; the instance keeps its last access (idle clock).
    assert_eq!(fx.ctl.access_entries(), [1, 0, 0, 0]);

    // A connection still open when its instance is removed: counted out with it.
    assert_eq!(fx.resolve_ready(&rw(sid, iid)).await, iid);
    let ro_iid = fx.resolve_ready(&ro(sid)).await;
    assert_eq!(fx.ctl.access_entries(), [2, 1, 1, 0]);
    fx.ctl.delete_instance(&iid).await.unwrap();
    fx.ctl.release(&[iid]); // the gateway's release, after the removal: nothing to count
    assert_eq!(fx.ctl.access_entries(), [1, 1, 1, 0]);
    fx.ctl.delete_instance(&ro_iid).await.unwrap();
    assert_eq!(fx.ctl.access_entries(), [0, 0, 0, 0]);
    assert_eq!(fx.ctl.lifecycle_entries(), [0, 0, 0]);
    // A touch for an instance that is gone makes no entry.
    fx.ctl.touch(&[iid]);
    assert_eq!(fx.ctl.access_entries(), [0, 0, 0, 0]);

    // Standbys taken and builds finished leave no empty entries either.
    fx.ctl.start_standby(sid).await.unwrap();
    let taken = fx.ctl.take_standby(sid).await.unwrap().unwrap();
    assert_eq!(fx.ctl.lifecycle_entries()[0], 0, "no empty standby list");
    fx.ctl.delete_instance(&taken.instance_id).await.unwrap();
    let removed = fx.ctl.remove_state(&sid.to_string(), true).await.unwrap();
    assert_eq!(removed.states, [sid]);
    assert_eq!(fx.ctl.building.len(), 0);
    assert_eq!(fx.ctl.lifecycle_entries(), [0, 0, 0]);
}
