//! `best_of_n`: rejection-sampling fine-tuning data. The policy samples `n`
//! answers per prompt through the shared sampler (seeded), the preference
//! model scores each `prompt + answer` exactly as `ppo` and `evaluate` do
//! (sampled tokens, EOS included when sampled), and the best answer of each
//! prompt is kept (ties: the lowest sample index).
//!
//! # `data` (data.jsonl), one line per prompt, ready for `sft`
//!
//! ```json
//! {"prompt": "how do I ...",            // the raw prompt field, untemplated
//!  "prompt_text": "\n\nHuman: how do I ...\n\nAssistant:",   // after params.template
//!  "response": " You could ...",         // the best answer, EOS and stop strings cut
//!  "score": 1.3,                         // its PM score
//!  "best_index": 2,                      // its sample index
//!  "rank_scores": [0.2, -0.4, 1.3, 0.9]} // every sample's score, by sample index
//! ```
//!
//! `sft` reads `prompt` and `response` by default and applies its own
//! `template`: give the `sft` stage the same `template` as this stage, so it
//! trains on exactly the text the policy answered. (Equivalently, `sft` with
//! `prompt_field: prompt_text` and the default `{prompt}` template.)
//!
//! # `report` (report.json)
//!
//! ```json
//! {"prompts": 24, "n": 4, "mean_best_score": 1.1, "mean_score": 0.3,
//!  "mean_worst_score": -0.5, "best_index_histogram": [7, 5, 6, 6]}
//! ```
//!
//! The tensor work runs in `alignflow-worker` (`worker/src/ops/best_of_n.rs`);
//! this file holds the declaration, the selection and the report.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::chat_format::{PromptParams, CHAT_PROMPT_CONVENTION, CHAT_TEMPLATE_INPUT};
use crate::decoding::DecodingParams;
use crate::op::{require, AT_LEAST_ONE};
use crate::protocol::Metrics;
use crate::rewards::{
    check_reward_inputs, check_rewards, effective_rewards, RewardComponent, PROGRAM_INPUT,
    PROGRAM_INPUT_DOC,
};
use crate::{BindingError, OpDecl, OpParams, Outputs, ParamError, ParamsDecl, Placement, Port};

/// Params of `best_of_n`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
// Unknown names are refused by `op::parse` (serde cannot deny them
// beside `flatten`); the schema still lists the struct as closed.
#[schemars(deny_unknown_fields)]
pub struct BestOfNParams {
    /// The dtype the stage's models are held in (`auto`: bfloat16 on
    /// CUDA, float32 on the CPU).
    #[serde(default, skip_serializing_if = "crate::memory::Dtype::is_auto")]
    pub dtype: crate::memory::Dtype,
    /// The device of each model by role (`{policy: cuda:0, reference:
    /// cuda:1, reward: cuda:1}`; `cpu`, `cuda`, `cuda:N`, counted
    /// among the stage's own GPUs); a role left out runs on the stage's
    /// device. Tensors move between devices where roles meet.
    #[serde(
        default,
        skip_serializing_if = "crate::role_devices::RoleDevices::is_empty"
    )]
    pub placement: crate::role_devices::RoleDevices,
    /// Answers sampled per prompt.
    #[serde(default = "default_n")]
    pub n: usize,
    /// Most new tokens, temperature, top-k and top-p.
    #[serde(flatten)]
    pub decoding: DecodingParams,
    /// Stop an answer when its text contains one of these (the stop string
    /// is cut off the written response; the PM scores the sampled tokens).
    #[serde(default)]
    pub stop: Vec<String>,
    /// The prompt field, its template and the chat template.
    #[serde(flatten)]
    pub prompt: PromptParams,
    /// Sequences decoding at once (continuous batching), and prompts per
    /// scoring pass.
    #[serde(default = "crate::defaults::batch_size")]
    pub batch_size: usize,
    /// Use only the first `limit` prompts (none: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Several reward sources with weights, as `ppo`'s (`pm`, `program`,
    /// `exact_match`, `regex`, `length`; not `feedback`): an answer's score
    /// is the weighted sum. Empty: the one bound input (`reward_model` or
    /// `reward_program`) with weight 1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rewards: Vec<RewardComponent>,
}

fn default_n() -> usize {
    4
}

/// Index of the highest score; ties go to the lowest index. `None` when
/// `scores` is empty. NaN never wins (the worker rejects NaN scores first).
pub fn best_index(scores: &[f64]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for (i, &s) in scores.iter().enumerate() {
        match best {
            Some(b) if s <= scores[b] || s.is_nan() => {}
            None if s.is_nan() => {}
            _ => best = Some(i),
        }
    }
    best
}

/// The `report` output (layout in the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestOfNReport {
    pub prompts: usize,
    pub n: usize,
    /// Mean over prompts of the kept answer's score.
    pub mean_best_score: f64,
    /// Mean over every sampled answer (what one sample per prompt scores on
    /// average).
    pub mean_score: f64,
    /// Mean over prompts of the lowest score.
    pub mean_worst_score: f64,
    /// How often each sample index was kept.
    pub best_index_histogram: Vec<usize>,
}

impl BestOfNReport {
    /// The report of `scores`: per prompt, its `n` scores by sample index.
    pub fn of(scores: &[Vec<f64>], n: usize) -> BestOfNReport {
        let mean = |xs: &mut dyn Iterator<Item = f64>| {
            let (s, k) = xs.fold((0.0, 0usize), |(s, k), x| (s + x, k + 1));
            if k == 0 {
                0.0
            } else {
                s / k as f64
            }
        };
        let mut histogram = vec![0; n];
        for row in scores {
            if let Some(b) = best_index(row) {
                histogram[b] += 1;
            }
        }
        BestOfNReport {
            prompts: scores.len(),
            n,
            mean_best_score: mean(&mut scores.iter().filter_map(|r| best_index(r).map(|b| r[b]))),
            mean_score: mean(&mut scores.iter().flatten().copied()),
            mean_worst_score: mean(
                &mut scores
                    .iter()
                    .map(|r| r.iter().copied().fold(f64::INFINITY, f64::min)),
            ),
            best_index_histogram: histogram,
        }
    }

