//! Training checkpoints: one folder per optimizer step under a root,
//! written atomically and pruned to the last K.
//!
//! ```text
//! ROOT/step-00000500/model.safetensors      VarStore variables
//!                   /optimizer.safetensors  AdamW::state_tensors
//!                   /state.json             CheckpointState
//! ```
//!
//! A checkpoint is written into `ROOT/step-N.tmp-<pid>`, each file fsynced,
//! then renamed into place and the root fsynced: a folder named `step-N`
//! is complete, whatever crashed when.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::nn::VarStore;
use tch::Tensor;

use super::loop_state::TrainState;
use super::optim::{AdamW, OptimError};

const MODEL_FILE: &str = "model.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const STATE_FILE: &str = "state.json";
/// The layout version in `state.json`, bumped when the layout changes.
const FORMAT: u32 = 1;

/// Errors reading or writing checkpoints; each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// A file-system operation failed.
    #[error("checkpoint I/O on {path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// libtorch could not write or read a safetensors file.
    #[error("checkpoint tensors in {path}: {source}")]
    Torch {
        /// The safetensors file.
        path: PathBuf,
        /// libtorch's error.
        #[source]
        source: tch::TchError,
    },
    /// `state.json` is not valid.
    #[error("checkpoint state {path}: {source}")]
    Json {
        /// The `state.json` file.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The optimizer state does not fit the optimizer.
    #[error("checkpoint optimizer state {path}: {source}")]
    Optim {
        /// The optimizer file.
        path: PathBuf,
        /// What did not fit.
        #[source]
        source: OptimError,
    },
    /// `state.json` has a layout this worker does not know.
    #[error("checkpoint {path} has format {found}, this worker reads format {FORMAT}")]
    Format {
        /// The `state.json` file.
        path: PathBuf,
        /// The format found.
        found: u32,
    },
}

/// Error constructors for `map_err`, each naming the file.
fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError {
    let path = path.to_path_buf();
    move |source| CheckpointError::Io { path, source }
}
fn torch(path: &Path) -> impl FnOnce(tch::TchError) -> CheckpointError {
    let path = path.to_path_buf();
    move |source| CheckpointError::Torch { path, source }
}
fn json(path: &Path) -> impl FnOnce(serde_json::Error) -> CheckpointError {
    let path = path.to_path_buf();
    move |source| CheckpointError::Json { path, source }
}

/// Everything in `state.json` besides the format number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// The loop counters; `train.step` is also the schedule's position.
    pub train: TrainState,
    /// The learning rate of the last step (informational: the schedule
    /// recomputes it from the step).
    pub lr: f64,
    /// Op-specific state (a PPO KL controller, best eval loss, ...).
    #[serde(default)]
    pub extra: serde_json::Value,
}

#[derive(Serialize, Deserialize)]
struct StateFile {
    format: u32,
    #[serde(flatten)]
    state: CheckpointState,
}

/// The checkpoints of one training run: a root folder and how many to keep.
#[derive(Debug, Clone)]
pub struct Checkpoints {
    root: PathBuf,
    keep: usize,
}

impl Checkpoints {
    /// Checkpoints under `root`, keeping the newest `keep` (at least 1).
    pub fn new(root: impl Into<PathBuf>, keep: usize) -> Self {
        Self {
            root: root.into(),
            keep: keep.max(1),
        }
    }

    /// Writes the checkpoint of step `state.train.step` atomically (replacing
    /// one of the same step), then deletes all but the newest `keep`.
    /// Returns its folder.
    pub fn save(
        &self,
        vs: &VarStore,
        opt: &AdamW,
        state: &CheckpointState,
    ) -> Result<PathBuf, CheckpointError> {
        self.save_parts(&[CheckpointPart { name: "", vs, opt }], state)
    }

