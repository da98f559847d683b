//! The panel webhook: delivers every journal entry from the durable outbox, in journal order,
//! as a signed JSON POST, retrying with backoff (1 s doubling to 5 min) until a 2xx.
//!
//! It runs as one async task with its own database connection: a slow or dead panel delays
//! nothing but itself. Delivery is at-least-once: an entry delivered just before a crash, whose
//! acknowledgement was not yet written, is sent again after the restart with the same
//! `X-Vmwatch-Event-Id`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::sync::watch;

use crate::blocking::blocking;
use crate::metrics::Metrics;
use crate::store::{JournalRow, Outbox};

/// Outbox rows read at a time.
const BATCH: u32 = 256;
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Acknowledged ids are written at least this often (and at the end of every batch).
const ACK_EVERY: usize = 64;
/// Refusals for good (a 4xx but 408, 425, 429) before an entry moves to the dead letters.
const DEAD_AFTER: u32 = 3;
/// A failing panel is logged at most this often.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);

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

/// What the deliverer does next with the entry at the head of the outbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Delivered: acknowledge it and go on with the next entry.
    Ack,
    /// Send it again at once: a pooled keep-alive connection the panel closed meanwhile fails
    /// at once, and one retry on a fresh connection is not a failure.
    RetryNow,
    /// Refused for good [`DEAD_AFTER`] times: move it to the dead letters.
    DeadLetter { status: u16, attempts: u32 },
    /// A batch refused for good: send its entries one at a time, so that only the entry the
    /// panel refuses goes to the dead letters.
    Split,
    /// Wait `backoff`, then send it again; `log` says whether to log this failure (at most one
    /// line every 10 s).
    Wait { backoff: Duration, log: bool },
}

/// The delivery state, without I/O: the backoff, the attempts on the current entry and the
/// failure log's rate. The shell sends, then reports each result with the time.
#[derive(Debug)]
pub struct Delivery {
    backoff: Duration,
    /// Attempts on the current entry (an immediate retry is part of its attempt).
    attempts: u32,
    retried_now: bool,
    refusals: u32,
    /// The current POST carries a batch (`panel_batch_max` > 1) of more than one entry.
    batch: bool,
    last_failure_log: Option<Instant>,
}

impl Default for Delivery {
    fn default() -> Delivery {
        Delivery {
            backoff: BACKOFF_MIN,
            attempts: 0,
            retried_now: false,
            refusals: 0,
            batch: false,
            last_failure_log: None,
        }
    }
}

impl Delivery {
    /// A new head entry, or a batch of several when `batch`: its attempts start again (the
    /// backoff does not: a panel that failed the previous entry is still being waited for).
    pub fn next_entry(&mut self, batch: bool) {
        self.attempts = 0;
        self.retried_now = false;
        self.refusals = 0;
        self.batch = batch;
    }

    /// The current entry's attempts so far.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// One attempt's result at `now`. `Err(Some(status))` is an HTTP answer other than 2xx,
    /// `Err(None)` no answer at all.
    pub fn attempted(&mut self, result: Result<(), Option<u16>>, now: Instant) -> Step {
        if result == Err(None) && self.attempts == 0 && !self.retried_now {
            self.retried_now = true;
            return Step::RetryNow;
        }
        self.attempts += 1;
        let status = match result {
            Ok(()) => {
                self.backoff = BACKOFF_MIN;
                return Step::Ack;
            }
            Err(status) => status,
        };
        if let Some(status) = status.filter(|s| refused_for_good(*s)) {
            if self.batch {
                return Step::Split;
            }
            self.refusals += 1;
            if self.refusals >= DEAD_AFTER {
                return Step::DeadLetter {
                    status,
                    attempts: self.attempts,
                };
            }
        }
        self.wait(now)
    }

    /// The entry is in the dead letters: the panel answers, so the next one goes at once.
    pub fn dead_lettered(&mut self) {
        self.backoff = BACKOFF_MIN;
    }

    /// A failure to wait out (also when the dead-letter write itself failed): the backoff to
    /// wait now; the one after doubles.
    pub fn wait(&mut self, now: Instant) -> Step {
        let log = self
            .last_failure_log
            .is_none_or(|t| now.saturating_duration_since(t) >= FAILURE_LOG_EVERY);
        if log {
            self.last_failure_log = Some(now);
        }
        let backoff = self.backoff;
        self.backoff = next_backoff(backoff);
        Step::Wait { backoff, log }
    }
}

