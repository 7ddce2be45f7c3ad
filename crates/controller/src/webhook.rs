//! The git-hosting webhook (GitHub style): `push` and `create` of a branch or tag pin the
//! states tagged with that ref; `pull_request` opened or reopened pins the states tagged with
//! its number, closed releases them so eviction takes them first. Every request must carry
//! `X-Hub-Signature-256: sha256=<hex HMAC-SHA256 of the body>`; a bad one is refused and
//! logged (and recorded as a `webhook_rejected` event).

use serde::Deserialize;
use taidon_api::PinReason;

use crate::{now_ms, pins, Controller, ControllerError};

/// Why a webhook delivery was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WebhookError {
    #[error("missing or malformed X-Hub-Signature-256")]
    MissingSignature,
    #[error("signature does not match")]
    BadSignature,
    #[error("payload is not a {event} event: {message}")]
    Payload { event: String, message: String },
}

/// What a delivery changed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct WebhookOutcome {
    pub event: String,
    pub ref_name: String,
    pub pinned: usize,
    pub unpinned: usize,
}

/// Checks `sha256=<hex>` against the HMAC-SHA256 of `body` under `secret`, in constant time.
pub fn verify_signature(secret: &[u8], body: &[u8], header: &str) -> Result<(), WebhookError> {
    let hex_sig = header
        .strip_prefix("sha256=")
        .ok_or(WebhookError::MissingSignature)?;
    let sig = hex::decode(hex_sig).map_err(|_| WebhookError::MissingSignature)?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::verify(&key, body, &sig).map_err(|_| WebhookError::BadSignature)
}

/// `sha256=<hex>` for `body` under `secret`: what a sender puts in the header.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    format!(
        "sha256={}",
        hex::encode(ring::hmac::sign(&key, body).as_ref())
    )
}

#[derive(Deserialize)]
struct Push {
    #[serde(rename = "ref")]
    ref_: String,
    #[serde(default)]
    deleted: bool,
}

#[derive(Deserialize)]
struct Create {
    #[serde(rename = "ref")]
    ref_: String,
    ref_type: String,
}

#[derive(Deserialize)]
struct PullRequest {
    action: String,
    number: u64,
}

/// What a delivery asks: which ref, and whether to pin or release it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Action {
    pub(crate) reason: Option<PinReason>,
    pub(crate) ref_name: String,
    pub(crate) active: bool,
}

/// Reads an event into an action; `None` for events and actions that change nothing.
pub(crate) fn action(event: &str, body: &[u8]) -> Result<Option<Action>, WebhookError> {
    let bad = |e: serde_json::Error| WebhookError::Payload {
        event: event.to_owned(),
        message: e.to_string(),
    };
    Ok(match event {
        "push" => {
            let p: Push = serde_json::from_slice(body).map_err(bad)?;
            let name = p
                .ref_
                .strip_prefix("refs/heads/")
                .or_else(|| p.ref_.strip_prefix("refs/tags/"))
                .unwrap_or(&p.ref_);
            Some(Action {
                reason: None,
                ref_name: name.to_owned(),
                active: !p.deleted,
            })
        }
        "create" => {
            let c: Create = serde_json::from_slice(body).map_err(bad)?;
            (c.ref_type == "tag" || c.ref_type == "branch").then_some(Action {
                reason: None,
                ref_name: c.ref_,
                active: true,
            })
        }
        "pull_request" => {
            let pr: PullRequest = serde_json::from_slice(body).map_err(bad)?;
            let active = match pr.action.as_str() {
                "opened" | "reopened" | "synchronize" => true,
                "closed" => false,
                _ => return Ok(None),
            };
            Some(Action {
                reason: Some(PinReason::Pr),
                ref_name: pr.number.to_string(),
                active,
            })
        }
        _ => None,
    })
}

