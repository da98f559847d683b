//! The idle rule (pure): per running VM, each stats sample against the previous one.
//!
//! For each resource — network (`tx_pkts`) and disk (`wr_reqs`) — a window whose delta is at
//! most the resource's threshold (`idle_tx_packets_max`, `idle_wr_reqs_max`; 0 by default: no
//! change at all) is quiet; after `idle_windows` consecutive quiet windows the resource is
//! flagged idle, and a window over the threshold clears the flag. A threshold lets a guest whose
//! OS is up but unused (ARP, DHCP renewals, NTP) be flagged. A counter that went down (the VM restarted) or a missing previous
//! sample is *unknown*: it never flags and it restarts the count. A VM with no interface (or no
//! disk) cannot be judged on it and says so (`no_device`) instead of looking idle.
//!
//! Missed windows: when two samples are further apart than one interval (the node or master was
//! away), a zero delta counts for as many windows as the gap spans, rounded to the nearest.

/// The last counters kept for a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Node time of the sample, unix ms.
    pub ts: u64,
    pub tx_pkts: u64,
    pub wr_reqs: u64,
    pub rx_pkts: u64,
    pub rd_reqs: u64,
    pub cpu_time_ns: u64,
    /// Byte counters (for the activity history); `None` in a sample stored before they were
    /// kept.
    pub bytes: Option<ByteCounters>,
}

/// A sample's cumulative byte counters: transmitted, received, disk read, disk written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteCounters {
    pub tx: u64,
    pub rx: u64,
    pub rd: u64,
    pub wr: u64,
}

/// The idle state of one resource of one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Resource {
    /// Flagged idle.
    pub idle: bool,
    /// When the flag was set (unix ms).
    pub since: Option<u64>,
    /// Consecutive quiet windows so far.
    pub quiet_windows: u32,
    /// The counter's change over the last evaluated window(s); `None` when unknown.
    pub last_delta: Option<u64>,
    /// True when the VM has no device of this kind (no interface, no disk): never idle, and
    /// shown as its own warning.
    pub no_device: bool,
}

/// Everything the master keeps about a VM's activity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub sample: Option<Sample>,
    pub nics: u32,
    pub disks: u32,
    pub net: Resource,
    pub disk: Resource,
    /// Length of the last evaluated window(s), in ms.
    pub last_window_ms: Option<u64>,
}

/// A flag that changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Change {
    /// `net` or `disk`.
    pub resource: &'static str,
    /// True: became idle; false: became active again.
    pub idle: bool,
    /// Quiet windows behind the change (0 for activity).
    pub windows: u32,
    /// The counter's change over the last evaluated window(s); `None` when a removed device
    /// cleared the flag.
    pub delta: Option<u64>,
    /// The threshold per window the delta was judged against.
    pub threshold: u64,
}

/// One stats sample of one VM, with what the rule needs to judge it.
#[derive(Debug, Clone, Copy)]
pub struct Observation {
    pub sample: Sample,
    pub nics: u32,
    pub disks: u32,
    /// Only running VMs are evaluated; others just keep the sample as the next baseline.
    pub running: bool,
}

/// The rule's parameters.
#[derive(Debug, Clone, Copy)]
pub struct IdleConfig {
    /// The node's stats interval, in ms.
    pub interval_ms: u64,
    /// Consecutive quiet windows before a flag is set.
    pub idle_windows: u32,
    /// A window with at most this many transmitted packets is quiet on the network.
    pub tx_packets_max: u64,
    /// A window with at most this many disk write requests is quiet on the disk.
    pub wr_reqs_max: u64,
}

/// Applies one observation at `now`; returns the flags that changed.
pub fn observe(usage: &mut Usage, obs: Observation, cfg: IdleConfig, now: u64) -> Vec<Change> {
    let sample = obs.sample;
    let prev = usage.sample.replace(sample);
    usage.nics = obs.nics;
    usage.disks = obs.disks;
    let mut changes = Vec::new();
    if !obs.running {
        return changes;
    }
    let windows = match prev {
        Some(p) if sample.ts > p.ts && cfg.interval_ms > 0 => {
            let elapsed = sample.ts - p.ts;
            usage.last_window_ms = Some(elapsed);
            ((elapsed + cfg.interval_ms / 2) / cfg.interval_ms).max(1) as u32
        }
        _ => 0, // no usable previous sample: unknown
    };
    // A delta exists only with a usable previous sample, a device, and a counter that did not
    // go backwards.
    let delta = |devices: u32, before: Option<u64>, after: u64| match before {
        Some(b) if windows > 0 && devices > 0 && after >= b => Some(after - b),
        _ => None,
    };
    let net = delta(obs.nics, prev.map(|p| p.tx_pkts), sample.tx_pkts);
    let disk = delta(obs.disks, prev.map(|p| p.wr_reqs), sample.wr_reqs);
    for (name, r, devices, d, max) in [
        ("net", &mut usage.net, obs.nics, net, cfg.tx_packets_max),
        ("disk", &mut usage.disk, obs.disks, disk, cfg.wr_reqs_max),
    ] {
        let judged = Judged {
            delta: d,
            windows,
            max,
        };
        if let Some(change) = evaluate(r, devices, judged, cfg.idle_windows, now) {
            changes.push(Change {
                resource: name,
                ..change
            });
        }
    }
    changes
}

