//! The event bus (the CloudStack/Mold pattern): every journal entry, in journal order, published
//! to a durable topic exchange on an AMQP 0-9-1 broker (RabbitMQ) with publisher confirms.
//!
//! It runs as one async task with its own database connection and a durable cursor (the last
//! journal id the broker confirmed). A broker that is down or slow delays nothing but this task:
//! ingestion never waits for it, and retention keeps every entry after the cursor. Delivery is
//! at-least-once: entries published but not yet confirmed when the connection or the master
//! dies are published again, with the same `message_id`.
//!
//! The decisions (routing key, how far a window's confirms move the cursor, the reconnection
//! backoff) are plain functions here; the shell below only does the I/O.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::watch;

use crate::blocking::blocking;
use crate::config::BusUrl;
use crate::metrics::Metrics;
use crate::store::{BusCursor, JournalRow};

/// Entries published before waiting for their confirms.
pub const WINDOW: u32 = 1024;
const RECONNECT_MIN: Duration = Duration::from_secs(1);
const RECONNECT_MAX: Duration = Duration::from_secs(30);
/// A confirm that takes longer counts as a lost connection: the window is published again.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection attempt that takes longer fails.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A failing broker is logged at most this often.
const FAILURE_LOG_EVERY: Duration = Duration::from_secs(10);
/// While nothing is new, the connection is checked this often (and the lag refreshed).
const IDLE_CHECK: Duration = Duration::from_secs(1);
/// The longest routing key AMQP carries.
const MAX_KEY: usize = 255;

/// `vmwatch.<type>.<event>.<node_id>`, each part with its dots as `-`, so that each part is one
/// word of a binding (`vmwatch.lifecycle.#`, `vmwatch.*.*.hv-01`). Cut to 255 bytes (never
/// reached with the documented bounds).
pub fn routing_key(kind: &str, event: &str, node_id: &str) -> String {
    let mut key = String::with_capacity(16 + kind.len() + event.len() + node_id.len());
    key.push_str("vmwatch");
    for part in [kind, event, node_id] {
        key.push('.');
        key.extend(part.chars().map(|c| if c == '.' { '-' } else { c }));
    }
    if key.len() > MAX_KEY {
        let mut end = MAX_KEY;
        while !key.is_char_boundary(end) {
            end -= 1;
        }
        key.truncate(end);
    }
    key
}

/// The confirms of one window, in publishing order (`true` = ack): the id the cursor moves to
/// (the last of the leading run of acks), and whether every entry was acked. After a nack the
/// window is published again from the first refused entry, so nothing after a gap is skipped.
pub fn confirmed_prefix(ids: &[i64], acked: &[bool]) -> (Option<i64>, bool) {
    let run = acked.iter().take_while(|a| **a).count();
    let upto = run.checked_sub(1).and_then(|i| ids.get(i)).copied();
    (upto, run == ids.len())
}

/// The reconnection state, without I/O: the backoff (1 s doubling to 30 s, back to 1 s once a
/// connection is made) and the failure log's rate.
#[derive(Debug)]
pub struct Reconnect {
    backoff: Duration,
    last_log: Option<Instant>,
}

impl Default for Reconnect {
    fn default() -> Reconnect {
        Reconnect {
            backoff: RECONNECT_MIN,
            last_log: None,
        }
    }
}

