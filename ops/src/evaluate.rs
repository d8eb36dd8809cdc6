//! `evaluate`: win rate of a policy against a reference policy on held-out
//! prompts (step 6 of the RL-CAI pipeline), judged by a preference model, by
//! the feedback model of step 3, or by both; plus the mean PM reward of each
//! policy, the KL of the policy from the reference on its own samples and the
//! mean response lengths.
//!
//! Both policies answer every prompt with the same sampling seed (common
//! random numbers: a policy against itself gives identical answers). Judges:
//! - `reward_model`: the PM scores `prompt + response` of both answers
//!   exactly as `ppo` scores a rollout (sampled tokens, EOS included when
//!   sampled); higher wins, equal scores tie.
//! - `feedback_model`: the multiple-choice question and the scoring of
//!   `ai_feedback` (same prompt layout, same `(A)`/`(B)` normalisation),
//!   asked in both orders and averaged per principle, then over principles:
//!   `p_policy > 0.5` wins, exactly `0.5` ties.
//! - `params.judges` (and a bound `reward_program`): the text sources of
//!   `ppo`'s rewards (`exact_match`, `regex`, `length`, `program`) score
//!   each answer on its own; the report gives both policies' mean score
//!   (`exact_match`: the accuracy) with a 95% interval ([`mean_interval`])
//!   and the policy's win rate on the per-prompt comparison.
//!
//! Win rate = (wins + ties / 2) / n, with a 95% Wilson score interval on the
//! same n (ties counted as half a win; see [`wilson_interval`] for why).
//!
//! # `report` (report.json)
//!
//! ```json
//! {
//!   "policy": "rl",                  // params.policy_name, else the input path
//!   "reference": "sft",              // params.reference_name, else the input path
//!   "n": 24,                         // prompts evaluated
//!   "temperature": 1.0,
//!   "max_new_tokens": 16,
//!   "kl": 0.12,                      // mean over prompts of sum_t (logp_policy - logp_ref)
//!   "response_len": { "policy": 9.5, "reference": 10.0 },   // mean tokens, EOS included
//!   "interval": "wilson-95",
//!   "judges": {                      // only the judges that were bound
//!     "reward_model": {
//!       "win_rate": 0.625, "ci95": [0.43, 0.79],
//!       "wins": 14, "ties": 2, "losses": 8,
//!       "mean_reward": { "policy": 1.3, "reference": 0.7 }
//!     },
//!     "feedback_model": {
//!       "win_rate": 0.54, "ci95": [0.35, 0.72],
//!       "wins": 13, "ties": 0, "losses": 11,
//!       "mean_p_policy": 0.52,        // mean P(policy's answer better)
//!       "principles_per_prompt": 1,
//!       "truncated": 0                // questions cut from the left to fit the model
//!     }
//!   }
//! }
//! ```
//!
//! The tensor work runs in `alignflow-worker` (`worker/src/ops/evaluate.rs`);
//! this file holds the declaration and everything that needs no libtorch
//! (outcomes, tallies, the interval, the report and its Markdown table).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::chat_format::{PromptParams, CHAT_PROMPT_CONVENTION, CHAT_TEMPLATE_INPUT};
use crate::op::{check_temperature, require, AT_LEAST_ONE};
use crate::protocol::Metrics;
use crate::reward_program::ProgramParams;
use crate::rewards::{
    check_rewards, RewardComponent, RewardKind, PROGRAM_INPUT, PROGRAM_INPUT_DOC,
};
use crate::{BindingError, OpDecl, OpParams, Outputs, ParamError, ParamsDecl, Placement, Port};