    /// [`Checkpoints::save`] for several models, each with its optimizer, in
    /// one atomic folder (PPO's policy and value model): part `NAME` is
    /// written as `NAME.model.safetensors` and `NAME.optimizer.safetensors`
    /// (the unnamed part as `model.safetensors`, `optimizer.safetensors`).
    pub fn save_parts(
        &self,
        parts: &[CheckpointPart<'_>],
        state: &CheckpointState,
    ) -> Result<PathBuf, CheckpointError> {
        std::fs::create_dir_all(&self.root).map_err(io(&self.root))?;
        self.remove_leftovers()?;
        let name = format!("step-{:08}", state.train.step);
        let dir = self.root.join(&name);
        let tmp = self.root.join(format!("{name}.tmp-{}", std::process::id()));
        std::fs::create_dir(&tmp).map_err(io(&tmp))?;
        let written = (|| {
            let mut files = Vec::new();
            for part in parts {
                let (model_name, optim_name) = part_files(part.name);
                let model = tmp.join(model_name);
                part.vs.save(&model).map_err(torch(&model))?;
                let optim = tmp.join(optim_name);
                Tensor::write_safetensors(&part.opt.state_tensors(), &optim)
                    .map_err(torch(&optim))?;
                files.extend([model, optim]);
            }
            let state_path = tmp.join(STATE_FILE);
            let json = serde_json::to_vec_pretty(&StateFile {
                format: FORMAT,
                state: state.clone(),
            })
            .map_err(json(&state_path))?;
            std::fs::write(&state_path, json).map_err(io(&state_path))?;
            files.push(state_path);
            for file in &files {
                File::open(file)
                    .and_then(|f| f.sync_all())
                    .map_err(io(file))?;
            }
            sync_dir(&tmp)?;
            if dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(io(&dir))?;
            }
            std::fs::rename(&tmp, &dir).map_err(io(&dir))?;
            sync_dir(&self.root)
        })();
        if written.is_err() {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        written?;
        let all = self.list()?;
        for (_, old) in all.iter().take(all.len().saturating_sub(self.keep)) {
            std::fs::remove_dir_all(old).map_err(io(old))?;
        }
        Ok(dir)
    }

    /// Removes what killed saves and prunes left: `step-N.tmp-PID` folders
    /// (a save killed halfway: a whole model and optimizer each, and the
    /// SIGUSR1 save before a time limit is the one most likely killed) and
    /// `step-N` folders without their state file (a prune killed halfway),
    /// which [`Checkpoints::list`] never shows. One process writes a
    /// stage's checkpoints at a time (the stage's lock), so none of them is
    /// being written.
    fn remove_leftovers(&self) -> Result<(), CheckpointError> {
        for entry in std::fs::read_dir(&self.root).map_err(io(&self.root))? {
            let entry = entry.map_err(io(&self.root))?;
            let path = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let Some(rest) = name.strip_prefix("step-") else {
                continue;
            };
            let unfinished = rest.contains(".tmp-");
            let incomplete = rest.parse::<u64>().is_ok() && !path.join(STATE_FILE).is_file();
            if (unfinished || incomplete) && path.is_dir() {
                tracing::info!("removing {}, left by a killed save", path.display());
                std::fs::remove_dir_all(&path).map_err(io(&path))?;
            }
        }
        Ok(())
    }

    /// The complete checkpoints, oldest first, as (step, folder).
    pub fn list(&self) -> Result<Vec<(u64, PathBuf)>, CheckpointError> {
        let entries = match std::fs::read_dir(&self.root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(io(&self.root)(source)),
        };
        let mut found = Vec::new();
        for entry in entries {
            let entry = entry.map_err(io(&self.root))?;
            let name = entry.file_name();
            // `step-N.tmp-PID` folders are unfinished writes and do not parse.
            let step = name
                .to_str()
                .and_then(|n| n.strip_prefix("step-"))
                .and_then(|n| n.parse::<u64>().ok());
            if let Some(step) = step {
                if entry.path().join(STATE_FILE).is_file() {
                    found.push((step, entry.path()));
                }
            }
        }
        found.sort();
        Ok(found)
    }

    /// The folder they are kept in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The newest complete checkpoint, if any.
    pub fn latest(&self) -> Result<Option<PathBuf>, CheckpointError> {
        Ok(self.list()?.pop().map(|(_, dir)| dir))
    }
}

/// The newest complete checkpoint under `root`, if any.
pub fn latest(root: &Path) -> Result<Option<PathBuf>, CheckpointError> {
    Checkpoints::new(root, 1).latest()
}

/// One model and its optimizer in a checkpoint written by
/// [`Checkpoints::save_parts`].
pub struct CheckpointPart<'a> {
    /// The file-name prefix (`""` for the single-model layout).
    pub name: &'a str,
    pub vs: &'a VarStore,
    pub opt: &'a AdamW,
}

/// A part to restore with [`load_checkpoint_parts`].
pub struct CheckpointPartMut<'a> {
    /// The file-name prefix it was saved under.
    pub name: &'a str,
    pub vs: &'a mut VarStore,
    pub opt: &'a mut AdamW,
}

/// The model and optimizer files of part `name`.
fn part_files(name: &str) -> (String, String) {
    if name.is_empty() {
        (MODEL_FILE.to_string(), OPTIMIZER_FILE.to_string())
    } else {
        (
            format!("{name}.{MODEL_FILE}"),
            format!("{name}.{OPTIMIZER_FILE}"),
        )
    }
}

