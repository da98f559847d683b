//! The HTTP accept loop: a connection cap, a header-read timeout that also closes idle
//! keep-alive connections, and a drain bounded by a grace period.
//!
//! Hand-written around hyper instead of `axum::serve`, which has neither a cap nor timeouts:
//! a peer that opens connections and never finishes a request must not hold the master's
//! descriptors or memory.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::metrics::Metrics;

/// HTTP connections served at once; more are closed as they are accepted.
const MAX_CONNECTIONS: usize = 512;
/// HTTP connections one peer address may hold (so `/wait` long-polls too): half the cap, so one
/// address cannot take every slot and the panel still has room for its long-polls.
const MAX_PER_ADDRESS: usize = MAX_CONNECTIONS / 2;

/// Connections held per peer address; a slot is released when its guard drops.
#[derive(Default)]
struct PerAddress(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

struct AddressSlot(Arc<PerAddress>, std::net::IpAddr);

impl PerAddress {
    fn take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<AddressSlot> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_default();
        if *n >= MAX_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(AddressSlot(self.clone(), ip))
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut m = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}
/// A request's headers must arrive within this time; an idle keep-alive connection is closed
/// after it too.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `app` until `stop` turns true, then drains open connections for at most `grace`.
pub async fn serve(
    listener: TcpListener,
    app: axum::Router,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_address = Arc::new(PerAddress::default());
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        let (stream, peer) = match accepted {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on the ready listener.
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(address_slot) = per_address.take(peer.ip()) else {
            metrics.http_connections_refused_per_address.inc();
            drop(stream);
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.http_connections_refused.inc();
            drop(stream);
            continue;
        };
        let conn =
            http.serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        let metrics = metrics.clone();
        metrics.http_connections.inc();
        tokio::spawn(async move {
            let _ = conn.await;
            metrics.http_connections.dec();
            drop(slot);
            drop(address_slot);
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(grace) => {
            tracing::warn!(grace_s = grace.as_secs(), "HTTP connections still open when the grace period ran out; closing them");
        }
    }
}
