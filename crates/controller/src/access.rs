//! What the gateway asks of the controller on every connection: Resolve (where to go, counted
//! as one more active connection), Touch (still there) and Release (gone), and of the sessions
//! it keeps for reuse, Park (client gone, session kept) and Unpark (kept session closed or
//! handed on); the read-only role
//! `ro` sessions log in as; DSNs minted for what exists; the keyset file in the home.
//!
//! Resolve is the gateway's hot path: for a running instance it reads two in-memory maps and
//! takes no lock across an await.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex};

use taidon_api::{DsnRequest, DsnResponse, ResolveRequest, ResolveResponse, Target};
use taidon_core::token::{Algorithm, KeyEntry, Keyset, KeysetFile, Scope};
use taidon_core::{InstanceId, StateId};
use taidon_runtime::Instance;

use crate::home::Home;
use crate::lock;
use crate::{now_ms, Controller, ControllerError};

/// The role `ro` sessions log in as: no write privilege, read-only transactions by default.
pub(crate) const RO_ROLE: &str = "taidon_ro";
/// What a client waiting for a starting instance is told to wait before asking again.
const STARTING_RETRY_MS: u64 = 200;
/// After a failed restart, how long Resolve answers MISSING before it tries again: a client
/// retrying in a loop does not restart a broken instance in a loop.
const WAKE_RETRY_MS: u64 = 5_000;

/// Connection limits of the controller's own; a token's `max_conn` can only lower them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessPolicy {
    /// Active connections per instance (PostgreSQL's own default allows 100, 3 reserved).
    pub max_conn_per_instance: u32,
    /// Active connections per state, over all its instances.
    pub max_conn_per_state: u32,
}

impl Default for AccessPolicy {
    fn default() -> Self {
        Self {
            max_conn_per_instance: 90,
            max_conn_per_state: 500,
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Usage {
    /// Connections with a client.
    active: u32,
    /// Server sessions the gateway keeps for reuse: they hold a server slot, so they count
    /// against the limits, but they are not activity.
    pooled: u32,
    last_access_ms: u64,
    /// The state its connections count against; known from the first one.
    state: Option<StateId>,
}

/// The instance a state's `ro` sessions share.
#[derive(Debug, Clone, Copy)]
enum Shared {
    Starting,
    Ready(InstanceId),
}

/// An instance Resolve is starting again on its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    Starting,
    /// The last restart failed; the next is tried from this time on.
    Failed {
        retry_at_ms: u64,
    },
}

/// What asking to wake an instance that is not running gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Woken {
    /// It is starting: the client waits.
    Starting,
    /// Its last restart failed a moment ago.
    Failed,
    /// Nothing to wake: no such instance of the state, or it is neither stopped nor failed.
    Nothing,
}

/// Counts and shared instances behind Resolve, Touch and Release. Entries of an instance go
/// with it (`forget_instance`), those of a state with it (`forget_state_access`), and a
/// state's count when it drops to zero.
#[derive(Debug, Default)]
pub(crate) struct Access {
    policy: StdMutex<AccessPolicy>,
    instances: StdMutex<HashMap<InstanceId, Usage>>,
    states: StdMutex<HashMap<StateId, u32>>,
    ro: StdMutex<HashMap<StateId, Shared>>,
    /// Instances being started again because a client asked for them after they were
    /// stopped for being idle or their server died, and those whose restart failed.
    waking: StdMutex<HashMap<InstanceId, Wake>>,
    /// The CA certificate of the gateway's TLS, named in DSNs as `sslrootcert`.
    tls_root: StdMutex<Option<PathBuf>>,
}

/// The `ro` role's password, derived from the instance's own so nothing more is stored.
pub(crate) fn ro_password(instance_password: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(format!("taidon-ro:{instance_password}").as_bytes())[..24])
}

/// Creates (or refreshes) the read-only role on a just-started server.
pub(crate) async fn create_ro_role(
    server: &dyn Instance,
    instance_password: &str,
) -> Result<(), ControllerError> {
    let verifier =
        postgres_protocol::password::scram_sha_256(ro_password(instance_password).as_bytes());
    let sql = format!(
        "DO $$ BEGIN
           IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{RO_ROLE}') THEN
             CREATE ROLE {RO_ROLE} LOGIN;
           END IF;
         END $$;
         ALTER ROLE {RO_ROLE} PASSWORD '{verifier}';
         ALTER ROLE {RO_ROLE} SET default_transaction_read_only = on;
         GRANT pg_read_all_data TO {RO_ROLE};"
    );
    server
        .execute(&sql)
        .await
        .map_err(|e| ControllerError::runtime("cannot create the read-only role", e))
}