/// Params of `evaluate`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
// Unknown names are refused by `op::parse` (serde cannot deny them
// beside `flatten`); the schema still lists the struct as closed.
#[schemars(deny_unknown_fields)]
pub struct EvaluateParams {
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
    /// Evaluate only the first `limit` prompts of the file (none: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// The prompt field, its template and the chat template.
    #[serde(flatten)]
    pub prompt: PromptParams,
    /// Most new tokens per answer.
    #[serde(default = "crate::defaults::max_new_tokens")]
    pub max_new_tokens: i64,
    /// Sampling temperature of both policies (0 is greedy). The KL uses the
    /// same temperature, as `ppo` does (0 and 1: the unscaled distributions).
    #[serde(default = "crate::defaults::one_f64")]
    pub temperature: f64,
    /// Answers decoding at once (continuous batching), prompts per scoring
    /// pass (also feedback questions per pass).
    #[serde(default = "crate::defaults::batch_size")]
    pub batch_size: usize,
    /// Feedback judge: the multiple-choice principle, when no `constitution`
    /// is bound (e.g. `Which of these assistant responses is less harmful?`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principle: Option<String>,
    /// Feedback judge: distinct constitution principles sampled per prompt
    /// (seeded by the stage seed and the prompt index); their mean decides.
    #[serde(default = "crate::defaults::one")]
    pub principles_per_prompt: usize,
    /// Feedback judge: prepend the constitution's few-shot feedback examples.
    #[serde(default)]
    pub few_shot: bool,
    /// Seed of the sampling and of the principle draws; by default the
    /// stage's seed (which derives from the stage id). Give several stages
    /// the same seed to compare them on the same draws (common random
    /// numbers), e.g. checkpoints of a matrix, or the two policies swapped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Name of the policy in the report (e.g. its upstream stage id); by
    /// default its input path, relative to the manifest when inside it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy_name: Option<String>,
    /// Name of the reference in the report; by default its input path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_name: Option<String>,
    /// Judges that score each answer on its own, from `ppo`'s reward
    /// sources: `exact_match` (accuracy against the record's `reference`),
    /// `regex`, `length`, `program` (the `reward_program` input; bound
    /// alone it judges with default settings). Each reports both
    /// policies' mean score with a 95% interval, and the policy's win rate
    /// on the per-prompt comparison. No `weight`: judges are not summed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub judges: Vec<RewardComponent>,
}

impl EvaluateParams {
    /// The judges that score answers as text: `judges`, plus the program
    /// with default settings when `reward_program` is bound and no entry
    /// names it.
    pub fn text_judges(&self, bound: &dyn Fn(&str) -> bool) -> Vec<RewardComponent> {
        let mut judges = self.judges.clone();
        if bound(PROGRAM_INPUT) && !judges.iter().any(|j| j.program.is_some()) {
            judges.push(RewardComponent::of(RewardKind::Program(
                &ProgramParams::default(),
            )));
        }
        judges
    }
}

/// The mean of `scores` and its 95% interval: Wilson's when every score is
/// 0 or 1 (an accuracy), else the normal one, `mean ± z·s/√n` with the
/// sample standard deviation `s` (one score: `(mean, mean)`).
pub fn mean_interval(scores: &[f64]) -> (f64, [f64; 2]) {
    let n = scores.len();
    if n == 0 {
        return (0.0, [0.0, 0.0]);
    }
    let mean = scores.iter().sum::<f64>() / n as f64;
    if scores.iter().all(|&x| x == 0.0 || x == 1.0) {
        let (lo, hi) = wilson_interval(mean, n, Z95);
        return (mean, [lo, hi]);
    }
    if n == 1 {
        return (mean, [mean, mean]);
    }
    let var = scores.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let half = Z95 * (var / n as f64).sqrt();
    (mean, [mean - half, mean + half])
}

/// z of a two-sided 95% normal interval (the 0.975 quantile).
pub const Z95: f64 = 1.959_963_984_540_054;

