//! The libvirt adapter: the only module of the workspace that calls `virt::sys`, and, beside
//! the one `mallopt` of `allocator.rs`, the only one of the node allowed `unsafe`.
//!
//! The safe `virt` crate lacks lifecycle-event registration, the close callback and a
//! non-leaking stats call, so this module wraps those raw calls in a small safe API that speaks
//! in facts (`facts.rs`) and core inputs, never in libvirt handles:
//!
//! - [`start_event_loop`] registers libvirt's default event implementation (it must happen
//!   before any connection is opened) and keeps a thread running it.
//! - [`open`] opens a connection with keepalive.
//! - [`Watch`] registers the lifecycle, reboot and close callbacks. They only copy what they
//!   are given and return, so the event thread never blocks; a `libvirt-facts` thread of the
//!   watch then reads each domain's identity, state and persistence and hands the core an
//!   [`Input::Event`] (or [`Input::Closed`]). Dropping the `Watch` deregisters the callbacks,
//!   and the thread ends once libvirt has freed them.
//! - [`list_domains`] and [`all_domain_counters`] read the inventory and the counters.
//!
//! Every callback's `opaque` is a `Box<Sender<Raw>>` freed by libvirt through `free_sender`
//! when the registration goes away, so nothing leaks and nothing is freed twice.
#![allow(unsafe_code)]

use std::ffi::{c_int, c_void, CStr};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Mutex;

use virt::connect::Connect;
use virt::domain::Domain;
use virt::sys;
use vmwatch_common::time::now_ms;

use crate::core::Input;
use crate::facts::{DomainCounters, DomainFacts, EventFacts, STATE_SHUTOFF};

/// What a callback copied out of libvirt, before the facts thread reads the rest.
enum Raw {
    /// A lifecycle (`reboot == false`) or reboot event. `domain` is a new reference.
    Event {
        domain: Domain,
        event: i32,
        detail: i32,
        reboot: bool,
        event_ts: u64,
    },
    /// The connection closed (`reason`: 0 error, 1 EOF, 2 keepalive, 3 client); `alive` is
    /// what `virConnectIsAlive` said at that moment.
    Closed { reason: i32, alive: bool },
}

/// An error from libvirt, with the call or step that failed.
#[derive(Debug, thiserror::Error)]
pub enum LibvirtError {
    #[error("cannot connect to {uri}: {message}")]
    Connect { uri: String, message: String },
    #[error("{call}: {message}")]
    Call { call: &'static str, message: String },
    #[error("cannot spawn the {thread} thread: {source}")]
    Spawn {
        thread: &'static str,
        source: std::io::Error,
    },
}

impl LibvirtError {
    fn from_virt(call: &'static str, e: virt::error::Error) -> LibvirtError {
        LibvirtError::Call {
            call,
            message: e.message().to_owned(),
        }
    }
}

fn last_error(call: &'static str) -> LibvirtError {
    // SAFETY: virGetLastErrorMessage returns a thread-local string owned by libvirt, never NULL
    // (it returns "no error" when there is none); we copy it at once.
    let message = unsafe {
        let p = sys::virGetLastErrorMessage();
        if p.is_null() {
            "unknown error".to_owned()
        } else {
            CStr::from_ptr(p).to_string_lossy().into_owned()
        }
    };
    LibvirtError::Call { call, message }
}

/// Whether the event loop runs (set only once it does, so a failed start can be retried).
static EVENT_LOOP: Mutex<bool> = Mutex::new(false);

/// Registers the default event implementation and starts the thread that runs it. Idempotent
/// once it succeeded; must be called before the first connection is opened.
pub fn start_event_loop() -> Result<(), LibvirtError> {
    let mut running = EVENT_LOOP.lock().unwrap_or_else(|p| p.into_inner());
    if *running {
        return Ok(());
    }
    // libvirt prints every error to stderr by default; we report errors ourselves.
    virt::error::clear_error_callback();
    // SAFETY: plain libvirt call without arguments, made before any connection.
    if unsafe { sys::virEventRegisterDefaultImpl() } < 0 {
        return Err(last_error("virEventRegisterDefaultImpl"));
    }
    std::thread::Builder::new()
        .name("libvirt-events".into())
        .spawn(|| loop {
            // SAFETY: runs one iteration of the default loop registered above.
            if unsafe { sys::virEventRunDefaultImpl() } < 0 {
                tracing::error!(error = %last_error("virEventRunDefaultImpl"), "libvirt event loop iteration failed");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        })
        .map_err(|source| LibvirtError::Spawn {
            thread: "libvirt-events",
            source,
        })?;
    *running = true;
    Ok(())
}

/// A libvirt connection that is safe to drop whether its daemon lives or not: the `virt`
/// crate panics in `Drop` if `virConnectClose` fails, and a dead daemon must not take the agent
/// down with it. Everything that holds a connection holds one of these.
pub struct Conn(Option<Connect>);

impl std::ops::Deref for Conn {
    type Target = Connect;

    fn deref(&self) -> &Connect {
        // Some until drop.
        self.0
            .as_ref()
            .expect("a connection is held until it is dropped")
    }
}

impl Clone for Conn {
    /// Another reference to the same connection (`virConnectRef`).
    fn clone(&self) -> Conn {
        Conn(self.0.clone())
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        if let Some(c) = self.0.take() {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(c))).is_err() {
                tracing::warn!("releasing a dead libvirt connection failed");
            }
        }
    }
}