impl Controller {
    /// The connection limits in force.
    pub fn access_policy(&self) -> AccessPolicy {
        *lock(&self.access.policy)
    }

    /// Replaces the connection limits.
    pub fn set_access_policy(&self, policy: AccessPolicy) {
        *lock(&self.access.policy) = policy;
    }

    /// Names `ca` as the `sslrootcert` of the DSNs minted from now on.
    pub fn set_gateway_tls_root(&self, ca: Option<PathBuf>) {
        *lock(&self.access.tls_root) = ca;
    }

    /// Active connections on `iid` (Resolved and not yet Released).
    // Read by the lifecycle policy (idle detection, pins); not every build has it yet.
    #[allow(dead_code)]
    pub(crate) fn active_connections(&self, iid: &InstanceId) -> u32 {
        lock(&self.access.instances)
            .get(iid)
            .map_or(0, |u| u.active)
    }

    /// Active connections over every instance of `sid`.
    #[allow(dead_code)]
    pub(crate) fn active_connections_of_state(&self, sid: &StateId) -> u32 {
        lock(&self.access.states).get(sid).copied().unwrap_or(0)
    }

    /// When a connection last resolved, touched or released `iid` (ms since the epoch).
    #[allow(dead_code)]
    pub(crate) fn last_access_ms(&self, iid: &InstanceId) -> Option<u64> {
        lock(&self.access.instances)
            .get(iid)
            .map(|u| u.last_access_ms)
    }

    /// Whether `live`'s server has ended, looked at now (a killed postgres, a failed pod):
    /// rather than send the client to a dead address, the death is recorded in the
    /// background as the lifecycle's own check would, and the client waits while the
    /// instance starts again. A server being stopped counts as ended; one being worked on
    /// (locked) does not.
    fn ended_under_us(
        self: &Arc<Self>,
        iid: InstanceId,
        live: &Arc<crate::instances::Live>,
    ) -> bool {
        let exit = match live.take_if_ended() {
            None => return false,
            Some(None) => return true,
            Some(Some(exit)) => exit,
        };
        let (this, live) = (Arc::clone(self), Arc::clone(live));
        self.spawn(async move {
            if let Err(e) = this.instance_died(iid, &live, exit).await {
                this.object_failed(
                    "recording a dead instance",
                    Some(&live.state_id),
                    Some(&iid),
                    &e,
                );
            }
        });
        true
    }

    /// Where the gateway finds what a verified token names; a `Ready` answer counts one more
    /// active connection until [`Controller::release`].
    pub fn resolve(self: &Arc<Self>, req: &ResolveRequest) -> ResolveResponse {
        match req.scope {
            Scope::Rw => {
                let Some(iid) = req.instance_id else {
                    return ResolveResponse::Forbidden {
                        reason: "an rw token must name its instance".into(),
                    };
                };
                let target = {
                    let live = self.live.read().unwrap_or_else(|p| p.into_inner());
                    match live.get(&iid) {
                        Some(l) if l.state_id == req.state_id => {
                            if self.ended_under_us(iid, l) {
                                return ResolveResponse::Starting {
                                    retry_after_ms: STARTING_RETRY_MS,
                                };
                            }
                            l.target(iid, Scope::Rw)
                        }
                        Some(_) => {
                            return ResolveResponse::Forbidden {
                                reason: "the instance is not of the token's state".into(),
                            }
                        }
                        None => {
                            if let Some(target) = self.client_build_target(&iid, &req.state_id) {
                                return ResolveResponse::Ready(target);
                            }
                            return match self.wake(iid, req.state_id) {
                                Woken::Starting => ResolveResponse::Starting {
                                    retry_after_ms: STARTING_RETRY_MS,
                                },
                                Woken::Failed | Woken::Nothing => ResolveResponse::Missing,
                            };
                        }
                    }
                };
                self.admit(req, target)
            }
            Scope::Ro => self.resolve_ro(req),
        }
    }

