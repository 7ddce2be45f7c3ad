//! The controller over its seams' fakes: a fake runtime (builds apply steps by recording them,
//! instances are table entries a test can kill) and an in-memory snapshot store. The metadata
//! and the input blobs are real, in a temporary home; no PostgreSQL runs and no engine is
//! looked for, so every prepare and lifecycle decision here runs anywhere.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use taidon_api::{PinReason, PrepareEvent, ResolveRequest, ResolveResponse, StateStatus};
use taidon_core::plan::{chain, Included};
use taidon_core::policy::Event;
use taidon_core::token::Scope;
use taidon_core::{InstanceId, PsqlInput, PsqlStep, StateId, Step};
use taidon_runtime::testing::{instance_area, FakeRuntime};
use taidon_runtime::{Exit, Runtime};
use taidon_store::testing::FakeStore;
use taidon_store::RemoteTier;

use crate::config::Config;
use crate::meta::StateRow;
use crate::prepare::Events;
use crate::{now_ms, Controller, ControllerConfig, ControllerError, Seams};

struct Fixture {
    ctl: Arc<Controller>,
    fake: FakeRuntime,
    store: FakeStore,
    /// What the controller's clock says; 0: the real time.
    clock: Arc<AtomicU64>,
    cfg: ControllerConfig,
    _dir: tempfile::TempDir,
}

/// A controller on a fresh home with `config` (TOML); its own lifecycle loop never ticks, the
/// tests tick it themselves.
async fn fixture(config: &str) -> Fixture {
    fixture_on(config, FakeStore::new()).await
}

/// [`fixture`] on a given fake store (one with a fake bucket behind it).
async fn fixture_on(config: &str, store: FakeStore) -> Fixture {
    let dir = tempfile::Builder::new().prefix("ctl").tempdir().unwrap();
    let mut cfg = ControllerConfig::new(dir.path().join("home"));
    let text = format!("[lifecycle]\ntick_ms = 3600000\n{config}");
    cfg.lifecycle = Some(Config::parse(&text, "test").unwrap());
    let (fake, clock) = (FakeRuntime::new(), Arc::default());
    let ctl = open(&cfg, &fake, &store, &clock).await;
    Fixture {
        ctl,
        fake,
        store,
        clock,
        cfg,
        _dir: dir,
    }
}

async fn open(
    cfg: &ControllerConfig,
    fake: &FakeRuntime,
    store: &FakeStore,
    clock: &Arc<AtomicU64>,
) -> Arc<Controller> {
    let at = Arc::clone(clock);
    let seams = Seams {
        runtime: Arc::new(fake.clone()),
        store: Arc::new(store.clone()),
        clock: Arc::new(move || match at.load(Ordering::Relaxed) {
            0 => now_ms(),
            t => t,
        }),
    };
    Controller::open_with(cfg.clone(), seams).await.unwrap()
}

impl Fixture {
    /// The controller after a daemon restart: a new one on the same home, runtime and store.
    async fn restart(&mut self) {
        self.ctl.request_shutdown();
        self.ctl = open(&self.cfg, &self.fake, &self.store, &self.clock).await;
    }

