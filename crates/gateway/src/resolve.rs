//! Where a verified token's instance runs: asked of the controller.

use futures_util::future::BoxFuture;
use taidon_api::{ApiError, Leases, PublicKeys, ResolveRequest, ResolveResponse};
use taidon_core::InstanceId;

/// Why the controller could not say where an instance is.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("controller at {url} is unreachable")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("controller answered {status}: {message}")]
    Status { status: u16, message: String },
    #[error("cannot decode the controller's answer")]
    Decode(#[source] reqwest::Error),
    #[error("cannot set up the HTTP client for the controller")]
    Client(#[source] reqwest::Error),
}

impl ResolveError {
    /// Whether trying again later may succeed (the client is told 57P03 rather than XX000).
    pub fn is_transient(&self) -> bool {
        match self {
            ResolveError::Unreachable { .. } => true,
            ResolveError::Status { status, .. } => *status == 503,
            ResolveError::Decode(_) | ResolveError::Client(_) => false,
        }
    }
}

/// Finds the running instance a token names, and hears which connections live and end.
pub trait Resolver: Send + Sync {
    /// Where `req`'s instance runs, or why not; `Ready` counts one more connection.
    fn resolve(&self, req: ResolveRequest) -> BoxFuture<'_, Result<ResolveResponse, ResolveError>>;

    /// The connections on these instances are still open (one entry per connection).
    fn touch(&self, _instance_ids: Vec<InstanceId>) -> BoxFuture<'_, Result<(), ResolveError>> {
        Box::pin(async { Ok(()) })
    }

    /// These connections closed (one entry per connection).
    fn release(&self, _instance_ids: Vec<InstanceId>) -> BoxFuture<'_, Result<(), ResolveError>> {
        Box::pin(async { Ok(()) })
    }

    /// These connections' clients left and their sessions are kept for reuse: they still
    /// count against the limits, not as activity.
    fn park(&self, _instance_ids: Vec<InstanceId>) -> BoxFuture<'_, Result<(), ResolveError>> {
        Box::pin(async { Ok(()) })
    }

    /// These kept sessions were closed, or handed to a client Resolve counted.
    fn unpark(&self, _instance_ids: Vec<InstanceId>) -> BoxFuture<'_, Result<(), ResolveError>> {
        Box::pin(async { Ok(()) })
    }
}

/// A [`Resolver`] that asks the controller's `POST /v1/resolve`, `/v1/touch`, `/v1/release`.
#[derive(Clone)]
pub struct HttpResolver {
    client: reqwest::Client,
    url: String,
    base: String,
    api_token: String,
}

impl std::fmt::Debug for HttpResolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpResolver")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl HttpResolver {
    /// A resolver for the controller at `base_url` (`http://127.0.0.1:PORT`) with its API token.
    pub fn new(base_url: &str, api_token: impl Into<String>) -> Self {
        Self::with_client(reqwest::Client::new(), base_url, api_token)
    }

    /// A resolver for a controller whose API speaks TLS under a certificate that `ca_pem` (a
    /// PEM CA certificate) signs; `None` trusts no CA (plain `http://` only).
    pub fn with_ca(
        base_url: &str,
        api_token: impl Into<String>,
        ca_pem: Option<&[u8]>,
    ) -> Result<Self, ResolveError> {
        let mut builder = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .connect_timeout(std::time::Duration::from_secs(10));
        if let Some(pem) = ca_pem {
            let ca = reqwest::Certificate::from_pem(pem).map_err(ResolveError::Client)?;
            builder = builder.add_root_certificate(ca);
        }
        let client = builder.build().map_err(ResolveError::Client)?;
        Ok(Self::with_client(client, base_url, api_token))
    }

    fn with_client(client: reqwest::Client, base_url: &str, api_token: impl Into<String>) -> Self {
        Self {
            client,
            base: format!("{}{}", base_url.trim_end_matches('/'), taidon_api::PREFIX),
            url: format!(
                "{}{}/resolve",
                base_url.trim_end_matches('/'),
                taidon_api::PREFIX
            ),
            api_token: api_token.into(),
        }
    }

    async fn post(&self, req: ResolveRequest) -> Result<ResolveResponse, ResolveError> {
        let resp = self
            .client
            .post(&self.url)
            .bearer_auth(&self.api_token)
            .json(&req)
            .send()
            .await
            .map_err(|source| ResolveError::Unreachable {
                url: self.url.clone(),
                source,
            })?;
        let status = resp.status();
        if !status.is_success() {
            // The body is an ApiError when the controller wrote it; anything else is kept short.
            let text = resp.text().await.unwrap_or_default();
            let message = serde_json_message(&text);
            return Err(ResolveError::Status {
                status: status.as_u16(),
                message,
            });
        }
        resp.json().await.map_err(ResolveError::Decode)
    }
}

impl HttpResolver {
    async fn post_leases(&self, route: &str, ids: Vec<InstanceId>) -> Result<(), ResolveError> {
        let url = format!("{}/{route}", self.base);
        let resp = self
            .client
            .post(&url)
            .bearer_auth(&self.api_token)
            .json(&Leases { instance_ids: ids })
            .send()
            .await
            .map_err(|source| ResolveError::Unreachable { url, source })?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap_or_default();
            return Err(ResolveError::Status {
                status,
                message: serde_json_message(&text),
            });
        }
        Ok(())
    }
}

impl HttpResolver {
    /// `GET /v1/keys`: the public keys DSN tokens are verified with.
    pub async fn public_keys(&self) -> Result<PublicKeys, ResolveError> {
        let url = format!("{}/keys", self.base);
        let resp = self
            .client
            .get(&url)
            .bearer_auth(&self.api_token)
            .send()
            .await
            .map_err(|source| ResolveError::Unreachable { url, source })?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(ResolveError::Status {
                status: status.as_u16(),
                message: serde_json_message(&text),
            });
        }
        resp.json().await.map_err(ResolveError::Decode)
    }
}

fn serde_json_message(text: &str) -> String {
    match serde_json::from_str::<ApiError>(text) {
        Ok(e) => e.message,
        Err(_) => text.chars().take(200).collect(),
    }
}

impl Resolver for HttpResolver {
    fn resolve(&self, req: ResolveRequest) -> BoxFuture<'_, Result<ResolveResponse, ResolveError>> {
        Box::pin(self.post(req))
    }

    fn touch(&self, ids: Vec<InstanceId>) -> BoxFuture<'_, Result<(), ResolveError>> {
        Box::pin(self.post_leases("touch", ids))
    }

    fn release(&self, ids: Vec<InstanceId>) -> BoxFuture<'_, Result<(), ResolveError>> {
        Box::pin(self.post_leases("release", ids))
    }

    fn park(&self, ids: Vec<InstanceId>) -> BoxFuture<'_, Result<(), ResolveError>> {
        Box::pin(self.post_leases("park", ids))
    }

    fn unpark(&self, ids: Vec<InstanceId>) -> BoxFuture<'_, Result<(), ResolveError>> {
        Box::pin(self.post_leases("unpark", ids))
    }
}
