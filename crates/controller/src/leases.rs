//! Leases: a fresh, isolated copy of a state for one test, handed out in milliseconds and
//! destroyed when given back or when its TTL runs out.
//!
//! Two isolations, two pools:
//! - `database`: a *host* (an instance of the state that nobody connects to directly) keeps
//!   databases made ahead of time with `CREATE DATABASE … TEMPLATE postgres` (`STRATEGY
//!   FILE_COPY` from PostgreSQL 15: a file copy, not a WAL record per page). A lease takes
//!   one; its token names that database and the gateway connects nowhere else. The pool
//!   refills in the background, as many at once as there are cores, and keeps as many ready
//!   as the recent lease rate needs ([`policy::lease_ready_target`]).
//! - `instance`: an instance of its own, from the standby pool, which grows with the recent
//!   rate of instance leases within the memory budget.
//!
//! Requests for one state and isolation queue in arrival order (a fair mutex) and wait up to
//! their `wait_s` for a copy; each answer says how long it waited. A given-back copy is
//! dropped, never reused. Leases and hosts are rows in the metadata, so a restarted daemon
//! keeps every lease and its DSN.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use rusqlite::params;
use taidon_api::{Isolation, LeaseInfo, LeaseRequest, PrepareEvent};
use taidon_core::policy;
use taidon_core::token::Scope;
use taidon_core::{InstanceId, LeaseId, StateId, Step};

use crate::meta::{Meta, MetaError};
use crate::tokens::Principal;
use crate::{lock, now_ms, Controller, ControllerError};

pub(crate) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS leases (
    lease_id    TEXT PRIMARY KEY,
    state_id    TEXT NOT NULL,
    isolation   TEXT NOT NULL,
    instance_id TEXT NOT NULL,
    database    TEXT NOT NULL,
    owner       TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    expires_ms  INTEGER NOT NULL,
    waited_ms   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS lease_hosts (
    instance_id TEXT PRIMARY KEY,
    state_id    TEXT NOT NULL
);
"#;

/// The prefix of every database a host makes for leases.
const DB_PREFIX: &str = "taidon_lease_";
/// The window the lease rate is measured over.
const RATE_WINDOW_MS: u64 = 60_000;

/// One lease, as kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LeaseRow {
    pub(crate) lease: LeaseId,
    pub(crate) state: StateId,
    pub(crate) isolation: Isolation,
    pub(crate) instance: InstanceId,
    pub(crate) database: String,
    pub(crate) owner: String,
    pub(crate) created_ms: u64,
    pub(crate) expires_ms: u64,
    pub(crate) waited_ms: u64,
}

fn parse<T: std::str::FromStr>(s: String) -> Result<T, MetaError> {
    s.parse()
        .map_err(|_| MetaError::Corrupt(format!("lease field {s:?}")))
}

impl Meta {
    /// Records a lease and its `lease_granted` event in one transaction: one commit on the
    /// hand-out path.
    fn insert_lease(&self, r: &LeaseRow, detail: &str) -> Result<(), MetaError> {
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            tx.execute(
                "INSERT INTO leases (lease_id, state_id, isolation, instance_id, database, owner, \
                 created_ms, expires_ms, waited_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    r.lease.to_string(),
                    r.state.to_string(),
                    r.isolation.to_string(),
                    r.instance.to_string(),
                    r.database,
                    r.owner,
                    r.created_ms as i64,
                    r.expires_ms as i64,
                    r.waited_ms as i64,
                ],
            )?;
            tx.execute(
                "INSERT INTO events (ts_ms, kind, state_id, instance_id, detail) \
                 VALUES (?1, 'lease_granted', ?2, ?3, ?4)",
                params![
                    r.created_ms as i64,
                    r.state.to_string(),
                    r.instance.to_string(),
                    detail
                ],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn delete_lease(&self, id: &LeaseId) -> Result<(), MetaError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM leases WHERE lease_id = ?1",
                params![id.to_string()],
            )?;
            Ok(())
        })
    }

    fn leases(&self) -> Result<Vec<LeaseRow>, MetaError> {
        self.with(|c| {
            let mut stmt = c.prepare(
                "SELECT lease_id, state_id, isolation, instance_id, database, owner, created_ms, \
                 expires_ms, waited_ms FROM leases",
            )?;
            let rows = stmt.query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, String>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, i64>(6)?,
                    r.get::<_, i64>(7)?,
                    r.get::<_, i64>(8)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (lease, state, isolation, instance, database, owner, c, e, w) = row?;
                out.push(LeaseRow {
                    lease: parse(lease)?,
                    state: parse(state)?,
                    isolation: parse(isolation)?,
                    instance: parse(instance)?,
                    database,
                    owner,
                    created_ms: c as u64,
                    expires_ms: e as u64,
                    waited_ms: w as u64,
                });
            }
            Ok(out)
        })
    }

    fn insert_lease_host(&self, iid: &InstanceId, state: &StateId) -> Result<(), MetaError> {
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO lease_hosts (instance_id, state_id) VALUES (?1, ?2)",
                params![iid.to_string(), state.to_string()],
            )?;
            Ok(())
        })
    }

    fn delete_lease_host(&self, iid: &InstanceId) -> Result<(), MetaError> {
        self.with(|c| {
            c.execute(
                "DELETE FROM lease_hosts WHERE instance_id = ?1",
                params![iid.to_string()],
            )?;
            Ok(())
        })
    }

    fn lease_hosts(&self) -> Result<Vec<(InstanceId, StateId)>, MetaError> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT instance_id, state_id FROM lease_hosts")?;
            let rows =
                stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?;
            let mut out = Vec::new();
            for row in rows {
                let (i, s) = row?;
                out.push((parse(i)?, parse(s)?));
            }
            Ok(out)
        })
    }
}

