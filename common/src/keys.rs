//! Key derivation (docs/PROTOCOL.md, "Keys"): every key of the system comes from the master's
//! `secret`, so no key material is configured twice.
//!
//! - A node's HMAC secret in `derived` mode: `hex(HMAC-SHA256(secret, "vmwatch node key v1" ‖
//!   0x00 ‖ node_id))`, so no hypervisor can sign as another.
//! - The master's CURVE keypair: secret key `HKDF-SHA256(ikm = secret, salt = "", info =
//!   "vmwatch curve server v1", L = 32)`, public key its X25519 base-point multiple.
//! - Node N's CURVE keypair (the client key it presents, accepted only while N is enrolled):
//!   the same with `info = "vmwatch curve node v1" ‖ 0x00 ‖ N`.
//! - The fleet transport keypair (round 2's CURVE client key every node held, accepted only
//!   with `allow_fleet_transport`): the same with `info = "vmwatch curve transport v1"`.
//!
//! CURVE keys are written as Z85 (40 characters for 32 bytes), as libzmq and pyzmq take them.

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::protocol::NodeId;

/// The label of a node's HMAC secret.
pub const NODE_KEY_LABEL: &[u8] = b"vmwatch node key v1";
/// The HKDF `info` of the master's CURVE secret key.
pub const SERVER_KEY_INFO: &[u8] = b"vmwatch curve server v1";
/// The HKDF `info` of the fleet transport (CURVE client) secret key.
pub const TRANSPORT_KEY_INFO: &[u8] = b"vmwatch curve transport v1";

/// The HKDF `info` label of a node's CURVE secret key (followed by 0x00 and the node id).
pub const NODE_CURVE_KEY_LABEL: &[u8] = b"vmwatch curve node v1";

/// A CURVE keypair: 32-byte X25519 keys.
#[derive(Clone, PartialEq, Eq)]
pub struct CurveKeyPair {
    pub public: [u8; 32],
    pub secret: [u8; 32],
}

impl std::fmt::Debug for CurveKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "CurveKeyPair {{ public: {}, secret: ******** }}",
            z85_encode(&self.public)
        )
    }
}

impl CurveKeyPair {
    /// The keypair whose secret key is `secret` (the public key is computed from it).
    pub fn from_secret(secret: [u8; 32]) -> CurveKeyPair {
        let public =
            x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(secret)).to_bytes();
        CurveKeyPair { public, secret }
    }

    /// From a Z85-encoded secret key (`transport_key=` in a node's configuration).
    pub fn from_z85_secret(text: &str) -> Result<CurveKeyPair, String> {
        Ok(CurveKeyPair::from_secret(z85_decode(text)?))
    }
}

