//! The decoding params every op that samples free text shares (`generate`,
//! `critique_revise`, `best_of_n`), flattened into its params, with one
//! check of their ranges.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::op::{check_temperature, require, AT_LEAST_ONE};
use crate::ParamError;

/// How text is sampled.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct DecodingParams {
    /// Most new tokens per sampled text.
    #[serde(default = "crate::defaults::max_new_tokens")]
    pub max_new_tokens: i64,
    /// Sampling temperature; 0 is greedy.
    #[serde(default = "crate::defaults::temperature")]
    pub temperature: f64,
    /// Keep the k most likely tokens (0: off).
    #[serde(default)]
    pub top_k: i64,
    /// Nucleus sampling mass (1: off).
    #[serde(default = "crate::defaults::top_p")]
    pub top_p: f64,
}

impl DecodingParams {
    /// Errors name the field: at least one new token, a finite temperature
    /// >= 0, top-p in (0, 1], top-k >= 0.
    pub fn check(&self) -> Result<(), ParamError> {
        require(self.max_new_tokens >= 1, "max_new_tokens", AT_LEAST_ONE)?;
        check_temperature(self.temperature)?;
        require(
            self.top_p > 0.0 && self.top_p <= 1.0,
            "top_p",
            "must be in (0, 1]",
        )?;
        require(self.top_k >= 0, "top_k", "must be >= 0")
    }
}