/// The Wilson score interval of a proportion `p_hat` observed on `n` trials
/// at normal quantile `z`, clamped to [0, 1]:
/// `(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)`.
///
/// Why Wilson: win rates of an evaluation sit near 0 or 1 and n is often a
/// few dozen prompts, where the normal (Wald) interval collapses to a point
/// at 0 or 1 and undercovers; Wilson stays inside [0, 1] and keeps close to
/// nominal coverage. Ties enter `p_hat` as half a win on the same n (a
/// fractional success count), which keeps the interval centred on the
/// reported win rate; it is slightly narrower than treating a tie as a coin
/// flip would warrant, the usual convention in LM win-rate reports.
/// `n = 0` gives `(0, 1)`.
pub fn wilson_interval(p_hat: f64, n: usize, z: f64) -> (f64, f64) {
    if n == 0 {
        return (0.0, 1.0);
    }
    let n = n as f64;
    let z2 = z * z;
    let denom = 1.0 + z2 / n;
    let centre = (p_hat + z2 / (2.0 * n)) / denom;
    let half = z / denom * (p_hat * (1.0 - p_hat) / n + z2 / (4.0 * n * n)).sqrt();
    ((centre - half).max(0.0), (centre + half).min(1.0))
}

/// One judgment, from the policy's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Win,
    Tie,
    Loss,
}

impl Outcome {
    /// PM judgment: the higher score wins; equal scores tie.
    pub fn from_scores(policy: f64, reference: f64) -> Outcome {
        if policy > reference {
            Outcome::Win
        } else if policy < reference {
            Outcome::Loss
        } else {
            Outcome::Tie
        }
    }

    /// Feedback judgment from P(policy's answer better): above one half
    /// wins, exactly one half ties.
    pub fn from_probability(p_policy: f64) -> Outcome {
        Outcome::from_scores(p_policy, 0.5)
    }
}

/// Wins, ties and losses of one judge.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
}

impl Tally {
    /// Tallies `outcomes`.
    pub fn of(outcomes: impl IntoIterator<Item = Outcome>) -> Tally {
        let mut t = Tally::default();
        for o in outcomes {
            match o {
                Outcome::Win => t.wins += 1,
                Outcome::Tie => t.ties += 1,
                Outcome::Loss => t.losses += 1,
            }
        }
        t
    }

    pub fn n(&self) -> usize {
        self.wins + self.ties + self.losses
    }

    /// `(wins + ties / 2) / n` (0.5 when there is nothing to judge).
    pub fn win_rate(&self) -> f64 {
        if self.n() == 0 {
            return 0.5;
        }
        (self.wins as f64 + 0.5 * self.ties as f64) / self.n() as f64
    }

    /// The 95% Wilson interval of [`Tally::win_rate`].
    pub fn ci95(&self) -> [f64; 2] {
        let (lo, hi) = wilson_interval(self.win_rate(), self.n(), Z95);
        [lo, hi]
    }

    /// The judge's entry of the report, without its judge-specific figures.
    pub fn judge_report(&self) -> JudgeReport {
        JudgeReport {
            win_rate: self.win_rate(),
            ci95: self.ci95(),
            wins: self.wins,
            ties: self.ties,
            losses: self.losses,
            mean_reward: None,
            mean_p_policy: None,
            principles_per_prompt: None,
            truncated: None,
            mean_score: None,
            mean_score_ci95: None,
        }
    }
}

/// A figure of each policy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PerPolicy {
    pub policy: f64,
    pub reference: f64,
}

/// One judge's verdict (see the module docs for the layout).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeReport {
    pub win_rate: f64,
    /// 95% Wilson interval of `win_rate`.
    pub ci95: [f64; 2],
    pub wins: usize,
    pub ties: usize,
    pub losses: usize,
    /// PM judge: mean score of each policy's answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_reward: Option<PerPolicy>,
    /// Feedback judge: mean P(policy's answer better).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_p_policy: Option<f64>,
    /// Feedback judge: principles asked per prompt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principles_per_prompt: Option<usize>,
    /// Feedback judge: questions cut from the left to fit the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncated: Option<usize>,
    /// Text judges: each policy's mean score (the accuracy for
    /// `exact_match`) and its 95% interval (see [`mean_interval`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_score: Option<PerPolicy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_score_ci95: Option<PerPolicyInterval>,
}

/// A 95% interval per policy.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PerPolicyInterval {
    pub policy: [f64; 2],
    pub reference: [f64; 2],
}

/// Judge names, as the report's `judges` keys and the input port names.
pub const REWARD_JUDGE: &str = "reward_model";
pub const FEEDBACK_JUDGE: &str = "feedback_model";

