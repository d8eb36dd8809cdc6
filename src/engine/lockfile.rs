//! The lockfile (`NAME.lock` beside `NAME.yaml`): what each stage was last
//! run with and what it produced, so another team can reproduce the run
//! (`run --locked`) or learn exactly why not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cache::{atomic_write, ArtifactId, Fingerprint, StageKey, STAGE_KEY_SCHEMA};

/// Bump when the lockfile layout changes.
pub const LOCKFILE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lockfile {
    pub version: u32,
    pub pipeline: String,
    pub engine_version: String,
    pub stages: BTreeMap<String, LockedStage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockedStage {
    pub op: String,
    pub op_version: u32,
    pub fingerprint: Fingerprint,
    pub seed: u64,
    pub params: serde_json::Value,
    pub inputs: BTreeMap<String, LockedInput>,
    pub outputs: BTreeMap<String, ArtifactId>,
}

/// Where an input came from, and its id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockedInput {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    pub id: ArtifactId,
}

impl LockedStage {
    /// The stage key this entry was run with.
    pub fn key(&self) -> StageKey {
        StageKey {
            schema_version: STAGE_KEY_SCHEMA,
            op: self.op.clone(),
            op_version: self.op_version,
            params: self.params.clone(),
            inputs: self
                .inputs
                .iter()
                .map(|(k, v)| (k.clone(), v.id.clone()))
                .collect(),
            seed: self.seed,
        }
    }
}

/// `dir/NAME.lock` for manifest `dir/NAME.yaml`.
pub fn lockfile_path(manifest: &Path) -> PathBuf {
    manifest.with_extension("lock")
}

impl Lockfile {
    pub fn new(pipeline: &str) -> Lockfile {
        Lockfile {
            version: LOCKFILE_VERSION,
            pipeline: pipeline.to_string(),
            engine_version: crate::ENGINE_VERSION.to_string(),
            stages: BTreeMap::new(),
        }
    }

    /// Reads a lockfile; `Ok(None)` when there is none.
    pub fn load(path: &Path) -> anyhow::Result<Option<Lockfile>> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let lock: Lockfile = serde_yaml::from_str(&text).map_err(|e| {
                    anyhow::anyhow!("{}: not a valid lockfile: {e}", path.display())
                })?;
                anyhow::ensure!(
                    lock.version == LOCKFILE_VERSION,
                    "{}: lockfile version {} is not supported (expected {LOCKFILE_VERSION})",
                    path.display(),
                    lock.version
                );
                Ok(Some(lock))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
        }
    }

    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        let mut text = String::from(
            "# Written by alignflow after each successful run; commit it with the manifest.\n",
        );
        text.push_str(&serde_yaml::to_string(self)?);
        atomic_write(path, text.as_bytes()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }
}
