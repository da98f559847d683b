//! The ZeroMQ PULL socket, in a thread of its own: receive, authenticate, hand over.
//!
//! libzmq enforces `ZMQ_MAXMSGSIZE` per frame; this thread keeps at most five frames of any
//! message (more is already a `frame_count` rejection), so neither size nor frame count can
//! make it allocate without bound. Authentication (frames, node id, HMAC) happens here; the
//! stateful checks happen in the core thread. Accepted messages go to the core through a
//! bounded channel, so a slow disk pushes back into libzmq's queues rather than into memory.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::SyncSender;
use std::sync::Arc;
use std::thread::JoinHandle;

use vmwatch_common::protocol::{authenticate, Authenticated};

use crate::config::MasterConfig;
use crate::metrics::{Metrics, RejectLog};

/// What the ingest thread hands to the core.
pub struct Received {
    pub message: Authenticated,
}

/// Binds the PULL socket (before anything else starts, so a busy port fails at once).
pub fn bind(config: &MasterConfig) -> Result<(zmq::Context, zmq::Socket), String> {
    let ctx = zmq::Context::new();
    let socket = ctx
        .socket(zmq::PULL)
        .map_err(|e| format!("zmq socket: {e}"))?;
    let setup = || -> Result<(), zmq::Error> {
        socket.set_maxmsgsize(config.max_message_bytes)?;
        socket.set_rcvhwm(100_000)?;
        socket.set_linger(0)?;
        socket.set_tcp_keepalive(1)?;
        socket.set_tcp_keepalive_idle(60)?;
        Ok(())
    };
    setup().map_err(|e| format!("cannot configure the ZeroMQ socket: {e}"))?;
    socket
        .bind(&config.listen)
        .map_err(|e| format!("cannot listen on {}: {e}", config.listen))?;
    Ok((ctx, socket))
}

pub fn spawn(
    ctx: zmq::Context,
    socket: zmq::Socket,
    config: Arc<MasterConfig>,
    to_core: SyncSender<Received>,
    metrics: Arc<Metrics>,
    reject_log: Arc<RejectLog>,
    stop: Arc<AtomicBool>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("zmq-pull".into())
        .spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match socket.poll(zmq::POLLIN, 200) {
                    Ok(0) => continue,
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "zmq poll failed");
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        continue;
                    }
                }
                // Drain everything ready, one message at a time.
                loop {
                    let frames = match receive(&socket) {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "zmq receive failed");
                            break;
                        }
                    };
                    match authenticate(&frames, |n| config.key_for(n)) {
                        Ok(message) => {
                            if to_core.send(Received { message }).is_err() {
                                return; // the core has stopped
                            }
                        }
                        Err(r) => {
                            metrics.count_reject(r.reason);
                            reject_log.log(&r);
                        }
                    }
                }
            }
            drop(socket);
            drop(ctx);
        })
}

/// One whole multipart message, keeping at most five frames; `None` when nothing is ready.
fn receive(socket: &zmq::Socket) -> Result<Option<Vec<Vec<u8>>>, zmq::Error> {
    let mut frames = Vec::with_capacity(4);
    let mut extra = 0usize;
    loop {
        let part = match socket.recv_bytes(if frames.is_empty() && extra == 0 {
            zmq::DONTWAIT
        } else {
            0
        }) {
            Ok(p) => p,
            Err(zmq::Error::EAGAIN) if frames.is_empty() && extra == 0 => return Ok(None),
            Err(e) => return Err(e),
        };
        if frames.len() < 5 {
            frames.push(part);
        } else {
            extra += 1;
        }
        if !socket.get_rcvmore()? {
            return Ok(Some(frames));
        }
    }
}