/// One resource's delta over `windows` windows, and its threshold per window.
struct Judged {
    delta: Option<u64>,
    windows: u32,
    max: u64,
}

/// Updates one resource; returns the change of its flag, if any.
fn evaluate(
    r: &mut Resource,
    devices: u32,
    judged: Judged,
    idle_windows: u32,
    now: u64,
) -> Option<Change> {
    let Judged {
        delta,
        windows,
        max,
    } = judged;
    r.no_device = devices == 0;
    r.last_delta = delta;
    let cleared = Change {
        resource: "",
        idle: false,
        windows: 0,
        delta,
        threshold: max,
    };
    // A delta over several missed windows is judged against the threshold of as many.
    let quiet = |d: u64| d <= max.saturating_mul(u64::from(windows));
    match delta {
        None => {
            r.quiet_windows = 0;
            if r.no_device && r.idle {
                // A device removed while flagged: the flag no longer means anything.
                r.idle = false;
                r.since = None;
                return Some(cleared);
            }
            None
        }
        Some(d) if quiet(d) => {
            r.quiet_windows = r.quiet_windows.saturating_add(windows);
            if !r.idle && r.quiet_windows >= idle_windows {
                r.idle = true;
                r.since = Some(now);
                return Some(Change {
                    resource: "",
                    idle: true,
                    windows: r.quiet_windows,
                    delta,
                    threshold: max,
                });
            }
            None
        }
        Some(_) => {
            r.quiet_windows = 0;
            if r.idle {
                r.idle = false;
                r.since = None;
                return Some(cleared);
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60_000;

    fn s(ts_min: u64, tx: u64, wr: u64) -> Sample {
        Sample {
            ts: ts_min * MIN,
            tx_pkts: tx,
            wr_reqs: wr,
            rx_pkts: 0,
            rd_reqs: 0,
            cpu_time_ns: 0,
            bytes: None,
        }
    }

    fn obs(sample: Sample, nics: u32, disks: u32, running: bool) -> Observation {
        Observation {
            sample,
            nics,
            disks,
            running,
        }
    }

    fn cfg(idle_windows: u32) -> IdleConfig {
        IdleConfig {
            interval_ms: MIN,
            idle_windows,
            tx_packets_max: 0,
            wr_reqs_max: 0,
        }
    }

    /// Feeds samples (minute, tx, wr) with a 1-minute interval; returns the flags after each.
    fn run(
        samples: &[(u64, u64, u64)],
        idle_windows: u32,
        nics: u32,
        disks: u32,
    ) -> Vec<(bool, bool)> {
        let mut u = Usage::default();
        samples
            .iter()
            .map(|&(t, tx, wr)| {
                observe(
                    &mut u,
                    obs(s(t, tx, wr), nics, disks, true),
                    cfg(idle_windows),
                    t * MIN,
                );
                (u.net.idle, u.disk.idle)
            })
            .collect()
    }

    #[test]
    fn first_sample_is_unknown_then_zero_delta_is_idle() {
        assert_eq!(
            run(&[(0, 5, 5), (1, 5, 5)], 1, 1, 1),
            [(false, false), (true, true)]
        );
    }

    #[test]
    fn activity_on_one_resource_only() {
        assert_eq!(
            run(&[(0, 5, 5), (1, 5, 9), (2, 5, 12)], 1, 1, 1),
            [(false, false), (true, false), (true, false)]
        );
    }

    #[test]
    fn idle_windows_must_be_consecutive() {
        let flags = run(
            &[(0, 0, 0), (1, 0, 0), (2, 1, 0), (3, 1, 0), (4, 1, 0)],
            2,
            1,
            1,
        );
        assert_eq!(
            flags,
            [
                (false, false),
                (false, false),
                (false, true),
                (false, true),
                (true, true)
            ]
        );
    }

    #[test]
    fn activity_clears_the_flag() {
        assert_eq!(
            run(&[(0, 0, 0), (1, 0, 0), (2, 3, 0)], 1, 1, 1)[2],
            (false, true)
        );
    }

    #[test]
    fn counter_reset_is_unknown_never_idle() {
        // The VM restarted between samples: counters below the previous sample.
        let flags = run(&[(0, 50, 50), (1, 60, 70), (2, 3, 3), (3, 9, 9)], 1, 1, 1);
        assert_eq!(flags, [(false, false); 4]);
        // A reset to zero is a reset, not a quiet window.
        assert_eq!(
            run(&[(0, 50, 50), (1, 0, 0)], 1, 1, 1),
            [(false, false), (false, false)]
        );
    }

    #[test]
    fn counter_wrap_is_unknown() {
        let flags = run(&[(0, u64::MAX - 1, 0), (1, 2, 1)], 1, 1, 1);
        assert_eq!(flags[1], (false, false));
    }

    #[test]
    fn missed_windows_count_for_what_they_span() {
        // Three windows apart with no change: three quiet windows at once.
        assert_eq!(run(&[(0, 1, 1), (3, 1, 1)], 3, 1, 1)[1], (true, true));
        // Activity over a long gap is activity.
        assert_eq!(
            run(&[(0, 1, 1), (1, 1, 1), (5, 2, 2)], 1, 1, 1)[2],
            (false, false)
        );
    }

    #[test]
    fn no_device_is_reported_not_idle() {
        let mut u = Usage::default();
        observe(&mut u, obs(s(0, 0, 0), 0, 1, true), cfg(1), 0);
        observe(&mut u, obs(s(1, 0, 0), 0, 1, true), cfg(1), MIN);
        assert!(!u.net.idle && u.net.no_device);
        assert!(u.disk.idle && !u.disk.no_device);
    }

    #[test]
    fn not_running_is_not_evaluated() {
        let mut u = Usage::default();
        observe(&mut u, obs(s(0, 0, 0), 1, 1, true), cfg(1), 0);
        for t in 1..5 {
            assert!(observe(&mut u, obs(s(t, 0, 0), 1, 1, false), cfg(1), t * MIN).is_empty());
        }
        assert!(!u.net.idle, "a paused VM is not flagged");
        // Resumed: the sample taken while paused is the baseline.
        assert_eq!(
            observe(&mut u, obs(s(5, 0, 0), 1, 1, true), cfg(1), 5 * MIN).len(),
            2
        );
    }

    #[test]
    fn changes_are_reported_once() {
        let mut u = Usage::default();
        let mut all = Vec::new();
        for t in 0..5 {
            all.extend(observe(
                &mut u,
                obs(s(t, 0, 0), 1, 1, true),
                cfg(2),
                t * MIN,
            ));
        }
        assert_eq!(
            all,
            [
                Change {
                    resource: "net",
                    idle: true,
                    windows: 2,
                    delta: Some(0),
                    threshold: 0
                },
                Change {
                    resource: "disk",
                    idle: true,
                    windows: 2,
                    delta: Some(0),
                    threshold: 0
                }
            ]
        );
    }

    /// Background traffic at or under the threshold is quiet; one packet over it is activity.
    /// A delta over missed windows is judged against the threshold of as many windows.
    #[test]
    fn a_threshold_lets_background_noise_be_idle() {
        let config = IdleConfig {
            tx_packets_max: 5,
            wr_reqs_max: 2,
            ..cfg(2)
        };
        let mut u = Usage::default();
        let mut feed = |t: u64, tx: u64, wr: u64| {
            observe(&mut u, obs(s(t, tx, wr), 1, 1, true), config, t * MIN)
        };
        assert!(feed(0, 100, 100).is_empty());
        assert!(feed(1, 105, 102).is_empty(), "one quiet window of 2");
        let flagged = feed(2, 108, 103);
        assert_eq!(
            flagged,
            [
                Change {
                    resource: "net",
                    idle: true,
                    windows: 2,
                    delta: Some(3),
                    threshold: 5
                },
                Change {
                    resource: "disk",
                    idle: true,
                    windows: 2,
                    delta: Some(1),
                    threshold: 2
                },
            ]
        );
        // Two windows missed: 10 packets over 3 windows is still under 3 × 5.
        assert!(
            feed(5, 118, 109).is_empty(),
            "14 ≤ 15 and 6 ≤ 6 over three windows"
        );
        let cleared = feed(6, 124, 109);
        assert_eq!(
            cleared,
            [Change {
                resource: "net",
                idle: false,
                windows: 0,
                delta: Some(6),
                threshold: 5
            }]
        );
    }
}
