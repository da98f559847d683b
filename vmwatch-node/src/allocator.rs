//! glibc's allocator, set for an agent that sits on every hypervisor and is measured against
//! collectd in private memory (`vmwatch-bench-collectd`): the one module beside the libvirt
//! adapter allowed `unsafe`, for a plain call that no safe crate wraps.
#![allow(unsafe_code)]

/// One malloc arena for the whole process. glibc gives each thread that allocates an arena of
/// its own (up to 8 per core), each with its own free pages: measured with 20 guests, four
/// arenas held about 240 KiB of private dirty memory, for an agent whose threads allocate a few
/// KiB a minute and never contend; with one arena the main heap grows by about 200 KiB instead
/// (private dirty 2,644 → 2,572–2,608 KiB). Called first thing in `agent::run`, before the
/// agent's threads (libvirt events and facts, stats, ZeroMQ's) start.
///
/// Only with glibc; other C libraries keep their own policy.
pub fn one_arena() {
    // SAFETY: mallopt takes two integers and only sets glibc's own parameters.
    #[cfg(target_env = "gnu")]
    if unsafe { nix::libc::mallopt(nix::libc::M_ARENA_MAX, 1) } != 1 {
        tracing::warn!("mallopt(M_ARENA_MAX) refused; each thread may keep an arena");
    }
}