/// An instance of a state whose databases are leased one by one.
pub(crate) struct Host {
    pub(crate) instance: InstanceId,
    state: StateId,
    /// Made, never handed out: the next leases take them, oldest first.
    ready: StdMutex<VecDeque<String>>,
    /// Handed out and not yet given back.
    leased: StdMutex<HashSet<String>>,
    /// Being made or dropped now.
    making: AtomicUsize,
    dropping: AtomicUsize,
    /// Signalled when a database is made, or one is dropped (room for another).
    changed: tokio::sync::Notify,
    /// How long making one took lately (an average), in ms.
    refill_ms: AtomicU64,
    /// The last hand-out or give-back, for retiring a host nobody uses.
    last_used_ms: AtomicU64,
    /// Why the last database could not be made, for the requests that wait.
    last_error: StdMutex<Option<String>>,
    /// Sessions on `template1` that make and drop databases.
    sessions: tokio::sync::Mutex<Vec<tokio_postgres::Client>>,
    /// `server_version_num`, learnt at the first session.
    version: AtomicU64,
    /// Retired: nothing more is made in it.
    retired: AtomicBool,
}

impl Host {
    fn new(instance: InstanceId, state: StateId) -> Self {
        Self {
            instance,
            state,
            ready: StdMutex::default(),
            leased: StdMutex::default(),
            making: AtomicUsize::new(0),
            dropping: AtomicUsize::new(0),
            changed: tokio::sync::Notify::new(),
            refill_ms: AtomicU64::new(150),
            last_used_ms: AtomicU64::new(now_ms()),
            last_error: StdMutex::default(),
            sessions: tokio::sync::Mutex::default(),
            version: AtomicU64::new(0),
            retired: AtomicBool::new(false),
        }
    }

    fn ready_count(&self) -> usize {
        lock(&self.ready).len()
    }

    fn leased_count(&self) -> usize {
        lock(&self.leased).len()
    }
}

/// A fair (FIFO) line of lease requests: tokio's mutex wakes its waiters in order.
type Queue = Arc<tokio::sync::Mutex<()>>;

/// The controller's leases: the active ones, the hosts of leased databases, the queues.
#[derive(Default)]
pub(crate) struct Leases {
    active: StdMutex<HashMap<LeaseId, LeaseRow>>,
    hosts: StdMutex<HashMap<StateId, Arc<Host>>>,
    /// One fair (FIFO) queue per state and isolation: requests are served in arrival order.
    queues: StdMutex<HashMap<(StateId, Isolation), Queue>>,
    /// When recent leases were handed out, by state and isolation: the pools' demand.
    recent: StdMutex<HashMap<(StateId, Isolation), VecDeque<u64>>>,
    /// One host start at a time per state.
    host_starts: crate::keyed::KeyedLocks<StateId>,
    /// Signalled when an instance lease's instance is gone: room for another.
    instance_freed: tokio::sync::Notify,
}