    /// An instance that is not running: if the lifecycle stopped it for being idle, or its
    /// server died, start it again on its data and have the client wait (STARTING), so a
    /// kept instance's DSN keeps working. Off the hot path: only reached when the instance
    /// is not live.
    pub(crate) fn wake(self: &Arc<Self>, iid: InstanceId, sid: StateId) -> Woken {
        match lock(&self.access.waking).get(&iid) {
            Some(Wake::Starting) => return Woken::Starting,
            Some(Wake::Failed { retry_at_ms }) if now_ms() < *retry_at_ms => return Woken::Failed,
            _ => {}
        }
        let row = match self.meta.instances() {
            Ok(rows) => rows.into_iter().find(|r| r.instance_id == iid),
            Err(e) => {
                tracing::warn!(instance = %iid, error = %e, "cannot read instances");
                return Woken::Nothing;
            }
        };
        let Some(row) =
            row.filter(|r| r.state_id == sid && matches!(r.status.as_str(), "stopped" | "failed"))
        else {
            return Woken::Nothing;
        };
        {
            let mut waking = lock(&self.access.waking);
            if waking.get(&iid) == Some(&Wake::Starting) {
                return Woken::Starting;
            }
            waking.insert(iid, Wake::Starting);
        }
        let event = if row.status == "failed" {
            "instance_restarted"
        } else {
            "instance_woken"
        };
        let this = Arc::clone(self);
        self.spawn(async move {
            let result = this.restart_instance(row, event).await;
            let mut waking = lock(&this.access.waking);
            match result {
                Ok(()) => {
                    tracing::info!(instance = %iid, "started an instance again for a client");
                    waking.remove(&iid);
                }
                Err(e) => {
                    tracing::warn!(instance = %iid, error = %e, "cannot start an instance again");
                    // Unless it was removed meanwhile: then there is nothing to retry.
                    if let Some(w) = waking.get_mut(&iid) {
                        *w = Wake::Failed {
                            retry_at_ms: now_ms() + WAKE_RETRY_MS,
                        };
                    }
                }
            }
        });
        Woken::Starting
    }

    fn resolve_ro(self: &Arc<Self>, req: &ResolveRequest) -> ResolveResponse {
        let shared = lock(&self.access.ro).get(&req.state_id).copied();
        match shared {
            Some(Shared::Starting) => {
                return ResolveResponse::Starting {
                    retry_after_ms: STARTING_RETRY_MS,
                }
            }
            Some(Shared::Ready(iid)) => {
                let target = {
                    let live = self.live.read().unwrap_or_else(|p| p.into_inner());
                    live.get(&iid).map(|l| l.target(iid, Scope::Ro))
                };
                if let Some(target) = target {
                    return self.admit(req, target);
                }
                // Stopped for being idle, or its server died: started again on its data. If
                // it is gone, or its restart failed, another one is started.
                if self.wake(iid, req.state_id) == Woken::Starting {
                    return ResolveResponse::Starting {
                        retry_after_ms: STARTING_RETRY_MS,
                    };
                }
                let mut ro = lock(&self.access.ro);
                if matches!(ro.get(&req.state_id), Some(Shared::Ready(i)) if *i == iid) {
                    ro.remove(&req.state_id);
                }
            }
            None => {}
        }
        if !self.store.contains(&req.state_id) {
            lock(&self.access.ro).remove(&req.state_id);
            return ResolveResponse::Missing;
        }
        {
            let mut ro = lock(&self.access.ro);
            // Another connection may have started one since the look above.
            if let Some(Shared::Starting) = ro.get(&req.state_id) {
                return ResolveResponse::Starting {
                    retry_after_ms: STARTING_RETRY_MS,
                };
            }
            ro.insert(req.state_id, Shared::Starting);
        }
        let this = Arc::clone(self);
        let sid = req.state_id;
        self.spawn(async move {
            match this.create_instance_of(sid).await {
                Ok(info) => {
                    tracing::info!(state = %sid.short(), instance = %info.instance_id, "started the shared read-only instance");
                    lock(&this.access.ro).insert(sid, Shared::Ready(info.instance_id));
                }
                Err(e) => {
                    tracing::warn!(state = %sid.short(), error = %e, "cannot start a read-only instance");
                    lock(&this.access.ro).remove(&sid);
                }
            }
        });
        ResolveResponse::Starting {
            retry_after_ms: STARTING_RETRY_MS,
        }
    }

