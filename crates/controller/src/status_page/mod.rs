//! The status page at `GET /`: the tree of states, the instances, recent events, and a chart
//! of the last hour, rendered on the server as one HTML page that reloads itself.
//!
//! The page is behind the API token: `POST /login` checks it as the API does and keeps it in
//! an HttpOnly, SameSite=Strict cookie; `POST /logout` clears it. Admin and user tokens may
//! look; a gateway's may not. The token is never logged nor written into a page.

mod history;
mod render;

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;
use taidon_api::TokenRole;

pub(crate) use history::History;
use history::{Sample, SAMPLE_EVERY};
use render::{InstanceLine, Page};

use crate::tokens::{AuthError, Principal};
use crate::{now_ms, Controller, ControllerError};

/// The cookie that carries the API token.
const COOKIE: &str = "taidon_session";
/// How many of the newest events the page lists.
const EVENTS: usize = 50;

/// `GET /`, `POST /login`, `POST /logout`; merged into the API's router.
pub(crate) fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/", get(index))
        // A bookmarked or reloaded /login lands on the page (or its form).
        .route("/login", get(|| async { see_other("/", None) }).post(login))
        .route("/logout", post(logout))
}

impl Controller {
    /// Records store usage and running instances every [`SAMPLE_EVERY`] (and once now), for
    /// the status page's chart.
    pub(crate) fn spawn_status_sampler(self: &Arc<Self>) {
        let this = Arc::downgrade(self);
        let stop = self.shutdown_requested();
        self.spawn(async move {
            tokio::pin!(stop);
            loop {
                let Some(ctl) = this.upgrade() else { return };
                ctl.sample_usage().await;
                drop(ctl);
                tokio::select! {
                    () = &mut stop => return,
                    () = tokio::time::sleep(SAMPLE_EVERY) => {}
                }
            }
        });
    }

    async fn sample_usage(&self) {
        if let Some(sample) = self.usage_now().await {
            self.history.record(sample);
        }
    }

    /// Store usage (the store keeps it, so this is cheap) and running instances, now.
    async fn usage_now(&self) -> Option<Sample> {
        match self.store.usage().await {
            Ok(store_bytes) => Some(Sample {
                at_ms: now_ms(),
                store_bytes,
                instances: self.live.read().unwrap_or_else(|p| p.into_inner()).len() as u64,
            }),
            Err(e) => {
                tracing::debug!(error = %e, "cannot sample the store's usage");
                None
            }
        }
    }

    /// What the status page shows now, to `viewer`; the chart ends with the usage now.
    async fn status_page(&self, viewer: &Principal) -> Result<Page, ControllerError> {
        let mut samples = self.history.samples();
        samples.extend(self.usage_now().await);
        let live = self.live_ids();
        let owners = self.meta.instance_owners()?;
        let mut instances: Vec<InstanceLine> = self
            .meta
            .instances()?
            .into_iter()
            .map(|r| {
                let running = live.contains(&r.instance_id);
                InstanceLine {
                    instance_id: r.instance_id,
                    state_id: r.state_id,
                    owner: owners.get(&r.instance_id).cloned().unwrap_or_default(),
                    // As the API says it: a live standby is still a standby.
                    status: if running && r.status != "standby" {
                        "running".into()
                    } else {
                        r.status
                    },
                    created_ms: r.created_ms,
                    last_activity_ms: running.then(|| {
                        r.created_ms
                            .max(self.last_access_ms(&r.instance_id).unwrap_or(0))
                    }),
                    connections: self.active_connections(&r.instance_id),
                }
            })
            .collect();
        instances.sort_by_key(|i| (i.created_ms, i.instance_id.to_string()));
        Ok(Page {
            now_ms: now_ms(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            viewer: format!("{} ({})", viewer.sub, viewer.role),
            states: self.list_states()?,
            instances,
            events: self.events(None, EVENTS)?,
            samples,
            store_capacity_bytes: self
                .lifecycle
                .config
                .store_limits()
                .map_or(0, |l| l.high_water_bytes),
            max_instances: self.lifecycle.config.instance_limits().capacity() as u64,
        })
    }
}

/// Whether a principal may see the page: admins and users, as for `/v1/states`.
fn may_look(p: &Principal) -> bool {
    matches!(p.role, TokenRole::Admin | TokenRole::User)
}

/// The token in the request's session cookie, if it has one.
fn session_token(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (name, value) = pair.trim().split_once('=')?;
            (name == COOKIE).then(|| percent_decode(value))
        })
        .filter(|t| !t.is_empty())
}

