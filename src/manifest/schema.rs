//! The manifest's serde types, which also generate `schemas/pipeline.schema.json`.
use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A pipeline manifest (version 1).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest format version; must be 1.
    pub version: u32,
    /// Pipeline name.
    pub name: String,
    /// Base seed; each stage's seed derives from it and the stage id.
    #[serde(default)]
    pub seed: u64,
    /// Base manifests to merge under this one (paths relative to this file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub include: Option<Includes>,
    /// Pipeline parameters, read with `${params.NAME}`.
    #[serde(default)]
    pub params: BTreeMap<String, serde_json::Value>,
    /// Loops by name: stages repeated for a number of rounds, each round
    /// reading what the previous one produced (`${loop.NAME}`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub loops: BTreeMap<String, LoopDef>,
    /// Stages by id.
    #[serde(default)]
    pub stages: BTreeMap<String, StageDef>,
    /// Experiment trackers every training stage's metrics stream to. They
    /// observe: changing them reruns nothing.
    #[serde(default, skip_serializing_if = "Tracking::is_empty")]
    pub tracking: Tracking,
}

/// Where training stages' `metrics.jsonl` lines go while the stages run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Tracking {
    /// A folder of TensorBoard runs (relative to the manifest): one run
    /// folder per stage instance, scalars under the metric names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensorboard: Option<std::path::PathBuf>,
    /// An MLflow tracking server (`http://host:port`): one run per stage
    /// instance in the experiment named after the pipeline, with the
    /// stage's params, fingerprint, metrics and output paths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlflow: Option<String>,
}

impl Tracking {
    /// No tracker named.
    pub fn is_empty(&self) -> bool {
        self.tensorboard.is_none() && self.mlflow.is_none()
    }

    /// These settings, each tracker not named taken from `base`.
    pub fn over(&self, base: &Tracking) -> Tracking {
        Tracking {
            tensorboard: self
                .tensorboard
                .clone()
                .or_else(|| base.tensorboard.clone()),
            mlflow: self.mlflow.clone().or_else(|| base.mlflow.clone()),
        }
    }
}

/// A loop: its stages run once per round, as `STAGE[round=1]`,
/// `STAGE[round=2]`, ...; stages outside it read one round as
/// `${stages.STAGE[round=N].OUTPUT}`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoopDef {
    /// How many rounds: a number from 1, or `${params.NAME}`.
    pub rounds: Rounds,
    /// Values carried from one round to the next, read in the loop's stages
    /// as `${loop.NAME}` (`${loop.round}` is the round number, from 1).
    #[serde(default)]
    pub carry: BTreeMap<String, CarryDef>,
    /// The loop's stages, declared under `stages:` as usual; a stage
    /// belongs to one loop at most, and a loop cannot hold another.
    pub stages: Vec<String>,
}

/// A loop's round count as written.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Rounds {
    Count(#[schemars(range(min = 1, max = super::loops::MAX_ROUNDS))] u64),
    /// `${params.NAME}`, a whole number from 1.
    Param(#[schemars(regex(pattern = r"^\$\{params\.[^}]+\}$"))] String),
    /// Anything else (`2.5`, `-1`): refused by the loop's check, which says
    /// what a round count is, where serde would only say no variant fits.
    #[schemars(skip)]
    Other(serde_json::Value),
}

/// One carried value: round 1 reads `init`, round k what `next` was in
/// round k-1.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CarryDef {
    /// Round 1's value, written as an input is: a path, `${params.NAME}`
    /// or `${stages.ID.OUTPUT}` of a stage outside the loop.
    pub init: String,
    /// The value for the next round: `${stages.STAGE.OUTPUT}` of a stage of
    /// this loop (read in the round that just ended), or `${loop.NAME}`
    /// (another carried value as it was in that round).
    pub next: String,
}

/// One include or several.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Includes {
    One(String),
    Many(Vec<String>),
}

