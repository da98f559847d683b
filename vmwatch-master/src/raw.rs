//! The master's only `unsafe` code: what the `zmq` and `nix` crates do not offer.
//!
//! - [`receive_frame`]: one frame off a ZeroMQ socket with its source descriptor
//!   (`ZMQ_SRCFD`) and its connection's `User-Id` (the node id the ZAP handler gave its CURVE
//!   key). `zmq::Message` hides its `zmq_msg_t`, so the frame is received through `zmq-sys`.
//! - [`tcp_bytes_received`]: `tcpi_bytes_received` of a TCP socket (`TCP_INFO`), which the
//!   `libc` crate's `tcp_info` does not have.
//! - [`release_free_memory`], [`tune_allocator`]: glibc's `malloc_trim` and `mallopt`, which no
//!   safe crate wraps.
#![allow(unsafe_code)]

use std::ffi::CStr;
use std::mem::MaybeUninit;
use std::os::fd::RawFd;

/// One received frame.
pub struct Frame {
    pub data: Vec<u8>,
    pub more: bool,
    /// The descriptor of the connection it came on (`ZMQ_SRCFD`), when libzmq says.
    pub fd: Option<RawFd>,
    /// The connection's `User-Id` (set by the ZAP handler); `None` when it has none. (Its
    /// `Peer-Address` is not read: ingest knows each descriptor's peer from the monitor.)
    pub user_id: Option<String>,
}

/// Receives one frame; with `props` also reads its message properties (a message's first
/// frame). `zmq::Error::EAGAIN` when nothing is ready under `DONTWAIT`.
pub fn receive_frame(
    socket: &mut zmq::Socket,
    flags: i32,
    props: bool,
) -> Result<Frame, zmq::Error> {
    let sock = socket.as_mut_ptr();
    let mut msg = MaybeUninit::<zmq_sys::zmq_msg_t>::uninit();
    // SAFETY: `msg` is initialised by zmq_msg_init before any other use and closed exactly once
    // below on every path; `sock` is a live socket owned by `socket`, which we borrow mutably
    // for the whole call; the data pointer is read only while the message is open.
    unsafe {
        if zmq_sys::zmq_msg_init(msg.as_mut_ptr()) != 0 {
            return Err(zmq::Error::from_raw(zmq_sys::zmq_errno()));
        }
        let msg = msg.as_mut_ptr();
        if zmq_sys::zmq_msg_recv(msg, sock, flags) < 0 {
            let err = zmq::Error::from_raw(zmq_sys::zmq_errno());
            zmq_sys::zmq_msg_close(msg);
            return Err(err);
        }
        let size = zmq_sys::zmq_msg_size(msg);
        let data = zmq_sys::zmq_msg_data(msg) as *const u8;
        let data = if size == 0 || data.is_null() {
            Vec::new()
        } else {
            std::slice::from_raw_parts(data, size).to_vec()
        };
        let more = zmq_sys::zmq_msg_more(msg) != 0;
        let (mut fd, mut user_id) = (None, None);
        if props {
            let srcfd = zmq_sys::zmq_msg_get(msg, ZMQ_SRCFD);
            if srcfd >= 0 {
                fd = Some(srcfd as RawFd);
            }
            let prop = |name: &CStr| {
                let v = zmq_sys::zmq_msg_gets(msg, name.as_ptr());
                if v.is_null() {
                    None
                } else {
                    Some(CStr::from_ptr(v).to_string_lossy().into_owned())
                }
            };
            user_id = prop(c"User-Id").filter(|u| !u.is_empty());
        }
        zmq_sys::zmq_msg_close(msg);
        Ok(Frame {
            data,
            more,
            fd,
            user_id,
        })
    }
}

/// `ZMQ_SRCFD` (zmq.h: 2), deprecated in libzmq 4.3 but answered by 4.3.4, and the only way to
/// tell which connection a frame came on; zmq-sys hides the constant behind a draft feature.
const ZMQ_SRCFD: i32 = 2;

/// Offset of `tcpi_bytes_received` in Linux's `struct tcp_info` (since Linux 4.1).
const TCPI_BYTES_RECEIVED: usize = 128;

/// Bytes the kernel has received on a TCP socket (`tcpi_bytes_received`); `None` if `fd` is not
/// a TCP socket or the kernel is too old to say.
pub fn tcp_bytes_received(fd: RawFd) -> Option<u64> {
    let mut buf = [0u8; 256];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `buf`, which outlives the call, and
    // updates `len`; an invalid or non-TCP descriptor makes it fail, which we check.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            buf.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 || (len as usize) < TCPI_BYTES_RECEIVED + 8 {
        return None;
    }
    let bytes: [u8; 8] = buf[TCPI_BYTES_RECEIVED..TCPI_BYTES_RECEIVED + 8]
        .try_into()
        .ok()?;
    Some(u64::from_ne_bytes(bytes))
}

/// Gives the pages of freed heap memory back to the kernel (glibc's `malloc_trim(0)`, every
/// arena, not only the top of the main heap). glibc keeps what its per-thread arenas freed:
/// after 10,000 nodes' snapshots the master held 753 MiB resident for 411 MB in use, and one
/// call brought it to 517 MiB. Returns how long the call took.
pub fn release_free_memory() -> std::time::Duration {
    let t0 = std::time::Instant::now();
    // SAFETY: malloc_trim takes no pointers; it only walks glibc's own arenas under their locks.
    #[cfg(target_env = "gnu")]
    unsafe {
        libc::malloc_trim(0);
    }
    t0.elapsed()
}

/// Blocks of 4 MiB and more (a fleet's snapshots: up to 65,536 effects of 328 bytes in one
/// batch) are mapped and unmapped whole, never carved from the heap. glibc raises this
/// threshold by itself, up to 32 MiB, after such a block is freed; then those transient buffers
/// were carved between long-lived VM rows and stayed resident. Measured at 10,000 nodes × 50
/// VMs: 401-446 MiB resident with the moving threshold, 376-381 MiB with this one, the same
/// steady CPU. At 1 MiB events were 7 % slower (every batch's buffers mapped anew); at 4 MiB the
/// difference is within the runs' noise.
/// Only with glibc; other C libraries keep their own policy.
pub fn tune_allocator() {
    // SAFETY: mallopt takes two integers and only sets glibc's own parameters.
    #[cfg(target_env = "gnu")]
    if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20) } != 1 {
        tracing::warn!("mallopt(M_MMAP_THRESHOLD) refused; large buffers may stay resident");
    }
}
