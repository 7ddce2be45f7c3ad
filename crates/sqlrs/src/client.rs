//! The controller's HTTP API, as `sqlrs` calls it.

use std::pin::Pin;

use futures_util::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use taidon_api::{
    ApiError, InstanceInfo, PrepareEvent, PrepareRequest, Removed, StateInfo, Status, PREFIX,
};

use crate::daemon::Daemon;

/// Why a request did not give an answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientError {
    /// The controller answered with an error.
    #[error(transparent)]
    Api(ApiError),
    #[error("cannot reach {what} at {url}: {}", cause_chain(source))]
    Http {
        what: &'static str,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("TLS to {url} failed (CA tried: {ca}): {}", cause_chain(source))]
    Tls {
        url: String,
        ca: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("cannot use the CA file {}: {message}", path.display())]
    Ca {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("the taidon daemon answered {url} with {status}: {body}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
        body: String,
    },
    #[error("the taidon daemon sent an answer sqlrs cannot read ({url}): {source}")]
    Decode {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the prepare stream ended before it said done or failed")]
    StreamEnded,
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Where an input blob's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum BlobSource {
    File(std::path::PathBuf),
    /// Read already (a script from stdin).
    Bytes(Vec<u8>),
}

/// Every message in an error's chain, once each: reqwest's own says little.
fn cause_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// A client of one daemon's or server's API.
pub(crate) struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    /// `the taidon daemon` or `the Taidon server`, for messages.
    what: &'static str,
    /// The CA trusted for TLS, for messages.
    ca: String,
    remote: bool,
}

type Chunks = Pin<Box<dyn Stream<Item = Result<Vec<u8>, reqwest::Error>> + Send>>;

/// The NDJSON events of one prepare, as they arrive.
pub(crate) struct PrepareStream {
    url: String,
    chunks: Chunks,
    lines: Lines,
    ended: bool,
}

impl PrepareStream {
    /// The next event; `None` after the stream ended with `Done` or `Failed`.
    pub(crate) async fn next(&mut self) -> Result<Option<PrepareEvent>, ClientError> {
        loop {
            if self.ended {
                return Ok(None);
            }
            if let Some(line) = self.lines.next_line() {
                let event: PrepareEvent =
                    serde_json::from_slice(&line).map_err(|source| ClientError::Decode {
                        url: self.url.clone(),
                        source,
                    })?;
                if matches!(
                    event,
                    PrepareEvent::Done { .. } | PrepareEvent::Failed { .. }
                ) {
                    self.ended = true;
                }
                return Ok(Some(event));
            }
            match self.chunks.next().await {
                Some(Ok(chunk)) => self.lines.push(&chunk),
                Some(Err(source)) => {
                    return Err(ClientError::Http {
                        what: "the controller's event stream",
                        url: self.url.clone(),
                        source,
                    })
                }
                None => {
                    if !self.lines.finish() {
                        return Err(ClientError::StreamEnded);
                    }
                }
            }
        }
    }
}

/// Splits bytes into newline-terminated lines, skipping blank ones.
#[derive(Debug, Default)]
pub(crate) struct Lines {
    buf: Vec<u8>,
}

impl Lines {
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete, non-blank line, without its newline.
    pub(crate) fn next_line(&mut self) -> Option<Vec<u8>> {
        loop {
            let end = self.buf.iter().position(|&b| b == b'\n')?;
            let mut line: Vec<u8> = self.buf.drain(..=end).collect();
            line.pop();
            if !line.trim_ascii().is_empty() {
                return Some(line);
            }
        }
    }

    /// At the end of input: makes a last unterminated line complete. False if nothing is left.
    pub(crate) fn finish(&mut self) -> bool {
        if self.buf.trim_ascii().is_empty() {
            self.buf.clear();
            return false;
        }
        self.buf.push(b'\n');
        true
    }
}

impl Client {
    pub(crate) fn new(daemon: &Daemon) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .build()?;
        Ok(Self {
            http,
            base: format!("{}{PREFIX}", daemon.info.api_url.trim_end_matches('/')),
            token: daemon.token.clone(),
            what: "the taidon daemon",
            ca: String::new(),
            remote: false,
        })
    }

    /// A client of a shared server, trusting `server.ca` alone when given, else the
    /// system's roots.
    pub(crate) fn remote(server: &crate::remote::Server) -> Result<Self, ClientError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .use_rustls_tls();
        let ca = match &server.ca {
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| ClientError::Ca {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
                let certs =
                    reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ClientError::Ca {
                        path: path.clone(),
                        message: cause_chain(&e),
                    })?;
                if certs.is_empty() {
                    return Err(ClientError::Ca {
                        path: path.clone(),
                        message: "no PEM certificate in it".into(),
                    });
                }
                builder = builder.tls_built_in_root_certs(false);
                for cert in certs {
                    builder = builder.add_root_certificate(cert);
                }
                path.display().to_string()
            }
            None => "the system's roots".to_owned(),
        };
        let http = builder.build().map_err(|e| ClientError::Ca {
            path: server.ca.clone().unwrap_or_default(),
            message: cause_chain(&e),
        })?;
        Ok(Self {
            http,
            base: format!("{}{PREFIX}", server.url),
            token: server.token.clone(),
            what: "the Taidon server",
            ca,
            remote: true,
        })
    }

    /// Whether this client talks to a shared server (not the local daemon).
    pub(crate) fn is_remote(&self) -> bool {
        self.remote
    }

    /// The error for a request that got no answer.
    fn unreachable(&self, url: &str, source: reqwest::Error) -> ClientError {
        let chain = cause_chain(&source).to_ascii_lowercase();
        if url.starts_with("https://") && (chain.contains("certificate") || chain.contains("tls")) {
            ClientError::Tls {
                url: url.to_owned(),
                ca: self.ca.clone(),
                source,
            }
        } else {
            ClientError::Http {
                what: self.what,
                url: url.to_owned(),
                source,
            }
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::Response, ClientError> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|source| self.unreachable(url, source))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let body = resp.text().await.unwrap_or_default();
        match serde_json::from_str::<ApiError>(&body) {
            Ok(api) => Err(ClientError::Api(api)),
            Err(_) => Err(ClientError::Status {
                url: url.to_owned(),
                status,
                body: body.chars().take(500).collect(),
            }),
        }
    }

    async fn json<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<T, ClientError> {
        let resp = self.send(req, url).await?;
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| self.unreachable(url, source))?;
        serde_json::from_slice(&bytes).map_err(|source| ClientError::Decode {
            url: url.to_owned(),
            source,
        })
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let url = self.url(path);
        self.json(self.http.get(&url), &url).await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let url = self.url(path);
        self.json(self.http.post(&url).json(body), &url).await
    }

    async fn delete(&self, path: &str, force: bool) -> Result<Removed, ClientError> {
        let url = self.url(path);
        let mut req = self.http.delete(&url);
        if force {
            req = req.query(&[("force", "true")]);
        }
        self.json(req, &url).await
    }

    /// Which of these input blobs the controller lacks.
    pub(crate) async fn blobs_missing(
        &self,
        sha256: &[String],
    ) -> Result<Vec<String>, ClientError> {
        let answer: taidon_api::BlobsMissing = self
            .post(
                "/blobs/missing",
                &taidon_api::BlobsMissingRequest {
                    sha256: sha256.to_vec(),
                },
            )
            .await?;
        Ok(answer.missing)
    }

    /// Uploads one input blob, streamed from `source`.
    pub(crate) async fn put_blob(
        &self,
        sha256: &str,
        source: &BlobSource,
    ) -> Result<(), ClientError> {
        let url = self.url(&format!("/blobs/{sha256}"));
        let body = match source {
            BlobSource::Bytes(bytes) => reqwest::Body::from(bytes.clone()),
            BlobSource::File(path) => {
                let file = tokio::fs::File::open(path)
                    .await
                    .map_err(|e| ClientError::Read {
                        path: path.clone(),
                        source: e,
                    })?;
                let chunks = futures_util::stream::unfold(file, |mut file| async move {
                    use tokio::io::AsyncReadExt;
                    let mut buf = vec![0u8; 256 << 10];
                    match file.read(&mut buf).await {
                        Ok(0) => None,
                        Ok(n) => {
                            buf.truncate(n);
                            Some((Ok::<_, std::io::Error>(buf), file))
                        }
                        Err(e) => Some((Err(e), file)),
                    }
                });
                reqwest::Body::wrap_stream(chunks)
            }
        };
        self.send(self.http.put(&url).body(body), &url).await?;
        Ok(())
    }

    pub(crate) async fn status(&self) -> Result<Status, ClientError> {
        self.get("/status").await
    }

    pub(crate) async fn states(&self) -> Result<Vec<StateInfo>, ClientError> {
        self.get("/states").await
    }

    pub(crate) async fn instances(&self) -> Result<Vec<InstanceInfo>, ClientError> {
        self.get("/instances").await
    }

    pub(crate) async fn instance(&self, id: &str) -> Result<InstanceInfo, ClientError> {
        self.get(&format!("/instances/{id}")).await
    }

    pub(crate) async fn remove_state(&self, id: &str, force: bool) -> Result<Removed, ClientError> {
        self.delete(&format!("/states/{id}"), force).await
    }

    /// `POST /v1/states/{id}/push`: uploads now and waits.
    pub(crate) async fn push(&self, id: &str) -> Result<taidon_api::Pushed, ClientError> {
        self.post(&format!("/states/{id}/push"), &serde_json::json!({}))
            .await
    }

    /// `POST /v1/fsck`: checks (and with `repair`, repairs) the store and the metadata.
    pub(crate) async fn fsck(&self, repair: bool) -> Result<taidon_api::FsckReport, ClientError> {
        self.post("/fsck", &taidon_api::FsckRequest { repair })
            .await
    }

    /// `POST /v1/plan`: what a prepare would build; nothing is built.
    pub(crate) async fn plan(&self, req: &PrepareRequest) -> Result<taidon_api::Plan, ClientError> {
        self.post("/plan", req).await
    }

    /// `POST /v1/builds/{build}/done`: how the command of a `prepare:cmd` step ended.
    pub(crate) async fn command_done(
        &self,
        build: &taidon_core::InstanceId,
        done: &taidon_api::CommandDone,
    ) -> Result<serde_json::Value, ClientError> {
        self.post(&format!("/builds/{build}/done"), done).await
    }

    pub(crate) async fn remove_instance(
        &self,
        id: &str,
        force: bool,
    ) -> Result<Removed, ClientError> {
        self.delete(&format!("/instances/{id}"), force).await
    }

    pub(crate) async fn dsn(
        &self,
        req: &taidon_api::DsnRequest,
    ) -> Result<taidon_api::DsnResponse, ClientError> {
        self.post("/dsn", req).await
    }

    /// A fresh, isolated copy of a state for a test.
    pub(crate) async fn lease(
        &self,
        req: &taidon_api::LeaseRequest,
    ) -> Result<taidon_api::LeaseInfo, ClientError> {
        self.post("/leases", req).await
    }

    /// Gives a lease back; its copy is destroyed.
    pub(crate) async fn release_lease(
        &self,
        id: &str,
    ) -> Result<taidon_api::LeaseInfo, ClientError> {
        let url = self.url(&format!("/leases/{id}"));
        self.json(self.http.delete(&url), &url).await
    }

    pub(crate) async fn leases(&self) -> Result<Vec<taidon_api::LeaseInfo>, ClientError> {
        self.get("/leases").await
    }

    pub(crate) async fn shutdown(&self) -> Result<(), ClientError> {
        let _: serde_json::Value = self.post("/shutdown", &serde_json::json!({})).await?;
        Ok(())
    }

    /// Starts a prepare and returns its event stream.
    pub(crate) async fn pin(
        &self,
        req: &taidon_api::PinRequest,
    ) -> Result<taidon_api::PinsChanged, ClientError> {
        self.post("/pins", req).await
    }

    pub(crate) async fn unpin(
        &self,
        req: &taidon_api::UnpinRequest,
    ) -> Result<taidon_api::PinsChanged, ClientError> {
        self.post("/unpin", req).await
    }

    pub(crate) async fn events(
        &self,
        state: Option<&str>,
    ) -> Result<Vec<taidon_api::EventInfo>, ClientError> {
        match state {
            Some(s) => self.get(&format!("/events?state={s}")).await,
            None => self.get("/events").await,
        }
    }

    /// `POST /v1/warmup`: the same NDJSON progress stream as a prepare.
    pub(crate) async fn warmup(
        &self,
        req: &taidon_api::WarmupRequest,
    ) -> Result<PrepareStream, ClientError> {
        self.stream("/warmup", req).await
    }

    pub(crate) async fn prepare(&self, req: &PrepareRequest) -> Result<PrepareStream, ClientError> {
        self.stream("/prepare", req).await
    }

    async fn stream<B: Serialize>(
        &self,
        path: &str,
        req: &B,
    ) -> Result<PrepareStream, ClientError> {
        let url = self.url(path);
        let resp = self.send(self.http.post(&url).json(req), &url).await?;
        let chunks = resp.bytes_stream().map(|c| c.map(|b| b.to_vec()));
        Ok(PrepareStream {
            url,
            chunks: Box::pin(chunks),
            lines: Lines::default(),
            ended: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(lines: &mut Lines) -> Vec<String> {
        std::iter::from_fn(|| lines.next_line())
            .map(|l| String::from_utf8(l).unwrap())
            .collect()
    }

    #[test]
    fn lines_split_across_chunks_and_skip_blanks() {
        let mut lines = Lines::default();
        lines.push(b"{\"a\":1}\n{\"b\"");
        assert_eq!(drain(&mut lines), ["{\"a\":1}"]);
        lines.push(b":2}\n\n  \n{\"c\":");
        assert_eq!(drain(&mut lines), ["{\"b\":2}"]);
        lines.push(b"3}");
        assert!(drain(&mut lines).is_empty());
        assert!(lines.finish());
        assert_eq!(drain(&mut lines), ["{\"c\":3}"]);
        assert!(!lines.finish());
    }

    #[test]
    fn a_stream_of_events_parses_line_by_line() {
        let text = concat!(
            r#"{"event":"plan","total":1,"cached":0,"state_id":"#,
            r#""0000000000000000000000000000000000000000000000000000000000000000"}"#,
            "\n",
            r#"{"event":"failed","error":{"kind":"step_failed","message":"boom"}}"#,
            "\n"
        );
        let mut lines = Lines::default();
        // One byte at a time, as a slow network might deliver it.
        let mut events = Vec::new();
        for b in text.as_bytes() {
            lines.push(&[*b]);
            while let Some(line) = lines.next_line() {
                events.push(serde_json::from_slice::<PrepareEvent>(&line).unwrap());
            }
        }
        assert_eq!(events.len(), 2);
        assert!(matches!(events[0], PrepareEvent::Plan { total: 1, .. }));
        let PrepareEvent::Failed { error } = &events[1] else {
            panic!()
        };
        assert_eq!(error.message, "boom");
    }
}