/// A stage as written.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StageDef {
    /// Registered op name (`alignflow ops` lists them).
    pub op: String,
    /// Input name to a path (relative to the manifest) or `${stages.ID.OUTPUT}`;
    /// may use `${params.NAME}`, `${matrix.NAME}` and, in a loop, `${loop.NAME}`.
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    /// The op's params; values may use `${params.NAME}`, `${matrix.NAME}`
    /// and, in a loop, `${loop.NAME}` (`${loop.round}` alone stays a number).
    #[serde(default)]
    pub params: BTreeMap<String, serde_json::Value>,
    /// Output names, for ops whose outputs the stage declares (`exec`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<Vec<String>>,
    /// Name to a list of scalar values: one stage per combination. A name the
    /// stage reads as `${matrix.NAME}` (in params or inputs, even inside a
    /// reference: `${stages.${matrix.method}.model}`) is substituted; any
    /// other name sets the op param of that name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matrix: Option<BTreeMap<String, Vec<serde_json::Value>>>,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Free text shown by `dag` and `report`; `${matrix.NAME}` and
    /// `${loop.NAME}` are substituted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Keep the stage's training checkpoints once its result is committed
    /// (by default they are removed then: nothing resumes from them). Not
    /// part of the fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_checkpoints: Option<bool>,
    /// What the stage asks of a cluster scheduler (`--executor slurm`):
    /// GPUs, CPUs, memory and time. Not part of the fingerprint; the local
    /// executor reads only `gpus` (see [`Resources::gpus`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
}

/// A stage's resource request, as Slurm takes it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// GPUs (`--gres=gpu:N`; with `data_parallel: N`, the stage's in all,
    /// shared out to its N tasks: `--gpus-per-task`); a tensor stage with
    /// `device: cuda` or `cuda:N` and no `gpus` asks for one, or one per
    /// rank with `data_parallel` (or as many as its `placement` names, for
    /// each rank). Over 1, on a
    /// training stage on `device: cuda` that sets neither `data_parallel`
    /// nor `placement`, also its `data_parallel` (one rank per GPU, with
    /// either executor; so it enters the fingerprint through that param).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpus: Option<u32>,
    /// CPU cores (`--cpus-per-task`); also the worker's thread count. With
    /// `data_parallel: N`, each rank's (the job has N tasks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Memory per node in Slurm's notation (`--mem`): `500M`, `16G`. With
    /// `data_parallel: N`, each rank's (`--mem-per-cpu`: this over `cpus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem: Option<String>,
    /// Time limit in Slurm's notation (`--time`): `30` (minutes), `2:00:00`,
    /// `1-12:00:00`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
}

impl Resources {
    /// GPUs the stage's job asks for: `gpus`, else those its `placement`
    /// names (`placed`) for each data-parallel rank (`ranks`), else one per
    /// rank or one for a stage pinned to a GPU (`device: cuda`, `cuda:N`)
    /// that runs in the worker.
    pub fn gpus_for(&self, device: &str, in_worker: bool, placed: usize, ranks: usize) -> u32 {
        match self.gpus {
            Some(n) => n,
            None if in_worker => {
                let per_rank =
                    alignflow_ops::role_devices::gpus_per_rank(placed, device.starts_with("cuda"));
                (per_rank * ranks.max(1)) as u32
            }
            None => 0,
        }
    }

    /// Why `mem` or `time` is not in Slurm's notation: (field, message).
    pub fn problem(&self) -> Option<(&'static str, String)> {
        if let Some(mem) = &self.mem {
            let digits = mem.trim_end_matches(['K', 'M', 'G', 'T']);
            if digits.is_empty()
                || !digits.bytes().all(|b| b.is_ascii_digit())
                || mem.len() - digits.len() > 1
            {
                return Some((
                    "resources.mem",
                    format!("`{mem}` is not a memory size (a whole number with an optional K, M, G or T: `16G`)"),
                ));
            }
        }
        if let Some(time) = &self.time {
            let (days, clock) = time.split_once('-').unwrap_or(("0", time));
            let fields: Vec<&str> = clock.split(':').collect();
            let number = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
            if !number(days) || fields.len() > 3 || !fields.iter().all(|f| number(f)) {
                return Some((
                    "resources.time",
                    format!("`{time}` is not a time limit (minutes, `H:MM:SS` or `D-HH:MM:SS`)"),
                ));
            }
        }
        None
    }
}

/// The JSON schema of a manifest, as checked in at `schemas/pipeline.schema.json`.
pub fn pipeline_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Manifest)).expect("schema serialises")
}
