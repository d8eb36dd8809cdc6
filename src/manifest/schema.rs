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
    /// Stages by id.
    #[serde(default)]
    pub stages: BTreeMap<String, StageDef>,
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
    /// may use `${params.NAME}` and `${matrix.NAME}`.
    #[serde(default)]
    pub inputs: BTreeMap<String, String>,
    /// The op's params; values may use `${params.NAME}` and `${matrix.NAME}`.
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
    /// Free text shown by `dag` and `report`; `${matrix.NAME}` is substituted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Keep the stage's training checkpoints once its result is committed
    /// (by default they are removed then: nothing resumes from them). Not
    /// part of the fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_checkpoints: Option<bool>,
}

/// The JSON schema of a manifest, as checked in at `schemas/pipeline.schema.json`.
pub fn pipeline_schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Manifest)).expect("schema serialises")
}
