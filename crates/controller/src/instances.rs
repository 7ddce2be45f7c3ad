//! Instances: a clone of a snapshot plus a running `postgres`, started and watched through the
//! [`Runtime`](taidon_runtime::Runtime).

use std::sync::Arc;
use std::time::Instant;

use rand::RngCore;
use taidon_api::{InstanceInfo, Target};
use taidon_core::{InstanceId, StateId};
use taidon_runtime::{Endpoint, Instance};

use crate::meta::InstanceRow;
use crate::{now_ms, Controller, ControllerError};

/// The superuser the gateway logs in as; users never see its password.
pub(crate) const INSTANCE_USER: &str = "postgres";

/// A running instance, as resolve needs it.
pub(crate) struct Live {
    pub(crate) state_id: StateId,
    /// Where the gateway reaches it, as its runtime says.
    endpoint: Endpoint,
    password: String,
    /// The read-only role's password, derived once here rather than on every Resolve.
    ro_password: String,
    /// The runtime's handle on its server; `None` once stopping (or found dead).
    pub(crate) server: tokio::sync::Mutex<Option<Box<dyn Instance>>>,
}

impl Live {
    fn new(state_id: StateId, password: String, server: Box<dyn Instance>) -> Self {
        Self {
            state_id,
            endpoint: server.endpoint(),
            ro_password: crate::access::ro_password(&password),
            password,
            server: tokio::sync::Mutex::new(Some(server)),
        }
    }

    /// How its server ended, if it has, looked at now; the handle of an ended server is
    /// dropped (it signals nothing). `None` while it runs, and while another task holds it
    /// (being stopped or worked on); `Some(None)` once it is gone from the handle already.
    pub(crate) fn take_if_ended(&self) -> Option<Option<taidon_runtime::Exit>> {
        let mut server = self.server.try_lock().ok()?;
        match server.as_mut().map(|s| s.health()) {
            None => Some(None),
            Some(taidon_runtime::Health::Running) => None,
            Some(taidon_runtime::Health::Exited { status }) => {
                server.take();
                Some(Some(status))
            }
        }
    }

    /// Where the gateway logs in to this instance for a session of `scope`.
    pub(crate) fn target(
        &self,
        instance_id: InstanceId,
        scope: taidon_core::token::Scope,
    ) -> Target {
        let (user, password) = match scope {
            taidon_core::token::Scope::Rw => (INSTANCE_USER, &self.password),
            taidon_core::token::Scope::Ro => (crate::access::RO_ROLE, &self.ro_password),
        };
        Target {
            instance_id,
            host: self.endpoint.host.clone(),
            port: self.endpoint.port,
            user: user.into(),
            password: password.clone(),
        }
    }
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut b);
    hex::encode(b)
}

impl Controller {
    /// Creates an instance of a state given by id or prefix.
    pub async fn create_instance(
        self: &Arc<Self>,
        typed: &str,
    ) -> Result<InstanceInfo, ControllerError> {
        let id = self.state_by_prefix(typed)?;
        self.create_instance_of(id).await
    }

    /// Clones the snapshot of `state`, starts a server on it and sets a fresh password.
    pub(crate) async fn create_instance_of(
        self: &Arc<Self>,
        state: StateId,
    ) -> Result<InstanceInfo, ControllerError> {
        // A pre-started standby is handed out at once.
        if let Some(info) = self.take_standby(state).await? {
            self.metrics.standby_handout(true);
            return Ok(info);
        }
        self.metrics.standby_handout(false);
        let row = self.start_new_instance(state).await?;
        self.meta.event(
            now_ms(),
            "instance_started",
            Some(&state),
            Some(&row.instance_id),
            None,
        )?;
        self.make_spare_later(state);
        self.instance_info(&row)
    }

    /// Clones `state` (restoring its snapshot first if it is not here), makes room, starts a
    /// server on the clone and records the instance.
    pub(crate) async fn start_new_instance(
        self: &Arc<Self>,
        state: StateId,
    ) -> Result<InstanceRow, ControllerError> {
        // Held from here until the clone is made: eviction leaves it alone.
        let _hold = self.hold_snapshot(state).await;
        if !self.store.contains(&state) {
            // Downloaded from the bucket, or (COLD) rebuilt from its nearest surviving
            // ancestor, first.
            let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
            self.ensure_local(state, &tx).await?;
        }
        self.make_room().await?;
        let iid = InstanceId::from_bytes(rand::random());
        let result = self.start_instance(iid, state).await;
        if result.is_err() {
            self.remove_instance_data(iid).await;
        }
        let row = result?;
        self.meta.insert_instance(&row)?;
        self.note_activity(iid);
        self.record_transition(&state, taidon_core::policy::Event::InstanceStarting, None)?;
        self.record_transition(&state, taidon_core::policy::Event::InstanceUp, None)?;
        self.meta
            .touch_state(&state, now_ms(), Some(row.clone_ms + row.start_ms))?;
        Ok(row)
    }

