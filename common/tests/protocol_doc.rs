//! docs/PROTOCOL.md is what clients in other languages are written from, so its values are
//! read from the document itself and checked against the implementation: the unit tests of
//! `keys.rs` and `protocol.rs` hold copies of these values, and a copy can drift from the page.

use vmwatch_common::keys::{
    node_curve_keypair, node_secret, server_keypair, transport_keypair, z85_encode,
};
use vmwatch_common::protocol::{authenticate, sign, Body, NodeId, TAG};

const DOC: &str = include_str!("../../docs/PROTOCOL.md");
const SECRET: &[u8] = b"correct horse battery staple";

/// The value in backquotes of the table row whose first cell is `label`.
fn row(label: &str) -> &'static str {
    let start = format!("| {label} | `");
    let line = DOC
        .lines()
        .find(|l| l.starts_with(&start))
        .unwrap_or_else(|| panic!("PROTOCOL.md has no row {label:?}"));
    line[start.len()..]
        .strip_suffix("` |")
        .unwrap_or_else(|| panic!("row {label:?} does not end in a `value`: {line}"))
}

/// The text between `before` and the next `after`, after the first `before`.
fn between(before: &str, after: &str) -> &'static str {
    let from = DOC
        .find(before)
        .unwrap_or_else(|| panic!("PROTOCOL.md lacks {before:?}"))
        + before.len();
    let len = DOC[from..]
        .find(after)
        .unwrap_or_else(|| panic!("nothing ends {before:?}"));
    &DOC[from..from + len]
}

fn id(n: &str) -> NodeId {
    NodeId::parse(n).expect("a valid node id")
}

#[test]
fn the_key_vectors_in_the_doc_are_what_the_code_derives() {
    let server = server_keypair(SECRET);
    let transport = transport_keypair(SECRET);
    let hv01 = node_curve_keypair(SECRET, &id("hv-01"));
    let hv02 = node_curve_keypair(SECRET, &id("hv-02"));
    let rows = [
        (
            "node secret of `hv-01` (derived)",
            node_secret(SECRET, &id("hv-01")),
        ),
        ("master CURVE secret key (Z85)", z85_encode(&server.secret)),
        (
            "master CURVE public key = `master_key` (Z85)",
            z85_encode(&server.public),
        ),
        (
            "fleet transport secret key = `transport_key` (Z85)",
            z85_encode(&transport.secret),
        ),
        (
            "fleet transport public key (Z85)",
            z85_encode(&transport.public),
        ),
        (
            "CURVE secret key of node `hv-01` = its `node_key` (Z85)",
            z85_encode(&hv01.secret),
        ),
        (
            "CURVE public key of node `hv-01` (Z85)",
            z85_encode(&hv01.public),
        ),
        (
            "CURVE public key of node `hv-02` (Z85)",
            z85_encode(&hv02.public),
        ),
    ];
    let wrong: Vec<String> = rows
        .iter()
        .filter(|(label, code)| row(label) != code)
        .map(|(label, code)| format!("{label}: doc {}, code {code}", row(label)))
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
    // The doc's minimal node carries the enrolled hv-01's three values.
    for (constant, value) in [
        ("SECRET", node_secret(SECRET, &id("hv-01"))),
        ("MASTER_KEY", z85_encode(&server.public)),
        ("NODE_KEY", z85_encode(&hv01.secret)),
    ] {
        let line = format!("{constant} = b\"{value}\"");
        assert!(DOC.contains(&line), "the Python node lacks {line}");
    }
}

#[test]
fn the_worked_example_in_the_doc_signs_and_authenticates_as_stated() {
    let section = between("## Worked example", "## A minimal node in Python");
    let stated_len: usize = between("an `event` payload (frame\n3, ", " bytes")
        .parse()
        .expect("the stated length");
    let payload = between("no trailing newline):\n\n```\n", "\n```").as_bytes();
    assert_eq!(payload.len(), stated_len, "the payload's stated length");

    let mut input = TAG.to_vec();
    input.extend_from_slice(b"\0hv-01\0");
    input.extend_from_slice(payload);
    let prefix: String = between("The HMAC input starts with these bytes (hex): `", "…`")
        .split_whitespace()
        .collect();
    assert!(
        hex::encode(&input).starts_with(&prefix),
        "HMAC input prefix {prefix}"
    );

    let derived_key = node_secret(SECRET, &id("hv-01"));
    assert!(
        section.contains(&format!("the 64 ASCII bytes\n`{derived_key}`")),
        "the example's derived key"
    );
    let derived = sign(derived_key.as_bytes(), b"hv-01", payload);
    let stated_derived = between("is the 32 bytes whose\nhex is\n\n```\n", "\n```");
    assert_eq!(
        hex::encode(derived),
        stated_derived,
        "frame 4, derived mode"
    );
    let shared = sign(SECRET, b"hv-01", payload);
    let stated_shared = between("master secret itself) it is\n`", "`");
    assert_eq!(hex::encode(shared), stated_shared, "frame 4, shared mode");

    // And the master's own check accepts it, with every field where the doc's tables put it.
    let frames = [
        TAG.to_vec(),
        b"hv-01".to_vec(),
        payload.to_vec(),
        derived.to_vec(),
    ];
    let message = authenticate(&frames, |_| Some(derived_key.as_bytes())).expect("accepted");
    let p = message.payload();
    assert_eq!(
        (p.boot.as_str(), p.boot_ts, p.seq, p.ts),
        (
            "0b7c5a5e-3f5e-4b8e-9a53-2d0c8f1e6a10",
            1_795_377_600_000,
            7,
            1_795_377_631_250
        )
    );
    let Body::Event(e) = &p.body else {
        panic!("not an event: {:?}", p.body)
    };
    assert_eq!(
        (
            e.uuid.as_str(),
            e.name.as_str(),
            e.event.as_str(),
            e.detail.as_str(),
            e.state.as_str(),
            e.reason.as_str(),
            e.event_ts
        ),
        (
            "4f8e1c2a-9d3b-4e6f-8a7c-1b2d3e4f5a6b",
            "web-01",
            "started",
            "booted",
            "running",
            "booted",
            1_795_377_631_247
        )
    );
}