/// Opens `uri` **read-only** with keepalive (`interval` s, `count` missed replies). Every call
/// the node makes (events, listing, state, persistence, stats) works on a read-only connection,
/// and a read-write one would be full control of the host whatever the unit's capabilities.
pub fn open(
    uri: &str,
    keepalive_interval: i32,
    keepalive_count: u32,
) -> Result<Conn, LibvirtError> {
    let conn = Connect::open_read_only(Some(uri)).map_err(|e| LibvirtError::Connect {
        uri: uri.to_owned(),
        message: e.message().to_owned(),
    })?;
    // Drivers without a daemon (test:///, some local ones) have no keepalive: not fatal.
    if let Err(e) = conn.set_keep_alive(keepalive_interval, keepalive_count) {
        tracing::debug!(
            uri,
            error = e.message(),
            "keepalive not available on this connection"
        );
    }
    Ok(Conn(Some(conn)))
}

/// Registered callbacks; dropping this deregisters them.
pub struct Watch {
    conn: Conn,
    callback_ids: Vec<c_int>,
    close_registered: bool,
}

unsafe extern "C" fn free_sender(opaque: *mut c_void) {
    if !opaque.is_null() {
        // SAFETY: every opaque handed to libvirt is a Box<Sender<Raw>> from `boxed_sender`,
        // and libvirt calls the free callback exactly once per registration.
        drop(unsafe { Box::from_raw(opaque as *mut Sender<Raw>) });
    }
}

fn boxed_sender(tx: &Sender<Raw>) -> *mut c_void {
    Box::into_raw(Box::new(tx.clone())) as *mut c_void
}

/// Takes a new reference on a domain handed to a callback (libvirt frees its own after return).
unsafe fn own_domain(dom: sys::virDomainPtr) -> Option<Domain> {
    if dom.is_null() {
        return None;
    }
    // SAFETY: `dom` is valid for the duration of the callback; virDomainRef adds a reference
    // that the returned `Domain` owns and frees on drop.
    if unsafe { sys::virDomainRef(dom) } < 0 {
        return None;
    }
    Some(unsafe { Domain::from_ptr(dom) })
}

unsafe extern "C" fn on_lifecycle(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    event: c_int,
    detail: c_int,
    opaque: *mut c_void,
) -> c_int {
    let event_ts = now_ms();
    // A hop of `vmwatch-bench-latency`'s breakdown.
    tracing::debug!(event, detail, "lifecycle callback");
    // SAFETY: opaque is the Box<Sender<Raw>> registered with this callback, alive until
    // free_sender runs; dom is valid during the callback.
    let tx = unsafe { &*(opaque as *const Sender<Raw>) };
    if let Some(domain) = unsafe { own_domain(dom) } {
        let _ = tx.send(Raw::Event {
            domain,
            event,
            detail,
            reboot: false,
            event_ts,
        });
    }
    0
}