    /// On a store that copies, prepares the next instance's clone of `state` in the background:
    /// the next instance then starts without waiting for a copy.
    fn make_spare_later(&self, state: StateId) {
        let store = self.store.shared();
        self.spawn(async move {
            if let Err(e) = store.make_spare(state).await {
                tracing::warn!(state = %state.short(), error = %e, "cannot make a spare clone");
            }
        });
    }

    /// Restores `state` into a new instance's data and starts its server; the caller removes
    /// the data if this fails.
    pub(crate) async fn start_instance(
        self: &Arc<Self>,
        iid: InstanceId,
        state: StateId,
    ) -> Result<InstanceRow, ControllerError> {
        let _starting = self.starting_instances.start(iid);
        self.verify_before_clone(state).await?;
        let started = Instant::now();
        let area = self.runtime.prepare_instance(iid).await.map_err(|e| {
            ControllerError::runtime(format!("cannot make room for instance {iid}"), e)
        })?;
        let restored = self.store.restore_for(state, &area).await;
        self.metrics
            .restored(crate::metrics::RestoreSource::Local, restored.is_ok());
        restored?;
        let clone_ms = started.elapsed().as_millis() as u64;

        let started = Instant::now();
        let server = self
            .runtime
            .start_instance(iid, state)
            .await
            .map_err(|e| ControllerError::runtime(format!("cannot start instance {iid}"), e))?;
        let password = random_hex(24);
        // On failure the caller deletes the clone: no checkpoint is worth waiting for.
        if let Err(e) = set_passwords(server.as_ref(), &password).await {
            let _ = server.discard().await;
            return Err(e);
        }
        let start_ms = started.elapsed().as_millis() as u64;
        let row = InstanceRow {
            instance_id: iid,
            state_id: state,
            status: "running".into(),
            port: server.endpoint().port,
            password: password.clone(),
            data_dir: area.to_string(),
            created_ms: now_ms(),
            clone_ms,
            start_ms,
        };
        self.live
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(iid, Arc::new(Live::new(state, password, server)));
        Ok(row)
    }

    pub(crate) fn resolve_instance(&self, typed: &str) -> Result<InstanceRow, ControllerError> {
        let rows = self.meta.instances()?;
        let ids: Vec<String> = rows.iter().map(|r| r.instance_id.to_string()).collect();
        let id = taidon_core::prefix::resolve(typed, ids.iter().map(String::as_str))?;
        rows.into_iter()
            .find(|r| r.instance_id.to_string() == id)
            .ok_or_else(|| ControllerError::NotFound(format!("no instance matches {typed:?}")))
    }

    /// One instance, by id or prefix, with a freshly minted DSN.
    pub fn get_instance(&self, typed: &str) -> Result<InstanceInfo, ControllerError> {
        let row = self.resolve_instance(typed)?;
        self.instance_info(&row)
    }

    pub fn list_instances(&self) -> Result<Vec<InstanceInfo>, ControllerError> {
        self.meta
            .instances()?
            .iter()
            .map(|r| self.instance_info(r))
            .collect()
    }

    /// Stops an instance and deletes its data.
    pub async fn delete_instance(&self, iid: &InstanceId) -> Result<(), ControllerError> {
        self.forget_standby(iid);
        let live = self
            .live
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(iid);
        if let Some(live) = live {
            let server = live.server.lock().await.take();
            if let Some(server) = server {
                // Its data is deleted next: no clean checkpoint is worth waiting for.
                server.discard().await.map_err(|e| {
                    ControllerError::runtime(format!("cannot stop instance {iid}"), e)
                })?;
            }
        }
        let state = self
            .meta
            .instances()?
            .into_iter()
            .find(|r| &r.instance_id == iid)
            .map(|r| r.state_id);
        self.meta.delete_instance(iid)?;
        self.forget_instance(iid);
        self.instance_removed_for_leases(iid);
        // Also stops a server a dead daemon left on its data, if any.
        self.remove_instance_data(*iid).await;
        if let Some(sid) = &state {
            self.after_instance_gone(sid, None)?;
        }
        self.meta.event(
            now_ms(),
            "instance_removed",
            state.as_ref(),
            Some(iid),
            None,
        )?;
        Ok(())
    }

    /// Deletes an instance given by id or prefix.
    pub async fn delete_instance_typed(
        &self,
        typed: &str,
    ) -> Result<taidon_api::Removed, ControllerError> {
        let row = self.resolve_instance(typed)?;
        self.delete_instance(&row.instance_id).await?;
        Ok(taidon_api::Removed {
            states: vec![],
            instances: vec![row.instance_id],
        })
    }