/// Bytes a cookie value may hold as they are; the rest are %XX (a hand-written api.token may
/// hold anything).
fn cookie_safe(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~".contains(&b) || b == b'_'
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if cookie_safe(b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Whether the browser reached us over TLS: the API's own URL says so, or a proxy in front
/// of it does.
fn over_tls(ctl: &Controller, headers: &HeaderMap) -> bool {
    let proxied = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    proxied
        || ctl
            .api_url
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .starts_with("https://")
}

fn session_cookie(value: &str, secure: bool, clear: bool) -> String {
    let mut cookie = format!("{COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/");
    if clear {
        cookie.push_str("; Max-Age=0");
    }
    if secure {
        cookie.push_str("; Secure");
    }
    cookie
}

/// An HTML response that no cache keeps, no frame shows, and no script runs in.
fn html(status: StatusCode, body: String) -> Response {
    let mut resp = (status, body).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
             frame-ancestors 'none'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    resp
}

fn see_other(location: &'static str, cookie: Option<String>) -> Response {
    let mut resp = StatusCode::SEE_OTHER.into_response();
    let h = resp.headers_mut();
    h.insert(header::LOCATION, HeaderValue::from_static(location));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    match cookie.map(|c| HeaderValue::from_str(&c)) {
        None => {}
        Some(Ok(v)) => {
            h.insert(header::SET_COOKIE, v);
        }
        // Percent-encoded, it is always a valid header; should it not be, no cookie is set.
        Some(Err(_)) => tracing::warn!("cannot set the status page's session cookie"),
    }
    resp
}

async fn index(State(ctl): State<Arc<Controller>>, headers: HeaderMap) -> Response {
    let Some(token) = session_token(&headers) else {
        return html(StatusCode::OK, render::login(None));
    };
    let viewer = match ctl.authenticate(&token) {
        Ok(p) if may_look(&p) => p,
        Ok(_) | Err(_) => {
            // A revoked or expired token, or one whose role changed: ask again, and forget it.
            let mut resp = html(
                StatusCode::OK,
                render::login(Some("your session has ended: sign in again")),
            );
            if let Ok(v) =
                HeaderValue::from_str(&session_cookie("", over_tls(&ctl, &headers), true))
            {
                resp.headers_mut().insert(header::SET_COOKIE, v);
            }
            return resp;
        }
    };
    match ctl.status_page(&viewer).await {
        Ok(page) => html(StatusCode::OK, render::page(&page)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot gather the status page");
            html(
                StatusCode::INTERNAL_SERVER_ERROR,
                render::login(Some(
                    "the status could not be read; see the controller's log",
                )),
            )
        }
    }
}

/// The login form's body. No `Debug`: it holds a token.
#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
}

async fn login(
    State(ctl): State<Arc<Controller>>,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let token = form.token.trim();
    match ctl.authenticate(token) {
        Ok(p) if may_look(&p) => {
            tracing::info!(sub = %p.sub, role = %p.role, "signed in to the status page");
            let cookie = session_cookie(&percent_encode(token), over_tls(&ctl, &headers), false);
            see_other("/", Some(cookie))
        }
        Ok(p) => html(
            StatusCode::FORBIDDEN,
            render::login(Some(&format!(
                "a {} token may not see the status page",
                p.role
            ))),
        ),
        Err(e @ AuthError::Meta(_)) => {
            tracing::warn!(error = %e, "cannot check an API token");
            html(
                StatusCode::SERVICE_UNAVAILABLE,
                render::login(Some("the token cannot be checked now; try again")),
            )
        }
        Err(_) => html(
            StatusCode::UNAUTHORIZED,
            render::login(Some("that token is not valid")),
        ),
    }
}

async fn logout(State(ctl): State<Arc<Controller>>, headers: HeaderMap) -> Response {
    see_other(
        "/",
        Some(session_cookie("", over_tls(&ctl, &headers), true)),
    )
}

#[cfg(test)]
mod tests;
