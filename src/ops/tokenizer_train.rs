//! `tokenizer.train` (to be written).
use super::{Op, ParamError, Port, StageContext};
use crate::protocol::Metrics;

pub struct TokenizerTrain;

impl Op for TokenizerTrain {
    fn name(&self) -> &'static str {
        "tokenizer.train"
    }
    fn version(&self) -> u32 {
        1
    }
    fn summary(&self) -> &'static str {
        "todo"
    }
    fn inputs(&self) -> &'static [Port] {
        &[]
    }
    fn outputs(&self) -> &'static [Port] {
        &[]
    }
    fn params_schema(&self) -> schemars::Schema {
        todo!()
    }
    fn normalize_params(&self, _params: &serde_json::Value) -> Result<serde_json::Value, ParamError> {
        todo!()
    }
    fn run(&self, _ctx: &StageContext<'_>) -> anyhow::Result<Metrics> {
        todo!()
    }
}