/// Restores the checkpoint in `dir` into `vs` and `opt`, which must have
/// the structure they were saved with (a fresh model and optimizer do), and
/// returns its state.
pub fn load_checkpoint(
    dir: &Path,
    vs: &mut VarStore,
    opt: &mut AdamW,
) -> Result<CheckpointState, CheckpointError> {
    load_checkpoint_parts(dir, &mut [CheckpointPartMut { name: "", vs, opt }])
}

/// [`load_checkpoint`] for a checkpoint of several parts.
pub fn load_checkpoint_parts(
    dir: &Path,
    parts: &mut [CheckpointPartMut<'_>],
) -> Result<CheckpointState, CheckpointError> {
    let state_path = dir.join(STATE_FILE);
    let text = std::fs::read(&state_path).map_err(io(&state_path))?;
    let file: StateFile = serde_json::from_slice(&text).map_err(json(&state_path))?;
    if file.format != FORMAT {
        return Err(CheckpointError::Format {
            path: state_path,
            found: file.format,
        });
    }
    for part in parts.iter_mut() {
        let (model_name, optim_name) = part_files(part.name);
        let model = dir.join(model_name);
        part.vs.load(&model).map_err(torch(&model))?;
        let optim = dir.join(optim_name);
        let tensors = Tensor::read_safetensors(&optim).map_err(torch(&optim))?;
        part.opt
            .load_state(&tensors)
            .map_err(|source| CheckpointError::Optim {
                path: optim,
                source,
            })?;
    }
    Ok(file.state)
}

/// Makes a folder's entries (creations, renames) durable.
fn sync_dir(dir: &Path) -> Result<(), CheckpointError> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::AdamWConfig;
    use tch::nn::Init;
    use tch::Device;

    fn setup() -> (VarStore, AdamW) {
        let vs = VarStore::new(Device::Cpu);
        let _ = vs.root().var("w", &[2, 2], Init::Const(1.0));
        let opt = AdamW::from_var_store(&vs, AdamWConfig::default()).unwrap();
        (vs, opt)
    }

    fn state(step: u64) -> CheckpointState {
        CheckpointState {
            train: TrainState {
                step,
                ..Default::default()
            },
            lr: 0.1,
            extra: serde_json::Value::Null,
        }
    }

    fn root(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("alignflow-ckpt-{name}-{}", std::process::id()))
    }

    #[test]
    fn keeps_the_last_k_and_ignores_unfinished_writes() {
        let root = root("keep");
        let ckpts = Checkpoints::new(&root, 2);
        assert_eq!(ckpts.latest().unwrap(), None);
        let (vs, opt) = setup();
        for step in [1, 2, 3] {
            ckpts.save(&vs, &opt, &state(step)).unwrap();
        }
        // Re-saving a step replaces it.
        ckpts.save(&vs, &opt, &state(3)).unwrap();
        // A crashed write: a temp folder of a later step, with all its files.
        let crashed = root.join("step-00000009.tmp-1");
        std::fs::create_dir(&crashed).unwrap();
        std::fs::write(crashed.join(STATE_FILE), "{}").unwrap();
        let steps: Vec<u64> = ckpts.list().unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(steps, vec![2, 3]);
        assert_eq!(latest(&root).unwrap(), Some(root.join("step-00000003")));
        let (mut vs2, mut opt2) = setup();
        assert_eq!(
            load_checkpoint(&root.join("step-00000003"), &mut vs2, &mut opt2).unwrap(),
            state(3)
        );
        // A prune killed halfway: a step folder without its state file.
        let pruned = root.join("step-00000001");
        std::fs::create_dir(&pruned).unwrap();
        std::fs::write(pruned.join("model.safetensors"), "x").unwrap();
        // The next save removes both leftovers.
        ckpts.save(&vs, &opt, &state(4)).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["step-00000003", "step-00000004"]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn rejects_an_unknown_format() {
        let root = root("format");
        let (vs, opt) = setup();
        let dir = Checkpoints::new(&root, 1)
            .save(&vs, &opt, &state(1))
            .unwrap();
        let text = std::fs::read_to_string(dir.join(STATE_FILE))
            .unwrap()
            .replace("\"format\": 1", "\"format\": 99");
        std::fs::write(dir.join(STATE_FILE), text).unwrap();
        let (mut vs2, mut opt2) = setup();
        let err = load_checkpoint(&dir, &mut vs2, &mut opt2).unwrap_err();
        std::fs::remove_dir_all(&root).unwrap();
        assert!(
            matches!(err, CheckpointError::Format { found: 99, .. }),
            "{err}"
        );
    }
}
