//! The lifecycle loop: every tick it notices instances whose server died, stops idle
//! instances (and those over capacity), evicts snapshots by retention score while the store is
//! over its capacity, and keeps the standby pool of HOT states at its target. The decisions
//! are `taidon_core::policy`'s; this module gathers the facts and acts on them.
//!
//! One object's failure (an instance that does not stop, a snapshot that cannot be removed)
//! is logged and recorded as a `lifecycle_error` event, and the tick goes on with the others.
//!
//! Inputs are kept: every file a step reads is an input blob in `<home>/inputs/<sha256>`
//! (content-addressed, uploaded once), so a COLD state asked for by id alone can be replayed
//! from its nearest surviving ancestor.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex as StdMutex};

use taidon_api::{EventInfo, PrepareEvent, StateStatus, WarmupRequest};
use taidon_core::plan::Chain;
use taidon_core::policy::{
    self, retention_score, transition, Event, InstanceFacts, PinState, Presence, Ranking,
    StateFacts, StopReason, Tree,
};
use taidon_core::{EngineFingerprint, InstanceId, StateId, Step};
use taidon_runtime::Exit;

use crate::config::Config;
use crate::instances::Live;
use crate::lock;
use crate::meta::StateRow;
use crate::prepare::Events;
use crate::{now_ms, pins, Controller, ControllerError};

/// The lifecycle's own state inside the controller.
pub(crate) struct Lifecycle {
    pub(crate) config: Config,
    pub(crate) webhook_secret: String,
    /// The store's I/O budget: builds and restores at once.
    builds: tokio::sync::Semaphore,
    /// Pre-started instances nobody has taken, by state.
    standby: StdMutex<HashMap<StateId, Vec<InstanceId>>>,
    /// Standbys being started, by state.
    starting: StdMutex<HashMap<StateId, usize>>,
    /// States warmed with `--hot`: they keep a standby until this time.
    hold: StdMutex<HashMap<StateId, u64>>,
    /// Activity the controller itself saw (start, hand-out), by instance.
    activity: StdMutex<HashMap<InstanceId, u64>>,
    /// Snapshots being cloned now (count by state), and those being evicted: the two
    /// exclude each other.
    snapshots: StdMutex<SnapshotUse>,
}

#[derive(Default)]
struct SnapshotUse {
    cloning: HashMap<StateId, usize>,
    evicting: HashSet<StateId>,
}

/// A standby being started, counted in the pool's `starting` until dropped.
pub(crate) struct StartingStandby {
    controller: Arc<Controller>,
    state: StateId,
}

impl Drop for StartingStandby {
    fn drop(&mut self) {
        let mut starting = lock(&self.controller.lifecycle.starting);
        if let Some(n) = starting.get_mut(&self.state) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                starting.remove(&self.state);
            }
        }
    }
}

/// Keeps a snapshot from being evicted while it is cloned.
pub(crate) struct SnapshotHold<'a> {
    lifecycle: &'a Lifecycle,
    id: StateId,
}

impl Drop for SnapshotHold<'_> {
    fn drop(&mut self) {
        let mut u = lock(&self.lifecycle.snapshots);
        if let Some(n) = u.cloning.get_mut(&self.id) {
            *n -= 1;
            if *n == 0 {
                u.cloning.remove(&self.id);
            }
        }
    }
}

impl Lifecycle {
    pub(crate) fn new(config: Config, webhook_secret: String) -> Self {
        let builds = tokio::sync::Semaphore::new(config.store.max_parallel_builds);
        Self {
            config,
            webhook_secret,
            builds,
            standby: StdMutex::default(),
            starting: StdMutex::default(),
            hold: StdMutex::default(),
            activity: StdMutex::default(),
            snapshots: StdMutex::default(),
        }
    }
}

pub(crate) fn presence(s: StateStatus) -> Presence {
    match s {
        StateStatus::Hot => Presence::Hot,
        StateStatus::Warm => Presence::Warm,
        StateStatus::Cold => Presence::Cold,
        StateStatus::Building => Presence::Building,
        StateStatus::Starting => Presence::Starting,
        StateStatus::Failed => Presence::Failed,
    }
}

