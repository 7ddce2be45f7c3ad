//! The runner's control endpoint, as both sides see it: the paths, the bodies, and the
//! client the controller uses. Every call but `/ready` (the kubelet's probe) carries the
//! pod's bearer token.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use taidon_core::{EngineFingerprint, StateId};
use taidon_store::Manifest;

/// The runner's control port, on the pod's IP.
pub const CONTROL_PORT: u16 = 7432;
/// PostgreSQL's port, on the pod's IP.
pub const POSTGRES_PORT: u16 = 5432;

/// `POST /v1/password`: sets a role's password (only its SCRAM verifier reaches the server).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SetPassword {
    pub role: String,
    pub password: String,
}

/// `POST /v1/execute`: statements run as the superuser.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Execute {
    pub sql: String,
}

/// `POST /v1/publish`: the stopped data directory becomes the snapshot of `state` in the
/// bucket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Publish {
    pub state: StateId,
    pub parent: Option<StateId>,
    pub engine: EngineFingerprint,
    pub build_cost_ms: u64,
}

/// An error the runner answers with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Failure {
    pub message: String,
}

/// Why a call to a runner failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the runner at {url} cannot be reached: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the runner at {url} answered {status}: {message}")]
    Refused {
        url: String,
        status: u16,
        message: String,
    },
}

/// The controller's client of one runner.
#[derive(Debug, Clone)]
pub struct RunnerClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl RunnerClient {
    /// The runner at `host` (the pod's IP), which accepts `token`.
    pub fn new(host: &str, token: &str) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default();
        let host = if host.contains(':') {
            format!("[{host}]")
        } else {
            host.to_owned()
        };
        Self {
            http,
            base: format!("http://{host}:{CONTROL_PORT}"),
            token: token.to_owned(),
        }
    }

    /// Whether its server is up (the readiness probe's answer).
    pub async fn ready(&self) -> bool {
        let url = format!("{}/ready", self.base);
        matches!(self.http.get(&url).send().await, Ok(r) if r.status().is_success())
    }

    pub async fn set_password(&self, role: &str, password: &str) -> Result<(), ControlError> {
        let body = SetPassword {
            role: role.to_owned(),
            password: password.to_owned(),
        };
        self.post("/v1/password", &body, Duration::from_secs(30))
            .await
            .map(drop)
    }

    pub async fn execute(&self, sql: &str) -> Result<(), ControlError> {
        let body = Execute {
            sql: sql.to_owned(),
        };
        self.post("/v1/execute", &body, Duration::from_secs(60))
            .await
            .map(drop)
    }

    /// Stops the server cleanly (a checkpoint); the runner stays, to publish.
    pub async fn stop(&self) -> Result<(), ControlError> {
        self.post("/v1/stop", &serde_json::json!({}), Duration::from_secs(120))
            .await
            .map(drop)
    }

    /// Uploads the stopped data directory as `publish.state`'s snapshot; its manifest.
    pub async fn publish(&self, publish: &Publish) -> Result<Manifest, ControlError> {
        let url = format!("{}/v1/publish", self.base);
        let response = self
            .post("/v1/publish", publish, Duration::from_secs(3600))
            .await?;
        response
            .json()
            .await
            .map_err(|source| ControlError::Unreachable { url, source })
    }

    async fn post<B: Serialize>(
        &self,
        path: &str,
        body: &B,
        timeout: Duration,
    ) -> Result<reqwest::Response, ControlError> {
        let url = format!("{}{path}", self.base);
        let response = self
            .http
            .post(&url)
            .bearer_auth(&self.token)
            .timeout(timeout)
            .json(body)
            .send()
            .await
            .map_err(|source| ControlError::Unreachable {
                url: url.clone(),
                source,
            })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status().as_u16();
        let message = match response.json::<Failure>().await {
            Ok(f) => f.message,
            Err(_) => "no reason given".into(),
        };
        Err(ControlError::Refused {
            url,
            status,
            message,
        })
    }
}

/// The bearer token of pod `pod`: an HMAC under the controller's secret, so a controller that
/// restarts (same secret) can talk to the pods it adopts, and one pod's token opens no other.
pub fn pod_token(secret: &[u8], pod: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    hex::encode(ring::hmac::sign(&key, pod.as_bytes()).as_ref())
}