    /// A published base state whose data is `bytes` long, WARM in the metadata, last used
    /// `last_access_ms`.
    async fn state_used_at(&self, tag: u8, bytes: u64, last_access_ms: u64) -> StateId {
        let id = StateId::from_bytes([tag; 32]);
        let manifest = self.store.put(id, None, bytes);
        self.ctl.store.refresh().await.unwrap();
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
                created_ms: last_access_ms,
                last_access_ms,
                access_count: 0,
            })
            .unwrap();
        id
    }

    /// A published base state whose data is `bytes` long, WARM, used now.
    async fn state(&self, tag: u8, bytes: u64) -> StateId {
        self.state_used_at(tag, bytes, now_ms()).await
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

    /// `(kind, detail)` of the events about state `sid`.
    fn state_events(&self, sid: &StateId) -> Vec<(String, String)> {
        self.ctl
            .events(Some(&sid.to_string()), 1000)
            .unwrap()
            .into_iter()
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

    /// The ids of the chain of `steps` on the fake engine: base first, then one per step.
    fn ids(&self, steps: &[Step]) -> Vec<StateId> {
        let c = chain(self.fake.engine(), steps);
        std::iter::once(c.base).chain(c.steps).collect()
    }

    /// Builds `steps` as a prepare does; the head, whether all was cached, and the events.
    async fn build(
        &self,
        steps: &[Step],
    ) -> (Result<(StateId, bool), ControllerError>, Vec<PrepareEvent>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let result = self
            .ctl
            .build_steps(&self.fake.engine().clone(), steps.to_vec(), &tx)
            .await;
        drop(tx);
        (result, drain(rx))
    }

    /// Stores `content` as an input blob; its SHA-256.
    async fn blob(&self, content: &'static [u8]) -> String {
        use sha2::Digest;
        let sha = hex::encode(sha2::Sha256::digest(content));
        let body = futures_util::stream::iter([Ok::<_, std::io::Error>(content)]);
        self.ctl.blobs.put(&sha, body).await.unwrap();
        sha
    }
}

fn drain(mut rx: tokio::sync::mpsc::UnboundedReceiver<PrepareEvent>) -> Vec<PrepareEvent> {
    let mut out = Vec::new();
    while let Ok(e) = rx.try_recv() {
        out.push(e);
    }
    out
}

fn sql(text: &str) -> Step {
    Step::Psql(PsqlStep {
        input: PsqlInput::Command { sql: text.into() },
        variables: BTreeMap::new(),
        single_transaction: false,
    })
}

fn labels(fake: &FakeRuntime) -> Vec<String> {
    fake.applied().into_iter().map(|a| a.label).collect()
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
    let sid = fx.state(1, 10).await;
    let iid = fx.ctl.create_instance_of(sid).await.unwrap().instance_id;
    assert_eq!(fx.fake.running(), vec![iid]);
    assert_eq!(fx.store.restores(), [(sid, instance_area(&iid))]);
    assert_eq!(fx.state_status(&sid), StateStatus::Hot);

    assert!(fx.fake.kill(&iid, Exit::Signal(9)));
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
    assert_eq!(fx.fake.starts(&iid), 2);
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
    let sid = fx.state(1, 10).await;
    let iid = fx.resolve_ready(&ro(sid)).await;
    fx.ctl.release(&[iid]);
    assert!(fx.fake.kill(&iid, Exit::Code(1)));
    fx.ctl.lifecycle_tick().await.unwrap();
    assert_eq!(fx.status(&iid), "failed");
    assert!(fx.events_of(&iid).contains(&(
        "instance_died".into(),
        "postgres exited: exited with code 1".into()
    )));

    assert_eq!(fx.resolve_ready(&ro(sid)).await, iid, "the same instance");
    assert_eq!(fx.ctl.list_instances().unwrap().len(), 1);
    assert_eq!(fx.fake.starts(&iid), 2);
    fx.ctl.release(&[iid]);
}

#[tokio::test]
async fn a_dead_standby_is_removed() {
    let fx = fixture("").await;
    let sid = fx.state(1, 10).await;
    let iid = fx.ctl.start_standby(sid).await.unwrap();
    assert!(fx.fake.kill(&iid, Exit::Signal(11)));
    fx.ctl.reap_dead_instances().await;
    assert!(fx.ctl.list_instances().unwrap().is_empty());
    assert_eq!(fx.ctl.standby_count(), 0);
    assert!(!fx.fake.has_data(&iid));
    let kinds: Vec<String> = fx.events_of(&iid).into_iter().map(|(k, _)| k).collect();
    assert!(kinds.contains(&"instance_died".to_owned()), "{kinds:?}");
    assert!(kinds.contains(&"instance_removed".to_owned()), "{kinds:?}");
}

#[tokio::test]
async fn a_failing_stop_does_not_skip_eviction_or_the_standby_pool() {
    // Room for two instances, and a store of 2 MiB.
    let fx = fixture("[instances]\nmax = 2\n[store]\ncapacity_mb = 2\nlow_water = 1.0\n").await;
    let used = fx.state(1, 10).await;
    let big = fx.state(2, 2 << 20).await;
    let stuck = fx.state(3, 600 << 10).await;
    let spare = fx.state(4, 10).await;
    let held = fx.ctl.create_instance_of(used).await.unwrap().instance_id;
    // Two standbys started past the limit (as a smaller limit after a restart would leave
    // them): the lower-scored (larger) one is stopped first, and that stop fails.
    let stuck_standby = fx.ctl.start_standby(stuck).await.unwrap();
    let spare_standby = fx.ctl.start_standby(spare).await.unwrap();
    fx.fake.fail_stops(&stuck_standby);

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
    assert!(!fx.ctl.store.contains(&big) && !fx.store.contains(&big));
    assert_eq!(fx.state_status(&big), StateStatus::Cold);
    // The pool ran: the standby nobody wants (target 0) is stopped.
    assert!(!fx.is_live(&spare_standby));
    assert!(!fx.fake.running().contains(&spare_standby));
    // The instance in use is untouched.
    assert!(fx.is_live(&held));
}

#[tokio::test]
async fn kept_sessions_count_against_the_limit_but_not_as_activity() {
    let fx = fixture("[policy.standby]\npinned = 0\nbusy = 0\nother = 0\n").await;
    fx.ctl.set_access_policy(crate::AccessPolicy {
        max_conn_per_instance: 2,
        max_conn_per_state: 10,
    });
    let sid = fx.state(1, 10).await;
    let iid = fx.ctl.create_instance_of(sid).await.unwrap().instance_id;
    let req = rw(sid, iid);
    assert_eq!(fx.resolve_ready(&req).await, iid);
    assert_eq!(fx.resolve_ready(&req).await, iid);
    // Both clients leave; the gateway keeps their sessions.
    fx.ctl.park(&[iid, iid]);
    assert_eq!(fx.ctl.active_connections(&iid), 0, "not activity");
    assert_eq!(fx.ctl.active_connections_of_state(&sid), 2);
    // Still holding the instance's two slots.
    assert!(matches!(
        fx.ctl.resolve(&req),
        ResolveResponse::TooManyConnections { limit: 2 }
    ));
    // One kept session is handed to a client (Resolve counts it, Unpark counts the kept one
    // out), the other is closed.
    fx.ctl.unpark(&[iid]);
    assert_eq!(fx.resolve_ready(&req).await, iid);
    assert_eq!(fx.ctl.active_connections(&iid), 1);
    fx.ctl.unpark(&[iid]);
    assert_eq!(fx.ctl.active_connections_of_state(&sid), 1);
    // Unpark and park past zero count nothing.
    fx.ctl.unpark(&[iid]);
    fx.ctl.release(&[iid]);
    fx.ctl.park(&[iid]);
    assert_eq!(fx.ctl.active_connections_of_state(&sid), 0);
    assert_eq!(fx.resolve_ready(&req).await, iid);
    assert_eq!(fx.resolve_ready(&req).await, iid);
    // Kept sessions of a removed instance are counted out with it.
    fx.ctl.park(&[iid]);
    fx.ctl.delete_instance(&iid).await.unwrap();
    fx.ctl.unpark(&[iid]);
    assert_eq!(fx.ctl.active_connections_of_state(&sid), 0);
    assert_eq!(fx.ctl.access_entries(), [0, 0, 0, 0]);
}

#[tokio::test]
async fn maps_keep_no_entry_for_what_is_gone() {
    // No standby wanted, whatever the state's accesses: the test takes its own.
    let fx = fixture("[policy.standby]\npinned = 0\nbusy = 0\nother = 0\n").await;
    let sid = fx.state(1, 10).await;
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

#[tokio::test]
async fn the_nearest_cached_ancestor_is_reused_and_only_missing_steps_are_built() {
    let fx = fixture("").await;
    let main = fx.blob(b"\\ir lib/t.sql\n").await;
    let lib = fx.blob(b"create table t();\n").await;
    let file = Step::Psql(PsqlStep {
        input: PsqlInput::File {
            path: "main.sql".into(),
            sha256: main.clone(),
            workdir: "db".into(),
            includes: vec![Included {
                path: "db/lib/t.sql".into(),
                sha256: lib,
            }],
        },
        variables: BTreeMap::new(),
        single_transaction: false,
    });
    let two = [sql("select 1"), file.clone()];
    let [base, s1, s2] = fx.ids(&two)[..] else {
        unreachable!()
    };

    let (built, events) = fx.build(&two).await;
    assert_eq!(built.unwrap(), (s2, false));
    assert!(matches!(
        events[0],
        PrepareEvent::Plan {
            total: 2,
            cached: 0,
            ..
        }
    ));
    assert_eq!(fx.fake.inits().len(), 1);
    assert_eq!(fx.fake.builds(), [s1, s2]);
    assert_eq!(
        fx.store.begun(),
        [(base, None), (s1, Some(base)), (s2, Some(s1))]
    );
    // The step read its closure by content, laid out where psql finds it.
    let applied = fx.fake.applied();
    assert_eq!(applied[1].state, s2);
    assert_eq!(
        applied[1].files,
        [
            ("db/main.sql".to_owned(), b"\\ir lib/t.sql\n".to_vec()),
            ("db/lib/t.sql".to_owned(), b"create table t();\n".to_vec()),
        ]
    );

    // One step more: only it is built, from the head before.
    let three = [sql("select 1"), file.clone(), sql("select 3")];
    let s3 = *fx.ids(&three).last().unwrap();
    let (built, events) = fx.build(&three).await;
    assert_eq!(built.unwrap(), (s3, false));
    assert!(matches!(
        events[0],
        PrepareEvent::Plan {
            total: 3,
            cached: 2,
            ..
        }
    ));
    assert_eq!(fx.fake.builds(), [s1, s2, s3]);
    assert_eq!(fx.store.begun().last(), Some(&(s3, Some(s2))));

    // The second step edited: rebuilt from the first, which stays.
    let edited = [sql("select 1"), sql("select 2")];
    let e2 = *fx.ids(&edited).last().unwrap();
    let (built, events) = fx.build(&edited).await;
    assert_eq!(built.unwrap(), (e2, false));
    assert!(matches!(
        events[0],
        PrepareEvent::Plan {
            total: 2,
            cached: 1,
            ..
        }
    ));
    assert_eq!(fx.store.begun().last(), Some(&(e2, Some(s1))));

    // All cached: nothing runs, and the prepare says so.
    let before = fx.fake.builds().len();
    let (built, events) = fx.build(&three).await;
    assert_eq!(built.unwrap(), (s3, true));
    assert!(matches!(
        events[..],
        [PrepareEvent::Plan {
            total: 3,
            cached: 3,
            ..
        }]
    ));
    assert_eq!(fx.fake.builds().len(), before);
    assert_eq!(fx.fake.inits().len(), 1, "one initdb in all");
    assert_eq!(
        labels(&fx.fake),
        [
            "-c 'select 1'",
            "main.sql",
            "-c 'select 3'",
            "-c 'select 2'"
        ]
    );
    assert_eq!(fx.state_status(&s3), StateStatus::Warm);
}

#[tokio::test]
async fn a_failing_step_publishes_nothing_and_records_the_failure() {
    let fx = fixture("").await;
    fx.fake.fail_steps("boom");
    let steps = [sql("select 1"), sql("select boom")];
    let [base, s1, s2] = fx.ids(&steps)[..] else {
        unreachable!()
    };
    let (built, _) = fx.build(&steps).await;
    match built {
        Err(ControllerError::StepFailed {
            index: 2,
            total: 2,
            message,
            output,
            ..
        }) => {
            assert_eq!(message, "ERROR:  the fake fails");
            assert_eq!(output, "ERROR:  the fake fails\n");
        }
        other => panic!("{other:?}"),
    }
    // The steps before it are checkpoints; the failed one left nothing behind.
    assert_eq!(fx.store.published(), {
        let mut v = vec![base, s1];
        v.sort();
        v
    });
    assert!(!fx.ctl.store.contains(&s2));
    assert_eq!(fx.store.in_progress(), 0, "the build was discarded");
    assert_eq!(fx.fake.builds_running(), 0, "its server was stopped");
    assert_eq!(fx.state_status(&s2), StateStatus::Failed);
    let failed = fx.state_events(&s2);
    assert!(
        failed.contains(&("build_failed".into(), "ERROR:  the fake fails".into())),
        "{failed:?}"
    );

    // initdb failing: nothing published, the base is failed.
    let fx = fixture("").await;
    fx.fake.fail_init();
    let (built, _) = fx.build(&[sql("select 1")]).await;
    assert!(
        matches!(built, Err(ControllerError::Runtime { .. })),
        "{built:?}"
    );
    assert!(fx.store.published().is_empty());
    assert_eq!(fx.store.in_progress(), 0);
    let base = fx.ids(&[sql("select 1")])[0];
    assert_eq!(fx.state_status(&base), StateStatus::Failed);
}

#[tokio::test]
async fn concurrent_prepares_of_one_state_build_it_once() {
    let fx = fixture("").await;
    let steps = vec![sql("create table t()")];
    let s1 = fx.ids(&steps)[1];
    fx.fake.hold_steps();
    let prepare = |steps: Vec<Step>| {
        let ctl = Arc::clone(&fx.ctl);
        let engine = fx.fake.engine().clone();
        let (tx, rx): (Events, _) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(async move { ctl.build_steps(&engine, steps, &tx).await });
        (task, rx)
    };
    let (first, _first_events) = prepare(steps.clone());
    while fx.fake.applying() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let (second, mut second_events) = prepare(steps.clone());
    // The second finds the step being built, and says it waits.
    loop {
        match second_events.recv().await.unwrap() {
            PrepareEvent::Waiting { index, state_id } => {
                assert_eq!((index, state_id), (1, s1));
                break;
            }
            PrepareEvent::Plan { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    fx.fake.release_steps();
    assert_eq!(first.await.unwrap().unwrap(), (s1, false));
    assert_eq!(second.await.unwrap().unwrap(), (s1, true));
    assert_eq!(fx.fake.builds(), [s1], "built once");
    assert_eq!(fx.fake.inits().len(), 1);
    assert_eq!(
        fx.store.begun().len(),
        2,
        "the base and the step, once each"
    );
    assert_eq!(fx.ctl.building.len(), 0);
}

#[tokio::test]
async fn a_cold_state_is_restored_from_its_nearest_surviving_ancestor() {
    let fx = fixture("").await;
    let steps = [sql("select 1"), sql("select 2"), sql("select 3")];
    let [_, s1, s2, s3] = fx.ids(&steps)[..] else {
        unreachable!()
    };
    fx.build(&steps).await.0.unwrap();
    // Evicted: the last two snapshots go, and the states are COLD.
    for id in [s3, s2] {
        assert!(fx.ctl.store.remove(id).await.unwrap());
        fx.ctl
            .record_transition(&id, Event::Evicted, Some("test"))
            .unwrap();
        assert_eq!(fx.state_status(&id), StateStatus::Cold);
    }

    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    fx.ctl.restore_state(s3, &tx).await.unwrap();
    drop(tx);
    let events = drain(rx);
    assert!(
        events.contains(&PrepareEvent::Restoring {
            state_id: s3,
            from: Some(s1),
            steps: 2
        }),
        "{events:?}"
    );
    assert_eq!(fx.fake.builds(), [s1, s2, s3, s2, s3], "s1 was not rebuilt");
    assert_eq!(fx.store.begun().last(), Some(&(s3, Some(s2))));
    assert_eq!(fx.fake.inits().len(), 1);
    assert!(fx
        .state_events(&s3)
        .contains(&("restoring".into(), format!("from {}", s1.short()))));

    // An instance of a COLD state asked for by id restores it first, the same way.
    assert!(fx.ctl.store.remove(s3).await.unwrap());
    fx.ctl
        .record_transition(&s3, Event::Evicted, Some("test"))
        .unwrap();
    let iid = fx.ctl.create_instance_of(s3).await.unwrap().instance_id;
    assert_eq!(fx.fake.builds().last(), Some(&s3));
    assert_eq!(fx.fake.builds().len(), 6, "only s3 again");
    assert_eq!(fx.store.restores().last(), Some(&(s3, instance_area(&iid))));
    assert_eq!(fx.state_status(&s3), StateStatus::Hot);
}

#[tokio::test]
async fn eviction_picks_by_score_and_never_a_pinned_or_in_use_snapshot() {
    // 5 MiB of snapshots in a store of 4 MiB that evicts down to 3: two must go.
    let fx = fixture(
        "[store]\ncapacity_mb = 4\nlow_water = 0.75\n\
         [policy.standby]\npinned = 0\nbusy = 0\nother = 0\n",
    )
    .await;
    let now = now_ms();
    fx.clock.store(now, Ordering::Relaxed);
    let day = 24 * 3600 * 1000;
    let mib = 1 << 20;
    let recent = fx.state_used_at(1, mib, now).await;
    let week = fx.state_used_at(2, mib, now - 7 * day).await;
    let month = fx.state_used_at(3, mib, now - 30 * day).await;
    let pinned = fx.state_used_at(4, mib, now - 60 * day).await;
    let in_use = fx.state_used_at(5, mib, now - 60 * day).await;
    fx.ctl
        .pin(&pinned.to_string(), PinReason::Manual, "")
        .unwrap();
    fx.ctl.create_instance_of(in_use).await.unwrap();
    // Its instance counted as an access: it is old again, for the policy.
    fx.ctl
        .meta
        .touch_state(&in_use, now - 60 * day, None)
        .unwrap();

    let standings = fx.ctl.standings().unwrap();
    let score = |id: &StateId| standings[id].score;
    assert!(score(&month) < score(&week) && score(&week) < score(&recent));

    fx.ctl.lifecycle_tick().await.unwrap();
    let evicted: Vec<StateId> = fx
        .ctl
        .events(None, 1000)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "evicted")
        .filter_map(|e| e.state_id)
        .collect();
    assert_eq!(
        evicted,
        [month, week],
        "lowest score first, until under 3 MiB"
    );
    assert_eq!(fx.store.published(), {
        let mut v = vec![recent, pinned, in_use];
        v.sort();
        v
    });
    assert_eq!(fx.state_status(&month), StateStatus::Cold);
    assert_eq!(fx.state_status(&pinned), StateStatus::Warm);
    assert_eq!(fx.state_status(&in_use), StateStatus::Hot);

    // A year on, a large new snapshot takes the store over again: of the two candidates left,
    // the large one scores lower and goes; the pinned and the used ones, older than both, stay.
    fx.clock.store(now + 365 * day, Ordering::Relaxed);
    let large = fx.state_used_at(6, 2 * mib, now).await;
    fx.ctl.lifecycle_tick().await.unwrap();
    assert!(!fx.store.contains(&large));
    assert!(fx.store.contains(&recent));
    assert!(fx.store.contains(&pinned) && fx.store.contains(&in_use));
}

#[tokio::test]
async fn a_restart_stops_leftover_build_servers_and_reclaims_instances() {
    let mut fx = fixture("").await;
    let sid = fx.state(1, 10).await;
    let kept = fx.ctl.create_instance_of(sid).await.unwrap().instance_id;
    let standby = fx.ctl.start_standby(sid).await.unwrap();
    // A build the dead daemon left, with its server still running.
    let leftover = fx.store.leave_build(StateId::from_bytes([2; 32]));
    fx.fake.leave_build_server(leftover.clone());
    // The daemon exits leaving its servers to the next one.
    assert_eq!(fx.ctl.leave_running(), 2);
    assert_eq!(fx.fake.running(), {
        let mut v = vec![kept, standby];
        v.sort();
        v
    });

    fx.restart().await;

    assert_eq!(fx.fake.leftovers_stopped(), [leftover]);
    assert!(fx.fake.discarded_leftovers() >= 2, "once per start");
    // The kept instance runs again under the new daemon; the standby is gone with its data.
    assert_eq!(fx.fake.starts(&kept), 2);
    assert!(fx.is_live(&kept));
    assert_eq!(fx.status(&kept), "running");
    assert!(fx
        .events_of(&kept)
        .iter()
        .any(|(k, _)| k == "instance_adopted"));
    assert!(!fx.fake.has_data(&standby));
    assert_eq!(fx.fake.running(), [kept]);
    assert!(
        fx.ctl.store.contains(&sid),
        "the published set is read back"
    );
}

#[tokio::test]
async fn a_miss_downloads_the_nearest_state_the_bucket_has_and_builds_only_what_follows() {
    let fx = fixture_on("", FakeStore::new().with_bucket()).await;
    let three = [sql("select 1"), sql("select 2"), sql("select 3")];
    let [base, s1, s2, s3] = fx.ids(&three)[..] else {
        unreachable!()
    };
    // Another machine uploaded the chain up to step 2.
    fx.store.bucket_put(base, None, 10);
    fx.store.bucket_put(s1, Some(base), 20);
    fx.store.bucket_put(s2, Some(s1), 30);

    let (built, events) = fx.build(&three).await;
    assert_eq!(built.unwrap(), (s3, false));
    assert_eq!(fx.store.fetched(), [s2], "only the nearest is fetched");
    assert!(fx.fake.inits().is_empty(), "no initdb");
    assert_eq!(fx.fake.builds(), [s3]);
    assert_eq!(fx.store.begun(), [(s3, Some(s2))]);
    assert!(events.iter().any(|e| matches!(
        e,
        PrepareEvent::Downloading { index: 2, state_id, .. } if *state_id == s2
    )));
    assert!(events
        .iter()
        .any(|e| matches!(e, PrepareEvent::Downloaded { bytes: 30, .. })));
    // The downloaded state is WARM here and in the bucket; the new one goes up too.
    let states = fx.ctl.list_states().unwrap();
    let row = |id: StateId| states.iter().find(|s| s.state_id == id).unwrap().clone();
    assert_eq!(row(s2).status, StateStatus::Warm);
    assert_eq!(row(s2).location, "local+remote");
    assert_eq!(row(s2).label, "-c 'select 2'");
    assert_eq!(row(s3).location, "local+remote");
    assert!(fx
        .state_events(&s2)
        .iter()
        .any(|(kind, _)| kind == "downloaded"));

    // All of it local now: a second prepare neither fetches nor builds.
    let (built, _) = fx.build(&three).await;
    assert_eq!(built.unwrap(), (s3, true));
    assert_eq!(fx.store.fetched(), [s2]);
}

#[tokio::test]
async fn a_corrupt_remote_state_is_skipped_with_one_notice_and_rebuilt_from_a_good_ancestor() {
    let fx = fixture_on("", FakeStore::new().with_bucket()).await;
    let two = [sql("select 1"), sql("select 2")];
    let [base, s1, s2] = fx.ids(&two)[..] else {
        unreachable!()
    };
    fx.store.bucket_put(base, None, 10);
    fx.store.bucket_put(s1, Some(base), 20);
    fx.store.bucket_put(s2, Some(s1), 30);
    fx.store.corrupt_in_bucket(s2);

    let (built, events) = fx.build(&two).await;
    assert_eq!(built.unwrap(), (s2, false));
    assert_eq!(fx.store.fetched(), [s2, s1]);
    assert_eq!(fx.fake.builds(), [s2], "rebuilt from step 1");
    let notices: Vec<&String> = events
        .iter()
        .filter_map(|e| match e {
            PrepareEvent::Notice { message } => Some(message),
            _ => None,
        })
        .collect();
    assert_eq!(notices.len(), 1, "{events:?}");
    assert!(
        notices[0].contains(&s2.short().to_string()),
        "{}",
        notices[0]
    );
    assert!(notices[0].contains("checksum mismatch"), "{}", notices[0]);
    assert!(fx
        .state_events(&s2)
        .iter()
        .any(|(kind, _)| kind == "checksum_mismatch"));
    // The rebuilt state replaced the bad copy in the bucket.
    assert!(fx.store.bucket_states().contains(&s2));
}

#[tokio::test]
async fn a_local_eviction_of_a_state_in_the_bucket_keeps_it_warm_and_a_pending_upload_keeps_it_here(
) {
    let store = FakeStore::new().with_bucket();
    let fx = fixture_on(
        "[store]\ncapacity_mb = 1\nlow_water = 0.5\n\
         [policy.standby]\npinned = 0\nbusy = 0\nother = 0\n",
        store,
    )
    .await;
    let mib = 1 << 20;
    let up = fx.state(1, mib).await;
    fx.store.push(up).await.unwrap();
    fx.store.hold_uploads(true);
    let one = [sql("select 1")];
    fx.store.set_size(fx.ids(&one)[1], mib);
    fx.store.set_size(fx.ids(&one)[0], 1);
    let (built, _) = fx.build(&one).await;
    let pending = built.unwrap().0;
    assert!(fx.store.pending().contains(&pending));

    fx.ctl.lifecycle_tick().await.unwrap();
    // The uploaded one left the local tier but stays WARM, in the bucket.
    assert!(!fx.store.contains(&up));
    assert_eq!(fx.state_status(&up), StateStatus::Warm);
    let row = fx
        .ctl
        .list_states()
        .unwrap()
        .into_iter()
        .find(|s| s.state_id == up)
        .unwrap();
    assert_eq!(row.location, "remote");
    assert!(fx
        .state_events(&up)
        .iter()
        .any(|(kind, _)| kind == "evicted_local"));
    // The one still uploading stays here.
    assert!(fx.store.contains(&pending));

    // An instance of the evicted state downloads it first.
    fx.ctl.create_instance_of(up).await.unwrap();
    assert_eq!(fx.store.fetched(), [up]);
    assert!(fx.store.contains(&up));
}

#[tokio::test]
async fn the_bucket_is_trimmed_by_score_and_keeps_pins() {
    let store = FakeStore::new().with_bucket();
    let fx = fixture_on(
        "[store.remote]\nurl = \"s3://fake-bucket\"\ncapacity_mb = 3\nlow_water = 0.7\n",
        store,
    )
    .await;
    let now = now_ms();
    fx.clock.store(now, Ordering::Relaxed);
    let day = 24 * 3600 * 1000;
    let mib = 1 << 20;
    let recent = fx.state_used_at(1, mib, now).await;
    let old = fx.state_used_at(2, mib, now - 30 * day).await;
    let pinned = fx.state_used_at(3, mib, now - 60 * day).await;
    let older = fx.state_used_at(4, mib, now - 90 * day).await;
    for id in [recent, old, pinned, older] {
        fx.store.push(id).await.unwrap();
    }
    fx.ctl
        .pin(&pinned.to_string(), PinReason::Manual, "")
        .unwrap();
    // Gone from the local tier: the bucket's eviction leaves it COLD.
    fx.ctl.store.remove(older).await.unwrap();

    fx.ctl.remote_pass().await.unwrap();
    let mut left = fx.store.bucket_states();
    left.sort();
    let mut want = vec![recent, pinned];
    want.sort();
    assert_eq!(
        left, want,
        "4 MiB over 3: the two lowest unpinned go (down to 2.1)"
    );
    assert_eq!(fx.state_status(&older), StateStatus::Cold);
    assert_eq!(fx.state_status(&old), StateStatus::Warm, "still here");
    assert!(fx
        .state_events(&older)
        .iter()
        .any(|(kind, _)| kind == "evicted_remote"));
}

/// Benchmark (run by bench/kube.sh): Resolve of a HOT state's instance while the controller
/// knows 1,000 instances. Prints p50/p99/max in microseconds; asserts nothing about time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: bench/kube.sh"]
async fn bench_resolve_with_a_thousand_instances() {
    let fx = fixture("[instances]\nmax = 2000\nmemory_budget_mb = 1000000\n").await;
    let sid = fx.state(1, 1000).await;
    let mut ids = Vec::new();
    for _ in 0..1000 {
        ids.push(fx.ctl.create_instance_of(sid).await.unwrap().instance_id);
    }
    assert_eq!(fx.ctl.list_instances().unwrap().len(), 1000);
    let hot = ids[500];
    let req = rw(sid, hot);
    let mut samples = Vec::with_capacity(20_000);
    for _ in 0..20_000 {
        let started = std::time::Instant::now();
        let answer = fx.ctl.resolve(&req);
        samples.push(started.elapsed().as_nanos() as u64);
        assert!(matches!(answer, ResolveResponse::Ready(_)), "{answer:?}");
        fx.ctl.release(&[hot]);
    }
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize] as f64 / 1000.0;
    println!(
        "resolve with 1000 instances: p50 {:.1} us, p99 {:.1} us, max {:.1} us ({} calls)",
        at(0.5),
        at(0.99),
        at(1.0),
        samples.len()
    );
}

#[tokio::test]
async fn a_client_command_builds_through_its_report_and_only_a_client_can_rebuild_it() {
    let fx = fixture("").await;
    let cmd = Step::Command(taidon_core::plan::CommandStep {
        argv: vec!["dbmate".into(), "up".into()],
        inputs: vec![],
    });
    let steps = vec![sql("select 1"), cmd];
    let ids = fx.ids(&steps);
    let head = ids[2];
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let ctl = Arc::clone(&fx.ctl);
    let engine = fx.fake.engine().clone();
    let build = tokio::spawn(async move { ctl.build_steps(&engine, steps, &tx).await });
    // The client is told where to run it, and Resolve hands the gateway the build server for
    // that build's token only.
    let (build_id, dsn) = loop {
        match rx.recv().await.expect("events") {
            PrepareEvent::RunCommand {
                build,
                dsn,
                state_id,
                ..
            } => {
                assert_eq!(state_id, head);
                break (build, dsn);
            }
            _ => continue,
        }
    };
    assert!(dsn.starts_with("postgres://"), "{dsn}");
    let resolve = |state_id| rw(state_id, build_id);
    match fx.ctl.resolve(&resolve(head)) {
        ResolveResponse::Ready(t) => assert_eq!((t.port, t.instance_id), (9, build_id)),
        other => panic!("{other:?}"),
    }
    assert!(!matches!(
        fx.ctl.resolve(&resolve(ids[1])),
        ResolveResponse::Ready(_)
    ));
    fx.ctl
        .command_done(
            build_id,
            taidon_api::CommandDone {
                exit_code: 0,
                output: String::new(),
            },
        )
        .unwrap();
    assert_eq!(build.await.unwrap().unwrap(), (head, false));
    // The build is closed: its token reaches nothing, and a second report is refused.
    assert!(!matches!(
        fx.ctl.resolve(&resolve(head)),
        ResolveResponse::Ready(_)
    ));
    assert!(fx
        .ctl
        .command_done(
            build_id,
            taidon_api::CommandDone {
                exit_code: 0,
                output: String::new()
            }
        )
        .is_err());
    let listed = fx.ctl.list_states().unwrap();
    let info = listed.iter().find(|s| s.state_id == head).unwrap();
    assert!(info.client_only);
    assert!(
        !listed
            .iter()
            .find(|s| s.state_id == ids[1])
            .unwrap()
            .client_only
    );

    // Evicted: a restore by id says that only a client can rebuild it.
    assert!(fx.ctl.store.remove(head).await.unwrap());
    fx.ctl
        .record_transition(&head, Event::Evicted, Some("test"))
        .unwrap();
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    let err = fx
        .ctl
        .restore_state(head, &tx)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("only a client holds its inputs") && err.contains("cmd: dbmate up"),
        "{err}"
    );
}

#[tokio::test]
async fn a_client_that_leaves_during_its_command_ends_the_build_and_publishes_nothing() {
    let fx = fixture("").await;
    let cmd = Step::Command(taidon_core::plan::CommandStep {
        argv: vec!["alembic".into(), "upgrade".into(), "head".into()],
        inputs: vec![],
    });
    let head = fx.ids(std::slice::from_ref(&cmd))[1];
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let ctl = Arc::clone(&fx.ctl);
    let engine = fx.fake.engine().clone();
    let build = tokio::spawn(async move { ctl.build_steps(&engine, vec![cmd], &tx).await });
    let build_id = loop {
        if let PrepareEvent::RunCommand { build, .. } = rx.recv().await.expect("events") {
            break build;
        }
    };
    // The client goes away: its events are closed.
    drop(rx);
    let err = tokio::time::timeout(Duration::from_secs(10), build)
        .await
        .expect("the build ends at once, not after the command's timeout")
        .unwrap()
        .unwrap_err();
    assert!(err.to_string().contains("the client left"), "{err}");
    assert!(!fx.ctl.store.contains(&head));
    assert!(!matches!(
        fx.ctl.resolve(&rw(head, build_id)),
        ResolveResponse::Ready(_)
    ));
}

/// An instance lease of a one-step recipe, given as its prepare.
fn instance_lease_of_a_recipe() -> taidon_api::LeaseRequest {
    taidon_api::LeaseRequest {
        prepare: Some(taidon_api::PrepareRequest {
            steps: vec![sql("create table t (x int)")],
            create_instance: false,
            engine: Default::default(),
            liquibase: None,
        }),
        isolation: taidon_api::Isolation::Instance,
        ..Default::default()
    }
}

#[tokio::test]
async fn instance_leases_of_a_recipe_build_it_once_refuse_what_is_wrong_and_expire() {
    use crate::tokens::Principal;
    use taidon_api::{LeaseRequest, TokenRole};

    let fx = fixture("[leases]\ndefault_ttl_s = 30\nmax_ttl_s = 60\n").await;
    let admin = Principal::local_admin();
    let recipe = |ttl_s| LeaseRequest {
        ttl_s,
        ..instance_lease_of_a_recipe()
    };
    // Two leases of a missing recipe at once: one build, two instances.
    let (a, b) = tokio::join!(
        fx.ctl.lease(recipe(None), &admin),
        fx.ctl.lease(recipe(None), &admin)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_eq!(a.state_id, b.state_id);
    assert_ne!(a.instance_id, b.instance_id);
    assert_eq!(labels(&fx.fake).len(), 1, "{:?}", labels(&fx.fake));
    assert_eq!(a.expires_ms - a.created_ms, 30_000);

    // Over the maximum TTL, an unknown state, both and neither: refused, nothing leased.
    let e = fx.ctl.lease(recipe(Some(61)), &admin).await.unwrap_err();
    assert!(
        matches!(&e, ControllerError::BadInput(m) if m.contains("max_ttl_s")),
        "{e}"
    );
    let unknown = LeaseRequest {
        state: Some("deadbeef00".into()),
        ..Default::default()
    };
    let e = fx.ctl.lease(unknown, &admin).await.unwrap_err();
    assert!(
        matches!(&e, ControllerError::NotFound(m) if m.contains("deadbeef00")),
        "{e}"
    );
    let both = LeaseRequest {
        state: Some(a.state_id.to_string()),
        ..recipe(None)
    };
    assert!(matches!(
        fx.ctl.lease(both, &admin).await,
        Err(ControllerError::BadInput(_))
    ));
    assert!(matches!(
        fx.ctl.lease(LeaseRequest::default(), &admin).await,
        Err(ControllerError::BadInput(_))
    ));
    assert_eq!(fx.ctl.list_leases(&admin).unwrap().len(), 2);

    // Someone else's lease: 403, and it stays; they see none.
    let bob = Principal {
        sub: "bob".into(),
        role: TokenRole::User,
    };
    let e = fx
        .ctl
        .release_lease(&a.lease.to_string(), &bob)
        .await
        .unwrap_err();
    assert!(matches!(e, ControllerError::Forbidden(_)), "{e}");
    assert!(fx.ctl.list_leases(&bob).unwrap().is_empty());
    assert_eq!(fx.ctl.list_leases(&admin).unwrap().len(), 2);

    // Given back: gone at once; its instance is removed.
    fx.ctl
        .release_lease(&b.lease.to_string(), &admin)
        .await
        .unwrap();
    // Past its TTL, the tick reclaims the other and records it.
    fx.clock.store(now_ms() + 31_000, Ordering::Relaxed);
    fx.ctl.lifecycle_tick().await.unwrap();
    assert!(fx.ctl.list_leases(&admin).unwrap().is_empty());
    let kinds = fx.ctl.meta.event_kinds(&a.state_id).unwrap();
    for kind in ["lease_granted", "lease_released", "lease_expired"] {
        assert!(kinds.iter().any(|k| k == kind), "{kind} in {kinds:?}");
    }
    for _ in 0..100 {
        let left: Vec<InstanceId> = fx
            .ctl
            .list_instances()
            .unwrap()
            .iter()
            .map(|i| i.instance_id)
            .filter(|i| *i == a.instance_id || *i == b.instance_id)
            .collect();
        if left.is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the leased instances were not removed");
}

#[tokio::test]
async fn the_lease_maps_keep_nothing_for_states_no_longer_leased() {
    use crate::tokens::Principal;

    let fx = fixture("").await;
    let admin = Principal::local_admin();
    let lease = fx
        .ctl
        .lease(instance_lease_of_a_recipe(), &admin)
        .await
        .unwrap();
    fx.ctl.lifecycle_tick().await.unwrap();
    // Its rate is recent: kept; its queue has no waiter: gone.
    assert_eq!(fx.ctl.lease_map_entries(), [0, 1]);
    fx.ctl
        .release_lease(&lease.lease.to_string(), &admin)
        .await
        .unwrap();
    // A minute on, nothing is left of it.
    fx.clock.store(now_ms() + 61_000, Ordering::Relaxed);
    fx.ctl.lifecycle_tick().await.unwrap();
    assert_eq!(fx.ctl.lease_map_entries(), [0, 0]);
}