/// `CREATE DATABASE` and `DROP DATABASE` for one host, over a session on `template1` (a
/// session on the template itself would keep others from copying it).
async fn host_session(
    ctl: &Controller,
    host: &Host,
) -> Result<tokio_postgres::Client, ControllerError> {
    if let Some(c) = host.sessions.lock().await.pop() {
        if !c.is_closed() {
            return Ok(c);
        }
    }
    let target = {
        let live = ctl.live.read().unwrap_or_else(|p| p.into_inner());
        live.get(&host.instance)
            .map(|l| l.target(host.instance, Scope::Rw))
    }
    .ok_or_else(|| {
        ControllerError::Internal(format!(
            "the instance {} holding leased databases is not running",
            host.instance
        ))
    })?;
    let (client, connection) = tokio_postgres::Config::new()
        .host(&target.host)
        .port(target.port)
        .user(&target.user)
        .password(target.password.as_bytes())
        .dbname("template1")
        .application_name("taidon-leases")
        .connect_timeout(Duration::from_secs(10))
        .connect(tokio_postgres::NoTls)
        .await
        .map_err(|e| {
            ControllerError::Internal(format!(
                "cannot connect to instance {} to make databases: {e}",
                host.instance
            ))
        })?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!("lease session ended: {e}");
        }
    });
    if host.version.load(Ordering::Relaxed) == 0 {
        let row = client
            .query_one("SELECT current_setting('server_version_num')::int8", &[])
            .await
            .map_err(|e| sql_error("reading the server version", e))?;
        host.version
            .store(row.get::<_, i64>(0) as u64, Ordering::Relaxed);
    }
    Ok(client)
}

async fn put_back(host: &Host, client: tokio_postgres::Client) {
    if !client.is_closed() {
        host.sessions.lock().await.push(client);
    }
}

