//! The stage fingerprint: blake3 of a canonical [`StageKey`].
use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use super::ArtifactId;

/// Bump when the key's structure or hashing changes: every fingerprint changes.
pub const STAGE_KEY_SCHEMA: u32 = 1;

/// Everything a stage's result depends on, and nothing else (no paths,
/// timestamps or machine facts).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageKey {
    pub schema_version: u32,
    pub op: String,
    pub op_version: u32,
    /// Normalised params; serde_json objects are sorted maps, so the JSON
    /// encoding is canonical.
    pub params: serde_json::Value,
    /// Input name to artifact id.
    pub inputs: BTreeMap<String, ArtifactId>,
    pub seed: u64,
}

impl StageKey {
    pub fn fingerprint(&self) -> Fingerprint {
        let bytes = serde_json::to_vec(self).expect("stage keys serialise");
        Fingerprint(blake3::hash(&bytes).to_hex().to_string())
    }
}

/// 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Fingerprint(pub String);

impl Fingerprint {
    pub fn short(&self) -> &str {
        &self.0[..12.min(self.0.len())]
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