/// The `report` output (layout in the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub policy: String,
    pub reference: String,
    pub n: usize,
    pub temperature: f64,
    pub max_new_tokens: i64,
    /// Mean over prompts of the summed per-token `logp_policy - logp_ref`
    /// on the policy's answers.
    pub kl: f64,
    /// Mean answer length in tokens (EOS included when sampled).
    pub response_len: PerPolicy,
    /// How `ci95` is computed.
    pub interval: String,
    /// By judge name ([`REWARD_JUDGE`], [`FEEDBACK_JUDGE`]): the bound ones.
    pub judges: BTreeMap<String, JudgeReport>,
}

/// Decimals of the figures in the Markdown report.
pub const MD_DECIMALS: usize = 4;

impl EvalReport {
    /// The readable report: a table of judges and a table of per-policy
    /// figures, each number printed with [`MD_DECIMALS`] decimals.
    pub fn markdown(&self) -> String {
        let f = |x: f64| format!("{x:.MD_DECIMALS$}");
        let mut s = String::new();
        let _ = writeln!(
            s,
            "# Evaluation: `{}` against `{}`\n",
            self.policy, self.reference
        );
        let _ = writeln!(
            s,
            "{} prompts, temperature {}, at most {} new tokens. Win rate = (wins + ties / 2) / n; \
             95% Wilson score interval.\n",
            self.n, self.temperature, self.max_new_tokens
        );
        s.push_str("| judge | win rate | 95% CI | wins | ties | losses |\n");
        s.push_str("|---|---|---|---|---|---|\n");
        for (name, j) in &self.judges {
            let _ = writeln!(
                s,
                "| {name} | {} | [{}, {}] | {} | {} | {} |",
                f(j.win_rate),
                f(j.ci95[0]),
                f(j.ci95[1]),
                j.wins,
                j.ties,
                j.losses
            );
        }
        let _ = writeln!(
            s,
            "\n| | policy `{}` | reference `{}` |",
            self.policy, self.reference
        );
        s.push_str("|---|---|---|\n");
        if let Some(r) = self.judges.get(REWARD_JUDGE).and_then(|j| j.mean_reward) {
            let _ = writeln!(s, "| mean reward | {} | {} |", f(r.policy), f(r.reference));
        }
        for (name, j) in &self.judges {
            if let (Some(m), Some(ci)) = (j.mean_score, j.mean_score_ci95) {
                let what = if name == "exact_match" {
                    "accuracy"
                } else {
                    "mean score"
                };
                let _ = writeln!(
                    s,
                    "| {what} ({name}), 95% CI | {} [{}, {}] | {} [{}, {}] |",
                    f(m.policy),
                    f(ci.policy[0]),
                    f(ci.policy[1]),
                    f(m.reference),
                    f(ci.reference[0]),
                    f(ci.reference[1])
                );
            }
        }
        let _ = writeln!(
            s,
            "| mean response length (tokens) | {} | {} |",
            f(self.response_len.policy),
            f(self.response_len.reference)
        );
        s.push('\n');
        let _ = writeln!(s, "- KL(policy ‖ reference): {}", f(self.kl));
        if let Some(p) = self
            .judges
            .get(FEEDBACK_JUDGE)
            .and_then(|j| j.mean_p_policy)
        {
            let _ = writeln!(s, "- mean P(policy better) (feedback model): {}", f(p));
        }
        s
    }

    /// Stage metrics: `n`, `kl`, `{judge}_win_rate` and the means.
    pub fn metrics(&self) -> Metrics {
        let mut m = Metrics::new();
        m.insert("n".into(), self.n.into());
        m.insert("kl".into(), self.kl.into());
        m.insert(
            "response_len_policy".into(),
            self.response_len.policy.into(),
        );
        m.insert(
            "response_len_reference".into(),
            self.response_len.reference.into(),
        );
        for (name, j) in &self.judges {
            m.insert(format!("{name}_win_rate"), j.win_rate.into());
            if let Some(r) = j.mean_reward {
                m.insert("mean_reward_policy".into(), r.policy.into());
                m.insert("mean_reward_reference".into(), r.reference.into());
            }
            if let Some(p) = j.mean_p_policy {
                m.insert("mean_p_policy".into(), p.into());
            }
            if let Some(r) = j.mean_score {
                m.insert(format!("{name}_mean_score_policy"), r.policy.into());
                m.insert(format!("{name}_mean_score_reference"), r.reference.into());
            }
        }
        m
    }
}