pub(crate) fn status(p: Presence) -> StateStatus {
    match p {
        Presence::Hot => StateStatus::Hot,
        Presence::Warm => StateStatus::Warm,
        Presence::Cold => StateStatus::Cold,
        Presence::Building => StateStatus::Building,
        Presence::Starting => StateStatus::Starting,
        Presence::Failed => StateStatus::Failed,
    }
}

/// Everything `ls` shows about a state's standing: score and pin.
pub(crate) struct Standing {
    pub(crate) score: f64,
    pub(crate) pin: Option<String>,
}

impl Controller {
    /// Waits for a slot in the store's I/O budget.
    pub(crate) async fn build_permit(&self) -> Option<tokio::sync::SemaphorePermit<'_>> {
        self.lifecycle.builds.acquire().await.ok()
    }

    /// Holds `id`'s snapshot against eviction until the hold drops; waits for an eviction
    /// under way (after which the snapshot is gone and the caller restores it).
    pub(crate) async fn hold_snapshot(&self, id: StateId) -> SnapshotHold<'_> {
        loop {
            {
                let mut u = lock(&self.lifecycle.snapshots);
                if !u.evicting.contains(&id) {
                    *u.cloning.entry(id).or_default() += 1;
                    return SnapshotHold {
                        lifecycle: &self.lifecycle,
                        id,
                    };
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Records activity on an instance the controller itself saw.
    pub(crate) fn note_activity(&self, iid: InstanceId) {
        lock(&self.lifecycle.activity).insert(iid, now_ms());
    }

    /// Applies `event` to a state's persisted presence and records it; an event that does
    /// not apply (the state is elsewhere already) changes nothing.
    pub(crate) fn record_transition(
        &self,
        id: &StateId,
        event: Event,
        reason: Option<&str>,
    ) -> Result<(), ControllerError> {
        let Some(row) = self.meta.state(id)? else {
            return Ok(());
        };
        let from = presence(row.status);
        match transition(from, event) {
            Ok(to) if to != from => {
                self.meta.set_state_status(id, status(to), reason)?;
                let detail = match reason {
                    Some(r) => format!("{} -> {}: {r}", status(from), status(to)),
                    None => format!("{} -> {}", status(from), status(to)),
                };
                self.meta
                    .event(now_ms(), "transition", Some(id), None, Some(&detail))?;
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(state = %id.short(), "{e}"),
        }
        Ok(())
    }

    /// Starts the loop; it ends when a shutdown is asked for.
    pub(crate) fn spawn_lifecycle(self: &Arc<Self>) {
        let this = Arc::downgrade(self);
        let tick = std::time::Duration::from_millis(self.lifecycle.config.lifecycle.tick_ms);
        let stop = self.shutdown_requested();
        self.spawn(async move {
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    () = &mut stop => return,
                    () = tokio::time::sleep(tick) => {}
                }
                let Some(ctl) = this.upgrade() else { return };
                if let Err(e) = ctl.lifecycle_tick().await {
                    tracing::warn!(error = %e, "lifecycle tick failed");
                }
            }
        });
    }

    /// One pass: dead instances, idle and over-capacity instances, store eviction, the
    /// standby pool. Each part runs whatever happened in the one before: one object's
    /// failure is logged and recorded inside its part, and a part that cannot run at all (its
    /// facts cannot be read) is the error returned, after the others ran.
    pub async fn lifecycle_tick(self: &Arc<Self>) -> Result<(), ControllerError> {
        let mut first_error = None;
        self.reap_dead_instances().await;
        self.tend_leases().await;
        match self.instances_to_stop(0) {
            Ok(victims) => self.stop_each(victims).await,
            Err(e) => first_error = first_error.or(Some(e)),
        }
        if let Err(e) = self.evict().await {
            first_error = first_error.or(Some(e));
        }
        if let Err(e) = self.tend_pool().await {
            first_error = first_error.or(Some(e));
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Stops each instance; one that fails is logged and recorded, and the others still stop.
    async fn stop_each(&self, victims: Vec<(InstanceId, StopReason)>) {
        for (iid, why) in victims {
            match self.stop_instance(&iid, why).await {
                Ok(()) => self.metrics.evicted(match why {
                    StopReason::Idle => crate::metrics::Eviction::Idle,
                    StopReason::LeaseExpired => crate::metrics::Eviction::LeaseExpired,
                    StopReason::OverCapacity => crate::metrics::Eviction::InstanceCapacity,
                }),
                Err(e) => self.object_failed("stopping an instance", None, Some(&iid), &e),
            }
        }
    }

    /// The per-object error policy of the lifecycle: a warning and a `lifecycle_error` event
    /// naming what failed; the caller goes on with the next object.
    pub(crate) fn object_failed(
        &self,
        what: &str,
        state: Option<&StateId>,
        instance: Option<&InstanceId>,
        e: &ControllerError,
    ) {
        let message = e.to_api().message;
        tracing::warn!(
            state = ?state.map(StateId::short),
            instance = ?instance.map(ToString::to_string),
            error = %message,
            "{what}"
        );
        let detail = format!("{what}: {message}");
        if let Err(e) = self
            .meta
            .event(now_ms(), "lifecycle_error", state, instance, Some(&detail))
        {
            tracing::warn!(error = %e, "cannot record a lifecycle error");
        }
    }

    /// Notices instances whose server ended without being asked to (SIGKILL, the OOM killer,
    /// a crash): each is marked `failed` with an `instance_died` event that says how it
    /// ended, and the next Resolve of its DSN starts it again on its data. A dead standby is
    /// removed: it holds nothing.
    pub(crate) async fn reap_dead_instances(&self) {
        let live: Vec<(InstanceId, Arc<Live>)> = self
            .live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(i, l)| (*i, Arc::clone(l)))
            .collect();
        for (iid, l) in live {
            // Busy means being stopped: not a death to report.
            if let Some(Some(exit)) = l.take_if_ended() {
                if let Err(e) = self.instance_died(iid, &l, exit).await {
                    self.object_failed(
                        "recording a dead instance",
                        Some(&l.state_id),
                        Some(&iid),
                        &e,
                    );
                }
            }
        }
    }

    pub(crate) async fn instance_died(
        &self,
        iid: InstanceId,
        live: &Arc<Live>,
        exit: Exit,
    ) -> Result<(), ControllerError> {
        let detail = format!("postgres exited: {exit}");
        tracing::warn!(instance = %iid, state = %live.state_id.short(), "{detail}");
        let row = self
            .meta
            .instances()?
            .into_iter()
            .find(|r| r.instance_id == iid);
        // Failed before it leaves the live map: a Resolve in between finds it to wake.
        let marked = match row {
            Some(mut row) if row.status != "standby" => {
                row.status = "failed".into();
                self.meta.insert_instance(&row)
            }
            _ => Ok(()),
        };
        {
            let mut map = self.live.write().unwrap_or_else(|p| p.into_inner());
            if map.get(&iid).is_some_and(|cur| Arc::ptr_eq(cur, live)) {
                map.remove(&iid);
            }
        }
        lock(&self.lifecycle.activity).remove(&iid);
        marked?;
        self.meta.event(
            now_ms(),
            "instance_died",
            Some(&live.state_id),
            Some(&iid),
            Some(&detail),
        )?;
        if self.is_standby(&iid) {
            return self.delete_instance(&iid).await;
        }
        self.after_instance_gone(
            &live.state_id,
            Some(&format!("instance {iid} died: {exit}")),
        )
    }

    /// The policy's view of every state.
    pub(crate) fn state_facts(&self) -> Result<Vec<StateFacts<StateId>>, ControllerError> {
        let rows = self.meta.states()?;
        let pins = pins::pin_states(&self.meta)?;
        let running: HashSet<StateId> = self
            .live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|l| l.state_id)
            .collect();
        let building_parents: HashSet<StateId> = rows
            .iter()
            .filter(|r| r.status == StateStatus::Building)
            .filter_map(|r| r.parent)
            .collect();
        Ok(rows
            .iter()
            .map(|r| {
                let hot = running.contains(&r.state_id);
                let mut p = presence(r.status);
                if hot {
                    p = Presence::Hot;
                } else if p == Presence::Hot {
                    p = Presence::Warm;
                }
                let being_built = self.building.is_locked(&r.state_id);
                StateFacts {
                    id: r.state_id,
                    parent: r.parent,
                    presence: p,
                    size_bytes: r.size_bytes,
                    build_cost_ms: r.build_cost_ms,
                    access_count: r.access_count,
                    last_access_ms: r.last_access_ms,
                    pin: pins.get(&r.state_id).map_or(PinState::None, |p| p.0),
                    in_use: hot || being_built || building_parents.contains(&r.state_id),
                }
            })
            .collect())
    }

    /// Score and pin of every state, for `ls`.
    pub(crate) fn standings(&self) -> Result<HashMap<StateId, Standing>, ControllerError> {
        let facts = self.state_facts()?;
        let tree = Tree::new(&facts);
        let pins = pins::pin_states(&self.meta)?;
        let w = &self.lifecycle.config.policy.weights;
        let now = self.now();
        let none = HashSet::new();
        Ok(facts
            .iter()
            .map(|f| {
                let score = retention_score(f, tree.replay_ms(&f.id, &none), w, now);
                let pin = pins.get(&f.id).map(|p| p.1.clone());
                (f.id, Standing { score, pin })
            })
            .collect())
    }

    fn instance_facts(&self) -> Vec<InstanceFacts<InstanceId, StateId>> {
        let now = now_ms();
        let lease = self.lifecycle.config.instances.lease_ttl_s * 1000;
        let standby: HashSet<InstanceId> = lock(&self.lifecycle.standby)
            .values()
            .flatten()
            .copied()
            .collect();
        let live: Vec<(InstanceId, StateId)> = self
            .live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(i, l)| (*i, l.state_id))
            .collect();
        let leased = self.leased_instances();
        let mut activity = lock(&self.lifecycle.activity);
        live.into_iter()
            .map(|(iid, sid)| {
                // An instance first seen now (adopted after a restart) starts its clock now.
                let seen = *activity.entry(iid).or_insert(now);
                let last = seen.max(self.last_access_ms(&iid).unwrap_or(0));
                InstanceFacts {
                    id: iid,
                    state: sid,
                    connections: self.active_connections(&iid),
                    last_activity_ms: last,
                    lease_expires_ms: last.saturating_add(lease),
                    standby: standby.contains(&iid),
                    leased: leased.contains(&iid),
                }
            })
            .collect()
    }

    fn instances_to_stop(
        &self,
        reserve: usize,
    ) -> Result<Vec<(InstanceId, StopReason)>, ControllerError> {
        let standings = self.standings()?;
        let limits = self.lifecycle.config.instance_limits();
        Ok(policy::instances_to_stop(
            &self.instance_facts(),
            &limits,
            reserve,
            now_ms(),
            |s| standings.get(s).map_or(0.0, |x| x.score),
        ))
    }

    /// Makes room for one more instance, stopping idle ones if the limits say so.
    pub(crate) async fn make_room(&self) -> Result<(), ControllerError> {
        // Standbys being started take their places too: without them, an instance and a
        // standby started at once would both fit, one over the limit.
        let starting: usize = lock(&self.lifecycle.starting).values().sum();
        self.stop_each(self.instances_to_stop(1 + starting)?).await;
        let running = self.live.read().unwrap_or_else(|p| p.into_inner()).len() + starting;
        let capacity = self.lifecycle.config.instance_limits().capacity();
        if running >= capacity {
            return Err(ControllerError::Capacity(format!(
                "instance limit reached: {running} running (limit {capacity}), none idle; \
                 remove one (sqlrs rm) or raise [instances] max / memory_budget_mb"
            )));
        }
        Ok(())
    }

    /// Stops an instance's server. A standby is removed (it holds nothing); any other keeps
    /// its data with status `stopped` until `sqlrs rm`. The state drops to WARM with its
    /// last running instance.
    pub(crate) async fn stop_instance(
        &self,
        iid: &InstanceId,
        why: StopReason,
    ) -> Result<(), ControllerError> {
        let sid = self
            .meta
            .instances()?
            .into_iter()
            .find(|r| &r.instance_id == iid)
            .map(|r| r.state_id);
        let was_standby = self.forget_standby(iid);
        if was_standby {
            self.delete_instance(iid).await?;
        } else {
            let live = self
                .live
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(iid);
            let Some(live) = live else { return Ok(()) };
            let server = live.server.lock().await.take();
            if let Some(server) = server {
                // The runtime ends a server that does not stop cleanly (SIGQUIT, SIGKILL), so
                // it is stopped all the same; the failure is worth an event.
                if let Err(e) = server.stop().await {
                    let e = ControllerError::runtime("the server did not stop cleanly", e);
                    self.object_failed("stopping an instance", sid.as_ref(), Some(iid), &e);
                }
            }
            if let Some(mut row) = self
                .meta
                .instances()?
                .into_iter()
                .find(|r| &r.instance_id == iid)
            {
                row.status = "stopped".into();
                self.meta.insert_instance(&row)?;
            }
        }
        lock(&self.lifecycle.activity).remove(iid);
        let reason = format!("{why:?}").to_lowercase();
        tracing::info!(instance = %iid, reason, "instance stopped");
        self.meta.event(
            now_ms(),
            "instance_stopped",
            sid.as_ref(),
            Some(iid),
            Some(&reason),
        )?;
        if let Some(sid) = sid {
            self.after_instance_gone(&sid, None)?;
        }
        Ok(())
    }

    /// A state with no running instance left is WARM again; `reason` says why, if not for
    /// being idle or removed.
    pub(crate) fn after_instance_gone(
        &self,
        sid: &StateId,
        reason: Option<&str>,
    ) -> Result<(), ControllerError> {
        let any = self
            .live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .any(|l| &l.state_id == sid);
        if !any {
            self.record_transition(sid, Event::LastInstanceStopped, reason)?;
        }
        Ok(())
    }

    /// Drops what the lifecycle and Resolve kept about an instance that is removed.
    pub(crate) fn forget_instance(&self, iid: &InstanceId) {
        self.forget_standby(iid);
        lock(&self.lifecycle.activity).remove(iid);
        self.forget_instance_access(iid);
    }

    /// Evicts WARM snapshots by retention score while the store is over its capacity.
    async fn evict(&self) -> Result<(), ControllerError> {
        let Some(limits) = self.lifecycle.config.store_limits() else {
            return Ok(());
        };
        let used = self.store.usage().await?;
        if used <= limits.high_water_bytes {
            return Ok(());
        }
        // Only snapshots kept here can free room here, and one still uploading stays.
        let mut facts = self.state_facts()?;
        let uploading = self.store.remote().map(|r| r.pending()).unwrap_or_default();
        for f in &mut facts {
            if f.presence == Presence::Warm && !self.store.contains(&f.id) {
                f.presence = Presence::Cold;
            }
            f.in_use |= uploading.contains(&f.id);
        }
        let victims = policy::choose_evictions(
            &facts,
            used,
            &limits,
            &self.lifecycle.config.policy.weights,
            Ranking::Score,
            self.now(),
        );
        for id in victims {
            // A build or an instance that began since the facts were read keeps it.
            let Some(_guard) = self.building.try_lock(id) else {
                continue;
            };
            if self
                .live
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .any(|l| l.state_id == id)
            {
                continue;
            }
            {
                let mut u = lock(&self.lifecycle.snapshots);
                if u.cloning.contains_key(&id) {
                    continue;
                }
                u.evicting.insert(id);
            }
            let removed = self.store.remove(id).await.map_err(ControllerError::from);
            lock(&self.lifecycle.snapshots).evicting.remove(&id);
            let reason = format!(
                "evicted: store over {} MiB",
                limits.high_water_bytes / (1024 * 1024)
            );
            // A state the bucket has stays WARM: getting it back is a download.
            let in_bucket = removed.is_ok() && self.kept_in_bucket(&id).await;
            let recorded = removed.and_then(|_| {
                if in_bucket {
                    let reason = format!("{reason}; kept in the bucket");
                    self.meta
                        .set_state_status(&id, StateStatus::Warm, Some(&reason))?;
                    self.meta
                        .event(now_ms(), "evicted_local", Some(&id), None, Some(&reason))?;
                } else {
                    self.record_transition(&id, Event::Evicted, Some(&reason))?;
                    self.meta
                        .event(now_ms(), "evicted", Some(&id), None, Some(&reason))?;
                }
                Ok(())
            });
            match recorded {
                Ok(()) => {
                    self.metrics
                        .evicted(crate::metrics::Eviction::StoreCapacity);
                    tracing::info!(state = %id.short(), "evicted");
                }
                Err(e) => self.object_failed("evicting a snapshot", Some(&id), None, &e),
            }
        }
        Ok(())
    }

    /// Takes `iid` out of the standby pool; true if it was there.
    pub(crate) fn forget_standby(&self, iid: &InstanceId) -> bool {
        let mut pool = lock(&self.lifecycle.standby);
        for list in pool.values_mut() {
            if let Some(pos) = list.iter().position(|i| i == iid) {
                list.remove(pos);
                pool.retain(|_, l| !l.is_empty());
                return true;
            }
        }
        false
    }

    /// How many entries the lifecycle's maps hold: standby lists, starting counts, activity.
    #[cfg(test)]
    pub(crate) fn lifecycle_entries(&self) -> [usize; 3] {
        [
            lock(&self.lifecycle.standby).len(),
            lock(&self.lifecycle.starting).len(),
            lock(&self.lifecycle.activity).len(),
        ]
    }

    /// Instances waiting to be handed out.
    pub(crate) fn standby_count(&self) -> usize {
        lock(&self.lifecycle.standby).values().map(Vec::len).sum()
    }

    /// Hands out a pre-started standby of `state`, if one waits; a replacement starts in the
    /// background.
    pub(crate) async fn take_standby(
        self: &Arc<Self>,
        state: StateId,
    ) -> Result<Option<taidon_api::InstanceInfo>, ControllerError> {
        let iid = {
            let mut pool = lock(&self.lifecycle.standby);
            let Some(list) = pool.get_mut(&state) else {
                return Ok(None);
            };
            let live = self.live.read().unwrap_or_else(|p| p.into_inner());
            list.retain(|i| live.contains_key(i));
            let taken = list.pop();
            if list.is_empty() {
                pool.remove(&state);
            }
            match taken {
                Some(i) => i,
                None => return Ok(None),
            }
        };
        let Some(mut row) = self
            .meta
            .instances()?
            .into_iter()
            .find(|r| r.instance_id == iid)
        else {
            return Ok(None);
        };
        row.status = "running".into();
        row.created_ms = now_ms();
        self.meta.insert_instance(&row)?;
        self.note_activity(iid);
        self.meta.touch_state(&state, now_ms(), None)?;
        self.meta
            .event(now_ms(), "standby_taken", Some(&state), Some(&iid), None)?;
        let this = Arc::clone(self);
        self.spawn(async move {
            if let Err(e) = this.tend_pool().await {
                tracing::warn!(error = %e, "refilling the standby pool");
            }
        });
        self.instance_info(&row).map(Some)
    }

    /// Counts a standby of `state` as starting until the guard drops: the pool tick sees it
    /// and does not start another for the same target.
    fn count_starting(self: &Arc<Self>, state: StateId) -> StartingStandby {
        *lock(&self.lifecycle.starting).entry(state).or_default() += 1;
        StartingStandby {
            controller: Arc::clone(self),
            state,
        }
    }

    /// Whether `iid` is a standby waiting in the pool.
    pub(crate) fn is_standby(&self, iid: &InstanceId) -> bool {
        lock(&self.lifecycle.standby)
            .values()
            .any(|pool| pool.contains(iid))
    }

    /// Starts or stops standbys so each state has its target.
    async fn tend_pool(self: &Arc<Self>) -> Result<(), ControllerError> {
        let now = self.now();
        let policy = self.lifecycle.config.policy.standby;
        let facts = self.state_facts()?;
        let holds: HashMap<StateId, u64> = {
            let mut h = lock(&self.lifecycle.hold);
            h.retain(|_, until| *until > now);
            h.clone()
        };
        for f in &facts {
            let mut target = policy::standby_target(f, &policy, now);
            if matches!(f.presence, Presence::Hot | Presence::Warm) {
                target = target.max(self.lease_standby_target(f.id));
            }
            if holds.contains_key(&f.id) && matches!(f.presence, Presence::Hot | Presence::Warm) {
                target = target.max(1);
            }
            let have = lock(&self.lifecycle.standby).get(&f.id).map_or(0, Vec::len);
            let starting = lock(&self.lifecycle.starting)
                .get(&f.id)
                .copied()
                .unwrap_or(0);
            if have + starting < target {
                let running = self.live.read().unwrap_or_else(|p| p.into_inner()).len();
                if running + starting >= self.lifecycle.config.instance_limits().capacity() {
                    continue;
                }
                let counted = self.count_starting(f.id);
                let this = Arc::clone(self);
                let sid = f.id;
                self.spawn(async move {
                    let _counted = counted;
                    if let Err(e) = this.start_standby(sid).await {
                        tracing::warn!(state = %sid.short(), error = %e, "cannot start a standby");
                    }
                });
            } else if have > target {
                let extra = lock(&self.lifecycle.standby)
                    .get(&f.id)
                    .and_then(|l| l.first().copied());
                if let Some(iid) = extra {
                    if let Err(e) = self.stop_instance(&iid, StopReason::Idle).await {
                        self.object_failed("stopping a spare standby", Some(&f.id), Some(&iid), &e);
                    }
                }
            }
        }
        Ok(())
    }

    /// Starts one standby of `state` and puts it in the pool.
    pub(crate) async fn start_standby(
        self: &Arc<Self>,
        state: StateId,
    ) -> Result<InstanceId, ControllerError> {
        if !self.store.contains(&state) {
            return Err(ControllerError::NotFound(format!(
                "state {} has no snapshot",
                state.short()
            )));
        }
        let _hold = self.hold_snapshot(state).await;
        if !self.store.contains(&state) {
            return Err(ControllerError::NotFound(format!(
                "state {} was evicted",
                state.short()
            )));
        }
        let iid = InstanceId::from_bytes(rand::random());
        let result = self.start_instance(iid, state).await;
        let mut row = match result {
            Ok(row) => row,
            Err(e) => {
                self.remove_instance_data(iid).await;
                return Err(e);
            }
        };
        row.status = "standby".into();
        self.meta.insert_instance(&row)?;
        lock(&self.lifecycle.standby)
            .entry(state)
            .or_default()
            .push(iid);
        self.note_activity(iid);
        self.record_transition(&state, Event::InstanceStarting, None)?;
        self.record_transition(&state, Event::InstanceUp, None)?;
        self.meta
            .event(now_ms(), "standby_started", Some(&state), Some(&iid), None)?;
        Ok(iid)
    }

    /// Whether a state's own step can be replayed from what is kept.
    pub(crate) fn replayable(&self, row: &StateRow) -> bool {
        if row.parent.is_none() {
            return true; // initdb
        }
        match serde_json::from_str::<Step>(&row.inputs_fingerprint) {
            Ok(step) if step.client_only() => false,
            Ok(step) => step
                .files()
                .iter()
                .all(|(_, sha256)| self.blobs.contains(sha256)),
            Err(_) => false,
        }
    }

    /// The steps that make `id`, from the base; their input files are blobs.
    pub(crate) fn replay_steps(
        &self,
        id: &StateId,
    ) -> Result<(EngineFingerprint, Vec<Step>), ControllerError> {
        let rows: HashMap<StateId, StateRow> = self
            .meta
            .states()?
            .into_iter()
            .map(|r| (r.state_id, r))
            .collect();
        let mut steps = Vec::new();
        let mut cur = rows.get(id);
        while let Some(row) = cur {
            let Some(parent) = row.parent else { break };
            let step: Step = serde_json::from_str(&row.inputs_fingerprint).map_err(|_| {
                ControllerError::NotFound(format!(
                    "state {} cannot be restored: its step is not recorded",
                    row.state_id.short()
                ))
            })?;
            if step.client_only() {
                return Err(ControllerError::NotFound(format!(
                    "state {} cannot be rebuilt here: step {} ({}) is a command a client ran \
                     (prepare:cmd), and only a client holds its inputs; run its prepare again",
                    id.short(),
                    row.state_id.short(),
                    step.label()
                )));
            }
            for (path, sha256) in step.files() {
                if !self.blobs.contains(sha256) {
                    return Err(ControllerError::NotFound(format!(
                        "state {} cannot be restored: input {path} was not kept",
                        row.state_id.short()
                    )));
                }
            }
            steps.push(step);
            cur = rows.get(&parent);
        }
        let Some(base) = cur else {
            return Err(ControllerError::NotFound(format!(
                "state {} is not known",
                id.short()
            )));
        };
        steps.reverse();
        // A base row records the engine it was made with; rows from before engines were
        // recorded there hold the default one's.
        let engine: EngineFingerprint = serde_json::from_str(&base.inputs_fingerprint)
            .unwrap_or_else(|_| self.runtime.engine().clone());
        let chain = taidon_core::plan::chain(&engine, &steps);
        if chain.head() != *id {
            return Err(ControllerError::BadInput(format!(
                "state {} was built by another engine than {} and cannot be replayed here",
                id.short(),
                engine.version()
            )));
        }
        Ok((engine, steps))
    }

    /// Rebuilds a COLD state known by id from its nearest surviving ancestor.
    pub(crate) async fn restore_state(
        self: &Arc<Self>,
        id: StateId,
        events: &Events,
    ) -> Result<(), ControllerError> {
        let (engine, steps) = self.replay_steps(&id)?;
        self.build_steps(&engine, steps, events).await?;
        Ok(())
    }

    /// The `Restoring` event for a chain whose head is COLD, naming the ancestor it replays
    /// from; `None` when the head is not COLD.
    pub(crate) fn restoring_event(
        &self,
        chain: &Chain,
        cached: usize,
    ) -> Result<Option<PrepareEvent>, ControllerError> {
        let head = chain.head();
        let cold = self
            .meta
            .state(&head)?
            .is_some_and(|r| r.status == StateStatus::Cold);
        if !cold {
            return Ok(None);
        }
        let from = if cached > 0 {
            Some(chain.steps[cached - 1])
        } else if self.store.contains(&chain.base) {
            Some(chain.base)
        } else {
            None
        };
        self.meta.event(
            now_ms(),
            "restoring",
            Some(&head),
            None,
            Some(&match from {
                Some(f) => format!("from {}", f.short()),
                None => "from initdb".to_owned(),
            }),
        )?;
        Ok(Some(PrepareEvent::Restoring {
            state_id: head,
            from,
            steps: chain.steps.len() - cached,
        }))
    }

    /// `POST /v1/warmup`: builds (or restores) the state to WARM; with `hot`, starts a
    /// standby and keeps one for the idle timeout.
    pub async fn warmup(self: &Arc<Self>, req: WarmupRequest, events: Events) {
        let result = self.warmup_inner(req, &events).await;
        let _ = events.send(match result {
            Ok(done) => done,
            Err(e) => PrepareEvent::Failed { error: e.to_api() },
        });
    }

    async fn warmup_inner(
        self: &Arc<Self>,
        req: WarmupRequest,
        events: &Events,
    ) -> Result<PrepareEvent, ControllerError> {
        let (id, cache_hit) = match &req.state {
            Some(typed) => {
                let id = self.state_by_prefix(typed)?;
                if self.store.contains(&id) {
                    (id, true)
                } else {
                    self.ensure_local(id, events).await?;
                    (id, false)
                }
            }
            None => {
                let engine = self.engine_for(&req.engine).await?;
                self.build_steps(&engine, req.steps, events).await?
            }
        };
        if req.hot {
            let until = now_ms() + self.lifecycle.config.instances.idle_timeout_s * 1000;
            lock(&self.lifecycle.hold).insert(id, until);
            let waiting = lock(&self.lifecycle.standby)
                .get(&id)
                .is_some_and(|l| !l.is_empty());
            if !waiting {
                let _ = events.send(PrepareEvent::InstanceStarting { state_id: id });
                self.make_room().await?;
                // Counted as starting, as the pool counts its own, so a pool tick that runs
                // meanwhile does not start a second one for the hold above.
                let _counted = self.count_starting(id);
                self.start_standby(id).await?;
            }
        }
        self.meta.touch_state(&id, now_ms(), None)?;
        Ok(PrepareEvent::Done {
            state_id: id,
            cache_hit,
            instance: None,
        })
    }

    /// Recorded events, newest last (at most `limit`), of one state or all.
    pub fn events(
        &self,
        typed: Option<&str>,
        limit: usize,
    ) -> Result<Vec<EventInfo>, ControllerError> {
        let state = match typed {
            Some(t) => Some(self.state_by_prefix(t)?.to_string()),
            None => None,
        };
        let rows = self.meta.with(|c| {
            let mut stmt = c.prepare(
                "SELECT ts_ms, kind, state_id, instance_id, detail FROM events
                 WHERE ?1 IS NULL OR state_id = ?1 ORDER BY id DESC LIMIT ?2",
            )?;
            let rows = stmt
                .query_map(rusqlite::params![state, limit as i64], |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, Option<String>>(4)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })?;
        let mut out: Vec<EventInfo> = rows
            .into_iter()
            .map(|(ts, kind, sid, iid, detail)| EventInfo {
                ts_ms: ts as u64,
                kind,
                state_id: sid.and_then(|s| s.parse().ok()),
                instance_id: iid.and_then(|i| i.parse().ok()),
                detail,
            })
            .collect();
        out.reverse();
        Ok(out)
    }
}
