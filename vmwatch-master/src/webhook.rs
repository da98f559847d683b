//! The panel webhook: delivers every journal entry from the durable outbox, in journal order,
//! as a signed JSON POST, retrying with backoff (1 s doubling to 5 min) until a 2xx.
//!
//! It runs as one async task with its own database connection: a slow or dead panel delays
//! nothing but itself. Delivery is at-least-once: an entry delivered just before a crash, whose
//! acknowledgement was not yet written, is sent again after the restart with the same
//! `X-Vmwatch-Event-Id`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::watch;

use crate::metrics::Metrics;
use crate::store::{JournalRow, Outbox, StoreError};

const BATCH: u32 = 256;
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Acknowledged ids are written at least this often (and at the end of every batch).
const ACK_EVERY: usize = 64;
/// Refusals for good (a 4xx but 408, 425, 429) before an entry moves to the dead letters.
const DEAD_AFTER: u32 = 3;

/// Whether the panel's answer says the entry itself is refused, so retrying cannot help.
pub fn refused_for_good(status: u16) -> bool {
    (400..500).contains(&status) && !matches!(status, 408 | 425 | 429)
}

/// `sha256=<hex HMAC-SHA256 of body>` with the panel key.
pub fn signature(key: &[u8], body: &[u8]) -> String {
    // HMAC takes keys of any length.
    let mut mac =
        <Hmac<Sha256> as Mac>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The next backoff after `current`.
pub fn next_backoff(current: Duration) -> Duration {
    (current * 2).min(BACKOFF_MAX)
}

pub struct Webhook {
    pub url: String,
    pub key: Vec<u8>,
    pub outbox: Outbox,
    pub metrics: Arc<Metrics>,
    pub committed: watch::Receiver<u64>,
    pub shutdown: watch::Receiver<bool>,
}

async fn blocking<T: Send + 'static>(
    outbox: Outbox,
    f: impl FnOnce(&mut Outbox) -> Result<T, StoreError> + Send + 'static,
) -> (Outbox, Result<T, StoreError>) {
    match tokio::task::spawn_blocking(move || {
        let mut outbox = outbox;
        let r = f(&mut outbox);
        (outbox, r)
    })
    .await
    {
        Ok(v) => v,
        // spawn_blocking only fails if the closure panicked, which these never do.
        Err(e) => panic!("outbox task failed: {e}"),
    }
}

