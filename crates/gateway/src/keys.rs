//! Verification keys for a gateway that runs apart from the controller: fetched from its
//! `GET /v1/keys` (public Ed25519 keys only), polled, and fetched again at once when a token
//! names a key not known yet, so a rotation reaches the gateway without a restart.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use taidon_api::PublicKeys;
use taidon_core::token::{KeyEntry, Keyset, KeysetError, KeysetFile, SharedKeyset};
use tracing::{debug, info, warn};

use crate::resolve::{HttpResolver, ResolveError};

/// What the gateway asks when a token names a key it does not know.
pub trait KeySource: Send + Sync {
    /// Fetches the keys again unless that was done a moment ago; returns once the keyset in
    /// force is as fresh as it will get.
    fn refresh(&self) -> BoxFuture<'_, ()>;
}

/// Why the controller's keys could not be put in force.
#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot fetch the keys")]
    Fetch(#[source] ResolveError),
    #[error("the controller's keys are not usable")]
    Invalid(#[source] KeysetError),
}

/// The least time between two fetches a token with an unknown `kid` may cause: a client
/// sending made-up key ids cannot make the gateway hammer the controller.
const MIN_REFETCH: Duration = Duration::from_secs(1);

/// Keys fetched from the controller, swapped whole in the shared keyset on every change.
pub struct ControllerKeys {
    client: HttpResolver,
    keys: Arc<SharedKeyset>,
    leeway_s: u64,
    /// When the last fetch started; held across a fetch, so concurrent refreshes wait for it.
    last: tokio::sync::Mutex<Option<Instant>>,
}

impl std::fmt::Debug for ControllerKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerKeys")
            .field("client", &self.client)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

/// The verify-only keyset of what `GET /v1/keys` answered.
pub fn keyset_of(answer: PublicKeys, leeway_s: u64) -> Result<Keyset, KeysetError> {
    let file = KeysetFile {
        audience: answer.audience,
        current: answer.current,
        keys: answer
            .keys
            .into_iter()
            .map(|k| KeyEntry {
                kid: k.kid,
                alg: k.alg,
                secret_hex: None,
                private_pkcs8_hex: None,
                public_hex: Some(k.public_hex),
            })
            .collect(),
    };
    Ok(Keyset::verify_only(&file)?.with_leeway(leeway_s))
}

impl ControllerKeys {
    /// Fetches the keys once (failing if the controller cannot give usable ones).
    pub async fn fetch_first(client: HttpResolver, leeway_s: u64) -> Result<Self, KeysError> {
        let answer = client.public_keys().await.map_err(KeysError::Fetch)?;
        let keyset = keyset_of(answer, leeway_s).map_err(KeysError::Invalid)?;
        info!(kids = ?keyset.kids(), "keys fetched from the controller");
        Ok(Self {
            client,
            keys: Arc::new(SharedKeyset::new(keyset)),
            leeway_s,
            last: tokio::sync::Mutex::new(Some(Instant::now())),
        })
    }

    /// The keyset in force, for the gateway.
    pub fn keyset(&self) -> Arc<SharedKeyset> {
        Arc::clone(&self.keys)
    }

    /// Fetches now; a failure leaves the keys in force.
    async fn fetch(&self) -> Result<(), KeysError> {
        let answer = self.client.public_keys().await.map_err(KeysError::Fetch)?;
        let new = keyset_of(answer, self.leeway_s).map_err(KeysError::Invalid)?;
        let old = self.keys.get();
        if old.kids() != new.kids() || old.audience() != new.audience() {
            info!(kids = ?new.kids(), "keys changed at the controller");
            self.keys.replace(new);
        }
        Ok(())
    }

    /// Fetches unless a fetch started less than `min_gap` ago.
    async fn fetch_unless_recent(&self, min_gap: Duration) {
        let mut last = self.last.lock().await;
        if last.is_some_and(|t| t.elapsed() < min_gap) {
            return;
        }
        *last = Some(Instant::now());
        if let Err(e) = self.fetch().await {
            warn!(error = %crate::error_chain(&e), "keys not refreshed; the previous ones stay");
        }
    }

    /// Fetches the keys every `every`, for ever.
    pub async fn poll(self: Arc<Self>, every: Duration) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            debug!("polling the controller's keys");
            self.fetch_unless_recent(every / 2).await;
        }
    }
}

impl KeySource for ControllerKeys {
    fn refresh(&self) -> BoxFuture<'_, ()> {
        Box::pin(self.fetch_unless_recent(MIN_REFETCH))
    }
}
