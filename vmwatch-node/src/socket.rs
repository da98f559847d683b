//! The ZeroMQ PUSH socket to the master (CURVE client), as a thin adapter for the core's queue.
//!
//! libzmq queues up to `send_queue` (SNDHWM) messages while the master is unreachable and
//! reconnects by itself; past that [`PushSocket::try_send`] says [`Transmit::Full`] and the
//! message waits in the core's queue.

use std::time::Duration;

use crate::builder::Outgoing;
use crate::config::CurveClient;
use crate::core::Transmit;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot set up the ZeroMQ socket for {endpoint}: {source}")]
pub struct SocketError {
    endpoint: String,
    source: zmq::Error,
}

/// The PUSH socket and its context. Field order matters: the socket closes before the context
/// terminates.
pub struct PushSocket {
    socket: zmq::Socket,
    _ctx: zmq::Context,
}

impl PushSocket {
    /// Creates the socket and connects it (libzmq connects in the background).
    pub fn connect(
        endpoint: &str,
        send_queue: i32,
        curve: &CurveClient,
    ) -> Result<PushSocket, SocketError> {
        let ctx = zmq::Context::new();
        let setup = || -> Result<zmq::Socket, zmq::Error> {
            let socket = ctx.socket(zmq::PUSH)?;
            socket.set_curve_serverkey(&curve.master_public)?;
            socket.set_curve_publickey(&curve.transport.public)?;
            socket.set_curve_secretkey(&curve.transport.secret)?;
            socket.set_sndhwm(send_queue)?;
            socket.set_linger(0)?;
            socket.set_reconnect_ivl(100)?;
            socket.set_reconnect_ivl_max(5_000)?;
            socket.set_tcp_keepalive(1)?;
            // A master that vanished without a FIN is noticed within about a minute and
            // redialled. (Not ZMTP heartbeats: a master pushing back stops reading, PONGs too.)
            socket.set_tcp_keepalive_idle(30)?;
            socket.set_tcp_keepalive_intvl(10)?;
            socket.set_tcp_keepalive_cnt(3)?;
            socket.connect(endpoint)?;
            Ok(socket)
        };
        let socket = setup().map_err(|source| SocketError {
            endpoint: endpoint.to_owned(),
            source,
        })?;
        Ok(PushSocket { socket, _ctx: ctx })
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