    /// Counts the connection if the limits allow it.
    fn admit(&self, req: &ResolveRequest, target: Target) -> ResolveResponse {
        let policy = self.access_policy();
        let token_limit = req.max_conn.unwrap_or(u32::MAX);
        let per_instance = policy.max_conn_per_instance.min(token_limit);
        let per_state = policy.max_conn_per_state.min(token_limit);
        let now = now_ms();
        let mut instances = lock(&self.access.instances);
        let mut states = lock(&self.access.states);
        let used = instances
            .get(&target.instance_id)
            .map_or(0, |u| u.active + u.pooled);
        if used >= per_instance {
            return ResolveResponse::TooManyConnections {
                limit: per_instance,
            };
        }
        // Entries are made only for a connection counted in: a refusal leaves nothing behind.
        if states.get(&req.state_id).copied().unwrap_or(0) >= per_state {
            return ResolveResponse::TooManyConnections { limit: per_state };
        }
        let usage = instances.entry(target.instance_id).or_default();
        usage.active += 1;
        usage.last_access_ms = now;
        usage.state = Some(req.state_id);
        *states.entry(req.state_id).or_default() += 1;
        ResolveResponse::Ready(target)
    }

    /// Marks the instances of open connections as used now (those still running: a touch
    /// that comes after its instance went makes no entry for it).
    pub fn touch(&self, instance_ids: &[InstanceId]) {
        let now = now_ms();
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        let mut instances = lock(&self.access.instances);
        for iid in instance_ids.iter().filter(|i| live.contains_key(i)) {
            instances.entry(*iid).or_default().last_access_ms = now;
        }
    }

    /// Counts closed connections out; also those of an instance that is not running any
    /// more (its server died under them).
    pub fn release(&self, instance_ids: &[InstanceId]) {
        let now = now_ms();
        let mut instances = lock(&self.access.instances);
        let mut states = lock(&self.access.states);
        for iid in instance_ids {
            let Some(u) = instances.get_mut(iid) else {
                continue; // removed: its connections were counted out then
            };
            if u.active == 0 {
                continue;
            }
            u.active -= 1;
            u.last_access_ms = now;
            if let Some(sid) = u.state {
                count_out(&mut states, &sid, 1);
            }
        }
    }

    /// Moves connections whose clients left, and whose sessions the gateway keeps, from
    /// active to pooled: still counted against the limits, no longer activity.
    pub fn park(&self, instance_ids: &[InstanceId]) {
        let now = now_ms();
        let mut instances = lock(&self.access.instances);
        for iid in instance_ids {
            let Some(u) = instances.get_mut(iid) else {
                continue;
            };
            if u.active == 0 {
                continue;
            }
            u.active -= 1;
            u.pooled += 1;
            u.last_access_ms = now;
        }
    }

    /// Counts out kept sessions that were closed, or handed to a client Resolve counted.
    pub fn unpark(&self, instance_ids: &[InstanceId]) {
        let mut instances = lock(&self.access.instances);
        let mut states = lock(&self.access.states);
        for iid in instance_ids {
            let Some(u) = instances.get_mut(iid) else {
                continue; // removed: its sessions were counted out then
            };
            if u.pooled == 0 {
                continue;
            }
            u.pooled -= 1;
            if let Some(sid) = u.state {
                count_out(&mut states, &sid, 1);
            }
        }
    }

    /// Drops what Resolve, Touch and Release kept about an instance that is removed; its
    /// open connections no longer count against its state.
    pub(crate) fn forget_instance_access(&self, iid: &InstanceId) {
        let usage = lock(&self.access.instances).remove(iid);
        if let Some(Usage {
            active,
            pooled,
            state: Some(sid),
            ..
        }) = usage
        {
            count_out(&mut lock(&self.access.states), &sid, active + pooled);
        }
        lock(&self.access.waking).remove(iid);
        lock(&self.access.ro).retain(|_, s| !matches!(s, Shared::Ready(i) if i == iid));
    }