impl Reconnect {
    /// A connection failed or was lost at `now`: how long to wait, and whether to log it.
    pub fn failed(&mut self, now: Instant) -> (Duration, bool) {
        let log = self
            .last_log
            .is_none_or(|t| now.saturating_duration_since(t) >= FAILURE_LOG_EVERY);
        if log {
            self.last_log = Some(now);
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(RECONNECT_MAX);
        (wait, log)
    }

    /// A connection is up: the next failure waits the shortest backoff again, and is logged.
    pub fn connected(&mut self) {
        self.backoff = RECONNECT_MIN;
        self.last_log = None;
    }
}

/// The shell: the cursor's connection, the broker connection and the signals.
pub struct Bus {
    pub url: BusUrl,
    pub exchange: String,
    pub cursor: BusCursor,
    pub metrics: Arc<Metrics>,
    pub committed: watch::Receiver<u64>,
    pub shutdown: watch::Receiver<bool>,
}

/// Why publishing stopped.
enum Stopped {
    /// The master is stopping.
    Shutdown,
    /// The connection is gone or refused something: reconnect.
    Lost(String),
}

struct Shell {
    url: BusUrl,
    exchange: ShortString,
    cursor: Arc<Mutex<BusCursor>>,
    metrics: Arc<Metrics>,
    committed: watch::Receiver<u64>,
    shutdown: watch::Receiver<bool>,
    /// The last journal id the broker confirmed, as stored.
    position: i64,
}

impl Bus {
    pub async fn run(self) {
        let mut shell = Shell {
            url: self.url,
            exchange: ShortString::from(self.exchange),
            cursor: Arc::new(Mutex::new(self.cursor)),
            metrics: self.metrics,
            committed: self.committed,
            shutdown: self.shutdown,
            position: 0,
        };
        loop {
            match blocking(&shell.cursor, |c| c.position()).await {
                Ok(p) => {
                    shell.position = p;
                    break;
                }
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the bus cursor; retrying in 1 s");
                    if shell.pause(Duration::from_secs(1)).await {
                        return;
                    }
                }
            }
        }
        tracing::info!(url = %shell.url, exchange = %shell.exchange, after = shell.position, "event bus enabled");
        let mut reconnect = Reconnect::default();
        loop {
            if *shell.shutdown.borrow() {
                return;
            }
            let why = match shell.connect().await {
                Ok((connection, channel)) => {
                    reconnect.connected();
                    shell.metrics.bus_up.set(1);
                    tracing::info!(url = %shell.url, exchange = %shell.exchange, "connected to the event bus");
                    let stopped = shell.publish(&channel).await;
                    shell.metrics.bus_up.set(0);
                    shell.metrics.bus_in_flight.set(0);
                    // Best effort: a dead connection fails at once, a live one says goodbye.
                    let _ = tokio::time::timeout(
                        Duration::from_millis(500),
                        connection.close(200, "vmwatch-master: reconnecting or stopping".into()),
                    )
                    .await;
                    match stopped {
                        Stopped::Shutdown => return,
                        Stopped::Lost(why) => why,
                    }
                }
                Err(why) => why,
            };
            shell.metrics.bus_failures.inc();
            let (wait, log) = reconnect.failed(Instant::now());
            if log {
                tracing::warn!(url = %shell.url, error = %why, retry_in_s = wait.as_secs(), after = shell.position, "event bus unavailable; journal entries wait in the database (logged at most every 10 s)");
            }
            if shell.pause(wait).await {
                return;
            }
        }
    }
}