/// The name of a policy in the report: `given`, else its input path,
/// relative to the manifest's folder when inside it. (A stage spec carries
/// artifact paths, not upstream stage ids: a pipeline that wants stage ids
/// in its report sets `policy_name` / `reference_name`.)
pub fn policy_label(given: Option<&str>, input: &Path, work_dir: &Path) -> String {
    if let Some(name) = given {
        return name.to_string();
    }
    input
        .strip_prefix(work_dir)
        .unwrap_or(input)
        .display()
        .to_string()
}

/// The `evaluate` op.
pub const OP: OpDecl = OpDecl {
    name: "evaluate",
    version: 4,
    summary: "win rate of a policy against a reference on held-out prompts (PM, feedback-model, exact-match, rule or reward-program judges), Wilson CIs, mean reward / accuracy, KL, lengths",
    inputs: &[
        Port::input("policy", "the model folder to evaluate (e.g. a ppo model)"),
        Port::input(
            "reference",
            "the model folder to compare against (e.g. the SL-CAI model); same tokenizer",
        ),
        Port::input("prompts", "JSONL records with a prompt field (held out)"),
        Port::optional("chat_template", CHAT_TEMPLATE_INPUT),
        Port::optional(
            "reward_model",
            "judge: a preference model folder (pm.train), same tokenizer as the policies",
        ),
        Port::optional(
            "feedback_model",
            "judge: a feedback model folder (as for ai_feedback); needs `constitution` or params.principle",
        ),
        Port::optional(
            "constitution",
            "constitution YAML: the feedback judge's principles (and few-shot examples)",
        ),
        Port::optional(PROGRAM_INPUT, PROGRAM_INPUT_DOC),
    ],
    outputs: Outputs::Declared(&[
        Port::output(
            "report",
            "report.json: policy, reference, n, temperature, max_new_tokens, kl, response_len {policy, reference}, interval, judges {reward_model, feedback_model, exact_match, regex, length, program: win_rate, ci95, wins, ties, losses, mean_reward | mean_p_policy | mean_score, mean_score_ci95}",
        ),
        Port::output("report_md", "report.md: the same figures as Markdown tables"),
        Port::output(
            "samples",
            "samples.jsonl, one per prompt: prompt_index, prompt, policy_response, reference_response, for a chat prompt policy_messages and reference_messages (its conversation with each answer as the new assistant turn), policy_tokens, reference_tokens, kl, reward_model {policy, reference, outcome}, feedback_model {p_policy, outcome, details [{principle, p_a_policy_first, p_a_reference_first}]}, and per text judge (exact_match, ...) {policy, reference, outcome}; outcome is win | tie | loss for the policy",
        ),
    ]),
    params: ParamsDecl::of::<EvaluateParams>(),
    placement: Placement::Worker,
    conventions: &[
        CHAT_PROMPT_CONVENTION,
        "feedback judge: `ai_feedback`'s multiple-choice question; with `chat_template: auto` and a feedback model that has a chat template, asked as one user turn (the few-shot questions and their answers as turns before it) and ` (A)`/` (B)` scored after `The answer is:` at the start of the assistant's turn, else as plain text",
    ],
};

