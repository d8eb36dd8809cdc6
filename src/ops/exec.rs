//! `exec`: a user command as a stage.
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Op, ParamError, Port, StageContext};
use crate::protocol::Metrics;

pub struct Exec;

/// Params of `exec`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecParams {
    /// Shell command, run with `sh -c` in the manifest's folder.
    pub cmd: String,
}

impl Op for Exec {
    fn name(&self) -> &'static str {
        "exec"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "run a shell command; inputs in $ALIGNFLOW_IN_<NAME>, outputs under $ALIGNFLOW_OUT"
    }
    fn inputs(&self) -> &'static [Port] {
        &[]
    }
    fn outputs(&self) -> &'static [Port] {
        &[]
    }
    fn outputs_from_stage(&self) -> bool {
        true
    }
    fn params_schema(&self) -> schemars::Schema {
        schemars::schema_for!(ExecParams)
    }
    fn normalize_params(&self, params: &serde_json::Value) -> Result<serde_json::Value, ParamError> {
        super::normalize_with::<ExecParams>(params)
    }
    fn run(&self, _ctx: &StageContext<'_>) -> anyhow::Result<Metrics> {
        todo!("ops helper")
    }
}
