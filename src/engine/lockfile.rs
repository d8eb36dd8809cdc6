//! The lockfile (`NAME.lock` beside `NAME.yaml`): what each stage was last
//! run with and what it produced, so another team can reproduce the run
//! (`run --locked`) or learn exactly why not.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::cache::{atomic_write, ArtifactId, Fingerprint, StageKey, STAGE_KEY_SCHEMA};
use crate::manifest::{Input, Stage};

/// Bump when the lockfile layout changes.
pub const LOCKFILE_VERSION: u32 = 1;

/// A lockfile that cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LockfileError {
    #[error("{}: not a valid lockfile: {reason}", .path.display())]
    Invalid {
        path: PathBuf,
        reason: serde_yaml::Error,
    },
    #[error("{}: lockfile version {version} is not supported (expected {LOCKFILE_VERSION})", .path.display())]
    Version { path: PathBuf, version: u32 },
    #[error("{}: {error}", .path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error(transparent)]
    Serialize(serde_yaml::Error),
}

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
    /// Why the outputs are not bitwise reproducible (NCCL's reductions),
    /// when the run said so: `run --locked` gives it as the reason for
    /// other bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_bitwise: Option<String>,
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
    pub fn load(path: &Path) -> Result<Option<Lockfile>, LockfileError> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let lock: Lockfile =
                    serde_yaml::from_str(&text).map_err(|reason| LockfileError::Invalid {
                        path: path.to_path_buf(),
                        reason,
                    })?;
                if lock.version != LOCKFILE_VERSION {
                    return Err(LockfileError::Version {
                        path: path.to_path_buf(),
                        version: lock.version,
                    });
                }
                Ok(Some(lock))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(LockfileError::Io {
                path: path.to_path_buf(),
                error,
            }),
        }
    }

    pub fn save(&self, path: &Path) -> Result<(), LockfileError> {
        let mut text = String::from(
            "# Written by alignflow after each successful run; commit it with the manifest.\n",
        );
        text.push_str(&serde_yaml::to_string(self).map_err(LockfileError::Serialize)?);
        atomic_write(path, text.as_bytes()).map_err(|error| LockfileError::Io {
            path: path.to_path_buf(),
            error,
        })
    }
}

/// The lockfile entry of a finished `stage` run with `key`: each input's
/// source as the manifest wrote it and the id it had.
pub(super) fn lock_entry(
    stage: &Stage,
    key: &StageKey,
    outputs: &BTreeMap<String, ArtifactId>,
    not_bitwise: Option<String>,
) -> LockedStage {
    let inputs = stage
        .inputs
        .iter()
        .filter_map(|(name, input)| {
            let id = key.inputs.get(name)?.clone();
            let source = match input {
                Input::Stage { stage, output, .. } => LockedInput {
                    path: None,
                    stage: Some(stage.clone()),
                    output: Some(output.clone()),
                    id,
                },
                Input::Path { written, .. } => LockedInput {
                    path: Some(written.clone()),
                    stage: None,
                    output: None,
                    id,
                },
            };
            Some((name.clone(), source))
        })
        .collect();
    LockedStage {
        op: key.op.clone(),
        op_version: key.op_version,
        fingerprint: key.fingerprint(),
        seed: key.seed,
        params: key.params.clone(),
        inputs,
        outputs: outputs.clone(),
        not_bitwise,
    }
}

/// Keeps the ids `previous` recorded for `entry`'s volatile outputs (timing
/// figures such as tokens/s) when the stage ran with the same fingerprint and
/// reproduced every other output: those bytes differ between identical runs,
/// and recording each new id would churn the committed lockfile on every
/// cold rerun without saying anything about reproducibility.
pub(super) fn keep_volatile_ids(entry: &mut LockedStage, previous: Option<&LockedStage>) {
    let Some(previous) = previous.filter(|p| p.fingerprint == entry.fingerprint) else {
        return;
    };
    let Some(op) = crate::ops::find(&entry.op) else {
        return;
    };
    let volatile = |name: &str| {
        op.declared_outputs()
            .iter()
            .any(|p| p.name == name && p.volatile)
    };
    let same_names = previous.outputs.keys().eq(entry.outputs.keys());
    let stable_same = entry
        .outputs
        .iter()
        .filter(|(name, _)| !volatile(name))
        .all(|(name, id)| previous.outputs.get(name) == Some(id));
    if !(same_names && stable_same) {
        return;
    }
    for (name, id) in entry.outputs.iter_mut() {
        if volatile(name) {
            *id = previous.outputs[name].clone();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::ArtifactKind;

    fn id(digit: char) -> ArtifactId {
        ArtifactId {
            kind: ArtifactKind::File,
            hash: digit.to_string().repeat(64),
        }
    }

    fn sft_entry(fingerprint: &str, model: char, metrics: char) -> LockedStage {
        LockedStage {
            op: "sft".into(),
            op_version: 1,
            fingerprint: Fingerprint(fingerprint.into()),
            seed: 1,
            params: serde_json::json!({}),
            inputs: BTreeMap::new(),
            outputs: [
                ("model".to_string(), id(model)),
                ("metrics".to_string(), id(metrics)),
            ]
            .into_iter()
            .collect(),
            not_bitwise: None,
        }
    }

    #[test]
    fn a_rerun_keeps_the_locked_ids_of_volatile_outputs() {
        let previous = sft_entry("f1", 'a', 'b');
        let mut rerun = sft_entry("f1", 'a', 'c');
        keep_volatile_ids(&mut rerun, Some(&previous));
        assert_eq!(rerun, previous);
    }

    #[test]
    fn volatile_ids_follow_a_changed_run() {
        let previous = sft_entry("f1", 'a', 'b');
        let mut other_model = sft_entry("f1", 'd', 'c');
        keep_volatile_ids(&mut other_model, Some(&previous));
        assert_eq!(other_model.outputs["metrics"], id('c'));
        let mut other_fingerprint = sft_entry("f2", 'a', 'c');
        keep_volatile_ids(&mut other_fingerprint, Some(&previous));
        assert_eq!(other_fingerprint.outputs["metrics"], id('c'));
        let mut first = sft_entry("f1", 'a', 'c');
        keep_volatile_ids(&mut first, None);
        assert_eq!(first.outputs["metrics"], id('c'));
    }
}
