//! The status page over HTTP: the API's router on a controller over fakes, reqwest as the
//! client (redirects not followed, cookies handled by hand).

use std::sync::Arc;

use taidon_api::{StateStatus, TokenRole};
use taidon_core::StateId;
use taidon_runtime::testing::FakeRuntime;
use taidon_store::testing::FakeStore;

use super::*;
use crate::config::Config;
use crate::meta::StateRow;
use crate::{ControllerConfig, Seams};

struct Served {
    ctl: Arc<Controller>,
    url: String,
    client: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// A controller with a base state and a child, its API served on a free port.
async fn served() -> (Served, StateId, StateId) {
    let dir = tempfile::Builder::new().prefix("page").tempdir().unwrap();
    let mut cfg = ControllerConfig::new(dir.path().join("home"));
    cfg.lifecycle = Some(Config::parse("[lifecycle]\ntick_ms = 3600000\n", "test").unwrap());
    let store = FakeStore::new();
    let seams = Seams {
        runtime: Arc::new(FakeRuntime::new()),
        store: Arc::new(store.clone()),
        clock: Arc::new(now_ms),
    };
    let ctl = Controller::open_with(cfg, seams).await.unwrap();
    let (base, child) = (StateId::from_bytes([1; 32]), StateId::from_bytes([2; 32]));
    for (id, parent, label) in [
        (base, None, "PostgreSQL <17>"),
        (child, Some(base), "schema.sql"),
    ] {
        let m = store.put(id, parent, 4096);
        ctl.meta
            .upsert_state(&StateRow {
                state_id: id,
                parent,
                label: label.into(),
                inputs_fingerprint: String::new(),
                engine_fingerprint: String::new(),
                status: StateStatus::Warm,
                status_reason: None,
                size_bytes: m.size_bytes,
                build_cost_ms: 1200,
                restore_cost_ms: 30,
                created_ms: now_ms(),
                last_access_ms: now_ms(),
                access_count: 1,
            })
            .unwrap();
    }
    ctl.store.refresh().await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = crate::router(Arc::clone(&ctl));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let served = Served {
        ctl,
        url,
        client,
        _dir: dir,
    };
    (served, base, child)
}

impl Served {
    async fn get(&self, cookie: Option<&str>) -> (u16, reqwest::header::HeaderMap, String) {
        let mut req = self.client.get(format!("{}/", self.url));
        if let Some(c) = cookie {
            req = req.header("cookie", c);
        }
        let resp = req.send().await.unwrap();
        let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
        (status, headers, resp.text().await.unwrap())
    }

    async fn post(&self, path: &str, body: String) -> (u16, reqwest::header::HeaderMap, String) {
        let resp = self
            .client
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .unwrap();
        let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
        (status, headers, resp.text().await.unwrap())
    }

    async fn login(&self, token: &str) -> (u16, reqwest::header::HeaderMap, String) {
        self.post("/login", format!("token={}", percent_encode(token)))
            .await
    }
}

fn set_cookie(headers: &reqwest::header::HeaderMap) -> Option<String> {
    headers
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn the_page_asks_for_the_token_then_shows_the_states() {
    let (s, base, child) = served().await;
    let token = s.ctl.api_token().to_owned();

    let (status, headers, body) = s.get(None).await;
    assert_eq!(status, 200);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(body.contains(r#"action="/login""#), "{body}");
    assert!(
        !body.contains(&base.to_string()[..12]),
        "no data before login"
    );

    let wrong = "not-the-token-42";
    let (status, headers, body) = s.login(wrong).await;
    assert_eq!(status, 401);
    assert!(set_cookie(&headers).is_none());
    assert!(body.contains("that token is not valid"));
    assert!(!body.contains(wrong), "the token is echoed back");

    let (status, headers, _) = s.login(&token).await;
    assert_eq!(status, 303);
    assert_eq!(headers["location"], "/");
    let cookie = set_cookie(&headers).expect("a session cookie");
    assert_eq!(
        cookie,
        format!("taidon_session={token}; HttpOnly; SameSite=Strict; Path=/")
    );

    let session = cookie.split(';').next().unwrap().to_owned();
    let (status, headers, body) = s.get(Some(&session)).await;
    assert_eq!(status, 200);
    assert_eq!(headers["cache-control"], "no-store");
    assert!(!body.contains(&token), "the token is in the page");
    assert!(body.contains(&format!(
        r#"data-state-id="{base}" data-parent="" data-depth="0""#
    )));
    assert!(body.contains(&format!(
        r#"data-state-id="{child}" data-parent="{base}" data-depth="1""#
    )));
    assert!(body.contains(r#"<span class="presence warm">Warm</span>"#));
    assert!(body.contains("PostgreSQL &lt;17&gt;"));
    assert!(body.contains(r#"<svg id="usage-chart""#));
    assert!(
        !body.contains(r#"data-samples="0""#),
        "the sampler records at start, and the chart ends now"
    );

    let resp = s
        .client
        .get(format!("{}/login", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 303);
    assert!(resp.headers().get("set-cookie").is_none());

    let (status, headers, _) = s.post("/logout", String::new()).await;
    assert_eq!(status, 303);
    let cleared = set_cookie(&headers).unwrap();
    assert!(
        cleared.starts_with("taidon_session=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );
}

#[tokio::test]
async fn users_may_look_gateways_and_revoked_tokens_may_not() {
    let (s, base, _) = served().await;
    let user = s
        .ctl
        .meta
        .create_token("alice", TokenRole::User, None, now_ms())
        .unwrap();
    let (status, headers, _) = s.login(&user.token).await;
    assert_eq!(status, 303);
    let session = set_cookie(&headers).unwrap();
    let session = session.split(';').next().unwrap().to_owned();
    let (_, _, body) = s.get(Some(&session)).await;
    assert!(body.contains(&base.to_string()), "{body}");
    assert!(body.contains("alice (user)"));

    s.ctl.meta.revoke_token(&user.token, now_ms()).unwrap();
    let (status, headers, body) = s.get(Some(&session)).await;
    assert_eq!(status, 200);
    assert!(body.contains(r#"action="/login""#));
    assert!(!body.contains(&base.to_string()));
    assert!(set_cookie(&headers).unwrap().contains("Max-Age=0"));

    let gateway = s
        .ctl
        .meta
        .create_token("gw", TokenRole::Gateway, None, now_ms())
        .unwrap();
    let (status, headers, body) = s.login(&gateway.token).await;
    assert_eq!(status, 403);
    assert!(set_cookie(&headers).is_none());
    assert!(!body.contains(&gateway.token));
}

#[tokio::test]
async fn the_cookie_is_secure_behind_tls() {
    let (s, _, _) = served().await;
    s.ctl.set_api_url("https://taidon.example:7000".into());
    let (status, headers, _) = s.login(s.ctl.api_token()).await;
    assert_eq!(status, 303);
    assert!(set_cookie(&headers).unwrap().ends_with("; Secure"));
}

#[test]
fn session_tokens_survive_the_cookie_encoding() {
    for token in ["abc123", "tdn_0011_ff", "with space;and=equals%"] {
        let mut headers = HeaderMap::new();
        let cookie = format!("other=1; {COOKIE}={}; more=2", percent_encode(token));
        headers.insert(header::COOKIE, HeaderValue::from_str(&cookie).unwrap());
        assert_eq!(session_token(&headers).as_deref(), Some(token));
    }
    assert_eq!(session_token(&HeaderMap::new()), None);
}
