//! Property tests ("the fuzzer"): arbitrary frames and arbitrary message sequences through
//! `authenticate` and the rules, with simulated time. Nothing may panic, a rejected message must
//! change nothing, and what is accepted must respect the documented bounds.
//!
//! CI runs `FUZZ_CASES` cases per property (default 2,000; `scripts/test.sh` sets it).

use proptest::prelude::*;
use vmwatch_common::keys;
use vmwatch_common::protocol::{
    authenticate, bounds, encode, AgentCounters, Body, Bye, DomainEvent, DomainState, DomainStats,
    Heartbeat, NodeId, Payload, Snapshot, Stats, STATES,
};

use crate::rules::{self, Inventory, Rules};

const SECRET: &[u8] = b"fuzzing master secret";
const NODES: [&str; 3] = ["hv-a", "hv-b", "hv-c"];

fn rules() -> Rules {
    Rules {
        max_nodes: 2,
        max_clock_skew_ms: 300_000,
        max_message_age_ms: 3_600_000,
        node_timeout_ms: 90_000,
        idle_windows: 1,
        idle_tx_packets_max: 0,
        idle_wr_reqs_max: 0,
        duplicate_grace_ms: 1_000,
        max_vms_per_node: 64,
        min_stats_interval_ms: 1_000,
        activity_min_window_ms: 60_000,
    }
}

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2_000)
}

fn key_for(n: &NodeId) -> Option<Vec<u8>> {
    NODES
        .contains(&n.as_str())
        .then(|| keys::node_secret(SECRET, n).into_bytes())
}

/// Strings a hostile node would try: vocabulary, near-vocabulary, control characters, quotes,
/// long and non-ASCII text.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec![
            "running",
            "paused",
            "shutoff",
            "started",
            "booted",
            "unknown-7",
            "",
            "uuid-1",
            "uuid-2",
            "running\"} 1\n# EOF",
            "\u{1b}[31m",
            "é",
        ])
        .prop_map(str::to_owned),
        ".{0,40}",
        (0usize..2000).prop_map(|n| "x".repeat(n)),
    ]
}

fn body() -> impl Strategy<Value = Body> {
    let dom =
        (text(), text(), text(), text()).prop_map(|(uuid, name, state, reason)| DomainState {
            uuid,
            name,
            state,
            reason,
        });
    prop_oneof![
        (prop::collection::vec(dom, 0..4), text()).prop_map(|(domains, hostname)| {
            Body::Snapshot(Snapshot {
                domains,
                hostname,
                libvirt_version: "9.0.0".into(),
            })
        }),
        (text(), text(), text(), text(), any::<u64>()).prop_map(|(uuid, name, event, state, t)| {
            Body::Event(DomainEvent {
                uuid,
                name,
                event,
                detail: "booted".into(),
                state,
                reason: "booted".into(),
                event_ts: t,
            })
        }),
        (text(), text(), any::<u64>(), any::<u64>()).prop_map(|(uuid, state, tx, wr)| {
            Body::Stats(Stats {
                interval_s: 600,
                domains: vec![DomainStats {
                    uuid,
                    name: "n".into(),
                    state,
                    tx_pkts: tx,
                    wr_reqs: wr,
                    ..Default::default()
                }],
            })
        }),
        (
            prop::sample::select(vec!["up", "down", "sideways"]),
            any::<u64>()
        )
            .prop_map(|(l, d)| {
                Body::Heartbeat(Heartbeat {
                    libvirt: l.into(),
                    domains: d,
                    version: "v".into(),
                    uptime_s: 1,
                    agent: AgentCounters::default(),
                })
            }),
        text().prop_map(|reason| Body::Bye(Bye { reason })),
    ]
}

/// One step of a hostile sequence: who claims to send it, under which key, which boot, how far
/// `seq` and the clock move, and a possible corruption of the frames.
#[derive(Debug, Clone)]
struct Step {
    claimed: usize,
    signer: usize,
    boot: u8,
    seq_delta: i8,
    ts_offset_s: i32,
    advance_s: u16,
    corrupt: Option<(usize, usize, u8)>,
    body: Body,
}