/// The shell: the outbox's connection, the HTTP client and the signals.
pub struct Webhook {
    pub url: String,
    pub key: Vec<u8>,
    /// `panel_batch_max`: 1 posts JSON objects, more posts JSON arrays of up to this many.
    pub batch_max: usize,
    pub outbox: Outbox,
    pub metrics: Arc<Metrics>,
    pub committed: watch::Receiver<u64>,
    pub shutdown: watch::Receiver<bool>,
}

/// Whether the deliverer goes on, splits a refused batch, or stops (shutdown).
enum Flow {
    Next,
    Split,
    Stop,
}

struct Shell {
    client: reqwest::Client,
    url: String,
    key: Vec<u8>,
    outbox: Arc<Mutex<Outbox>>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
    delivery: Delivery,
    /// Delivered, not yet deleted from the outbox.
    acked: Vec<i64>,
    batch_max: usize,
    /// Entries up to this id go one per POST: their batch was refused for good.
    single_until: i64,
}

impl Webhook {
    pub async fn run(self) {
        // No redirects: a 3xx would re-post the body and its signature to another host, and
        // a 2xx there would mark delivered what the panel never got. A 3xx is a failure.
        let client = match reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the webhook HTTP client; panel notifications disabled");
                return;
            }
        };
        tracing::info!(url = %crate::config::masked_url(&self.url), "panel webhook enabled");
        let mut committed = self.committed;
        let mut shell = Shell {
            client,
            url: self.url,
            key: self.key,
            outbox: Arc::new(Mutex::new(self.outbox)),
            metrics: self.metrics,
            shutdown: self.shutdown,
            delivery: Delivery::default(),
            acked: Vec::new(),
            batch_max: self.batch_max,
            single_until: 0,
        };
        loop {
            if *shell.shutdown.borrow() {
                return;
            }
            committed.borrow_and_update();
            // At least one full POST's worth (panel_batch_max may exceed BATCH).
            let read = BATCH.max(shell.batch_max as u32);
            let pending = match blocking(&shell.outbox, move |o| o.pending(read)).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the outbox");
                    Vec::new()
                }
            };
            if pending.is_empty() {
                tokio::select! {
                    _ = committed.changed() => {}
                    _ = shell.shutdown.changed() => {}
                    _ = tokio::time::sleep(Duration::from_secs(5)) => {}
                }
                continue;
            }
            let mut rest = pending.as_slice();
            while let Some(first) = rest.first() {
                let n = if first.id <= shell.single_until {
                    1
                } else {
                    shell.batch_max.min(rest.len())
                };
                let (unit, after) = rest.split_at(n);
                match shell.deliver(unit).await {
                    Flow::Stop => return,
                    // Read the outbox again from the split batch on.
                    Flow::Split => break,
                    Flow::Next => rest = after,
                }
                // Acknowledgements are written as they accumulate, without reading the outbox
                // again for the rows already in hand.
                if shell.acked.len() >= ACK_EVERY {
                    shell.record_acks().await;
                }
                if *shell.shutdown.borrow() {
                    break;
                }
            }
            shell.record_acks().await;
        }
    }
}

impl Shell {
    /// The body of one POST: the entry itself, or with `panel_batch_max` > 1 an array.
    fn body(&self, unit: &[JournalRow]) -> serde_json::Result<Vec<u8>> {
        match unit {
            [entry] if self.batch_max == 1 => serde_json::to_vec(entry),
            entries => serde_json::to_vec(entries),
        }
    }

