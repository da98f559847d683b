//! The ZeroMQ PUSH socket to the master (CURVE client), as a thin adapter for the core's queue.
//!
//! libzmq queues up to `send_queue` (SNDHWM) messages while the master is unreachable and
//! reconnects by itself; past that [`PushSocket::try_send`] says [`Transmit::Full`] and the
//! message waits in the core's queue.

use std::time::{Duration, Instant};

use crate::builder::Outgoing;
use crate::config::CurveClient;
use crate::core::{Backoff, Transmit};

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the ZeroMQ socket for {endpoint}: {source}")]
pub struct SocketError {
    endpoint: String,
    source: zmq::Error,
}

/// The PUSH socket and its context. Field order matters: the sockets close before the context
/// terminates.
pub struct PushSocket {
    socket: zmq::Socket,
    /// The socket's monitor: handshake failures, which libzmq never retries by itself.
    monitor: zmq::Socket,
    /// Every master's endpoint (one, or the masters of a high-availability group) and when to
    /// dial it again after a refused handshake.
    endpoints: Vec<(String, Redial)>,
    /// What the node's keys are, for the line that explains a refused handshake.
    key_source: crate::config::KeySource,
    _ctx: zmq::Context,
}

const MONITOR_ENDPOINT: &str = "inproc://vmwatch-node-push-monitor";

/// When to dial again after a refused handshake (pure): libzmq gives up on an endpoint whose
/// handshake the master refused (a node not yet enrolled, revoked, or with wrong keys), so the
/// node reconnects itself, 1 s doubling to 60 s, reset by a handshake that succeeds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Redial {
    pub at: Option<Instant>,
    pub backoff: Backoff,
}

impl Redial {
    pub fn new() -> Redial {
        Redial {
            at: None,
            backoff: Backoff::between(Duration::from_secs(1), Duration::from_secs(60)),
        }
    }

    /// A handshake was refused at `now`: dial again after the backoff, which then doubles.
    pub fn refused(&mut self, now: Instant) -> Duration {
        let wait = self.backoff.next_delay();
        self.at.get_or_insert(now + wait);
        wait
    }

    pub fn succeeded(&mut self) {
        self.at = None;
        self.backoff.reset();
    }

    /// Whether to dial now (once per refusal).
    pub fn due(&mut self, now: Instant) -> bool {
        match self.at {
            Some(t) if now >= t => {
                self.at = None;
                true
            }
            _ => false,
        }
    }
}

impl Default for Redial {
    fn default() -> Redial {
        Redial::new()
    }
}

impl PushSocket {
    /// Creates the socket and connects it to each of the comma-separated `endpoints` (libzmq
    /// connects in the background). With several, `ZMQ_IMMEDIATE`: messages queue only on a
    /// completed connection, so none wait for a standby that does not listen (SPEC §13).
    pub fn connect(
        endpoints: &str,
        send_queue: i32,
        curve: &CurveClient,
    ) -> Result<PushSocket, SocketError> {
        let ctx = zmq::Context::new();
        let list: Vec<&str> = endpoints.split(',').filter(|e| !e.is_empty()).collect();
        let setup = || -> Result<(zmq::Socket, zmq::Socket), zmq::Error> {
            let socket = ctx.socket(zmq::PUSH)?;
            socket.set_curve_serverkey(&curve.master_public)?;
            socket.set_curve_publickey(&curve.transport.public)?;
            socket.set_curve_secretkey(&curve.transport.secret)?;
            socket.set_sndhwm(send_queue)?;
            socket.set_linger(0)?;
            socket.set_immediate(list.len() > 1)?;
            socket.set_reconnect_ivl(100)?;
            // With several masters, a standby's refused port is tried every 0.5 s at most, so
            // the node reaches a new leader well within SPEC §13's lease + 2 s.
            socket.set_reconnect_ivl_max(if list.len() > 1 { 500 } else { 5_000 })?;
            if list.len() > 1 {
                // A master that froze (a paused old leader) would take its share of the
                // round robin into a pipe nobody reads: ZMTP heartbeats close such a connection
                // within 5 s. (Not with one master: its push-back must not cost the connection.)
                socket.set_heartbeat_ivl(1_000)?;
                socket.set_heartbeat_timeout(5_000)?;
                socket.set_heartbeat_ttl(10_000)?;
            }
            socket.set_tcp_keepalive(1)?;
            // A master that vanished without a FIN is noticed within about a minute and
            // redialled. (Not ZMTP heartbeats: a master pushing back stops reading, PONGs too.)
            socket.set_tcp_keepalive_idle(30)?;
            socket.set_tcp_keepalive_intvl(10)?;
            socket.set_tcp_keepalive_cnt(3)?;
            socket.monitor(
                MONITOR_ENDPOINT,
                (zmq::SocketEvent::HANDSHAKE_SUCCEEDED as i32)
                    | (zmq::SocketEvent::DISCONNECTED as i32)
                    | (zmq::SocketEvent::HANDSHAKE_FAILED_NO_DETAIL as i32)
                    | (zmq::SocketEvent::HANDSHAKE_FAILED_PROTOCOL as i32)
                    | (zmq::SocketEvent::HANDSHAKE_FAILED_AUTH as i32),
            )?;
            let monitor = ctx.socket(zmq::PAIR)?;
            monitor.connect(MONITOR_ENDPOINT)?;
            for endpoint in &list {
                socket.connect(endpoint)?;
            }
            Ok((socket, monitor))
        };
        let (socket, monitor) = setup().map_err(|source| SocketError {
            endpoint: endpoints.to_owned(),
            source,
        })?;
        Ok(PushSocket {
            socket,
            monitor,
            endpoints: list
                .iter()
                .map(|e| (e.to_string(), Redial::new()))
                .collect(),
            key_source: curve.source,
            _ctx: ctx,
        })
    }