fn step() -> impl Strategy<Value = Step> {
    (
        0..NODES.len() + 1,
        0..NODES.len(),
        0u8..3,
        -2i8..4,
        prop_oneof![Just(0i32), -400i32..400],
        0u16..200,
        prop::option::weighted(0.2, (0usize..5, any::<usize>(), any::<u8>())),
        body(),
    )
        .prop_map(
            |(claimed, signer, boot, seq_delta, ts_offset_s, advance_s, corrupt, body)| Step {
                claimed,
                signer,
                boot,
                seq_delta,
                ts_offset_s,
                advance_s,
                corrupt,
                body,
            },
        )
}

fn snapshot(inv: &Inventory) -> impl PartialEq + std::fmt::Debug {
    let mut nodes: Vec<_> = inv.nodes.values().cloned().collect();
    nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    let mut vms: Vec<_> = inv
        .vms
        .iter()
        .map(|(n, m)| (n.clone(), m.values().cloned().collect::<Vec<_>>()))
        .filter(|(_, v)| !v.is_empty())
        .collect();
    vms.sort_by(|a, b| a.0.cmp(&b.0));
    (nodes, vms)
}

fn check_bounds(inv: &Inventory) {
    assert!(inv.nodes.len() <= rules().max_nodes);
    for vm in inv.vms.values().flat_map(|m| m.values()) {
        assert!(
            vm.name.len() <= bounds::NAME,
            "name of {} bytes",
            vm.name.len()
        );
        assert!(vm.uuid.len() <= bounds::ID);
        assert!(
            STATES.contains(&vm.state.as_str())
                || (vm.state.starts_with("unknown") && vm.state.len() <= bounds::WORD),
            "state {:?}",
            vm.state
        );
        assert!(!vm.reason.chars().any(char::is_control));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    /// Arbitrary frames never panic and are never accepted without the key.
    #[test]
    fn arbitrary_frames(frames in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..80), 0..7)) {
        let r = authenticate(&frames, key_for);
        prop_assert!(r.is_err());
    }

    /// Sequences of signed, forged, replayed, skewed and corrupted messages.
    #[test]
    fn message_sequences(steps in prop::collection::vec(step(), 1..40)) {
        let rules = rules();
        let mut inv = Inventory::default();
        let mut now: u64 = 1_800_000_000_000;
        let mut seqs = [[0u64; 3]; 4];
        for s in steps {
            now += u64::from(s.advance_s) * 1000;
            let claimed = NODES.get(s.claimed).copied().unwrap_or("hv-z");
            let node = NodeId::parse(claimed).expect("valid id");
            let seq = &mut seqs[s.claimed][usize::from(s.boot)];
            *seq = seq.saturating_add_signed(i64::from(s.seq_delta));
            let payload = Payload {
                boot: format!("boot-{}", s.boot),
                boot_ts: 1_700_000_000_000 + u64::from(s.boot) * 1000,
                seq: *seq,
                ts: now.saturating_add_signed(i64::from(s.ts_offset_s) * 1000),
                body: s.body,
            };
            let signer = NodeId::parse(NODES[s.signer]).expect("valid id");
            let mut frames = encode(keys::node_secret(SECRET, &signer).as_bytes(), &node, &payload).to_vec();
            if let Some((f, at, byte)) = s.corrupt {
                if let Some(frame) = frames.get_mut(f) {
                    if !frame.is_empty() {
                        let i = at % frame.len();
                        frame[i] ^= byte | 1;
                    }
                }
            }
            let before = snapshot(&inv);
            let accepted = match authenticate(&frames, key_for) {
                Ok(m) => {
                    // Only the true signer's own id passes the HMAC.
                    prop_assert_eq!(m.node_id().as_str(), NODES[s.signer]);
                    rules::handle(&mut inv, &rules, now, m).is_ok()
                }
                Err(_) => false,
            };
            if !accepted {
                prop_assert_eq!(&before, &snapshot(&inv), "a rejected message changed the inventory");
            }
            let _ = rules::check_liveness(&mut inv, &rules, now, 1_800_000_000_000, 64);
            let _ = crate::duplicate::check(&mut inv, now, rules.duplicate_grace_ms);
            check_bounds(&inv);
        }
    }
}