    pub fn metrics(&self) -> Metrics {
        let mut m = Metrics::new();
        m.insert("prompts".into(), self.prompts.into());
        m.insert("n".into(), self.n.into());
        m.insert("mean_best_score".into(), self.mean_best_score.into());
        m.insert("mean_score".into(), self.mean_score.into());
        m.insert("mean_worst_score".into(), self.mean_worst_score.into());
        m
    }
}

/// The `best_of_n` op.
pub const OP: OpDecl = OpDecl {
    name: "best_of_n",
    version: 3,
    summary: "rejection sampling: n answers per prompt, scored by a PM, a reward program or rules, the best kept as SFT data",
    inputs: &[
        Port::input("policy", "the LM folder that samples the answers"),
        Port::optional(
            "reward_model",
            "a preference model folder (pm.train), same tokenizer as the policy: a reward source (alone, or as `pm` in params.rewards)",
        ),
        Port::input("prompts", "JSONL records with a prompt field"),
        Port::optional("chat_template", CHAT_TEMPLATE_INPUT),
        Port::optional(PROGRAM_INPUT, PROGRAM_INPUT_DOC),
    ],
    outputs: Outputs::Declared(&[
        Port::output(
            "data",
            "data.jsonl, one per prompt: {prompt, prompt_text, response, score, best_index, rank_scores} (and `messages` with a chat template; `reward_sources`, the kept answer's unweighted score per source, with `params.rewards` or a program); `sft` reads it with the same `template`",
        ),
        Port::output(
            "report",
            "report.json: prompts, n, mean_best_score, mean_score, mean_worst_score, best_index_histogram",
        ),
    ]),
    params: ParamsDecl::of::<BestOfNParams>(),
    placement: Placement::Worker,
    conventions: &[CHAT_PROMPT_CONVENTION],
};

impl OpParams for BestOfNParams {
    fn check(&self) -> Result<(), ParamError> {
        use crate::role_devices::Role;
        self.placement
            .check("placement", &[Role::Policy, Role::Reward])?;
        require(self.n > 0, "n", AT_LEAST_ONE)?;
        self.decoding.check()?;
        crate::op::check_stop(&self.stop)?;
        require(self.batch_size > 0, "batch_size", AT_LEAST_ONE)?;
        require(self.limit != Some(0), "limit", AT_LEAST_ONE)?;
        check_rewards(&self.rewards, "rewards")?;
        require(
            self.rewards.iter().all(|c| c.feedback.is_none()),
            "rewards",
            "`best_of_n` has no feedback model source: use `pm`, `program` or a built-in rule",
        )
    }

    /// Exactly one bound reward input, or the inputs `rewards` names.
    fn check_bindings(&self, bound: &dyn Fn(&str) -> bool) -> Result<(), BindingError> {
        if !self.rewards.is_empty() {
            return check_reward_inputs(&self.rewards, bound);
        }
        match effective_rewards(&[], bound).len() {
            1 if !bound("feedback_model") => Ok(()),
            0 => Err(BindingError::new(
                "inputs",
                "no reward source: bind `reward_model` or `reward_program`, or list sources in `params.rewards`",
            )),
            _ => Err(BindingError::new(
                &format!("inputs.{PROGRAM_INPUT}"),
                "bind exactly one reward source: `reward_model` or `reward_program` (to mix them, weigh them in `params.rewards`)",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selection_picks_the_max_and_ties_go_to_the_lowest_index() {
        assert_eq!(best_index(&[0.1, 0.7, -2.0, 0.3]), Some(1));
        assert_eq!(best_index(&[-1.0, -0.5, -0.5, -3.0]), Some(1));
        assert_eq!(best_index(&[2.0, 2.0, 2.0]), Some(0));
        assert_eq!(best_index(&[0.0, 1.0, 1.0]), Some(1));
        assert_eq!(best_index(&[5.0]), Some(0));
        assert_eq!(best_index(&[f64::NAN, 1.0, f64::NAN]), Some(1));
        assert_eq!(best_index(&[]), None);
    }

    #[test]
    fn the_report_holds_best_all_and_worst_means() {
        let scores = vec![vec![1.0, 3.0, 2.0], vec![0.0, -1.0, 0.0]];
        let r = BestOfNReport::of(&scores, 3);
        assert_eq!(r.prompts, 2);
        // best: 3 and 0; all: 5 / 6; worst: 1 and -1.
        assert_eq!(r.mean_best_score, 1.5);
        assert!((r.mean_score - 5.0 / 6.0).abs() < 1e-12);
        assert_eq!(r.mean_worst_score, 0.0);
        assert_eq!(r.best_index_histogram, vec![1, 1, 0]);
        assert!(r.mean_best_score >= r.mean_score);
    }

    #[test]
    fn params_are_checked() {
        let op = OP;
        let ok = op.normalize_params(&serde_json::json!({})).unwrap();
        assert_eq!(ok["n"], 4);
        for (params, field) in [
            (serde_json::json!({ "n": 0 }), "n"),
            (serde_json::json!({ "temperature": -1.0 }), "temperature"),
            (serde_json::json!({ "top_p": 0.0 }), "top_p"),
            (serde_json::json!({ "batch_size": 0 }), "batch_size"),
        ] {
            assert_eq!(op.normalize_params(&params).unwrap_err().field, field);
        }
    }
}