    /// Reads the socket's handshake events and dials again when a refused handshake's backoff
    /// ran out. Call it every turn. Returns whether a handshake succeeded since the last call
    /// (with any master: each newly completed connection gets a fresh snapshot).
    pub fn service(&mut self, now: Instant) -> bool {
        let mut connected = false;
        while let Ok(frames) = self.monitor.recv_multipart(zmq::DONTWAIT) {
            let Some(head) = frames.first().filter(|h| h.len() >= 6) else {
                continue;
            };
            let event = u16::from_ne_bytes([head[0], head[1]]);
            let is = |e: zmq::SocketEvent| event == e as u16;
            // The event's second frame names the endpoint; with one endpoint it is that one.
            let address = frames
                .get(1)
                .map(|a| String::from_utf8_lossy(a).into_owned());
            let single = self.endpoints.len() == 1;
            let Some((endpoint, redial)) = self
                .endpoints
                .iter_mut()
                .find(|(e, _)| single || address.as_deref() == Some(e.as_str()))
            else {
                continue;
            };
            if is(zmq::SocketEvent::DISCONNECTED) {
                // With several masters, what was queued on the lost connection is gone while
                // the others stay up: send a fresh snapshot through them (with one master, the
                // reconnection's handshake does it).
                if !single {
                    tracing::info!(endpoint = %endpoint, "connection to a master lost; sending a fresh snapshot through the others");
                    connected = true;
                }
                continue;
            }
            if is(zmq::SocketEvent::HANDSHAKE_SUCCEEDED) {
                connected = true;
                if redial.backoff.grown() {
                    tracing::info!(endpoint = %endpoint, "CURVE handshake with the master succeeded");
                }
                redial.succeeded();
                continue;
            }
            let wait = redial.refused(now);
            let cause = if is(zmq::SocketEvent::HANDSHAKE_FAILED_AUTH) {
                match self.key_source {
                    crate::config::KeySource::NodeKey => "the master refused this node's key: it is not enrolled there (run `vmwatch-master enroll NODE_ID` or the enrollment API), it was revoked, or node_key/master_key are not the ones the master printed",
                    crate::config::KeySource::FleetKey => "the master refused the fleet transport_key: it runs with allow_fleet_transport=no; enroll this node and configure its node_key",
                    crate::config::KeySource::DerivedFromSecret => "the master refused keys derived from `secret`: that works only with node_keys=shared on an enrolled node; write the lines `vmwatch-master enroll NODE_ID` prints",
                }
            } else {
                "the CURVE handshake failed: master_key is probably not this master's public key (compare it with what `vmwatch-master enroll NODE_ID` prints), or the endpoint is not a vmwatch master"
            };
            tracing::error!(endpoint = %endpoint, retry_in_s = wait.as_secs(), "cannot connect to the master: {cause}");
        }
        for (endpoint, redial) in &mut self.endpoints {
            if redial.due(now) {
                // libzmq gave this endpoint up; connecting again starts a new attempt.
                let _ = self.socket.disconnect(endpoint);
                if let Err(e) = self.socket.connect(endpoint) {
                    tracing::error!(endpoint = %endpoint, error = %e, "cannot dial the master again");
                }
            }
        }
        connected
    }

    /// Hands one message to libzmq without blocking.
    pub fn try_send(&self, m: &Outgoing) -> Transmit {
        match self.socket.send_multipart(m.frames.iter(), zmq::DONTWAIT) {
            Ok(()) => Transmit::Sent,
            Err(zmq::Error::EAGAIN) => Transmit::Full,
            Err(e) => Transmit::Failed(e.to_string()),
        }
    }

    /// Closes the socket, letting libzmq flush what it holds for at most `linger`.
    pub fn close(self, linger: Duration) {
        let _ = self.socket.set_linger(linger.as_millis() as i32);
        // Dropping the socket, then the context (field order), waits at most `linger`.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redial_backs_off_and_resets() {
        let t0 = Instant::now();
        let mut r = Redial::new();
        assert!(!r.due(t0));
        assert_eq!(r.refused(t0), Duration::from_secs(1));
        assert!(!r.due(t0));
        assert!(r.due(t0 + Duration::from_secs(1)));
        assert!(!r.due(t0 + Duration::from_secs(2)));
        assert_eq!(r.refused(t0), Duration::from_secs(2));
        for _ in 0..10 {
            r.refused(t0);
        }
        assert_eq!(r.refused(t0), Duration::from_secs(60));
        r.succeeded();
        assert_eq!(r, Redial::new());
    }
}