unsafe extern "C" fn on_reboot(
    _conn: sys::virConnectPtr,
    dom: sys::virDomainPtr,
    opaque: *mut c_void,
) {
    let event_ts = now_ms();
    // SAFETY: as in on_lifecycle.
    let tx = unsafe { &*(opaque as *const Sender<Raw>) };
    if let Some(domain) = unsafe { own_domain(dom) } {
        let _ = tx.send(Raw::Event {
            domain,
            event: 0,
            detail: 0,
            reboot: true,
            event_ts,
        });
    }
}

unsafe extern "C" fn on_close(conn: sys::virConnectPtr, reason: c_int, opaque: *mut c_void) {
    // SAFETY: as in on_lifecycle; conn is valid during the callback, and virConnectIsAlive
    // only reads the client's local state (no round trip).
    let tx = unsafe { &*(opaque as *const Sender<Raw>) };
    let alive = unsafe { sys::virConnectIsAlive(conn) } == 1;
    let _ = tx.send(Raw::Closed { reason, alive });
}

impl Watch {
    /// Registers lifecycle, reboot and close callbacks on `conn`; the facts they lead to reach
    /// `tx` tagged with `generation`.
    pub fn register(
        conn: &Conn,
        generation: u64,
        tx: &Sender<Input>,
    ) -> Result<Watch, LibvirtError> {
        // The facts thread starts only once every callback is registered: a failed registration
        // leaks its boxed sender (see below), and a thread waiting on it would never end.
        let (raw_tx, raw_rx) = mpsc::channel();
        let tx_core = tx.clone();
        let tx = &raw_tx;
        let mut watch = Watch {
            conn: conn.clone(),
            callback_ids: Vec::new(),
            close_registered: false,
        };
        // SAFETY: libvirt passes the lifecycle callback as the generic type and calls it with
        // the lifecycle signature; transmuting between these fn-pointer types is how the C API
        // is meant to be used (VIR_DOMAIN_EVENT_CALLBACK).
        let lifecycle: sys::virConnectDomainEventGenericCallback = unsafe {
            Some(std::mem::transmute::<
                unsafe extern "C" fn(
                    sys::virConnectPtr,
                    sys::virDomainPtr,
                    c_int,
                    c_int,
                    *mut c_void,
                ) -> c_int,
                unsafe extern "C" fn(sys::virConnectPtr, sys::virDomainPtr, *mut c_void),
            >(on_lifecycle))
        };
        let reboot: sys::virConnectDomainEventGenericCallback = Some(on_reboot);
        for (event_id, cb, what) in [
            (
                sys::VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                lifecycle,
                "virConnectDomainEventRegisterAny(lifecycle)",
            ),
            (
                sys::VIR_DOMAIN_EVENT_ID_REBOOT,
                reboot,
                "virConnectDomainEventRegisterAny(reboot)",
            ),
        ] {
            let opaque = boxed_sender(tx);
            // SAFETY: conn is a live connection; libvirt owns opaque from here and frees it
            // through free_sender when the callback is deregistered.
            let id = unsafe {
                sys::virConnectDomainEventRegisterAny(
                    conn.as_ptr(),
                    std::ptr::null_mut(),
                    event_id as c_int,
                    cb,
                    opaque,
                    Some(free_sender),
                )
            };
            if id < 0 {
                // Whether libvirt already ran the free callback on failure differs between
                // versions; leaking one Sender on this rare path is safer than a double free.
                return Err(last_error(what));
            }
            watch.callback_ids.push(id);
        }
        let opaque = boxed_sender(tx);
        // SAFETY: as above; the close callback's opaque is freed by free_sender on unregister.
        let rc = unsafe {
            sys::virConnectRegisterCloseCallback(
                conn.as_ptr(),
                Some(on_close),
                opaque,
                Some(free_sender),
            )
        };
        if rc < 0 {
            // Leaked on purpose, as above.
            return Err(last_error("virConnectRegisterCloseCallback"));
        }
        watch.close_registered = true;
        // Reports that arrive meanwhile wait in the channel.
        std::thread::Builder::new()
            .name("libvirt-facts".into())
            .spawn(move || turn_into_facts(generation, raw_rx, tx_core))
            .map_err(|source| LibvirtError::Spawn {
                thread: "libvirt-facts",
                source,
            })?;
        Ok(watch)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        for id in self.callback_ids.drain(..) {
            // SAFETY: id came from a successful registration on this connection. Failure (for
            // example on a dead connection) is harmless: libvirt frees the callback with the
            // connection.
            unsafe { sys::virConnectDomainEventDeregisterAny(self.conn.as_ptr(), id) };
        }
        if self.close_registered {
            // SAFETY: on_close was registered on this connection.
            unsafe { sys::virConnectUnregisterCloseCallback(self.conn.as_ptr(), Some(on_close)) };
        }
    }
}