fn sql_error(what: &str, e: tokio_postgres::Error) -> ControllerError {
    let detail = e
        .as_db_error()
        .map(|d| d.message().to_owned())
        .unwrap_or_else(|| e.to_string());
    ControllerError::Internal(format!("{what}: {detail}"))
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

fn random_db_name() -> String {
    let b: [u8; 8] = rand::random();
    format!("{DB_PREFIX}{}", hex::encode(b))
}

impl Controller {
    /// Hands out a fresh copy of a state: see the module's documentation.
    pub async fn lease(
        self: &Arc<Self>,
        req: LeaseRequest,
        caller: &Principal,
    ) -> Result<LeaseInfo, ControllerError> {
        let config = &self.lifecycle.config.leases;
        let ttl_s = req.ttl_s.unwrap_or(config.default_ttl_s);
        if ttl_s == 0 {
            return Err(ControllerError::BadInput(
                "a lease's ttl must be at least 1 s".into(),
            ));
        }
        if ttl_s > config.max_ttl_s {
            return Err(ControllerError::BadInput(format!(
                "ttl {ttl_s} s is over this installation's maximum of {} s ([leases] max_ttl_s)",
                config.max_ttl_s
            )));
        }
        let wait = Duration::from_secs(req.wait_s.unwrap_or(config.wait_s));
        let state = match (&req.state, req.prepare) {
            (Some(typed), None) => self.state_by_prefix(typed).map_err(|e| match e {
                ControllerError::Prefix(
                    taidon_core::prefix::PrefixError::NotFound(_)
                    | taidon_core::prefix::PrefixError::Malformed(_),
                ) => ControllerError::NotFound(format!(
                    "no state matches {typed:?}: give a state id (sqlrs ls) or a recipe of sqlrs.toml"
                )),
                other => other,
            })?,
            (None, Some(prepare)) => self.prepare_for_lease(prepare).await?,
            (Some(_), Some(_)) => {
                return Err(ControllerError::BadInput(
                    "a lease names a state or a recipe's prepare, not both".into(),
                ))
            }
            (None, None) => {
                return Err(ControllerError::BadInput(
                    "a lease names a state (an id or prefix) or a recipe's prepare".into(),
                ))
            }
        };
        let started = Instant::now();
        let deadline = started + wait;
        let queue = {
            let mut queues = lock(&self.leases.queues);
            Arc::clone(queues.entry((state, req.isolation)).or_default())
        };
        self.note_lease(state, req.isolation);
        let turn = tokio::time::timeout_at(deadline.into(), queue.lock()).await;
        let Ok(_turn) = turn else {
            return Err(ControllerError::Capacity(format!(
                "no fresh copy of state {} within {} s: the requests ahead of this one still wait \
                 (raise --wait, or [leases] / [instances] limits)",
                state.short(),
                wait.as_secs()
            )));
        };
        let (instance, database) = match req.isolation {
            Isolation::Database => {
                let (host, db) = self.take_database(state, deadline, wait).await?;
                (host, db)
            }
            Isolation::Instance => {
                let iid = self.take_instance(state, deadline, wait).await?;
                (iid, "postgres".to_owned())
            }
        };
        let waited_ms = started.elapsed().as_millis() as u64;
        let now = self.now();
        let row = LeaseRow {
            lease: LeaseId::from_bytes(rand::random()),
            state,
            isolation: req.isolation,
            instance,
            database,
            owner: caller.sub.clone(),
            created_ms: now,
            expires_ms: now.saturating_add(ttl_s.saturating_mul(1000)),
            waited_ms,
        };
        let detail = format!(
            "lease {} ({}, database {}, waited {} ms, ttl {ttl_s} s)",
            row.lease, row.isolation, row.database, waited_ms
        );
        self.meta.insert_lease(&row, &detail)?;
        lock(&self.leases.active).insert(row.lease, row.clone());
        if row.isolation == Isolation::Instance {
            self.meta.set_instance_owner(&row.instance, &row.owner)?;
        }
        self.lease_info(&row)
    }

    /// Builds (or finds) the state a recipe's prepare makes; a concurrent build of the same
    /// state is waited for, never repeated.
    async fn prepare_for_lease(
        self: &Arc<Self>,
        req: taidon_api::PrepareRequest,
    ) -> Result<StateId, ControllerError> {
        let engine = self.engine_for(&req.engine).await?;
        let mut steps = req.steps;
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel::<PrepareEvent>();
        if let Some(lb) = &req.liquibase {
            steps.extend(self.plan_liquibase(lb, &tx).await?);
        }
        let chain = taidon_core::plan::chain(&engine, &steps);
        let missing_command = steps
            .iter()
            .zip(&chain.steps)
            .any(|(s, id)| matches!(s, Step::Command(_)) && !self.store.contains(id));
        if missing_command {
            return Err(ControllerError::BadInput(
                "the recipe has a prepare:cmd step that is not built: its command runs where \
                 the client is, so prepare it first (sqlrs lease RECIPE does)"
                    .into(),
            ));
        }
        let (head, _) = self.build_steps(&engine, steps, &tx).await?;
        Ok(head)
    }

    /// Records a hand-out for the pools' demand, and forgets the old ones.
    fn note_lease(&self, state: StateId, isolation: Isolation) {
        let now = self.now();
        let mut recent = lock(&self.leases.recent);
        let times = recent.entry((state, isolation)).or_default();
        times.push_back(now);
        while times
            .front()
            .is_some_and(|t| now.saturating_sub(*t) > RATE_WINDOW_MS)
        {
            times.pop_front();
        }
    }

    /// Leases per second of `state` and `isolation` over the last minute.
    pub(crate) fn lease_rate(&self, state: StateId, isolation: Isolation) -> f64 {
        let recent = lock(&self.leases.recent);
        let times: Vec<u64> = recent
            .get(&(state, isolation))
            .map(|t| t.iter().copied().collect())
            .unwrap_or_default();
        policy::recent_rate(&times, self.now(), RATE_WINDOW_MS)
    }

    /// A ready database of `state`'s host (started first if there is none), waiting for one
    /// to be made until `deadline`.
    async fn take_database(
        self: &Arc<Self>,
        state: StateId,
        deadline: Instant,
        wait: Duration,
    ) -> Result<(InstanceId, String), ControllerError> {
        let host = tokio::time::timeout_at(deadline.into(), self.lease_host(state))
            .await
            .map_err(|_| {
                ControllerError::Capacity(format!(
                    "no fresh database of state {} within {} s: its instance is still starting (raise --wait)",
                    state.short(),
                    wait.as_secs()
                ))
            })??;
        loop {
            // Registered before looking, so a database made in between is not missed.
            let changed = host.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let taken = lock(&host.ready).pop_front();
            if let Some(db) = taken {
                lock(&host.leased).insert(db.clone());
                host.last_used_ms.store(now_ms(), Ordering::Relaxed);
                self.tend_host(&host);
                return Ok((host.instance, db));
            }
            self.tend_host(&host);
            if tokio::time::timeout_at(deadline.into(), changed)
                .await
                .is_err()
            {
                let max = self.lifecycle.config.leases.max_databases;
                let leased = host.leased_count();
                let why = if leased + host.dropping.load(Ordering::Relaxed) >= max {
                    format!(
                        "all {max} databases one instance may hold are leased ([leases] max_databases)"
                    )
                } else if let Some(e) = lock(&host.last_error).clone() {
                    format!("the last one could not be made: {e}")
                } else {
                    "they are made more slowly than they are asked for".to_owned()
                };
                return Err(ControllerError::Capacity(format!(
                    "no fresh database of state {} within {} s: {why}; nothing already leased was touched",
                    state.short(),
                    wait.as_secs()
                )));
            }
        }
    }

    /// The host of `state`'s leased databases, started if there is none.
    async fn lease_host(self: &Arc<Self>, state: StateId) -> Result<Arc<Host>, ControllerError> {
        if let Some(h) = lock(&self.leases.hosts).get(&state) {
            return Ok(Arc::clone(h));
        }
        let _start = self.leases.host_starts.lock(state).await;
        if let Some(h) = lock(&self.leases.hosts).get(&state) {
            return Ok(Arc::clone(h));
        }
        let iid = loop {
            match self.start_new_instance(state).await {
                Ok(row) => break row.instance_id,
                Err(ControllerError::Capacity(_)) if self.retire_one_idle_host(state).await => {}
                Err(e) => return Err(e),
            }
        };
        self.meta.insert_lease_host(&iid, &state)?;
        let host = Arc::new(Host::new(iid, state));
        lock(&self.leases.hosts).insert(state, Arc::clone(&host));
        self.meta.event(
            now_ms(),
            "lease_host_started",
            Some(&state),
            Some(&iid),
            None,
        )?;
        Ok(host)
    }

    /// An instance of its own for a lease: a standby if one waits, else a new one, waiting
    /// (until `deadline`) while every place the limits allow is held.
    async fn take_instance(
        self: &Arc<Self>,
        state: StateId,
        deadline: Instant,
        wait: Duration,
    ) -> Result<InstanceId, ControllerError> {
        loop {
            let freed = self.leases.instance_freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            match self.create_instance_of(state).await {
                Ok(info) => return Ok(info.instance_id),
                Err(ControllerError::Capacity(why)) => {
                    if self.retire_one_idle_host(state).await {
                        continue;
                    }
                    // A place frees when a lease ends; a standby being started for this
                    // state is taken once up: both are looked at again.
                    let retry = Instant::now() + Duration::from_millis(100);
                    let _ = tokio::time::timeout_at(retry.min(deadline).into(), freed).await;
                    if Instant::now() >= deadline {
                        let limits = self.lifecycle.config.instance_limits();
                        return Err(ControllerError::Capacity(format!(
                            "no instance of state {} within {} s: {why} (the memory budget of {} MiB \
                             holds {} instances); nothing already leased was touched",
                            state.short(),
                            wait.as_secs(),
                            self.lifecycle.config.instances.memory_budget_mb,
                            limits.capacity()
                        )));
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Keeps `host`'s ready databases at their target: starts making more (as many at once
    /// as `[leases] parallel` allows), in the background.
    pub(crate) fn tend_host(self: &Arc<Self>, host: &Arc<Host>) {
        if host.retired.load(Ordering::Relaxed) {
            return;
        }
        let config = &self.lifecycle.config.leases;
        let rate = self.lease_rate(host.state, Isolation::Database);
        let target = policy::lease_ready_target(
            rate,
            host.refill_ms.load(Ordering::Relaxed),
            config.min_ready,
            config.max_ready,
        );
        loop {
            let making = host.making.load(Ordering::Relaxed);
            let held = host.ready_count() + host.leased_count();
            if making >= config.parallelism()
                || host.ready_count() + making >= target
                || held + making + host.dropping.load(Ordering::Relaxed) >= config.max_databases
            {
                return;
            }
            if host
                .making
                .compare_exchange(making, making + 1, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            let this = Arc::clone(self);
            let host = Arc::clone(host);
            self.spawn(async move {
                let made = this.make_database(&host).await;
                host.making.fetch_sub(1, Ordering::AcqRel);
                match made {
                    Ok(()) => {
                        *lock(&host.last_error) = None;
                        host.changed.notify_waiters();
                        this.tend_host(&host);
                    }
                    Err(e) => {
                        tracing::warn!(state = %host.state.short(), error = %e, "cannot make a database for leases");
                        *lock(&host.last_error) = Some(e.to_string());
                        this.object_failed(
                            "making a database for leases",
                            Some(&host.state),
                            Some(&host.instance),
                            &e,
                        );
                        host.changed.notify_waiters();
                    }
                }
            });
        }
    }

    /// Makes one database from the host's `postgres` database and puts it in the ready list.
    async fn make_database(&self, host: &Host) -> Result<(), ControllerError> {
        let started = Instant::now();
        let client = host_session(self, host).await?;
        let name = random_db_name();
        // Before 15 there is one way (a file copy); from 15 on, `[leases] strategy`.
        let strategy = if host.version.load(Ordering::Relaxed) >= 150_000 {
            format!(
                " STRATEGY {}",
                self.lifecycle.config.leases.strategy.to_uppercase()
            )
        } else {
            String::new()
        };
        let sql = format!(
            "CREATE DATABASE {} TEMPLATE postgres{strategy}",
            quote_ident(&name)
        );
        let result = client.batch_execute(&sql).await;
        put_back(host, client).await;
        result.map_err(|e| sql_error("CREATE DATABASE", e))?;
        let took = started.elapsed().as_millis() as u64;
        let old = host.refill_ms.load(Ordering::Relaxed);
        host.refill_ms
            .store((old * 3 + took) / 4, Ordering::Relaxed);
        if host.retired.load(Ordering::Relaxed) {
            return Ok(());
        }
        lock(&host.ready).push_back(name);
        Ok(())
    }

    /// Drops a given-back database; a session still on it is ended first.
    async fn drop_database(&self, host: &Host, name: &str) -> Result<(), ControllerError> {
        let client = host_session(self, host).await?;
        let sql = if host.version.load(Ordering::Relaxed) >= 130_000 {
            format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", quote_ident(name))
        } else {
            format!(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{}'; \
                 DROP DATABASE IF EXISTS {}",
                name.replace('\'', "''"),
                quote_ident(name)
            )
        };
        let result = client.batch_execute(&sql).await;
        put_back(host, client).await;
        result.map_err(|e| sql_error(&format!("DROP DATABASE {name}"), e))
    }

    /// Every lease the caller may see: its own, or all for an admin.
    pub fn list_leases(&self, caller: &Principal) -> Result<Vec<LeaseInfo>, ControllerError> {
        let mut rows: Vec<LeaseRow> = lock(&self.leases.active)
            .values()
            .filter(|r| caller.may_act_for(&r.owner))
            .cloned()
            .collect();
        rows.sort_by_key(|r| (r.created_ms, r.lease.to_string()));
        rows.iter().map(|r| self.lease_info(r)).collect()
    }

    /// Gives a lease back: its copy is destroyed (in the background), never reused.
    pub async fn release_lease(
        self: &Arc<Self>,
        typed: &str,
        caller: &Principal,
    ) -> Result<LeaseInfo, ControllerError> {
        let id: LeaseId = typed.trim().parse().map_err(|_| {
            ControllerError::NotFound(format!("no lease {typed:?}: a lease id is 32 hex digits"))
        })?;
        let row = lock(&self.leases.active).get(&id).cloned();
        let Some(row) = row else {
            return Err(ControllerError::NotFound(format!(
                "no lease {id}: given back already, expired, or never made"
            )));
        };
        if !caller.may_act_for(&row.owner) {
            return Err(ControllerError::Forbidden(format!(
                "lease {id} belongs to {:?}, not to {:?}",
                row.owner, caller.sub
            )));
        }
        let info = self.lease_info(&row)?;
        self.end_lease(&row, "lease_released")?;
        Ok(info)
    }

    /// Forgets a lease and destroys its copy in the background.
    fn end_lease(self: &Arc<Self>, row: &LeaseRow, event: &str) -> Result<(), ControllerError> {
        if lock(&self.leases.active).remove(&row.lease).is_none() {
            return Ok(()); // ended already, by another request or the tick
        }
        self.meta.delete_lease(&row.lease)?;
        self.meta.event(
            now_ms(),
            event,
            Some(&row.state),
            Some(&row.instance),
            Some(&format!(
                "lease {} ({}, database {})",
                row.lease, row.isolation, row.database
            )),
        )?;
        let this = Arc::clone(self);
        let row = row.clone();
        match row.isolation {
            Isolation::Database => {
                let host = lock(&self.leases.hosts).get(&row.state).cloned();
                let Some(host) = host.filter(|h| h.instance == row.instance) else {
                    return Ok(()); // its host is gone, and the database with it
                };
                lock(&host.leased).remove(&row.database);
                host.last_used_ms.store(now_ms(), Ordering::Relaxed);
                host.dropping.fetch_add(1, Ordering::AcqRel);
                self.spawn(async move {
                    if let Err(e) = this.drop_database(&host, &row.database).await {
                        this.object_failed(
                            "dropping a leased database",
                            Some(&row.state),
                            Some(&row.instance),
                            &e,
                        );
                    }
                    host.dropping.fetch_sub(1, Ordering::AcqRel);
                    host.changed.notify_waiters();
                    this.tend_host(&host);
                });
            }
            Isolation::Instance => {
                self.spawn(async move {
                    if let Err(e) = this.delete_instance(&row.instance).await {
                        this.object_failed(
                            "removing a leased instance",
                            Some(&row.state),
                            Some(&row.instance),
                            &e,
                        );
                    }
                    this.leases.instance_freed.notify_waiters();
                });
            }
        }
        Ok(())
    }

    fn lease_info(&self, row: &LeaseRow) -> Result<LeaseInfo, ControllerError> {
        let keys = self.keys.get();
        let now_s = now_ms() / 1000;
        let ttl_s = (row.expires_ms / 1000).saturating_sub(now_s);
        let mut claims = keys.claims_for(row.state, Scope::Rw, now_s, ttl_s);
        claims.iid = Some(row.instance);
        claims.sub = row.owner.clone();
        if row.isolation == Isolation::Database {
            claims.db = Some(row.database.clone());
        }
        let token = keys
            .sign(&claims)
            .map_err(|e| ControllerError::Internal(format!("cannot sign a token: {e}")))?;
        Ok(LeaseInfo {
            lease: row.lease,
            state_id: row.state,
            isolation: row.isolation,
            dsn: self.dsn_for_database(&token, &row.database),
            instance_id: row.instance,
            database: row.database.clone(),
            created_ms: row.created_ms,
            expires_ms: row.expires_ms,
            waited_ms: row.waited_ms,
            owner: row.owner.clone(),
        })
    }

    /// Whether `iid` is held by a lease: an instance lease's own, or a host of leased
    /// databases. The lifecycle never stops those; the lease's end does.
    pub(crate) fn leased_instances(&self) -> HashSet<InstanceId> {
        let mut out: HashSet<InstanceId> = lock(&self.leases.hosts)
            .values()
            .map(|h| h.instance)
            .collect();
        out.extend(
            lock(&self.leases.active)
                .values()
                .filter(|r| r.isolation == Isolation::Instance)
                .map(|r| r.instance),
        );
        out
    }

    /// The instance leases' demand on the standby pool: enough standbys for the recent rate
    /// of instance leases of `state`.
    pub(crate) fn lease_standby_target(&self, state: StateId) -> usize {
        let rate = self.lease_rate(state, Isolation::Instance);
        if rate == 0.0 {
            return 0;
        }
        let config = &self.lifecycle.config.leases;
        policy::lease_ready_target(rate, 500, 1, config.max_ready)
    }

    /// The lifecycle's part: expired leases are reclaimed, pools refilled, and a host that
    /// has held no lease for `[leases] host_idle_s` is removed with its databases.
    pub(crate) async fn tend_leases(self: &Arc<Self>) {
        self.prune_lease_maps();
        let now = self.now();
        let expired: Vec<LeaseRow> = lock(&self.leases.active)
            .values()
            .filter(|r| r.expires_ms <= now)
            .cloned()
            .collect();
        for row in expired {
            if let Err(e) = self.end_lease(&row, "lease_expired") {
                self.object_failed(
                    "reclaiming an expired lease",
                    Some(&row.state),
                    Some(&row.instance),
                    &e,
                );
            }
        }
        let idle_ms = self.lifecycle.config.leases.host_idle_s * 1000;
        let hosts: Vec<Arc<Host>> = lock(&self.leases.hosts).values().cloned().collect();
        for host in hosts {
            let idle = host.leased_count() == 0
                && now.saturating_sub(host.last_used_ms.load(Ordering::Relaxed)) >= idle_ms;
            let running = self
                .live
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&host.instance);
            if idle {
                self.retire_host(&host).await;
            } else if !running {
                // Its server died: started again on its data, as a client's Resolve would,
                // so the pool refills and the leases in it come back.
                host.sessions.lock().await.clear();
                self.wake(host.instance, host.state);
            } else {
                self.tend_host(&host);
            }
        }
    }

    /// Forgets the queues nobody waits in and the rates of states not leased for a minute.
    fn prune_lease_maps(&self) {
        // A queue's map entry is its only holder when no request has it: a request clones
        // the Arc before it waits.
        lock(&self.leases.queues).retain(|_, q| Arc::strong_count(q) > 1);
        let now = self.now();
        lock(&self.leases.recent).retain(|_, times| {
            times
                .back()
                .is_some_and(|t| now.saturating_sub(*t) <= RATE_WINDOW_MS)
        });
    }

    /// Retires the idle host of some other state to make room for one more instance; true if
    /// one went.
    async fn retire_one_idle_host(&self, except: StateId) -> bool {
        let idle = lock(&self.leases.hosts)
            .values()
            .filter(|h| h.state != except && h.leased_count() == 0)
            .min_by_key(|h| h.last_used_ms.load(Ordering::Relaxed))
            .cloned();
        match idle {
            Some(host) => {
                self.retire_host(&host).await;
                true
            }
            None => false,
        }
    }

    /// Removes a host and the databases in it.
    async fn retire_host(&self, host: &Arc<Host>) {
        {
            let mut hosts = lock(&self.leases.hosts);
            if hosts.get(&host.state).is_some_and(|h| Arc::ptr_eq(h, host)) {
                hosts.remove(&host.state);
            }
        }
        host.retired.store(true, Ordering::Relaxed);
        host.sessions.lock().await.clear();
        if let Err(e) = self.delete_instance(&host.instance).await {
            self.object_failed(
                "removing an idle instance of leased databases",
                Some(&host.state),
                Some(&host.instance),
                &e,
            );
        }
        if let Err(e) = self.meta.delete_lease_host(&host.instance) {
            tracing::warn!(error = %e, "forgetting a lease host");
        }
        let _ = self.meta.event(
            now_ms(),
            "lease_host_removed",
            Some(&host.state),
            Some(&host.instance),
            None,
        );
        self.leases.instance_freed.notify_waiters();
    }

    /// An instance was removed (`sqlrs rm`, a state's removal, a host's retirement): a host
    /// of leased databases is forgotten, and every lease that lived in it ends
    /// (`lease_lost`), so the next lease of its state starts a new host.
    pub(crate) fn instance_removed_for_leases(&self, iid: &InstanceId) {
        {
            let mut hosts = lock(&self.leases.hosts);
            let gone: Vec<StateId> = hosts
                .iter()
                .filter(|(_, h)| h.instance == *iid)
                .map(|(s, _)| *s)
                .collect();
            for s in gone {
                if let Some(h) = hosts.remove(&s) {
                    h.retired.store(true, Ordering::Relaxed);
                    h.changed.notify_waiters();
                }
            }
        }
        if let Err(e) = self.meta.delete_lease_host(iid) {
            tracing::warn!(instance = %iid, error = %e, "forgetting a lease host");
        }
        let lost: Vec<LeaseRow> = {
            let mut active = lock(&self.leases.active);
            let ids: Vec<LeaseId> = active
                .values()
                .filter(|r| r.instance == *iid)
                .map(|r| r.lease)
                .collect();
            ids.iter().filter_map(|id| active.remove(id)).collect()
        };
        for row in lost {
            let _ = self.meta.delete_lease(&row.lease);
            let _ = self.meta.event(
                now_ms(),
                "lease_lost",
                Some(&row.state),
                Some(iid),
                Some(&format!("lease {}: its instance was removed", row.lease)),
            );
        }
        self.leases.instance_freed.notify_waiters();
    }

    /// After a restart: the leases and hosts the metadata keeps come back. A host's databases
    /// that no lease holds were never handed out, but are dropped all the same (they may be
    /// half made); a lease whose instance is gone is ended.
    pub(crate) async fn reconcile_leases(self: &Arc<Self>) -> Result<(), ControllerError> {
        let live = self.live_ids();
        let mut hosts = HashMap::new();
        for (iid, state) in self.meta.lease_hosts()? {
            if live.contains(&iid) {
                hosts.insert(state, Arc::new(Host::new(iid, state)));
            } else {
                self.meta.delete_lease_host(&iid)?;
            }
        }
        for row in self.meta.leases()? {
            let host_ok = match row.isolation {
                Isolation::Database => hosts
                    .get(&row.state)
                    .is_some_and(|h| h.instance == row.instance),
                Isolation::Instance => live.contains(&row.instance),
            };
            if !host_ok {
                self.meta.delete_lease(&row.lease)?;
                self.meta.event(
                    now_ms(),
                    "lease_lost",
                    Some(&row.state),
                    Some(&row.instance),
                    Some(&format!("lease {}: its instance is gone", row.lease)),
                )?;
                continue;
            }
            if let Some(h) = hosts.get(&row.state) {
                if row.isolation == Isolation::Database {
                    lock(&h.leased).insert(row.database.clone());
                }
            }
            lock(&self.leases.active).insert(row.lease, row);
        }
        for host in hosts.values() {
            lock(&self.leases.hosts).insert(host.state, Arc::clone(host));
            let this = Arc::clone(self);
            let host = Arc::clone(host);
            self.spawn(async move {
                if let Err(e) = this.drop_unleased(&host).await {
                    tracing::warn!(instance = %host.instance, error = %e, "cleaning up leased databases");
                }
                this.tend_host(&host);
            });
        }
        Ok(())
    }

    async fn drop_unleased(&self, host: &Arc<Host>) -> Result<(), ControllerError> {
        let client = host_session(self, host).await?;
        let rows = client
            .query(
                "SELECT datname FROM pg_database WHERE starts_with(datname, $1)",
                &[&DB_PREFIX],
            )
            .await
            .map_err(|e| sql_error("listing leased databases", e));
        put_back(host, client).await;
        for row in rows? {
            let name: String = row.get(0);
            if !lock(&host.leased).contains(&name) {
                self.drop_database(host, &name).await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
impl Controller {
    /// How many entries the lease maps hold: queues, recent rates.
    pub(crate) fn lease_map_entries(&self) -> [usize; 2] {
        [
            lock(&self.leases.queues).len(),
            lock(&self.leases.recent).len(),
        ]
    }
}
