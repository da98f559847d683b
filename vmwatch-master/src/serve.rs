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
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning on the ready listener.
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
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