    /// Drops what Resolve kept about a state that is removed.
    pub(crate) fn forget_state_access(&self, sid: &StateId) {
        lock(&self.access.states).remove(sid);
        lock(&self.access.ro).remove(sid);
    }

    /// A DSN with a fresh token for a state (`ro` by default) or an instance (`rw`).
    pub fn mint_dsn(&self, req: &DsnRequest) -> Result<DsnResponse, ControllerError> {
        self.mint_dsn_for(req, None)
    }

    /// [`Controller::mint_dsn`], the token naming `sub` (the caller) as its subject: what the
    /// gateway logs and rate-limits by.
    pub fn mint_dsn_for(
        &self,
        req: &DsnRequest,
        sub: Option<&str>,
    ) -> Result<DsnResponse, ControllerError> {
        let instances = self.meta.instances()?;
        let typed = req.target.as_str();
        let instance = instances.iter().find(|r| {
            let id = r.instance_id.to_string();
            typed.len() >= 8 && id.starts_with(typed)
        });
        let (sid, iid, scope) = match instance {
            Some(row) => (
                row.state_id,
                Some(row.instance_id),
                req.scope.unwrap_or(Scope::Rw),
            ),
            None => {
                let id = self.state_by_prefix(typed)?;
                if !self.store.contains(&id) {
                    return Err(ControllerError::NotFound(format!(
                        "state {} has no snapshot",
                        id.short()
                    )));
                }
                let scope = req.scope.unwrap_or(Scope::Ro);
                if scope == Scope::Rw {
                    return Err(ControllerError::BadInput(format!(
                        "an rw DSN reaches one instance: name an instance of state {} (sqlrs ls), or ask for --scope ro",
                        id.short()
                    )));
                }
                (id, None, scope)
            }
        };
        if let (Scope::Rw, Some(iid)) = (scope, iid) {
            if let Some(what) = self.not_ones_own(&iid) {
                return Err(ControllerError::BadInput(format!(
                    "instance {iid} is {what}: an rw DSN is for an instance of your own (sqlrs prepare), or ask for --scope ro"
                )));
            }
        }
        let keys = self.keys.get();
        let now_s = now_ms() / 1000;
        let ttl_s = req.ttl_s.unwrap_or(self.config.token_ttl_s);
        let mut claims = keys.claims_for(sid, scope, now_s, ttl_s);
        if let Some(sub) = sub {
            claims.sub = sub.to_owned();
        }
        if scope == Scope::Rw {
            claims.iid = iid;
        }
        let token = keys
            .sign(&claims)
            .map_err(|e| ControllerError::Internal(format!("cannot sign a token: {e}")))?;
        let gateway = self.gateway_addr();
        let tls_root = lock(&self.access.tls_root).clone();
        Ok(DsnResponse {
            dsn: dsn_with_token(&token, &gateway, tls_root.as_deref()),
            dsn_plain: dsn_with_token(&token, &gateway, None),
            dsn_user: format!("postgres://{token}@{gateway}/postgres?sslmode=disable"),
            state_id: sid,
            instance_id: if scope == Scope::Rw { iid } else { None },
            scope,
            expires_s: claims.exp,
            sslrootcert: tls_root,
        })
    }
}

impl Controller {
    /// The DSN every command hands out for `token`: verify-full against the local CA when the
    /// gateway speaks TLS.
    pub(crate) fn dsn_for(&self, token: &str) -> String {
        self.dsn_for_database(token, "postgres")
    }

    /// [`Controller::dsn_for`] naming `database`.
    pub(crate) fn dsn_for_database(&self, token: &str, database: &str) -> String {
        let tls_root = lock(&self.access.tls_root).clone();
        dsn_with_database(token, &self.gateway_addr(), tls_root.as_deref(), database)
    }
}

impl Controller {
    /// Why `iid` belongs to no single user, if it does not: the instance every ro session of
    /// its state shares, or a standby waiting to be handed out.
    fn not_ones_own(&self, iid: &InstanceId) -> Option<&'static str> {
        let shared = lock(&self.access.ro)
            .values()
            .any(|s| matches!(s, Shared::Ready(id) if id == iid));
        if shared {
            return Some("the shared read-only instance of its state");
        }
        if self.is_standby(iid) {
            return Some("a standby waiting to be handed out");
        }
        None
    }
}