/// The current state and reason of a domain (`virDomainGetState`), as raw codes.
fn domain_state(domain: &Domain) -> Result<(i32, i32), LibvirtError> {
    let mut state: c_int = -1;
    let mut reason: c_int = -1;
    // SAFETY: domain is a live reference; the out-pointers are valid locals.
    let rc = unsafe { sys::virDomainGetState(domain.as_ptr(), &mut state, &mut reason, 0) };
    if rc < 0 {
        return Err(last_error("virDomainGetState"));
    }
    Ok((state, reason))
}

/// Uuid and name of a domain (local, no round trip to libvirtd).
fn domain_identity(domain: &Domain) -> Result<(String, String), LibvirtError> {
    let uuid = domain
        .uuid_string()
        .map_err(|e| LibvirtError::from_virt("virDomainGetUUIDString", e))?;
    let name = domain
        .name()
        .map_err(|e| LibvirtError::from_virt("virDomainGetName", e))?;
    Ok((uuid, name))
}

/// All facts of one domain, re-read from libvirt.
fn domain_facts(domain: &Domain) -> Result<DomainFacts, LibvirtError> {
    let (uuid, name) = domain_identity(domain)?;
    let (state, reason) = domain_state(domain)?;
    Ok(DomainFacts {
        uuid,
        name,
        state,
        reason,
    })
}

/// The facts thread of one [`Watch`]: each raw callback report becomes a core input, in order.
/// Ends when libvirt has freed every callback (the watch was dropped or its connection died).
fn turn_into_facts(generation: u64, raw: Receiver<Raw>, tx: Sender<Input>) {
    for report in raw {
        let input = match report {
            Raw::Event {
                domain,
                event,
                detail,
                reboot,
                event_ts,
            } => {
                let (uuid, name) = match domain_identity(&domain) {
                    Ok(id) => id,
                    Err(e) => {
                        tracing::warn!(error = %e, "event for a domain without identity; ignored");
                        continue;
                    }
                };
                // Events are hints: the state read now is the truth we report.
                let current = domain_state(&domain).ok();
                // Persistence matters only once a domain has stopped (a stopped transient one
                // is about to vanish), so it costs a round trip to libvirtd only then.
                let persistent = match current {
                    None | Some((STATE_SHUTOFF, _)) => is_persistent(&domain),
                    Some(_) => true,
                };
                Input::Event(EventFacts {
                    uuid,
                    name,
                    event,
                    detail,
                    reboot,
                    event_ts,
                    current,
                    persistent,
                })
            }
            // A close report while the connection still works is not a loss.
            Raw::Closed { alive: true, .. } => continue,
            Raw::Closed { reason, .. } => Input::Closed { generation, reason },
        };
        if tx.send(input).is_err() {
            return;
        }
    }
}

/// Every domain libvirt knows, active or not. A domain that disappears between the listing
/// and the state read is left out (the next snapshot or its event will tell).
///
/// Every active domain and every persistent one: an inactive transient domain exists only for
/// the instant between its stop and its removal (e.g. the source of a live migration), so it
/// is left out rather than reported as a `shutoff` row that is about to vanish.
pub fn list_domains(conn: &Connect) -> Result<Vec<DomainFacts>, LibvirtError> {
    // One listing (two would miss a domain that starts between them), then the filter.
    let domains: Vec<Domain> = conn
        .list_all_domains(0)
        .map_err(|e| LibvirtError::from_virt("virConnectListAllDomains", e))?;
    let mut out = Vec::with_capacity(domains.len());
    for d in &domains {
        // One round trip per domain (its state); persistence is asked only of shut-off ones.
        match domain_facts(d) {
            Ok(f) if f.state == STATE_SHUTOFF && !is_persistent(d) => {}
            Ok(f) => out.push(f),
            Err(e) => tracing::debug!(error = %e, "domain vanished while listing"),
        }
    }
    Ok(out)
}

/// Whether the domain is persistent; a domain gone meanwhile counts as not.
fn is_persistent(domain: &Domain) -> bool {
    domain.is_persistent().unwrap_or(false)
}