/// A node's HMAC secret in `derived` mode, as the hex text the node's `secret=` holds.
pub fn node_secret(master_secret: &[u8], node_id: &NodeId) -> String {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for it.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(master_secret)
        .expect("HMAC takes keys of any length");
    mac.update(NODE_KEY_LABEL);
    mac.update(&[0]);
    mac.update(node_id.as_str().as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

fn hkdf32(ikm: &[u8], info: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's limit of 255 × 32, so `expand` cannot fail.
    Hkdf::<Sha256>::new(None, ikm)
        .expand(info, &mut out)
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    out
}

/// The master's CURVE keypair, from the master's `secret`.
pub fn server_keypair(master_secret: &[u8]) -> CurveKeyPair {
    CurveKeyPair::from_secret(hkdf32(master_secret, SERVER_KEY_INFO))
}

/// The fleet transport keypair every node presents as its CURVE client key.
pub fn transport_keypair(master_secret: &[u8]) -> CurveKeyPair {
    CurveKeyPair::from_secret(hkdf32(master_secret, TRANSPORT_KEY_INFO))
}

/// Node N's CURVE keypair: `HKDF-SHA256(ikm = secret, salt = none, info = "vmwatch curve node
/// v1" ‖ 0x00 ‖ N, L = 32)` and its X25519 public key.
pub fn node_curve_keypair(master_secret: &[u8], node_id: &NodeId) -> CurveKeyPair {
    let mut info = Vec::with_capacity(NODE_CURVE_KEY_LABEL.len() + 1 + node_id.as_str().len());
    info.extend_from_slice(NODE_CURVE_KEY_LABEL);
    info.push(0);
    info.extend_from_slice(node_id.as_str().as_bytes());
    CurveKeyPair::from_secret(hkdf32(master_secret, &info))
}

/// Z85 text of a 32-byte key (40 characters).
pub fn z85_encode(key: &[u8; 32]) -> String {
    z85::encode(key)
}

/// A 32-byte key from its Z85 text.
pub fn z85_decode(text: &str) -> Result<[u8; 32], String> {
    if text.len() != 40 {
        return Err(format!(
            "a CURVE key is 40 characters of Z85, got {}",
            text.len()
        ));
    }
    let bytes = z85::decode(text).map_err(|_| "not valid Z85 text".to_owned())?;
    bytes.try_into().map_err(|_| "not a 32-byte key".to_owned())
}

/// The lines of node N's configuration that carry its identity and key material
/// (`vmwatch-master enroll N`, the enrollment API's `config`): `node_secret` is the HMAC secret
/// the master expects of it, `connect` the endpoints it should use (none: no `connect=` line).
pub fn node_config_lines(
    master_secret: &[u8],
    node_id: &NodeId,
    node_secret: &[u8],
    connect: &[String],
) -> String {
    let secret = String::from_utf8_lossy(node_secret);
    let connect = if connect.is_empty() {
        String::new()
    } else {
        format!("connect={}\n", connect.join(","))
    };
    format!(
        "{connect}node_id={node_id}\nsecret={secret}\nmaster_key={}\nnode_key={}\n",
        z85_encode(&server_keypair(master_secret).public),
        z85_encode(&node_curve_keypair(master_secret, node_id).secret),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"correct horse battery staple";

    /// The test vectors of docs/PROTOCOL.md.
    #[test]
    fn vectors() {
        let hv01 = NodeId::parse("hv-01").unwrap();
        assert_eq!(
            node_secret(SECRET, &hv01),
            "fdc29d0c39405e1c4ef61c97fdf392ab7760f720250ae3188e642c01f76c0a85"
        );
        let server = server_keypair(SECRET);
        assert_eq!(
            z85_encode(&server.secret),
            "(!@S:+LLXRK$n2WIm2D]lyZ%2wdfC7hA+{aW+)o:"
        );
        assert_eq!(
            z85_encode(&server.public),
            "}:#qp.zgNNZ(Lqo*bBkQCxlyE3ELw>38Bqsz#XG0"
        );
        let transport = transport_keypair(SECRET);
        assert_eq!(
            z85_encode(&transport.secret),
            "{Tn<<U/}BumA4m}M}m]^=m){)p>.YPNC}7xbQW+6"
        );
        assert_eq!(
            z85_encode(&transport.public),
            "y4mG2m]HT8AcIRUOzRYJ@D}mIuh5Q^2>q/NEA?Kv"
        );
    }

    /// Node keys: the test vectors of docs/PROTOCOL.md, "Node keys".
    #[test]
    fn node_curve_vectors() {
        let hv01 = NodeId::parse("hv-01").unwrap();
        let k = node_curve_keypair(SECRET, &hv01);
        assert_eq!(
            z85_encode(&k.secret),
            "y+BN0pOKwLMSwF5Rz%u1s/5#nUX}d:4[ls)SsAYK"
        );
        assert_eq!(
            z85_encode(&k.public),
            "IA2j=[wm4tf642TI0rv<n)o#)OFugg6{enXnNyTV"
        );
        let hv02 = node_curve_keypair(SECRET, &NodeId::parse("hv-02").unwrap());
        assert_eq!(
            z85_encode(&hv02.public),
            "jY?P-Pi+1Hrwk3iE-C{IlDSI[P9XzxuThzDd.2>g"
        );
    }

    #[test]
    fn z85_round_trip_and_errors() {
        let k = transport_keypair(SECRET);
        let text = z85_encode(&k.secret);
        assert_eq!(CurveKeyPair::from_z85_secret(&text).unwrap(), k);
        assert!(z85_decode("short").unwrap_err().contains("40 characters"));
        assert!(z85_decode(&"~".repeat(40)).is_err());
        assert!(!format!("{k:?}").contains(&text));
    }

    #[test]
    fn nodes_get_different_secrets() {
        let a = node_secret(SECRET, &NodeId::parse("a").unwrap());
        let b = node_secret(SECRET, &NodeId::parse("b").unwrap());
        assert_ne!(a, b);
        assert_eq!(a.len(), 64);
    }
}
