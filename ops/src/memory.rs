//! Params that trade compute or precision for memory: the dtype a model's
//! weights are held in, and activation checkpointing of training ops.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The dtype of the weights of a model that is not trained (a sampled or
/// scoring model; PPO's reference, reward and feedback models). Trained
/// weights stay float32 (their master copy).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Dtype {
    /// bfloat16 on CUDA, float32 on the CPU.
    #[default]
    Auto,
    Float32,
    Bfloat16,
    Float16,
}

impl Dtype {
    /// For `skip_serializing_if`: `auto` is left out of the normalised
    /// params, so stages written before `dtype` keep their fingerprints
    /// (on the CPU, where those ran, `auto` is float32 as before).
    pub fn is_auto(&self) -> bool {
        *self == Dtype::Auto
    }

    /// The name in manifests.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Auto => "auto",
            Dtype::Float32 => "float32",
            Dtype::Bfloat16 => "bfloat16",
            Dtype::Float16 => "float16",
        }
    }
}

/// Models above this many parameters train with activation checkpointing
/// on CUDA unless `gradient_checkpointing` says otherwise.
pub const CHECKPOINTING_FROM_PARAMS: i64 = 300_000_000;

/// Whether a training stage recomputes activations: `asked`, else on for
/// CUDA models over [`CHECKPOINTING_FROM_PARAMS`] parameters.
pub fn gradient_checkpointing(asked: Option<bool>, cuda: bool, params: i64) -> bool {
    asked.unwrap_or(cuda && params > CHECKPOINTING_FROM_PARAMS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dtype_names_and_the_checkpointing_default() {
        for d in [Dtype::Auto, Dtype::Float32, Dtype::Bfloat16, Dtype::Float16] {
            let parsed: Dtype = serde_json::from_value(d.name().into()).unwrap();
            assert_eq!(parsed, d);
        }
        assert!(serde_json::from_value::<Dtype>("bf16".into()).is_err());
        assert!(!gradient_checkpointing(None, false, 1 << 40));
        assert!(!gradient_checkpointing(None, true, 124_000_000));
        assert!(gradient_checkpointing(None, true, 1_500_000_000));
        assert!(gradient_checkpointing(Some(true), false, 10));
        assert!(!gradient_checkpointing(Some(false), true, 1 << 40));
    }
}