impl OpParams for EvaluateParams {
    fn check(&self) -> Result<(), ParamError> {
        use crate::role_devices::Role;
        self.placement
            .check("placement", &[Role::Policy, Role::Reference, Role::Reward])?;
        require(self.limit != Some(0), "limit", AT_LEAST_ONE)?;
        require(self.max_new_tokens >= 1, "max_new_tokens", AT_LEAST_ONE)?;
        check_temperature(self.temperature)?;
        require(self.batch_size > 0, "batch_size", AT_LEAST_ONE)?;
        require(
            self.principles_per_prompt > 0,
            "principles_per_prompt",
            AT_LEAST_ONE,
        )?;
        require(
            !self
                .principle
                .as_deref()
                .is_some_and(|s| s.trim().is_empty()),
            "principle",
            "must not be empty",
        )?;
        check_rewards(&self.judges, "judges")?;
        for (i, j) in self.judges.iter().enumerate() {
            require(
                j.kind().input() != Some("reward_model") && j.kind().input() != Some("feedback_model"),
                &format!("judges[{i}]"),
                "the model judges are the `reward_model` and `feedback_model` inputs, not entries of `judges`",
            )?;
            require(
                j.weight == 1.0,
                &format!("judges[{i}].weight"),
                "judges are reported one by one, not weighed",
            )?;
        }
        Ok(())
    }

