//! What the gateway's tests against real servers share: a fixed clock and fake resolvers, a
//! token key, a template cluster copied per test, and the gateway served on a loopback port.
#![allow(dead_code)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use rand::distributions::{Alphanumeric, DistString};
use taidon_api::{ResolveRequest, ResolveResponse, Target};
use taidon_core::token::{Scope, SharedKeyset, TokenKey};
use taidon_core::{InstanceId, StateId};
use taidon_gateway::{Clock, Gateway, GatewayConfig, ResolveError, Resolver};
use taidon_runtime::{Engine, RunAs, Server, ServerConfig};

pub const NOW: u64 = 1_800_000_000;
pub const TTL: u64 = 600;

pub struct FixedClock(pub u64);

impl Clock for FixedClock {
    fn now_s(&self) -> u64 {
        self.0
    }
}

/// A fake resolver with one fixed answer for every instance.
pub struct FakeResolver(pub ResolveResponse);

impl Resolver for FakeResolver {
    fn resolve(&self, _: ResolveRequest) -> BoxFuture<'_, Result<ResolveResponse, ResolveError>> {
        let answer = self.0.clone();
        Box::pin(async move { Ok(answer) })
    }
}

pub fn key() -> TokenKey {
    TokenKey::hs256(b"gateway test secret, long enough", "install-gw")
}

pub fn token() -> String {
    let k = key();
    k.sign(&k.claims(
        StateId::from_bytes([3; 32]),
        InstanceId::from_bytes([4; 8]),
        Scope::Rw,
        NOW,
        TTL,
    ))
    .unwrap()
}

pub fn gateway_with(answer: ResolveResponse, now: u64, timeout: Duration) -> Arc<Gateway> {
    Arc::new(
        Gateway::new(
            GatewayConfig {
                handshake_timeout: timeout,
                ..GatewayConfig::default()
            },
            Arc::new(SharedKeyset::new(key())),
            Arc::new(FakeResolver(answer)),
        )
        .with_clock(Arc::new(FixedClock(now))),
    )
}

pub fn gateway(answer: ResolveResponse) -> Arc<Gateway> {
    gateway_with(answer, NOW + 1, Duration::from_secs(10))
}

pub fn engine() -> Engine {
    Engine::discover(None, Default::default()).expect("a PostgreSQL engine")
}

pub fn run_as() -> Option<RunAs> {
    RunAs::for_this_process().unwrap()
}

pub fn traversable(dir: &Path) {
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711)).unwrap();
}

/// The cluster every test copies: made once per test binary under the target's tmp dir (which
/// the server user can traverse, unlike /root), replacing one a previous run left.
pub async fn template() -> &'static Path {
    static TEMPLATE: tokio::sync::OnceCell<PathBuf> = tokio::sync::OnceCell::const_new();
    TEMPLATE
        .get_or_init(|| async {
            let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("gateway-template");
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&root).unwrap();
            traversable(&root);
            let data = root.join("data");
            engine().initdb(&data, run_as().as_ref()).await.unwrap();
            data
        })
        .await
}

/// A running copy of the template cluster, with a random password for `postgres`.
pub struct Pg {
    pub server: Server,
    pub password: String,
    _dir: tempfile::TempDir,
}

impl Pg {
    pub async fn start() -> Pg {
        Self::start_with_hba("").await
    }

    /// Starts with `hba_lines` placed before the template's pg_hba.conf rules.
    pub async fn start_with_hba(hba_lines: &str) -> Pg {
        Self::start_with(hba_lines, "").await
    }

    /// Starts with `conf_lines` added to postgresql.conf (they win over earlier settings).
    pub async fn start_with_conf(conf_lines: &str) -> Pg {
        Self::start_with("", conf_lines).await
    }

    async fn start_with(hba_lines: &str, conf_lines: &str) -> Pg {
        let template = template().await;
        let dir = tempfile::tempdir().unwrap();
        traversable(dir.path());
        let data = dir.path().join("data");
        let cp = std::process::Command::new("cp")
            .arg("-a")
            .arg(template)
            .arg(&data)
            .status()
            .unwrap();
        assert!(cp.success(), "cp -a of the template failed");
        if !hba_lines.is_empty() {
            let hba = data.join("pg_hba.conf");
            let rest = std::fs::read_to_string(&hba).unwrap();
            std::fs::write(&hba, format!("{hba_lines}\n{rest}")).unwrap();
        }
        if !conf_lines.is_empty() {
            let conf = data.join("postgresql.conf");
            let rest = std::fs::read_to_string(&conf).unwrap();
            std::fs::write(&conf, format!("{rest}\n{conf_lines}\n")).unwrap();
        }
        let server = engine()
            .start(
                ServerConfig {
                    data_dir: data,
                    socket_dir: dir.path().join("sock"),
                    tcp: true,
                    advertise: None,
                    port: None,
                    log_file: dir.path().join("server.log"),
                },
                run_as().as_ref(),
            )
            .await
            .unwrap();
        let password = Alphanumeric.sample_string(&mut rand::thread_rng(), 24);
        server.set_password("postgres", &password).await.unwrap();
        Pg {
            server,
            password,
            _dir: dir,
        }
    }

    pub fn target(&self) -> Target {
        self.target_as("postgres", &self.password)
    }

    pub fn target_as(&self, user: &str, password: &str) -> Target {
        Target {
            instance_id: InstanceId::from_bytes([4; 8]),
            host: "127.0.0.1".into(),
            port: self.server.port,
            user: user.into(),
            password: password.into(),
        }
    }

    pub fn ready(&self) -> ResolveResponse {
        ResolveResponse::Ready(self.target())
    }

    pub async fn stop(self) {
        self.server.stop().await.unwrap();
    }
}

/// A tokio-postgres config for the gateway DSN's user and database with `password`.
pub fn client_config(password: &str) -> tokio_postgres::Config {
    let mut cfg = tokio_postgres::Config::new();
    cfg.user("sqlrs").password(password).dbname("postgres");
    cfg
}

/// The gateway served on a loopback port with TLS from a fresh self-signed pair.
pub struct Served {
    pub port: u16,
    pub tls: taidon_gateway::TlsFiles,
    /// The gateway served, for its counters.
    pub gw: Arc<Gateway>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Served {
    pub async fn start(gw: Gateway) -> Served {
        let dir = tempfile::tempdir().unwrap();
        traversable(dir.path());
        let tls = taidon_gateway::ensure_self_signed(
            &dir.path().join("tls"),
            &["localhost", "127.0.0.1"],
        )
        .unwrap();
        // psql runs as root here and reads the CA; the server key stays 0600.
        let gw = Arc::new(gw.with_tls(taidon_gateway::server_config(&tls.cert, &tls.key).unwrap()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(Arc::clone(&gw).serve(listener, async {
            let _ = stopped.await;
        }));
        Served {
            port,
            tls,
            gw,
            stop: Some(stop),
            task,
            _dir: dir,
        }
    }

    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap();
    }
}

pub fn live_token(f: impl FnOnce(&mut taidon_core::token::Claims)) -> String {
    let k = key();
    let mut c = k.claims(
        StateId::from_bytes([3; 32]),
        InstanceId::from_bytes([4; 8]),
        Scope::Rw,
        taidon_gateway::SystemClock.now_s(),
        TTL,
    );
    f(&mut c);
    k.sign(&c).unwrap()
}

pub fn real_clock_gateway(answer: ResolveResponse, config: GatewayConfig) -> Gateway {
    Gateway::new(
        config,
        Arc::new(SharedKeyset::new(key())),
        Arc::new(FakeResolver(answer)),
    )
}
