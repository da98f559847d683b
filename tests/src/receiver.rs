//! A real HTTP server standing in for the control panel: records every webhook POST and checks
//! its signature. It can be stopped (connections refused) and started again on the same port.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// One request the panel received.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// `X-Vmwatch-Event-Id`.
    pub event_id: i64,
    pub body: Value,
    /// The signature header matched the body under the panel key.
    pub signature_ok: bool,
    /// Unix ms when the request was received.
    pub at_ms: u64,
    /// Entries in the POST that carried this one (`panel_batch_max` > 1 posts arrays; then
    /// each entry is recorded on its own, `event_id` from its body).
    pub post_size: usize,
}

pub struct PanelReceiver {
    pub port: u16,
    key: Vec<u8>,
    pub deliveries: Arc<Mutex<Vec<Delivery>>>,
    /// Entries whose `name` is listed here are answered 413 (refused for good), not recorded.
    pub refuse_names: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PanelReceiver {
    /// Listens on 127.0.0.1 (port 0: any free one).
    pub fn start(port: u16, key: &[u8]) -> std::io::Result<PanelReceiver> {
        let mut r = PanelReceiver {
            port,
            key: key.to_vec(),
            deliveries: Arc::new(Mutex::new(Vec::new())),
            refuse_names: Arc::new(Mutex::new(Vec::new())),
            stop: Arc::new(AtomicBool::new(false)),
            thread: None,
        };
        r.listen()?;
        Ok(r)
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/vmwatch-hook", self.port)
    }

    fn listen(&mut self) -> std::io::Result<()> {
        let listener = TcpListener::bind(("127.0.0.1", self.port))?;
        self.port = listener.local_addr()?.port();
        self.stop = Arc::new(AtomicBool::new(false));
        let (stop, key, deliveries, refuse) = (
            self.stop.clone(),
            self.key.clone(),
            self.deliveries.clone(),
            self.refuse_names.clone(),
        );
        self.thread = Some(std::thread::spawn(move || {
            // Blocking accept (a polling one would add its sleep to every new connection);
            // `stop` wakes it with a connection of its own.
            while !stop.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok(_) if stop.load(Ordering::Relaxed) => break,
                    Ok((stream, _)) => {
                        // One thread per connection: keep-alive connections stay open.
                        let (key, deliveries, stop, refuse) = (
                            key.clone(),
                            deliveries.clone(),
                            stop.clone(),
                            refuse.clone(),
                        );
                        std::thread::spawn(move || {
                            let _ = serve(stream, &key, &deliveries, &refuse, &stop);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(1)),
                }
            }
        }));
        Ok(())
    }

    /// Stops listening: the master's deliveries now fail (connection refused).
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // Wakes the blocking accept; the listener closes when its thread ends.
            let _ = TcpStream::connect_timeout(
                &std::net::SocketAddr::from(([127, 0, 0, 1], self.port)),
                Duration::from_secs(1),
            );
            let _ = t.join();
        }
    }

    /// Listens again on the same port.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.stop();
        self.listen()
    }

    pub fn received(&self) -> Vec<Delivery> {
        self.deliveries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Every delivery is signed, its body carries the id it was recorded under, and entries first
/// arrive in journal order (at least once: a re-delivery may repeat earlier ids).
pub fn assert_signed_and_ordered(deliveries: &[Delivery]) {
    assert!(
        deliveries.iter().all(|d| d.signature_ok),
        "bad signature in {deliveries:?}"
    );
    let mut firsts: Vec<i64> = Vec::new();
    for d in deliveries {
        if !firsts.contains(&d.event_id) {
            assert!(
                firsts.last().is_none_or(|last| d.event_id > *last),
                "entry {} first arrived after a later one",
                d.event_id
            );
            firsts.push(d.event_id);
        }
        assert_eq!(
            d.body["id"].as_i64(),
            Some(d.event_id),
            "the body carries the same id"
        );
    }
}

impl Drop for PanelReceiver {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How often an idle connection checks whether the panel was stopped.
const IDLE_POLL: Duration = Duration::from_millis(200);

/// Serves HTTP/1.1 keep-alive requests on one connection until it closes or the receiver stops.
fn serve(
    stream: TcpStream,
    key: &[u8],
    deliveries: &Mutex<Vec<Delivery>>,
    refuse: &Mutex<Vec<String>>,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IDLE_POLL))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if stop.load(Ordering::Relaxed) {
                    return Ok(()); // a stopped panel drops its connections
                }
                continue;
            }
            Err(e) => return Err(e),
        }
        if stop.load(Ordering::Relaxed) {
            return Ok(());
        }
        handle(&line, &mut reader, &mut writer, key, deliveries, refuse)?;
        // Back to the short idle wait, so a stopped panel drops a keep-alive connection within
        // 200 ms (handling a request raised it to 5 s).
        reader.get_ref().set_read_timeout(Some(IDLE_POLL))?;
    }
}

fn handle(
    line: &str,
    reader: &mut BufReader<TcpStream>,
    stream: &mut TcpStream,
    key: &[u8],
    deliveries: &Mutex<Vec<Delivery>>,
    refuse: &Mutex<Vec<String>>,
) -> std::io::Result<()> {
    reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut length = 0usize;
    let (mut event_id, mut signature) = (-1i64, String::new());
    loop {
        let mut h = String::new();
        reader.read_line(&mut h)?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        if let Some((name, value)) = h.split_once(':') {
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse().unwrap_or(0),
                "x-vmwatch-event-id" => event_id = value.parse().unwrap_or(-1),
                "x-vmwatch-signature" => signature = value.to_owned(),
                _ => {}
            }
        }
    }
    let mut body = vec![0u8; length];
    reader.read_exact(&mut body)?;
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key).expect("any key length");
    mac.update(&body);
    let expected = format!("sha256={}", hex_lower(&mac.finalize().into_bytes()));
    let signature_ok = line.starts_with("POST ") && signature == expected;
    let at_ms = vmwatch_common::time::now_ms();
    let entries: Vec<Delivery> = match serde_json::from_slice(&body).unwrap_or(Value::Null) {
        Value::Array(entries) => {
            let post_size = entries.len();
            entries
                .into_iter()
                .map(|body| Delivery {
                    event_id: body["id"].as_i64().unwrap_or(-1),
                    body,
                    signature_ok,
                    at_ms,
                    post_size,
                })
                .collect()
        }
        body => vec![Delivery {
            event_id,
            body,
            signature_ok,
            at_ms,
            post_size: 1,
        }],
    };
    let refused = entries.iter().any(|d| {
        d.body["name"].as_str().is_some_and(|n| {
            refuse
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|r| r == n)
        })
    });
    if refused {
        stream.write_all(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )?;
        return stream.flush();
    }
    deliveries
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(entries);
    // Keep-alive, as a panel behind any ordinary web server answers.
    stream.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")?;
    stream.flush()
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
