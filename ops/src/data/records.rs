//! The records that flow between data stages, one JSON object per line.
use serde::{Deserialize, Serialize};

/// A preference comparison: two responses to one prompt.
///
/// `prompt + chosen` and `prompt + rejected` are the two full dialogues, byte
/// for byte (for HH-RLHF the prompt ends with `\n\nAssistant:`, and each
/// response keeps its leading space).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The shared context, up to and including the last `\n\nAssistant:`.
    pub prompt: String,
    /// The response that `label` is about.
    pub chosen: String,
    /// The other response.
    pub rejected: String,
    /// Probability that `chosen` is preferred to `rejected`: 1.0 for a hard
    /// human label, anything in [0, 1] for soft (AI feedback) labels.
    pub label: f64,
}

/// A prompt to generate from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptRecord {
    /// The prompt text, exactly as imported.
    pub prompt: String,
}
