//! An entry point for cargo-fuzz: arbitrary client bytes through the startup and
//! authentication steps of a real [`Gateway`](crate::Gateway), over an in-memory pipe.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use taidon_api::{ResolveRequest, ResolveResponse};
use taidon_core::token::{Keyset, SharedKeyset};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Gateway, GatewayConfig, ResolveError, Resolver};

struct Nowhere;

impl Resolver for Nowhere {
    fn resolve(&self, _: ResolveRequest) -> BoxFuture<'_, Result<ResolveResponse, ResolveError>> {
        Box::pin(async { Ok(ResolveResponse::Missing) })
    }
}

/// Feeds `data` to a gateway as a client would, then closes the client's side; returns what
/// the gateway sent back. Must never panic or hang.
pub fn handshake(data: &[u8]) -> Vec<u8> {
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Vec::new();
    };
    rt.block_on(async {
        let gw = Gateway::new(
            GatewayConfig {
                handshake_timeout: Duration::from_millis(200),
                ..GatewayConfig::default()
            },
            Arc::new(SharedKeyset::new(Keyset::hs256(
                b"fuzzing secret, 32 bytes long...",
                "fuzz",
            ))),
            Arc::new(Nowhere),
        );
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let serve = gw.handle(server, None);
        let talk = async {
            let _ = client.write_all(data).await;
            let _ = client.shutdown().await;
            let mut out = Vec::new();
            let _ = client.read_to_end(&mut out).await;
            out
        };
        let (_, out) = tokio::join!(serve, talk);
        out
    })
}
