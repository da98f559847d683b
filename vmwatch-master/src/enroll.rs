//! Enrollment and revocation (SPEC §10), shared by the API (`POST /api/v1/nodes/{id}/enrollment`,
//! `DELETE /api/v1/nodes/{id}`) and the commands (`vmwatch-master enroll N`, `revoke N`). The
//! registry's table is written here; a running master follows it (ingest polls its version, the
//! core journals the change and removes a revoked node's rows).

use serde::Serialize;
use vmwatch_common::keys;
use vmwatch_common::protocol::NodeId;

use crate::config::MasterConfig;
use crate::store::{self, Enrolled, Revoked, StoreError};

/// What an enrollment answers: everything the node's configuration needs.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Enrollment {
    pub node_id: String,
    /// The node's HMAC secret (`secret=` in its configuration).
    pub secret: String,
    /// The master's CURVE public key, Z85.
    pub master_key: String,
    /// The node's CURVE secret key, Z85 (`node_key=`).
    pub node_key: String,
    /// The endpoints the node should connect to.
    pub connect: Vec<String>,
    /// The exact lines for vmwatch-node.conf.
    pub config: String,
    /// Whether this call enrolled it (false: it already was).
    pub new: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error("node `{0}` was revoked; its key derives from its id, so enrolling it again would give back the revoked key: enroll the hypervisor under a new node id")]
    WasRevoked(String),
    #[error("no `secret` in the master's configuration: node keys cannot be derived")]
    NoSecret,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Enrolls `node` (idempotent) and returns its configuration.
pub fn enroll(
    config: &MasterConfig,
    db: &mut store::Registry,
    node: &NodeId,
    now: u64,
) -> Result<Enrollment, EnrollError> {
    let secret = config.secret.as_ref().ok_or(EnrollError::NoSecret)?;
    let pair = keys::node_curve_keypair(secret.expose(), node);
    let outcome = db.enroll(node.as_str(), &keys::z85_encode(&pair.public), now)?;
    if outcome == Enrolled::Revoked {
        return Err(EnrollError::WasRevoked(node.as_str().to_owned()));
    }
    let hmac = config.key_for(node).ok_or(EnrollError::NoSecret)?;
    let connect = config.connect_endpoints();
    Ok(Enrollment {
        node_id: node.as_str().to_owned(),
        secret: String::from_utf8_lossy(&hmac).into_owned(),
        master_key: keys::z85_encode(&keys::server_keypair(secret.expose()).public),
        node_key: keys::z85_encode(&pair.secret),
        config: keys::node_config_lines(secret.expose(), node, &hmac, &connect),
        connect,
        new: outcome == Enrolled::New,
    })
}

/// Revokes `node` (idempotent).
pub fn revoke(db: &mut store::Registry, node: &NodeId, now: u64) -> Result<Revoked, StoreError> {
    db.revoke(node.as_str(), now)
}