impl Webhook {
    pub async fn run(self) {
        let Webhook {
            url,
            key,
            mut outbox,
            metrics,
            mut committed,
            mut shutdown,
        } = self;
        let client = match reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the webhook HTTP client; panel notifications disabled");
                return;
            }
        };
        tracing::info!(url = %url, "panel webhook enabled");
        let mut backoff = BACKOFF_MIN;
        let mut last_failure_log: Option<Instant> = None;
        loop {
            if *shutdown.borrow() {
                return;
            }
            committed.borrow_and_update();
            let (o, pending) = blocking(outbox, |o| o.pending(BATCH)).await;
            outbox = o;
            let pending = match pending {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the outbox");
                    Vec::new()
                }
            };
            if pending.is_empty() {
                tokio::select! {
                    _ = committed.changed() => {}
                    _ = shutdown.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                continue;
            }
            let mut acked: Vec<i64> = Vec::new();
            'entries: for entry in pending {
                let body = match serde_json::to_vec(&entry) {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::error!(error = %e, id = entry.id, "cannot encode a journal entry; skipped");
                        acked.push(entry.id);
                        continue;
                    }
                };
                let mut attempt = 0u32;
                let mut refusals = 0u32;
                loop {
                    attempt += 1;
                    let sent_at = Instant::now();
                    let result = match deliver(&client, &url, &key, &entry, &body).await {
                        // A pooled keep-alive connection the panel closed meanwhile fails at
                        // once; one immediate retry on a fresh connection is not a failure.
                        Err(Failure::Transport(_)) if attempt == 1 => {
                            deliver(&client, &url, &key, &entry, &body).await
                        }
                        other => other,
                    };
                    tracing::debug!(
                        id = entry.id,
                        attempt,
                        took_us = sent_at.elapsed().as_micros() as u64,
                        ok = result.is_ok(),
                        "webhook attempt"
                    );
                    let why = match result {
                        Ok(()) => {
                            metrics.webhook_deliveries.inc();
                            let age =
                                vmwatch_common::time::now_ms().saturating_sub(entry.received_at);
                            metrics.webhook_latency.observe(age as f64 / 1000.0);
                            backoff = BACKOFF_MIN;
                            acked.push(entry.id);
                            break;
                        }
                        Err(why) => why,
                    };
                    metrics.webhook_failures.inc();
                    // Save what was delivered before waiting or moving on.
                    if !acked.is_empty() {
                        outbox = record_acks(outbox, std::mem::take(&mut acked), &metrics).await;
                    }
                    if let Failure::Status(status) = why {
                        if refused_for_good(status) {
                            refusals += 1;
                        }
                        if refusals >= DEAD_AFTER {
                            let (id, now) = (entry.id, vmwatch_common::time::now_ms());
                            let (o, r) =
                                blocking(outbox, move |o| o.dead_letter(id, status, attempt, now))
                                    .await;
                            outbox = o;
                            match r {
                                Ok(()) => {
                                    metrics.outbox_depth.dec();
                                    metrics.dead_letters.inc();
                                    tracing::error!(id, status, attempts = attempt, "the panel refuses this journal entry for good; moved to the dead letters (GET /api/v1/dead-letters), delivery goes on");
                                    backoff = BACKOFF_MIN;
                                    break;
                                }
                                // Retried after the backoff like any failed delivery.
                                Err(e) => {
                                    tracing::error!(error = %e, id, "cannot move an entry to the dead letters")
                                }
                            }
                        }
                    }
                    if last_failure_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        tracing::warn!(id = entry.id, error = %why, retry_in_s = backoff.as_secs(), "panel webhook delivery failed (logged at most every 10 s)");
                        last_failure_log = Some(Instant::now());
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.changed() => return,
                    }
                    backoff = next_backoff(backoff);
                    if *shutdown.borrow() {
                        return;
                    }
                }
                if acked.len() >= ACK_EVERY {
                    break 'entries;
                }
            }
            if !acked.is_empty() {
                outbox = record_acks(outbox, std::mem::take(&mut acked), &metrics).await;
            }
        }
    }
}

/// Deletes delivered entries from the outbox; on failure they will simply be sent again.
async fn record_acks(outbox: Outbox, ids: Vec<i64>, metrics: &Metrics) -> Outbox {
    let n = ids.len() as i64;
    let (outbox, r) = blocking(outbox, move |o| o.ack(&ids)).await;
    match r {
        Ok(()) => {
            metrics.outbox_depth.dec_by(n);
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot record deliveries; they will be sent again");
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    outbox
}

/// Why one delivery attempt failed.
enum Failure {
    /// No HTTP answer (connection refused or reset, timeout).
    Transport(String),
    /// An answer other than 2xx.
    Status(u16),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Transport(e) => f.write_str(e),
            Failure::Status(s) => write!(f, "HTTP {s}"),
        }
    }
}

async fn deliver(
    client: &reqwest::Client,
    url: &str,
    key: &[u8],
    entry: &JournalRow,
    body: &[u8],
) -> Result<(), Failure> {
    let response = client
        .post(url)
        .header("Content-Type", "application/json")
        .header("X-Vmwatch-Event-Id", entry.id.to_string())
        .header("X-Vmwatch-Signature", signature(key, body))
        .body(body.to_vec())
        .send()
        .await
        .map_err(|e| Failure::Transport(format!("{e:#}")))?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(Failure::Status(response.status().as_u16()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_known_answer() {
        // Same value as the Python and PHP snippets in docs/API.md.
        assert_eq!(
            signature(b"panel-secret-0123456789", br#"{"id":1}"#),
            "sha256=f6bcdc7736219e9788a631dc679de8c33de987b66b0031f2c902b96132af2c24"
        );
    }

    #[test]
    fn which_answers_refuse_for_good() {
        for s in [400, 401, 403, 404, 413, 422] {
            assert!(refused_for_good(s), "{s}");
        }
        for s in [200, 408, 425, 429, 500, 502, 503] {
            assert!(!refused_for_good(s), "{s}");
        }
    }

    #[test]
    fn backoff_doubles_to_five_minutes() {
        let mut b = BACKOFF_MIN;
        let mut seen = vec![b.as_secs()];
        for _ in 0..10 {
            b = next_backoff(b);
            seen.push(b.as_secs());
        }
        assert_eq!(seen, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
    }
}
