//! Manifests (docs/DESIGN.md section 3): YAML types, includes, matrix expansion,
//! `${...}` interpolation and validation, with every error located at a
//! file, line and column.
//!
//! [`load`] turns a manifest file into a resolved [`Pipeline`]: includes
//! merged, `--set` overrides applied, matrix stages expanded, loops
//! unrolled into one stage per round, params
//! interpolated and validated against each op's schema. Stage references
//! are kept as [`Input::Stage`] edges for [`crate::graph`].
// `ManifestError` is the interface's error type and carries its context
// inline; errors are rare and not on a hot path.
#![allow(clippy::result_large_err)]

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

mod include;
mod interp;
mod locate;
mod loops;
mod resolve;
mod schema;
#[cfg(test)]
mod tests;

pub use schema::{pipeline_schema, Manifest, Resources, StageDef, Tracking};

/// A position in a manifest file (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file.display(), self.line, self.column)
    }
}

/// A manifest error: where, which stage and field, what, and a likely fix.
///
/// Displays as `FILE:LINE:COL: stage `ID`, field `FIELD`: MESSAGE (did you mean `X`?)`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ManifestError {
    /// `None` only when the file itself cannot be read.
    pub location: Option<Location>,
    pub file: PathBuf,
    pub stage: Option<String>,
    /// Dotted field path inside the stage (or the top level).
    pub field: Option<String>,
    pub message: String,
    pub suggestion: Option<String>,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(loc) => write!(f, "{loc}: ")?,
            None => write!(f, "{}: ", self.file.display())?,
        }
        if let Some(stage) = &self.stage {
            write!(f, "stage `{stage}`, ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "field `{field}`: ")?;
        }
        f.write_str(&self.message)?;
        if let Some(s) = &self.suggestion {
            write!(f, " (did you mean `{s}`?)")?;
        }
        Ok(())
    }
}

/// Options from the command line.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// `--set params.NAME=VALUE` overrides, as (`params.NAME`, `VALUE`);
    /// values parse as YAML scalars, so numbers stay numbers.
    pub sets: Vec<(String, String)>,
}

/// A resolved pipeline.
#[derive(Debug, Clone)]
pub struct Pipeline {
    pub name: String,
    /// The manifest file (absolute).
    pub file: PathBuf,
    /// Its folder: paths are relative to it.
    pub dir: PathBuf,
    pub seed: u64,
    /// Pipeline params after `--set` overrides.
    pub params: BTreeMap<String, serde_json::Value>,
    /// Stages in declaration order (matrix instances in expansion order; a
    /// loop's stages round by round, in its `stages:` order, where the first
    /// of them is declared).
    pub stages: Vec<Stage>,
    /// The trackers of `tracking:` (a TensorBoard folder made absolute).
    pub tracking: Tracking,
}

impl Pipeline {
    pub fn stage(&self, id: &str) -> Option<&Stage> {
        self.stages.iter().find(|s| s.id == id)
    }
}

/// One stage after matrix expansion and interpolation.
#[derive(Debug, Clone)]
pub struct Stage {
    /// Unique id: the YAML key, plus `[k=v,...]` for a matrix instance or
    /// `[round=N]` for a loop's stage.
    pub id: String,
    /// The YAML key.
    pub key: String,
    pub op: String,
    pub inputs: BTreeMap<String, Input>,
    /// Interpolated and normalised by the op (defaults filled in).
    pub params: serde_json::Value,
    /// Output names: the op's declared ones, or the stage's `outputs:` list.
    pub outputs: Vec<String>,
    /// `auto`, `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    pub description: Option<String>,
    /// Keep its checkpoints after the commit (`keep_checkpoints: true`).
    pub keep_checkpoints: bool,
    /// What it asks of a cluster scheduler (never part of the fingerprint).
    pub resources: Resources,
    /// This instance's matrix values (empty for plain stages).
    pub matrix: BTreeMap<String, serde_json::Value>,
    /// The loop and round of a loop's stage.
    pub round: Option<LoopRound>,
    /// Where the stage is declared (its key).
    pub location: Location,
}

/// Where a loop's stage runs: the loop's name and the round, from 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopRound {
    pub name: String,
    pub round: u64,
}

/// A bound input.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// `${stages.ID.OUTPUT}`: an edge of the DAG (`stage` is a full id).
    Stage {
        stage: String,
        output: String,
        location: Location,
    },
    /// A file or folder, hashed by content.
    Path {
        path: PathBuf,
        written: String,
        location: Location,
    },
}

impl Input {
    pub fn location(&self) -> &Location {
        match self {
            Input::Stage { location, .. } | Input::Path { location, .. } => location,
        }
    }
}

/// Loads, merges, expands, interpolates and validates a manifest.
pub fn load(path: &Path, options: &LoadOptions) -> Result<Pipeline, ManifestError> {
    resolve::load_with(path, options, crate::ops::REGISTRY)
}