/// libvirt's library version as `major.minor.micro`.
pub fn libvirt_version(conn: &Connect) -> String {
    match conn.lib_version() {
        Ok(v) => format!("{}.{}.{}", v / 1_000_000, (v / 1000) % 1000, v % 1000),
        Err(_) => "unknown".into(),
    }
}

/// True while the connection is open and alive.
pub fn is_alive(conn: &Connect) -> bool {
    conn.is_alive().unwrap_or(false)
}

/// One `virConnectGetAllDomainStats` call for the groups we use (state, cpu total, interface,
/// block) with `NOWAIT`, so a domain stuck in a job is skipped rather than waited for. The
/// records are always freed with `virDomainStatsRecordListFree` (the `virt` crate's own
/// wrapper leaks them). Only integer fields are kept.
pub fn all_domain_counters(conn: &Connect) -> Result<Vec<DomainCounters>, LibvirtError> {
    let groups = sys::VIR_DOMAIN_STATS_STATE
        | sys::VIR_DOMAIN_STATS_CPU_TOTAL
        | sys::VIR_DOMAIN_STATS_INTERFACE
        | sys::VIR_DOMAIN_STATS_BLOCK;
    let mut records: *mut sys::virDomainStatsRecordPtr = std::ptr::null_mut();
    // SAFETY: conn is live; records receives a NULL-terminated array that we free below.
    let n = unsafe {
        sys::virConnectGetAllDomainStats(
            conn.as_ptr(),
            groups,
            &mut records,
            sys::VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT,
        )
    };
    if n < 0 {
        return Err(last_error("virConnectGetAllDomainStats"));
    }
    /// Frees the record list on every path out of this function.
    struct Records(*mut sys::virDomainStatsRecordPtr);
    impl Drop for Records {
        fn drop(&mut self) {
            if !self.0.is_null() {
                // SAFETY: the list came from virConnectGetAllDomainStats and is freed once.
                unsafe { sys::virDomainStatsRecordListFree(self.0) };
            }
        }
    }
    let records = Records(records);
    let mut out = Vec::with_capacity(n as usize);
    for i in 0..n as usize {
        // SAFETY: the array holds n valid record pointers (followed by NULL).
        let rec = unsafe { *records.0.add(i) };
        if rec.is_null() {
            break;
        }
        // SAFETY: rec points to a record owned by the list, valid until the list is freed.
        let rec = unsafe { &*rec };
        if rec.dom.is_null() {
            continue;
        }
        // SAFETY: rec.dom is valid while the list lives; the names are copied out.
        let (uuid, name) = unsafe {
            let name_ptr = sys::virDomainGetName(rec.dom);
            let name = if name_ptr.is_null() {
                String::new()
            } else {
                CStr::from_ptr(name_ptr).to_string_lossy().into_owned()
            };
            let mut buf = [0 as std::ffi::c_char; 37];
            let uuid = if sys::virDomainGetUUIDString(rec.dom, buf.as_mut_ptr()) == 0 {
                CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
            } else {
                continue;
            };
            (uuid, name)
        };
        let mut fields = Vec::new();
        if !rec.params.is_null() && rec.nparams > 0 {
            for j in 0..rec.nparams as usize {
                // SAFETY: params holds nparams entries.
                let p = unsafe { &*rec.params.add(j) };
                // SAFETY: field is a NUL-terminated name of at most 80 bytes; the union is read
                // according to its declared type.
                let (key, value) = unsafe {
                    let key = CStr::from_ptr(p.field.as_ptr())
                        .to_string_lossy()
                        .into_owned();
                    let value = match p.type_ as u32 {
                        sys::VIR_TYPED_PARAM_INT => u64::try_from(p.value.i).ok(),
                        sys::VIR_TYPED_PARAM_UINT => Some(u64::from(p.value.ui)),
                        sys::VIR_TYPED_PARAM_LLONG => u64::try_from(p.value.l).ok(),
                        sys::VIR_TYPED_PARAM_ULLONG => Some(p.value.ul),
                        _ => None,
                    };
                    (key, value)
                };
                if let Some(v) = value {
                    fields.push((key, v));
                }
            }
        }
        out.push(DomainCounters { uuid, name, fields });
    }
    Ok(out)
}