#[cfg(test)]
impl Controller {
    /// How many entries Resolve's maps hold: instances, states, shared ro, waking.
    pub(crate) fn access_entries(&self) -> [usize; 4] {
        [
            lock(&self.access.instances).len(),
            lock(&self.access.states).len(),
            lock(&self.access.ro).len(),
            lock(&self.access.waking).len(),
        ]
    }
}

/// Takes `n` connections off a state's count, dropping the entry at zero.
fn count_out(states: &mut HashMap<StateId, u32>, sid: &StateId, n: u32) {
    if let Some(count) = states.get_mut(sid) {
        *count = count.saturating_sub(n);
        if *count == 0 {
            states.remove(sid);
        }
    }
}

/// `postgres://sqlrs:TOKEN@gateway/postgres` with `sslmode=verify-full` and `sslrootcert` when
/// the gateway speaks TLS, `sslmode=disable` otherwise.
pub fn dsn_with_token(token: &str, gateway: &str, tls_root: Option<&Path>) -> String {
    dsn_with_database(token, gateway, tls_root, "postgres")
}

/// [`dsn_with_token`] naming `database`.
fn dsn_with_database(
    token: &str,
    gateway: &str,
    tls_root: Option<&Path>,
    database: &str,
) -> String {
    let db = percent_encode(database);
    match tls_root {
        Some(ca) => format!(
            "postgres://sqlrs:{token}@{gateway}/{db}?sslmode=verify-full&sslrootcert={}",
            percent_encode(&ca.display().to_string())
        ),
        None => format!("postgres://sqlrs:{token}@{gateway}/{db}?sslmode=disable"),
    }
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"/-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A new Ed25519 key named `ed25519-<8 hex>`.
pub fn generate_ed25519_key() -> Result<KeyEntry, ControllerError> {
    use ring::signature::KeyPair;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| ControllerError::Internal("cannot generate an Ed25519 key".into()))?;
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| ControllerError::Internal("cannot read the new Ed25519 key".into()))?;
    let public = hex::encode(pair.public_key().as_ref());
    Ok(KeyEntry {
        kid: format!("ed25519-{}", &public[..8]),
        alg: Algorithm::EdDsa,
        secret_hex: None,
        private_pkcs8_hex: Some(hex::encode(pkcs8.as_ref())),
        public_hex: Some(public),
    })
}

/// The home's keyset, created on first start with a fresh Ed25519 key as the current one. The
/// issue-3 HS256 secret (`gateway.key`), if there is one, stays accepted so the DSNs it signed
/// keep working.
pub fn read_or_create_keyset(home: &Home) -> Result<KeysetFile, ControllerError> {
    let path = home.keyset_file();
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let file: KeysetFile = serde_json::from_str(&text).map_err(|e| {
                ControllerError::BadInput(format!("{} is not a keyset: {e}", path.display()))
            })?;
            Keyset::from_file(&file).map_err(|e| {
                ControllerError::BadInput(format!("{} is not a valid keyset: {e}", path.display()))
            })?;
            return Ok(file);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(ControllerError::io(
                format!("cannot read {}", path.display()),
                e,
            ))
        }
    }
    let audience = crate::home::read_or_create_secret(&home.installation_id_file(), 8)
        .map_err(|e| ControllerError::io("cannot read the installation id", e))?;
    let current = generate_ed25519_key()?;
    let mut file = KeysetFile {
        audience,
        current: current.kid.clone(),
        keys: vec![current],
    };
    if let Ok(secret) = std::fs::read_to_string(home.gateway_key_file()) {
        let secret = secret.trim();
        if !secret.is_empty() {
            let legacy = Keyset::hs256(secret.as_bytes(), &file.audience);
            file.keys.push(KeyEntry {
                kid: legacy.kids()[0].to_owned(),
                alg: Algorithm::Hs256,
                secret_hex: Some(hex::encode(secret.as_bytes())),
                private_pkcs8_hex: None,
                public_hex: None,
            });
        }
    }
    write_keyset(home, &file)?;
    Ok(file)
}