    /// Takes over the instances a previous daemon ran: a server that outlived it and runs as
    /// this runtime would run it is adopted as it is, its sessions (through a gateway that
    /// outlived it too) going on; any other is stopped and started again as a child of this
    /// process. DSNs stay valid either way: they name the gateway.
    pub(crate) async fn adopt_instances(self: &Arc<Self>) -> Result<(), ControllerError> {
        for row in self.meta.instances()? {
            if row.status == "stopped" {
                continue; // stopped for being idle: its data waits for sqlrs rm
            }
            if row.status != "standby" {
                match self.runtime.adopt_instance(row.instance_id).await {
                    Ok(Some(server)) => {
                        tracing::info!(instance = %row.instance_id, "adopted the running server a previous daemon left");
                        self.put_live(row, server, "instance_adopted")?;
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(instance = %row.instance_id, error = %e, "cannot adopt a left server; starting a new one");
                    }
                }
            }
            let has_data = match self.runtime.reclaim_instance(row.instance_id).await {
                Ok(reclaimed) => {
                    if let Some(what) = reclaimed.stopped {
                        tracing::warn!(instance = %row.instance_id, "stopped a server left by a previous daemon: {what}");
                    }
                    reclaimed.has_data
                }
                Err(e) => {
                    tracing::warn!(instance = %row.instance_id, error = %e, "checking for a left-over server");
                    true // its restart says whether it can run
                }
            };
            if row.status == "standby" {
                // A standby holds nothing: the pool starts a fresh one if still wanted.
                self.meta.delete_instance(&row.instance_id)?;
                self.remove_instance_data(row.instance_id).await;
                continue;
            }
            if !has_data {
                tracing::warn!(instance = %row.instance_id, "instance data is gone; forgetting it");
                self.meta.delete_instance(&row.instance_id)?;
                continue;
            }
            if let Err(e) = self.restart_instance(row, "instance_adopted").await {
                tracing::warn!(error = %e, "cannot restart an instance");
            }
        }
        // What runs for no instance this controller knows (a pod of a crashed build, of an
        // instance whose row went) is ended.
        let keep: Vec<_> = self
            .meta
            .instances()?
            .iter()
            .map(|r| r.instance_id)
            .collect();
        match self.runtime.end_unadopted(&keep).await {
            Ok(ended) => {
                for what in ended {
                    tracing::warn!("ended {what}: it belongs to no instance");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot end what belongs to no instance"),
        }
        Ok(())
    }

    /// Starts the server of an existing instance again on its data directory: after a
    /// daemon restart, or when a DSN names an instance stopped for being idle or whose server
    /// died. Its password is in its data already; its DSNs name the gateway, so they hold
    /// across the new port. On failure the instance is marked failed, with an event.
    pub(crate) async fn restart_instance(
        self: &Arc<Self>,
        row: InstanceRow,
        event: &str,
    ) -> Result<(), ControllerError> {
        let started = match self
            .runtime
            .start_instance(row.instance_id, row.state_id)
            .await
        {
            // A runtime that restores the data anew (a runner pod) has lost the passwords;
            // setting them again is harmless where the data was kept.
            Ok(server) => match set_passwords(server.as_ref(), &row.password).await {
                Ok(()) => Ok(server),
                Err(e) => {
                    let _ = server.discard().await;
                    Err(e)
                }
            },
            Err(e) => Err(ControllerError::runtime(
                format!("cannot restart instance {}", row.instance_id),
                e,
            )),
        };
        let mut row = row;
        match started {
            Ok(server) => self.put_live(row, server, event),
            Err(err) => {
                row.status = "failed".into();
                self.meta.insert_instance(&row)?;
                self.meta.event(
                    now_ms(),
                    "instance_failed",
                    Some(&row.state_id),
                    Some(&row.instance_id),
                    Some(&err.to_api().message),
                )?;
                Err(err)
            }
        }
    }
}

impl Controller {
    /// The instances with a server this process runs or adopted.
    pub(crate) fn live_ids(&self) -> std::collections::HashSet<InstanceId> {
        self.live
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect()
    }

    /// Records `row`'s instance as running on `server`, which the gateway reaches from now on,
    /// with the event `event`.
    fn put_live(
        &self,
        mut row: InstanceRow,
        server: Box<dyn Instance>,
        event: &str,
    ) -> Result<(), ControllerError> {
        row.port = server.endpoint().port;
        row.status = "running".into();
        self.meta.insert_instance(&row)?;
        self.live.write().unwrap_or_else(|p| p.into_inner()).insert(
            row.instance_id,
            Arc::new(Live::new(row.state_id, row.password.clone(), server)),
        );
        self.meta.event(
            now_ms(),
            event,
            Some(&row.state_id),
            Some(&row.instance_id),
            None,
        )?;
        Ok(())
    }

    /// Deletes an instance's data through the runtime; a failure is logged, not fatal (the
    /// instance is gone from the metadata either way).
    pub(crate) async fn remove_instance_data(&self, iid: InstanceId) {
        if let Err(e) = self.runtime.remove_instance(iid).await {
            tracing::warn!(instance = %iid, error = %e, "cannot remove an instance's data");
        }
    }
}

/// Sets the instance user's password and the read-only role's, on a new server or one
/// started again.
async fn set_passwords(server: &dyn Instance, password: &str) -> Result<(), ControllerError> {
    server
        .set_password(INSTANCE_USER, password)
        .await
        .map_err(|e| ControllerError::runtime("cannot set the instance password", e))?;
    crate::access::create_ro_role(server, password).await
}