impl Controller {
    /// Handles one delivery: checks its signature, then pins or releases the ref it names.
    pub fn webhook(
        &self,
        event: &str,
        signature: Option<&str>,
        body: &[u8],
    ) -> Result<WebhookOutcome, WebhookOutcomeError> {
        let checked = match signature {
            None => Err(WebhookError::MissingSignature),
            Some(sig) => verify_signature(self.lifecycle.webhook_secret.as_bytes(), body, sig),
        };
        if let Err(e) = checked {
            tracing::warn!(event, error = %e, "webhook refused");
            let _ = self.meta.event(
                now_ms(),
                "webhook_rejected",
                None,
                None,
                Some(&format!("{event}: {e}")),
            );
            return Err(WebhookOutcomeError::Refused(e));
        }
        let action = action(event, body).map_err(WebhookOutcomeError::Refused)?;
        let Some(a) = action else {
            return Ok(WebhookOutcome {
                event: event.to_owned(),
                ref_name: String::new(),
                pinned: 0,
                unpinned: 0,
            });
        };
        let changed = pins::set_ref(&self.meta, a.reason, &a.ref_name, a.active)
            .map_err(|e| WebhookOutcomeError::Controller(e.into()))?;
        let kind = if a.active { "pinned" } else { "unpinned" };
        for sid in &changed {
            let detail = format!("webhook {event} {}", a.ref_name);
            self.meta
                .event(now_ms(), kind, Some(sid), None, Some(&detail))
                .map_err(|e| WebhookOutcomeError::Controller(e.into()))?;
        }
        tracing::info!(event, r#ref = %a.ref_name, changed = changed.len(), "webhook {kind}");
        Ok(WebhookOutcome {
            event: event.to_owned(),
            ref_name: a.ref_name,
            pinned: if a.active { changed.len() } else { 0 },
            unpinned: if a.active { 0 } else { changed.len() },
        })
    }
}

/// A refused delivery (401 or 400) or a failure inside (500).
#[derive(Debug, thiserror::Error)]
pub enum WebhookOutcomeError {
    #[error(transparent)]
    Refused(WebhookError),
    #[error(transparent)]
    Controller(ControllerError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_and_tampering_fails() {
        let body = br#"{"ref":"refs/heads/main"}"#;
        let sig = sign(b"s3cret", body);
        // HMAC-SHA256("s3cret", body), computed apart with:
        // printf '%s' '{"ref":"refs/heads/main"}' | openssl dgst -sha256 -hmac s3cret
        assert_eq!(
            sig,
            "sha256=232a5e067b6a5aa567ed5a1d21a0dffaf6ef0eeecb6bd9bcf43b3d5ef3fc4f43"
        );
        assert_eq!(verify_signature(b"s3cret", body, &sig), Ok(()));
        assert_eq!(
            verify_signature(b"other", body, &sig),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify_signature(b"s3cret", b"{}", &sig),
            Err(WebhookError::BadSignature)
        );
        assert_eq!(
            verify_signature(b"s3cret", body, "sha1=00"),
            Err(WebhookError::MissingSignature)
        );
    }

    #[test]
    fn events_become_pin_actions() {
        let push = action("push", br#"{"ref":"refs/heads/main"}"#).unwrap();
        assert_eq!(
            push,
            Some(Action {
                reason: None,
                ref_name: "main".into(),
                active: true
            })
        );
        let tag = action("push", br#"{"ref":"refs/tags/v1.2"}"#)
            .unwrap()
            .unwrap();
        assert_eq!(tag.ref_name, "v1.2");
        let closed = action("pull_request", br#"{"action":"closed","number":42}"#)
            .unwrap()
            .unwrap();
        assert_eq!(
            (closed.reason, closed.ref_name.as_str(), closed.active),
            (Some(PinReason::Pr), "42", false)
        );
        assert_eq!(
            action("pull_request", br#"{"action":"labeled","number":1}"#).unwrap(),
            None
        );
        assert_eq!(action("ping", b"{}").unwrap(), None);
        assert!(action("push", b"[]").is_err());
    }
}