impl Shell {
    /// Waits `wait`, refreshing the lag every second; true if the master is stopping.
    async fn pause(&mut self, wait: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if *self.shutdown.borrow() {
                return true;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return false;
            }
            self.refresh_lag().await;
            tokio::select! {
                _ = tokio::time::sleep_until(deadline.min(now + IDLE_CHECK)) => {}
                _ = self.shutdown.changed() => {}
            }
        }
    }

    async fn refresh_lag(&mut self) {
        if let Ok(end) = blocking(&self.cursor, |c| c.journal_end()).await {
            self.metrics.bus_lag.set(end.saturating_sub(self.position));
        }
    }

    /// A connection with a confirming channel, and the exchange declared.
    async fn connect(&self) -> Result<(Connection, Channel), String> {
        let properties = ConnectionProperties::default()
            .with_connection_name(format!("vmwatch-master {}", vmwatch_common::VERSION).into());
        let connection = tokio::time::timeout(
            CONNECT_TIMEOUT,
            Connection::connect_uri(self.url.uri().clone(), properties),
        )
        .await
        .map_err(|_| format!("no connection within {} s", CONNECT_TIMEOUT.as_secs()))?
        .map_err(|e| format!("cannot connect: {e}"))?;
        let setup = async {
            let channel = connection.create_channel().await?;
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await?;
            channel
                .exchange_declare(
                    self.exchange.clone(),
                    ExchangeKind::Topic,
                    ExchangeDeclareOptions {
                        durable: true,
                        ..ExchangeDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            Ok::<_, lapin::Error>(channel)
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, setup).await {
            Ok(Ok(channel)) => Ok((connection, channel)),
            Ok(Err(e)) => Err(format!("cannot set up the channel and the exchange: {e}")),
            Err(_) => Err("the channel and the exchange were not set up in time".into()),
        }
    }

    /// Publishes windows of entries after the cursor until the connection is lost or the
    /// master stops; the cursor moves once the broker confirmed.
    async fn publish(&mut self, channel: &Channel) -> Stopped {
        loop {
            if *self.shutdown.borrow() {
                return Stopped::Shutdown;
            }
            self.committed.borrow_and_update();
            let after = self.position;
            let read = blocking(&self.cursor, move |c| {
                Ok((c.after(after, WINDOW)?, c.journal_end()?))
            })
            .await;
            let (rows, end) = match read {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(error = %e, "cannot read the journal for the event bus; retrying in 1 s");
                    if self.pause(Duration::from_secs(1)).await {
                        return Stopped::Shutdown;
                    }
                    continue;
                }
            };
            self.metrics.bus_lag.set(end.saturating_sub(after));
            if rows.is_empty() {
                tokio::select! {
                    _ = self.committed.changed() => {}
                    _ = self.shutdown.changed() => {}
                    _ = tokio::time::sleep(IDLE_CHECK) => {}
                }
                if !channel.status().connected() {
                    return Stopped::Lost("the connection to the broker closed".into());
                }
                continue;
            }
            match self.window(channel, &rows).await {
                Ok(true) => {}
                Ok(false) => {
                    // Refused (nack): the broker could not store it; try again shortly.
                    self.metrics.bus_failures.inc();
                    if self.pause(Duration::from_secs(1)).await {
                        return Stopped::Shutdown;
                    }
                }
                Err(stopped) => return stopped,
            }
            self.metrics.bus_lag.set(end.saturating_sub(self.position));
        }
    }

    /// Publishes one window and waits for its confirms; moves the cursor over the leading
    /// acks. `Ok(false)` when the broker refused one (nack).
    async fn window(&mut self, channel: &Channel, rows: &[JournalRow]) -> Result<bool, Stopped> {
        let started = Instant::now();
        // A broker that stops reading (frozen, its buffers full) must not hold the task
        // forever: publishing a window gets the confirm timeout too, and yields to shutdown.
        let exchange = self.exchange.clone();
        let publishing = async {
            let mut confirms = Vec::with_capacity(rows.len());
            for row in rows {
                let body = serde_json::to_vec(row)
                    .map_err(|e| format!("cannot encode entry {}: {e}", row.id))?;
                let properties = BasicProperties::default()
                    .with_delivery_mode(2)
                    .with_content_type("application/json".into())
                    .with_message_id(row.id.to_string().into())
                    .with_timestamp(row.received_at / 1000)
                    .with_app_id("vmwatch-master".into());
                let key = routing_key(&row.kind, &row.event, &row.node_id);
                let confirm = channel
                    .basic_publish(
                        exchange.clone(),
                        key.into(),
                        BasicPublishOptions::default(),
                        &body,
                        properties,
                    )
                    .await
                    .map_err(|e| format!("cannot publish: {e}"))?;
                confirms.push(confirm);
            }
            Ok::<_, String>(confirms)
        };
        let confirms = tokio::select! {
            published = tokio::time::timeout(CONFIRM_TIMEOUT, publishing) => match published {
                Ok(Ok(confirms)) => confirms,
                Ok(Err(why)) => return Err(Stopped::Lost(why)),
                Err(_) => {
                    return Err(Stopped::Lost(format!(
                        "the broker took no publish within {} s",
                        CONFIRM_TIMEOUT.as_secs()
                    )))
                }
            },
            _ = self.shutdown.changed() => return Err(Stopped::Shutdown),
        };
        self.metrics.bus_in_flight.set(confirms.len() as i64);
        let mut acked = Vec::with_capacity(confirms.len());
        let mut lost = None;
        for confirm in confirms {
            let answer = tokio::select! {
                a = tokio::time::timeout(CONFIRM_TIMEOUT, confirm) => a,
                _ = self.shutdown.changed() => {
                    // Unconfirmed entries stay after the cursor: published again next start.
                    self.advance(rows, &acked).await;
                    return Err(Stopped::Shutdown);
                }
            };
            match answer {
                Ok(Ok(c)) => {
                    self.metrics
                        .bus_confirm
                        .observe(started.elapsed().as_secs_f64());
                    acked.push(c.is_ack());
                }
                Ok(Err(e)) => {
                    lost = Some(format!("lost the confirm: {e}"));
                    break;
                }
                Err(_) => {
                    lost = Some(format!("no confirm within {} s", CONFIRM_TIMEOUT.as_secs()));
                    break;
                }
            }
        }
        self.metrics.bus_in_flight.set(0);
        let all = self.advance(rows, &acked).await;
        match lost {
            Some(why) => Err(Stopped::Lost(why)),
            None => {
                if !all {
                    let refused = rows.get(acked.iter().take_while(|a| **a).count());
                    tracing::warn!(
                        id = refused.map(|r| r.id),
                        "the broker refused a journal entry (nack); publishing again from it"
                    );
                }
                Ok(all)
            }
        }
    }

    /// Moves the cursor over the leading acks of `rows`; whether all of them were acked.
    async fn advance(&mut self, rows: &[JournalRow], acked: &[bool]) -> bool {
        let ids: Vec<i64> = rows.iter().take(acked.len()).map(|r| r.id).collect();
        let (upto, all) = confirmed_prefix(&ids, acked);
        let Some(upto) = upto else {
            return all && acked.len() == rows.len();
        };
        match blocking(&self.cursor, move |c| c.advance(upto)).await {
            Ok(()) => {
                let n = ids.iter().take_while(|id| **id <= upto).count();
                self.metrics.bus_published.inc_by(n as u64);
                self.position = upto;
            }
            // The entries stay after the cursor and are published again: at-least-once.
            Err(e) => {
                tracing::error!(error = %e, "cannot move the bus cursor; the entries will be published again")
            }
        }
        all && acked.len() == rows.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_keys_have_one_word_per_part() {
        assert_eq!(
            routing_key("lifecycle", "started", "hv-01"),
            "vmwatch.lifecycle.started.hv-01"
        );
        assert_eq!(
            routing_key("node", "down", "hv1.dc2.example"),
            "vmwatch.node.down.hv1-dc2-example"
        );
        assert_eq!(
            routing_key("lifecycle", "unknown-x.y", "n"),
            "vmwatch.lifecycle.unknown-x-y.n"
        );
        let long = routing_key("lifecycle", &"é".repeat(200), "n");
        assert!(long.len() <= 255 && long.starts_with("vmwatch.lifecycle.é"));
    }

    #[test]
    fn the_cursor_moves_over_the_leading_acks_only() {
        let ids = [5, 6, 7, 8];
        assert_eq!(confirmed_prefix(&ids, &[true; 4]), (Some(8), true));
        assert_eq!(
            confirmed_prefix(&ids, &[true, true, false, true]),
            (Some(6), false)
        );
        assert_eq!(
            confirmed_prefix(&ids, &[false, true, true, true]),
            (None, false)
        );
        assert_eq!(confirmed_prefix(&ids[..2], &[true, true]), (Some(6), true));
        assert_eq!(confirmed_prefix(&[], &[]), (None, true));
    }

    #[test]
    fn reconnection_backs_off_to_30_s_and_resets_on_connect() {
        let t0 = Instant::now();
        let mut r = Reconnect::default();
        let secs = |(d, log): (Duration, bool)| (d.as_secs(), log);
        assert_eq!(secs(r.failed(t0)), (1, true));
        assert_eq!(secs(r.failed(t0 + Duration::from_secs(1))), (2, false));
        let mut waits = vec![];
        for i in 0..6 {
            waits.push(r.failed(t0 + Duration::from_secs(3 + i)).0.as_secs());
        }
        assert_eq!(waits, [4, 8, 16, 30, 30, 30]);
        assert!(
            r.failed(t0 + Duration::from_secs(20)).1,
            "logged again after 10 s"
        );
        r.connected();
        assert_eq!(secs(r.failed(t0 + Duration::from_secs(21))), (1, true));
    }
}