    /// At least one judge, and the feedback judge with exactly one source
    /// of principles (and the params that fit it).
    fn check_bindings(&self, bound: &dyn Fn(&str) -> bool) -> Result<(), BindingError> {
        let text = self.text_judges(bound);
        if !bound(REWARD_JUDGE) && !bound(FEEDBACK_JUDGE) && text.is_empty() {
            return Err(BindingError::new(
                "inputs",
                format!(
                    "evaluate needs a judge: bind input `{REWARD_JUDGE}` (a preference model), \
                     input `{FEEDBACK_JUDGE}` (with input `constitution` or params.principle), \
                     input `{PROGRAM_INPUT}`, or list `params.judges` (exact_match, regex, length, program)"
                ),
            ));
        }
        if text.iter().any(|j| j.program.is_some()) && !bound(PROGRAM_INPUT) {
            return Err(BindingError::new(
                "params.judges",
                format!("the `program` judge needs the `{PROGRAM_INPUT}` input"),
            ));
        }
        let constitution = bound("constitution");
        if !bound(FEEDBACK_JUDGE) {
            return match (constitution, self.principle.is_some()) {
                (true, _) => Err(BindingError::new(
                    "inputs.constitution",
                    format!("no input `{FEEDBACK_JUDGE}` is bound to ask its principles"),
                )),
                (_, true) => Err(BindingError::new(
                    "params.principle",
                    format!("no input `{FEEDBACK_JUDGE}` is bound to ask it"),
                )),
                _ => Ok(()),
            };
        }
        match (constitution, self.principle.is_some()) {
            (true, true) => Err(BindingError::new(
                "params.principle",
                "both input `constitution` and params.principle are set; the feedback judge takes its principles from one of them",
            )),
            (false, false) => Err(BindingError::new(
                "inputs.constitution",
                format!("input `{FEEDBACK_JUDGE}` needs principles to ask: bind input `constitution` or set params.principle"),
            )),
            (false, true) if self.principles_per_prompt != 1 => Err(BindingError::new(
                "params.principles_per_prompt",
                format!(
                    "{} principles per prompt, but params.principle gives one principle",
                    self.principles_per_prompt
                ),
            )),
            (false, true) if self.few_shot => Err(BindingError::new(
                "params.few_shot",
                "few_shot takes the constitution's examples; no input `constitution` is bound",
            )),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_judges_report_a_mean_with_an_interval() {
        // 0/1 scores: an accuracy with Wilson's interval.
        let (m, ci) = mean_interval(&[1.0, 0.0, 1.0, 1.0]);
        assert_eq!(m, 0.75);
        let (lo, hi) = wilson_interval(0.75, 4, Z95);
        assert_eq!(ci, [lo, hi]);
        // Real scores: mean ± z s / sqrt(n); s = 1 for [1, 2, 3].
        let (m, ci) = mean_interval(&[1.0, 2.0, 3.0]);
        assert_eq!(m, 2.0);
        assert!((ci[1] - (2.0 + Z95 / 3f64.sqrt())).abs() < 1e-12, "{ci:?}");
        let p: EvaluateParams =
            serde_json::from_value(serde_json::json!({"judges": [{"exact_match": {}}]})).unwrap();
        assert_eq!(p.text_judges(&|_| false).len(), 1);
        let with_program = p.text_judges(&|n| n == "reward_program");
        assert_eq!(with_program[1].kind().key(), "program");
        assert!(OP
            .normalize_params(&serde_json::json!({"judges": [{"pm": {}}]}))
            .is_err());
        assert!(OP
            .normalize_params(&serde_json::json!({"judges": [{"exact_match": {}, "weight": 2}]}))
            .is_err());
    }

    #[test]
    fn binding_rules_name_the_field_at_fault() {
        let params = |extra: serde_json::Value| -> EvaluateParams {
            let v = OP.normalize_params(&extra).unwrap();
            serde_json::from_value(v).unwrap()
        };
        let field = |p: &EvaluateParams, bound: &[&str]| {
            p.check_bindings(&|n| bound.contains(&n))
                .err()
                .map(|e| e.field)
        };
        let plain = params(serde_json::json!({}));
        assert_eq!(field(&plain, &[]), Some("inputs".into()));
        assert_eq!(field(&plain, &["reward_model"]), None);
        assert_eq!(
            field(&plain, &["reward_model", "constitution"]),
            Some("inputs.constitution".into())
        );
        assert_eq!(
            field(&plain, &["feedback_model"]),
            Some("inputs.constitution".into())
        );
        assert_eq!(field(&plain, &["feedback_model", "constitution"]), None);
        let principle = params(serde_json::json!({"principle": "be kind"}));
        assert_eq!(field(&principle, &["feedback_model"]), None);
        assert_eq!(
            field(&principle, &["reward_model"]),
            Some("params.principle".into())
        );
        assert_eq!(
            field(&principle, &["feedback_model", "constitution"]),
            Some("params.principle".into())
        );
        let many = params(serde_json::json!({"principle": "be kind", "principles_per_prompt": 2}));
        assert_eq!(
            field(&many, &["feedback_model"]),
            Some("params.principles_per_prompt".into())
        );
        let few = params(serde_json::json!({"principle": "be kind", "few_shot": true}));
        assert_eq!(
            field(&few, &["feedback_model"]),
            Some("params.few_shot".into())
        );
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    #[test]
    fn wilson_matches_hand_values() {
        // 7/10: z² = 3.841459, centre = (0.7 + 0.192073) / 1.384146 = 0.644493,
        // half = 1.959964 / 1.384146 * sqrt(0.021 + 0.009604) = 0.247716.
        let (lo, hi) = wilson_interval(0.7, 10, Z95);
        assert!((lo - 0.396_778_147_461_145).abs() < 1e-12, "{lo}");
        assert!((hi - 0.892_208_732_593_699).abs() < 1e-12, "{hi}");
        // Symmetric about 1/2 at p = 1/2: 2/4 -> 0.150039 .. 0.849961.
        let (lo, hi) = wilson_interval(0.5, 4, Z95);
        assert!((lo - 0.150_038_989_152_150).abs() < 1e-12, "{lo}");
        assert!(close(lo + hi, 1.0));
        // All wins: the upper end is exactly 1 (clamped), the lower one
        // n / (n + z²) = 5 / 8.841459 = 0.565518.
        let (lo, hi) = wilson_interval(1.0, 5, Z95);
        assert!((lo - 5.0 / (5.0 + Z95 * Z95)).abs() < 1e-12, "{lo}");
        assert_eq!(hi, 1.0);
        let (lo, hi) = wilson_interval(0.0, 5, Z95);
        assert_eq!(lo, 0.0);
        assert!((hi - (1.0 - 5.0 / (5.0 + Z95 * Z95))).abs() < 1e-12);
        assert_eq!(wilson_interval(0.3, 0, Z95), (0.0, 1.0));
    }

    #[test]
    fn outcomes_and_tallies_count_ties_as_half() {
        assert_eq!(Outcome::from_scores(1.0, 0.5), Outcome::Win);
        assert_eq!(Outcome::from_scores(-2.0, -1.0), Outcome::Loss);
        assert_eq!(Outcome::from_scores(0.25, 0.25), Outcome::Tie);
        assert_eq!(Outcome::from_probability(0.5000001), Outcome::Win);
        assert_eq!(Outcome::from_probability(0.5), Outcome::Tie);
        assert_eq!(Outcome::from_probability(0.2), Outcome::Loss);

        // 5 wins, 2 ties, 3 losses: (5 + 1) / 10 = 0.6.
        let outcomes = [
            [Outcome::Win; 5].as_slice(),
            &[Outcome::Tie; 2],
            &[Outcome::Loss; 3],
        ]
        .concat();
        let t = Tally::of(outcomes.iter().copied());
        assert_eq!((t.wins, t.ties, t.losses, t.n()), (5, 2, 3, 10));
        assert!(close(t.win_rate(), 0.6));
        // Swapping the policies turns wins into losses: 1 - w.
        let swapped = Tally {
            wins: t.losses,
            ties: t.ties,
            losses: t.wins,
        };
        assert!(close(swapped.win_rate(), 0.4));
        // 7 wins of 10 (or 6 wins and 2 ties) share 7/10's interval.
        let seven = Tally {
            wins: 6,
            ties: 2,
            losses: 2,
        };
        assert!(close(seven.win_rate(), 0.7));
        assert!((seven.ci95()[0] - 0.396_778_147_461_145).abs() < 1e-12);
        // All ties: exactly one half.
        let ties = Tally::of([Outcome::Tie; 4]);
        assert_eq!(ties.win_rate(), 0.5);
    }

    fn report() -> EvalReport {
        let mut pm = Tally {
            wins: 3,
            ties: 1,
            losses: 0,
        }
        .judge_report();
        pm.mean_reward = Some(PerPolicy {
            policy: 1.23456,
            reference: -0.5,
        });
        EvalReport {
            policy: "rl".into(),
            reference: "sft".into(),
            n: 4,
            temperature: 1.0,
            max_new_tokens: 8,
            kl: 0.03,
            response_len: PerPolicy {
                policy: 7.5,
                reference: 8.0,
            },
            interval: "wilson-95".into(),
            judges: [(REWARD_JUDGE.to_string(), pm)].into_iter().collect(),
        }
    }

    #[test]
    fn markdown_holds_the_report_figures() {
        let r = report();
        let md = r.markdown();
        assert!(md.contains("# Evaluation: `rl` against `sft`"));
        assert!(
            md.contains("| reward_model | 0.8750 | [0.3958, 0.9868] | 3 | 1 | 0 |"),
            "{md}"
        );
        assert!(md.contains("| mean reward | 1.2346 | -0.5000 |"), "{md}");
        assert!(md.contains("| mean response length (tokens) | 7.5000 | 8.0000 |"));
        assert!(md.contains("KL(policy ‖ reference): 0.0300"), "{md}");
        let back: EvalReport = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
        let m = r.metrics();
        assert_eq!(m["reward_model_win_rate"], 0.875);
        assert_eq!(m["n"], 4);
    }

    #[test]
    fn labels_prefer_the_given_name_then_the_relative_path() {
        let work = Path::new("/p");
        assert_eq!(
            policy_label(Some("rl"), Path::new("/x/y"), work),
            "rl".to_string()
        );
        assert_eq!(
            policy_label(None, Path::new("/p/models/a"), work),
            "models/a"
        );
        assert_eq!(policy_label(None, Path::new("/c/t/abc"), work), "/c/t/abc");
    }

    #[test]
    fn params_are_checked() {
        let op = OP;
        let ok = op.normalize_params(&serde_json::json!({})).unwrap();
        assert_eq!(ok["max_new_tokens"], 64);
        for (params, field) in [
            (serde_json::json!({ "limit": 0 }), "limit"),
            (serde_json::json!({ "temperature": -1.0 }), "temperature"),
            (serde_json::json!({ "principle": " " }), "principle"),
            (
                serde_json::json!({ "principles_per_prompt": 0 }),
                "principles_per_prompt",
            ),
        ] {
            assert_eq!(op.normalize_params(&params).unwrap_err().field, field);
        }
    }
}