/// Makes a new Ed25519 key current; the previous current key stays accepted, older ones go.
pub fn rotate_keyset(home: &Home) -> Result<KeysetFile, ControllerError> {
    let file = read_or_create_keyset(home)?.rotated(generate_ed25519_key()?);
    write_keyset(home, &file)?;
    Ok(file)
}

/// Makes sure new DSN tokens are signed with Ed25519, which a gateway elsewhere verifies with
/// the public key alone: a keyset whose current key is HS256 is rotated (the HS256 key stays
/// accepted, as the previous one). `Some` with the new file if it rotated.
pub fn ensure_eddsa_current(home: &Home) -> Result<Option<KeysetFile>, ControllerError> {
    let file = read_or_create_keyset(home)?;
    let current_alg = file
        .keys
        .iter()
        .find(|k| k.kid == file.current)
        .map(|k| k.alg);
    if current_alg == Some(Algorithm::EdDsa) {
        return Ok(None);
    }
    Ok(Some(rotate_keyset(home)?))
}

fn write_keyset(home: &Home, file: &KeysetFile) -> Result<(), ControllerError> {
    let text = serde_json::to_vec_pretty(file)
        .map_err(|e| ControllerError::Internal(format!("cannot encode the keyset: {e}")))?;
    crate::home::write_atomic(&home.keyset_file(), &text, 0o600)
        .map_err(|e| ControllerError::io("cannot write the keyset", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dsn_forms() {
        let d = dsn_with_token("a.b.c", "127.0.0.1:5", Some(Path::new("/h/tls dir/ca.pem")));
        assert_eq!(
            d,
            "postgres://sqlrs:a.b.c@127.0.0.1:5/postgres?sslmode=verify-full&sslrootcert=/h/tls%20dir/ca.pem"
        );
        assert!(dsn_with_token("a.b.c", "h:1", None).ends_with("?sslmode=disable"));
    }

    #[test]
    fn keyset_is_created_once_keeps_the_legacy_secret_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path());
        std::fs::write(home.gateway_key_file(), "00112233445566778899aabbccddeeff").unwrap();
        let a = read_or_create_keyset(&home).unwrap();
        assert_eq!(a.keys.len(), 2, "current Ed25519 plus the legacy HS256");
        assert_eq!(read_or_create_keyset(&home).unwrap(), a);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(home.keyset_file())
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        let legacy = Keyset::hs256(b"00112233445566778899aabbccddeeff", &a.audience);
        let old_token = legacy
            .sign(&legacy.claims_for(StateId::from_bytes([1; 32]), Scope::Ro, 100, 100))
            .unwrap();
        assert!(Keyset::from_file(&a)
            .unwrap()
            .verify(&old_token, 150)
            .is_ok());

        let b = rotate_keyset(&home).unwrap();
        assert_ne!(b.current, a.current);
        assert_eq!(b.keys.len(), 2);
        assert!(b.keys.iter().any(|k| k.kid == a.current));
        assert_eq!(read_or_create_keyset(&home).unwrap(), b);
    }

    #[test]
    fn an_hs256_current_key_is_rotated_to_ed25519_and_stays_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::new(dir.path());
        let a = read_or_create_keyset(&home).unwrap();
        assert!(
            ensure_eddsa_current(&home).unwrap().is_none(),
            "already EdDSA"
        );
        let hs = KeyEntry {
            kid: "hs-old".into(),
            alg: Algorithm::Hs256,
            secret_hex: Some(hex::encode(b"0123456789abcdef0123")),
            private_pkcs8_hex: None,
            public_hex: None,
        };
        write_keyset(
            &home,
            &KeysetFile {
                audience: a.audience.clone(),
                current: "hs-old".into(),
                keys: vec![hs],
            },
        )
        .unwrap();
        let b = ensure_eddsa_current(&home).unwrap().expect("rotated");
        let current = b.keys.iter().find(|k| k.kid == b.current).unwrap();
        assert_eq!(current.alg, Algorithm::EdDsa);
        assert!(b.keys.iter().any(|k| k.kid == "hs-old"));
    }

    #[test]
    fn ro_password_is_derived_and_differs() {
        assert_eq!(ro_password("x"), ro_password("x"));
        assert_ne!(ro_password("x"), ro_password("y"));
        assert_eq!(ro_password("x").len(), 48);
    }
}
