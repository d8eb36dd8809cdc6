//! Artifact ids: the blake3 hash of a file, or of a folder's listing.
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArtifactKind {
    File,
    Tree,
}

/// `file:<hex>` or `tree:<hex>`; serialises as that string.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ArtifactId {
    pub kind: ArtifactKind,
    /// 64 lowercase hex digits of a blake3 hash.
    pub hash: String,
}

impl fmt::Display for ArtifactId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            ArtifactKind::File => "file",
            ArtifactKind::Tree => "tree",
        };
        write!(f, "{kind}:{}", self.hash)
    }
}

impl ArtifactId {
    /// The first 12 hex digits, for display.
    pub fn short(&self) -> &str {
        &self.hash[..12.min(self.hash.len())]
    }
}

impl FromStr for ArtifactId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind, hash) = s
            .split_once(':')
            .ok_or_else(|| format!("bad artifact id `{s}`"))?;
        let kind = match kind {
            "file" => ArtifactKind::File,
            "tree" => ArtifactKind::Tree,
            _ => return Err(format!("bad artifact kind in `{s}`")),
        };
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("bad artifact hash in `{s}`"));
        }
        Ok(ArtifactId {
            kind,
            hash: hash.to_ascii_lowercase(),
        })
    }
}

impl Serialize for ArtifactId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ArtifactId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}
