//! Where the controller's API listens: plain HTTP on loopback, which the local CLI finds in
//! `daemon.json`, and TLS on `--api-listen` when that is not a loopback address.

use std::future::Future;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use taidon_controller::serve::TlsListener;
use tokio::net::TcpListener;

/// The API's listeners.
pub(crate) struct ApiListeners {
    /// Plain HTTP on loopback: `--api-listen` itself when it is loopback, else a free port.
    local: TcpListener,
    /// TLS on `--api-listen` when it is not loopback.
    tls: Option<TlsListener>,
}

impl ApiListeners {
    /// Binds `listen`; off loopback it speaks TLS under `tls()` and a loopback port is bound
    /// beside it for the local CLI.
    pub(crate) async fn bind(
        listen: SocketAddr,
        tls: impl FnOnce() -> Result<std::sync::Arc<rustls::ServerConfig>>,
    ) -> Result<Self> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr}"))
        };
        if listen.ip().is_loopback() {
            return Ok(Self {
                local: bind(listen).await?,
                tls: None,
            });
        }
        let config = tls()?;
        let tls = TlsListener::new(bind(listen).await?, &config)?;
        let local = bind(SocketAddr::from(([127, 0, 0, 1], 0))).await?;
        Ok(Self {
            local,
            tls: Some(tls),
        })
    }

    /// `http://127.0.0.1:PORT`: what `daemon.json` names.
    pub(crate) fn local_url(&self) -> Result<String> {
        Ok(format!("http://{}", self.local.local_addr()?))
    }

    /// `https://ADDR:PORT` when the API speaks TLS off loopback, else the local URL.
    pub(crate) fn public_url(&self) -> Result<String> {
        match &self.tls {
            Some(l) => {
                use axum::serve::Listener;
                Ok(format!("https://{}", l.local_addr()?))
            }
            None => self.local_url(),
        }
    }

    /// Serves `app` on every listener until `stop` resolves, then lets requests finish.
    pub(crate) async fn serve(
        self,
        app: axum::Router,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let (tx, rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            stop.await;
            tx.send_replace(true);
        });
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let local =
            axum::serve(self.local, app.clone()).with_graceful_shutdown(stopped(rx.clone()));
        let tls = async {
            match self.tls {
                Some(l) => {
                    axum::serve(l, app)
                        .with_graceful_shutdown(stopped(rx))
                        .await
                }
                None => Ok(()),
            }
        };
        let (a, b) = tokio::join!(async { local.await }, tls);
        a.context("API server")?;
        b.context("API server (TLS)")?;
        Ok(())
    }
}