    /// Delivers one POST's entries until they are acknowledged or dead-lettered, the batch is
    /// split, or the master stops.
    async fn deliver(&mut self, unit: &[JournalRow]) -> Flow {
        let (Some(first), Some(last)) = (unit.first(), unit.last()) else {
            return Flow::Next;
        };
        let body = match self.body(unit) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, id = first.id, "cannot encode journal entries; skipped");
                self.acked.extend(unit.iter().map(|e| e.id));
                return Flow::Next;
            }
        };
        self.delivery.next_entry(unit.len() > 1);
        loop {
            let sent_at = Instant::now();
            let result = post(&self.client, &self.url, &self.key, last.id, &body).await;
            tracing::debug!(
                id = last.id,
                entries = unit.len(),
                attempt = self.delivery.attempts() + 1,
                took_us = sent_at.elapsed().as_micros() as u64,
                ok = result.is_ok(),
                "webhook attempt"
            );
            let reported = result.as_ref().map(|_| ()).map_err(Failure::status);
            let mut step = self.delivery.attempted(reported, Instant::now());
            match step {
                Step::Ack => {
                    self.metrics.webhook_deliveries.inc_by(unit.len() as u64);
                    let now = vmwatch_common::time::now_ms();
                    for e in unit {
                        let age = now.saturating_sub(e.received_at);
                        self.metrics.webhook_latency.observe(age as f64 / 1000.0);
                        self.acked.push(e.id);
                    }
                    return Flow::Next;
                }
                Step::RetryNow => continue,
                Step::Split => {
                    tracing::warn!(
                        first = first.id,
                        last = last.id,
                        "the panel refuses a batch for good; sending its entries one at a time"
                    );
                    self.single_until = last.id;
                    return Flow::Split;
                }
                Step::DeadLetter { .. } | Step::Wait { .. } => {}
            }
            self.metrics.webhook_failures.inc();
            // Save what was delivered before waiting or moving on.
            self.record_acks().await;
            if let Step::DeadLetter { status, attempts } = step {
                if self.dead_letter(first.id, status, attempts).await {
                    self.delivery.dead_lettered();
                    return Flow::Next;
                }
                // Retried after the backoff like any failed delivery.
                step = self.delivery.wait(Instant::now());
            }
            if let Step::Wait { backoff, log } = step {
                if log {
                    let error = result.err().map(|f| f.to_string()).unwrap_or_default();
                    tracing::warn!(
                        id = first.id,
                        error,
                        retry_in_s = backoff.as_secs(),
                        "panel webhook delivery failed (logged at most every 10 s)"
                    );
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = self.shutdown.changed() => return Flow::Stop,
                }
                if *self.shutdown.borrow() {
                    return Flow::Stop;
                }
            }
        }
    }

    /// Moves an entry to the dead letters; false when the write failed.
    async fn dead_letter(&mut self, id: i64, status: u16, attempts: u32) -> bool {
        let now = vmwatch_common::time::now_ms();
        match blocking(&self.outbox, move |o| {
            o.dead_letter(id, status, attempts, now)
        })
        .await
        {
            Ok(()) => {
                self.metrics.outbox_depth.dec();
                self.metrics.dead_letters.inc();
                tracing::error!(id, status, attempts, "the panel refuses this journal entry for good; moved to the dead letters (GET /api/v1/dead-letters), delivery goes on");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, id, "cannot move an entry to the dead letters");
                false
            }
        }
    }

    /// Deletes delivered entries from the outbox; on failure they will simply be sent again.
    async fn record_acks(&mut self) {
        if self.acked.is_empty() {
            return;
        }
        let ids = std::mem::take(&mut self.acked);
        let n = ids.len() as i64;
        match blocking(&self.outbox, move |o| o.ack(&ids)).await {
            Ok(()) => {
                self.metrics.outbox_depth.dec_by(n);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot record deliveries; they will be sent again");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Why one delivery attempt failed.
enum Failure {
    /// No HTTP answer (connection refused or reset, timeout).
    Transport(String),
    /// An answer other than 2xx; for a 3xx, the scheme and host it pointed at (never
    /// followed: it would re-post the signed body elsewhere).
    Status(u16, Option<String>),
}

impl Failure {
    /// The HTTP status, if the panel answered.
    fn status(&self) -> Option<u16> {
        match self {
            Failure::Transport(_) => None,
            Failure::Status(s, _) => Some(*s),
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Transport(e) => f.write_str(e),
            Failure::Status(s, None) => write!(f, "HTTP {s}"),
            Failure::Status(s, Some(to)) => write!(
                f,
                "HTTP {s}, redirect_to={to} not followed (the webhook follows no redirect: fix panel_url)"
            ),
        }
    }
}

/// One signed POST. `event_id` is the entry's id, or a batch's last id.
async fn post(
    client: &reqwest::Client,
    url: &str,
    key: &[u8],
    event_id: i64,
    body: &[u8],
) -> Result<(), Failure> {
    let response = client
        .post(url)
        .header("Content-Type", "application/json")
        .header("X-Vmwatch-Event-Id", event_id.to_string())
        .header("X-Vmwatch-Signature", signature(key, body))
        .body(body.to_vec())
        .send()
        .await
        // Without the URL: it may carry credentials or a token in its query.
        .map_err(|e| Failure::Transport(format!("{:#}", e.without_url())))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    // Logged with the other failures (at most every 10 s): scheme and host only.
    let redirect = status.is_redirection().then(|| {
        response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .and_then(|l| url::Url::parse(l).ok())
            .map(|u| format!("{}://{}", u.scheme(), u.host_str().unwrap_or("")))
            .unwrap_or_else(|| "(relative or none)".into())
    });
    Err(Failure::Status(status.as_u16(), redirect))
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

    /// A panel that is down: one immediate retry (a closed keep-alive), then backoffs that
    /// double, logged at most every 10 s; success resets the backoff for the next failure.
    #[test]
    fn a_panel_that_is_down_is_retried_with_a_doubling_backoff() {
        let t0 = Instant::now();
        let mut d = Delivery::default();
        d.next_entry(false);
        assert_eq!(d.attempted(Err(None), t0), Step::RetryNow);
        let wait = |backoff, log| Step::Wait {
            backoff: Duration::from_secs(backoff),
            log,
        };
        assert_eq!(d.attempted(Err(None), t0), wait(1, true));
        assert_eq!(
            d.attempted(Err(None), t0 + Duration::from_secs(1)),
            wait(2, false)
        );
        assert_eq!(
            d.attempted(Err(Some(503)), t0 + Duration::from_secs(3)),
            wait(4, false)
        );
        assert_eq!(
            d.attempted(Err(None), t0 + Duration::from_secs(10)),
            wait(8, true)
        );
        assert_eq!(d.attempts(), 4);
        assert_eq!(d.attempted(Ok(()), t0 + Duration::from_secs(18)), Step::Ack);
        // The next entry: no immediate retry is owed to a panel that answered, but a first
        // transport failure still gets one; the backoff starts at 1 s again.
        d.next_entry(false);
        assert_eq!(
            d.attempted(Err(None), t0 + Duration::from_secs(30)),
            Step::RetryNow
        );
        assert_eq!(
            d.attempted(Err(None), t0 + Duration::from_secs(30)),
            wait(1, true)
        );
    }

    /// Three refusals for good (a 4xx but 408/425/429) dead-letter an entry; other failures in
    /// between do not count toward them.
    #[test]
    fn an_entry_refused_three_times_is_dead_lettered() {
        let t0 = Instant::now();
        let mut d = Delivery::default();
        d.next_entry(false);
        assert!(matches!(d.attempted(Err(Some(422)), t0), Step::Wait { .. }));
        assert!(matches!(d.attempted(Err(Some(429)), t0), Step::Wait { .. }));
        assert!(matches!(d.attempted(Err(Some(500)), t0), Step::Wait { .. }));
        assert!(matches!(d.attempted(Err(Some(400)), t0), Step::Wait { .. }));
        assert_eq!(
            d.attempted(Err(Some(422)), t0),
            Step::DeadLetter {
                status: 422,
                attempts: 5
            }
        );
        // The dead-letter write failed: waited out like any failure, with the grown backoff.
        assert_eq!(
            d.wait(t0),
            Step::Wait {
                backoff: Duration::from_secs(16),
                log: false
            }
        );
        d.dead_lettered();
        d.next_entry(false);
        assert_eq!(
            d.attempted(Err(Some(500)), t0),
            Step::Wait {
                backoff: Duration::from_secs(1),
                log: false
            }
        );
    }

    /// A batch the panel refuses for good is split at once (no entry of it is dead-lettered
    /// for another's fault); a batch that fails otherwise waits like a single entry.
    #[test]
    fn a_batch_refused_for_good_is_split() {
        let t0 = Instant::now();
        let mut d = Delivery::default();
        d.next_entry(true);
        assert!(matches!(d.attempted(Err(Some(503)), t0), Step::Wait { .. }));
        assert_eq!(d.attempted(Err(Some(422)), t0), Step::Split);
        d.next_entry(false);
        assert!(matches!(d.attempted(Err(Some(422)), t0), Step::Wait { .. }));
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
