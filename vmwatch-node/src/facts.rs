//! What libvirt tells the node, as plain data, and its raw codes turned into the wire
//! vocabulary of docs/PROTOCOL.md (pure functions).
//!
//! The libvirt adapter produces these facts; the core and the builder consume them. An unknown
//! code becomes `unknown-N`, never a panic: a newer libvirtd may report codes this agent was not
//! built with.

use std::borrow::Cow;

use vmwatch_common::protocol::{EVENTS, STATES};

/// `VIR_DOMAIN_SHUTOFF`.
pub const STATE_SHUTOFF: i32 = 5;

/// Raw facts of one domain (a snapshot row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainFacts {
    pub uuid: String,
    pub name: String,
    pub state: i32,
    pub reason: i32,
}

/// What an event callback reported, plus what the adapter read right after it: the state
/// (`None` if the domain could no longer be read, e.g. after `undefined`) and, for a domain
/// that stopped, whether it is persistent (`true` for one still active: it is not asked).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventFacts {
    pub uuid: String,
    pub name: String,
    pub event: i32,
    pub detail: i32,
    pub reboot: bool,
    pub event_ts: u64,
    pub current: Option<(i32, i32)>,
    pub persistent: bool,
}

impl EventFacts {
    /// A transient domain that stopped (e.g. the source of a live migration) is gone, or about
    /// to be: no event says so, only a fresh snapshot (which leaves it out) does.
    pub fn transient_domain_stopped(&self) -> bool {
        let stopped = matches!(self.current, None | Some((STATE_SHUTOFF, _)));
        stopped && !self.persistent
    }
}

/// The numeric counters libvirt reported for one domain, by field name (`net.0.tx.pkts`, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainCounters {
    pub uuid: String,
    pub name: String,
    pub fields: Vec<(String, u64)>,
}

/// Why libvirt closed a connection (`virConnectCloseReason`).
pub fn close_reason(reason: i32) -> &'static str {
    match reason {
        0 => "error",
        1 => "end of file",
        2 => "keepalive timeout",
        3 => "closed by client",
        _ => "unknown reason",
    }
}

fn pick(table: &[&'static str], code: i32) -> Cow<'static, str> {
    usize::try_from(code)
        .ok()
        .and_then(|i| table.get(i))
        .map(|s| Cow::Borrowed(*s))
        .unwrap_or_else(|| Cow::Owned(format!("unknown-{code}")))
}

/// `virDomainState` → `running`, `shutoff`, …
pub fn state_name(state: i32) -> Cow<'static, str> {
    pick(STATES, state)
}

/// `virDomainEventType` → `started`, `stopped`, …
pub fn event_name(event: i32) -> Cow<'static, str> {
    // The last entry, `reboot`, has its own event id, not a lifecycle code.
    pick(&EVENTS[..EVENTS.len() - 1], event)
}

/// The detail code of a lifecycle event, named as libvirt names it.
pub fn detail_name(event: i32, detail: i32) -> Cow<'static, str> {
    let table: &[&str] = match event {
        0 => &["added", "updated", "renamed", "from_snapshot"],
        1 => &["removed", "renamed"],
        2 => &["booted", "migrated", "restored", "from_snapshot", "wakeup"],
        3 => &[
            "paused",
            "migrated",
            "ioerror",
            "watchdog",
            "restored",
            "from_snapshot",
            "api_error",
            "postcopy",
            "postcopy_failed",
        ],
        4 => &[
            "unpaused",
            "migrated",
            "from_snapshot",
            "postcopy",
            "postcopy_failed",
        ],
        5 => &[
            "shutdown",
            "destroyed",
            "crashed",
            "migrated",
            "saved",
            "failed",
            "from_snapshot",
        ],
        6 => &["finished", "guest", "host"],
        7 => &["memory", "disk"],
        8 => &["panicked", "crashloaded"],
        _ => &[],
    };
    pick(table, detail)
}

/// The reason code that goes with a state, named as libvirt names it.
pub fn reason_name(state: i32, reason: i32) -> Cow<'static, str> {
    let table: &[&str] = match state {
        1 => &[
            "unknown",
            "booted",
            "migrated",
            "restored",
            "from_snapshot",
            "unpaused",
            "migration_canceled",
            "save_canceled",
            "wakeup",
            "crashed",
            "postcopy",
            "postcopy_failed",
        ],
        3 => &[
            "unknown",
            "user",
            "migration",
            "save",
            "dump",
            "ioerror",
            "watchdog",
            "from_snapshot",
            "shutting_down",
            "snapshot",
            "crashed",
            "starting_up",
            "postcopy",
            "postcopy_failed",
            "api_error",
        ],
        4 => &["unknown", "user"],
        5 => &[
            "unknown",
            "shutdown",
            "destroyed",
            "crashed",
            "migrated",
            "saved",
            "failed",
            "from_snapshot",
            "daemon",
        ],
        6 => &["unknown", "panicked"],
        _ => &["unknown"],
    };
    pick(table, reason)
}

/// The state to report when the domain can no longer be read after its event (typically it
/// was undefined): what the event implies.
pub fn state_implied_by_event(event: i32) -> &'static str {
    match event {
        2 | 4 => "running",
        3 => "paused",
        7 => "pmsuspended",
        8 => "crashed",
        _ => "shutoff",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(got: Cow<'static, str>, expected: &str) {
        assert_eq!(got, expected);
    }

    #[test]
    fn known_codes() {
        check(state_name(1), "running");
        check(state_name(5), "shutoff");
        check(state_name(7), "pmsuspended");
        check(event_name(2), "started");
        check(event_name(8), "crashed");
        check(detail_name(2, 0), "booted");
        check(detail_name(5, 1), "destroyed");
        check(detail_name(3, 2), "ioerror");
        check(detail_name(4, 0), "unpaused");
        check(detail_name(6, 0), "finished");
        check(reason_name(1, 1), "booted");
        check(reason_name(3, 1), "user");
        check(reason_name(5, 2), "destroyed");
        check(reason_name(0, 0), "unknown");
    }

    #[test]
    fn unknown_codes_never_panic() {
        check(state_name(42), "unknown-42");
        check(state_name(-1), "unknown--1");
        check(event_name(9), "unknown-9");
        check(detail_name(2, 99), "unknown-99");
        check(detail_name(77, 0), "unknown-0");
        check(reason_name(5, 1000), "unknown-1000");
        check(
            reason_name(i32::MIN, i32::MAX),
            &format!("unknown-{}", i32::MAX),
        );
    }
}
