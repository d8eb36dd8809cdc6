//! `ppo`: RLHF / RLAIF with PPO against a preference model (InstructGPT /
//! TRL recipe: per-token KL penalty to a frozen reference, the PM score on
//! the last response token, GAE, clipped policy and value losses).
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::chat_format::{PromptParams, CHAT_PROMPT_CONVENTION, CHAT_TEMPLATE_INPUT};
use crate::op::require;
use crate::rewards::{
    check_reward_inputs, check_rewards, effective_rewards, RewardComponent, PROGRAM_INPUT,
    PROGRAM_INPUT_DOC,
};
use crate::training::LoraParams;
use crate::{BindingError, OpDecl, OpParams, Outputs, ParamError, ParamsDecl, Placement, Port};

/// Which per-token KL estimator the penalty uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum PpoKlEstimator {
    /// `logp - logp_ref`.
    #[default]
    K1,
    /// `0.5 * (logp - logp_ref)^2`.
    K2,
    /// `(r - 1) - log r`, `r = p_ref / p`.
    K3,
}

/// Where the value model starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum PpoValueInit {
    /// The policy folder with a fresh value head (TRL's default).
    #[default]
    Policy,
    /// The preference model folder, its `score` head replaced by a fresh
    /// value head (InstructGPT: the value function starts from the RM).
    RewardModel,
}

/// What the value model (critic) is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum PpoValueModel {
    /// A full trainable copy of its starting model, with a value head.
    #[default]
    Full,
    /// LoRA adapters (`critic_lora`, by default the policy's `lora`
    /// settings) and a value head on the frozen reference weights: with
    /// `lora` on the policy, its own frozen base (one copy of the base in
    /// memory); with a fully trained policy, the reference's copy (in
    /// `dtype`), so no second trained model and no optimizer state for it.
    Lora,
}

impl PpoValueModel {
    /// For `skip_serializing_if`: the default is left out of the
    /// normalised params (stages written before it keep their fingerprints).
    pub fn is_full(&self) -> bool {
        *self == PpoValueModel::Full
    }
}

/// The learning-rate schedule over the iterations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum PpoLrSchedule {
    /// `lr` throughout (after any warm-up).
    #[default]
    Constant,
    /// From `lr` down to 0 over the iterations, one rate per iteration
    /// (TRL / cleanrl `anneal_lr`: iteration `i` of `n` runs at
    /// `lr * (1 - (i - 1) / n)`).
    Linear,
}

/// How the advantages are estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum PpoAdvantage {
    /// GAE over per-token shaped rewards with a learned value model (PPO).
    #[default]
    Gae,
    /// GRPO (DeepSeekMath): no value model; `samples_per_prompt` responses
    /// per prompt, each one's sequence reward minus the group mean, divided
    /// by the group's (unbiased) standard deviation plus 1e-4 when
    /// `scale_std`; broadcast over its response tokens.
    Grpo,
    /// RLOO: no value model; each response's sequence reward minus the mean
    /// of the other `samples_per_prompt - 1` rewards to the same prompt.
    Rloo,
}

impl PpoAdvantage {
    /// Whether a value model is loaded and trained.
    pub fn uses_critic(self) -> bool {
        self == PpoAdvantage::Gae
    }
    fn is_gae(&self) -> bool {
        *self == PpoAdvantage::Gae
    }
}

/// Where the KL to the reference enters the objective.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum PpoKlMode {
    /// As a penalty in the reward: `-kl_coef * kl_t` per token (with GAE),
    /// or summed over the response's tokens and subtracted from its score
    /// (with grpo / rloo), using `kl_estimator`.
    #[default]
    Reward,
    /// As a loss term (GRPO's choice): `kl_coef` times the masked mean of
    /// the k3 estimator between the current policy and the reference is
    /// added to the policy loss; the reward is the score alone.
    Loss,
}

impl PpoKlMode {
    fn is_reward(&self) -> bool {
        *self == PpoKlMode::Reward
    }
}

/// Reward normalisation against reference samples (lm-human-preferences):
/// before training, `samples` responses of the reference policy are scored
/// and every later score becomes `gain * score + bias`, with gain and bias
/// chosen so those reference scores have mean `mean` and standard
/// deviation `std`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PpoRewardNorm {
    /// Reference responses to score (at least 2).
    pub samples: usize,
    /// Target mean of the normalized reference scores.
    #[serde(default)]
    pub mean: f64,
    /// Target (population) standard deviation of the normalized reference scores.
    #[serde(default = "crate::defaults::one_f64")]
    pub std: f64,
}

/// Params of `ppo`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
// Unknown names are refused by `op::parse` (serde cannot deny them
// beside `flatten`); the schema still lists the struct as closed.
#[schemars(deny_unknown_fields)]
pub struct PpoParams {
    /// PPO iterations (rollout + update).
    #[serde(default = "default_iterations")]
    pub iterations: u64,
    /// Prompts per rollout (the rollout has `batch_size * samples_per_prompt`
    /// responses).
    #[serde(default = "crate::defaults::batch_size")]
    pub batch_size: usize,
    /// How advantages are estimated: `gae` (PPO with a value model), or the
    /// critic-free `grpo` / `rloo` (no value model is loaded or trained;
    /// `value_clip`, `gamma`, `lam`, `value_init` and `whiten_rewards` are
    /// unused).
    #[serde(default, skip_serializing_if = "PpoAdvantage::is_gae")]
    pub advantage: PpoAdvantage,
    /// Responses sampled per prompt; at least 2 with `grpo` / `rloo`, whose
    /// baselines are the other responses to the same prompt.
    #[serde(default = "crate::defaults::one", skip_serializing_if = "is_one")]
    pub samples_per_prompt: usize,
    /// With `grpo`: divide the mean-centred rewards by the group's standard
    /// deviation (false: mean-centring only, as Dr. GRPO).
    #[serde(default = "crate::defaults::yes", skip_serializing_if = "is_true")]
    pub scale_std: bool,
    /// Where the KL to the reference enters: the reward (default) or the
    /// policy loss (`kl_coef * k3`, as GRPO).
    #[serde(default, skip_serializing_if = "PpoKlMode::is_reward")]
    pub kl_mode: PpoKlMode,
    /// Longest sampled response in tokens.
    #[serde(default = "default_max_new_tokens")]
    pub max_new_tokens: i64,
    /// Sampling temperature of the rollouts.
    #[serde(default = "crate::defaults::one_f64")]
    pub temperature: f64,
    /// The prompt field, its template and the chat template.
    #[serde(flatten)]
    pub prompt: PromptParams,
    /// Learning rate of the policy and the value model.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Passes over each rollout.
    #[serde(default = "crate::defaults::one")]
    pub ppo_epochs: usize,
    /// Minibatches per pass.
    #[serde(default = "crate::defaults::one")]
    pub minibatches: usize,
    /// Policy ratio clip range.
    #[serde(default = "default_clip")]
    pub clip: f64,
    /// Value clip range.
    #[serde(default = "default_clip")]
    pub value_clip: f64,
    /// Discount.
    #[serde(default = "crate::defaults::one_f64")]
    pub gamma: f64,
    /// GAE lambda.
    #[serde(default = "default_lam")]
    pub lam: f64,
    /// (Initial) KL penalty coefficient.
    #[serde(default = "default_kl_coef")]
    pub kl_coef: f64,
    /// Target KL: makes the coefficient adaptive (none: fixed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_kl: Option<f64>,
    /// Horizon of the adaptive KL controller.
    #[serde(default = "default_horizon")]
    pub horizon: f64,
    /// Per-token KL estimator of the penalty.
    #[serde(default)]
    pub kl_estimator: PpoKlEstimator,
    /// Added to the score of responses without EOS (give a negative number).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_eos_penalty: Option<f64>,
    /// Whiten the shaped rewards before GAE.
    #[serde(default)]
    pub whiten_rewards: bool,
    /// Clip each model's global gradient norm to this (none: no clipping).
    #[serde(default = "default_grad_clip", skip_serializing_if = "Option::is_none")]
    pub grad_clip: Option<f64>,
    /// Save a resumable checkpoint (policy, value model, both optimizers,
    /// KL controller, iteration) every this many iterations (0: never), and
    /// after the next iteration when SIGUSR1 asks for one (a Slurm job
    /// nearing its time limit); a rerun of an interrupted stage resumes
    /// from the latest.
    #[serde(default = "default_checkpoint_every")]
    pub checkpoint_every: u64,
    /// LoRA adapters on the policy: only they train, the reference is the
    /// same weights with the adapters off, and the saved policy has them
    /// merged. The value model is trained in full unless `value_model: lora`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<LoraParams>,
    /// Where the value model starts.
    #[serde(default)]
    pub value_init: PpoValueInit,
    /// The value model: a full copy (`full`) or adapters and a value head
    /// on the frozen reference weights (`lora`: the policy's own base with
    /// `lora`, else the reference's copy).
    #[serde(default, skip_serializing_if = "PpoValueModel::is_full")]
    pub value_model: PpoValueModel,
    /// With `value_model: lora`: the critic's adapters (by default the
    /// policy's `lora` settings, or LoRA's defaults without them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub critic_lora: Option<LoraParams>,
    /// Learning-rate schedule over the iterations (policy and value model).
    #[serde(default)]
    pub lr_schedule: PpoLrSchedule,
    /// Iterations of linear warm-up from 0 to `lr` (Hugging Face convention:
    /// iteration `i` of the warm-up runs at `lr * (i - 1) / warmup_iterations`).
    #[serde(default)]
    pub warmup_iterations: u64,
    /// Normalize the preference model's scores against reference samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_norm: Option<PpoRewardNorm>,
    /// With `feedback_model` (direct RLAIF): the principle the answer is
    /// rated under (instead of a `constitution` input).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub principle: Option<String>,
    /// bf16 autocast of the forward passes on CUDA (rollouts, scoring,
    /// updates); weights, optimizer state and losses stay float32. Ignored
    /// on CPU.
    #[serde(default)]
    pub bf16: bool,
    /// The dtype of the frozen models: the reference (with `lora`, the
    /// policy's frozen base weights, which serve as the reference), the
    /// reward and the feedback model (`auto`: bfloat16 on CUDA, float32 on
    /// the CPU). Trained weights stay float32.
    #[serde(default, skip_serializing_if = "crate::memory::Dtype::is_auto")]
    pub dtype: crate::memory::Dtype,
    /// Processes the stage runs on (Gloo on the CPU, NCCL on one GPU per
    /// rank; see `sft`'s `data_parallel`; with `placement`, each rank holds
    /// the GPUs it names, rank R the stage's `cuda:(R * placed + i)` for
    /// `cuda:i`): each rank samples, scores and takes the forward
    /// passes of its share of the prompts (whole groups), the rollouts are
    /// gathered so every rank shapes the same rewards and advantages, and
    /// each minibatch is split among the ranks, its gradients averaged
    /// after backward. Rank 0 writes the outputs. `batch_size` must be at
    /// least this.
    #[serde(default = "crate::defaults::one", skip_serializing_if = "is_one")]
    pub data_parallel: usize,
    /// The device of each model by role (`{policy: cuda:0, reference:
    /// cuda:1, reward: cuda:1, value: cuda:0}`; `cpu`, `cuda`, `cuda:N`, counted
    /// among the stage's own GPUs); a role left out runs on the stage's
    /// device. Tensors move between devices where roles meet.
    #[serde(
        default,
        skip_serializing_if = "crate::role_devices::RoleDevices::is_empty"
    )]
    pub placement: crate::role_devices::RoleDevices,
    /// Recompute each transformer block's activations in the update's
    /// backward instead of keeping them. Default: on for CUDA training of
    /// models over 300M parameters, off otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gradient_checkpointing: Option<bool>,
    /// Several reward sources, each with a weight: the response's score is
    /// the weighted sum (`[{pm: {}, weight: 1.0}, {program: {args: [..]},
    /// weight: 0.5}, {exact_match: {}}]`; see `alignflow ops ppo`). Empty:
    /// the one reward input bound (`reward_model`, `feedback_model` or
    /// `reward_program`) with weight 1.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rewards: Vec<RewardComponent>,
    /// Dropout (the checkpoints' own rates) in the update's policy and value
    /// forwards. Off by default, as TRL's PPO trainer: the rollout's
    /// log-probs and values are always dropout-free (they are the sampling
    /// policy's), and dropout in the update would make the ratio noisy. On,
    /// the rollout's log-probs take their own no-grad passes.
    #[serde(default, skip_serializing_if = "is_false")]
    pub dropout: bool,
}

fn default_iterations() -> u64 {
    20
}
fn default_max_new_tokens() -> i64 {
    32
}
// The knobs added after version 2 are left out of the normalised params at
// their defaults, so existing stages keep their cache keys.
fn is_one(n: &usize) -> bool {
    *n == 1
}
fn is_true(b: &bool) -> bool {
    *b
}
fn is_false(b: &bool) -> bool {
    !*b
}
fn default_lr() -> f64 {
    1e-5
}
fn default_clip() -> f64 {
    0.2
}
fn default_lam() -> f64 {
    0.95
}
fn default_kl_coef() -> f64 {
    0.05
}
fn default_horizon() -> f64 {
    10000.0
}
fn default_grad_clip() -> Option<f64> {
    Some(1.0)
}
fn default_checkpoint_every() -> u64 {
    10
}

impl OpParams for PpoParams {
    /// Checks the combinations serde cannot.
    fn check(&self) -> Result<(), ParamError> {
        use crate::role_devices::Role;
        self.placement.check(
            "placement",
            &[Role::Policy, Role::Reference, Role::Reward, Role::Value],
        )?;
        crate::training::check_lora(&self.lora, "lora")?;
        crate::training::check_lora(&self.critic_lora, "critic_lora")?;
        require(
            self.samples_per_prompt > 0,
            "samples_per_prompt",
            "`samples_per_prompt` must be at least 1",
        )?;
        crate::training::check_data_parallel(
            self.data_parallel,
            self.batch_size,
            "each rank samples a share of the prompts",
        )?;
        if self.value_model == PpoValueModel::Lora {
            require(
                self.value_init == PpoValueInit::Policy,
                "value_model",
                "`value_model: lora` puts the critic's adapters on the frozen starting policy: it needs `value_init: policy`",
            )?;
        }
        require(
            self.critic_lora.is_none() || self.value_model == PpoValueModel::Lora,
            "critic_lora",
            "`critic_lora` sets the adapters of a LoRA critic: it needs `value_model: lora`",
        )?;
        check_rewards(&self.rewards, "rewards")?;
        check_ranges(self)?;
        require(
            self.advantage.uses_critic() || self.samples_per_prompt >= 2,
            "samples_per_prompt",
            format!(
                "`advantage: {}` compares the responses to the same prompt: `samples_per_prompt` must be at least 2, got {}",
                self.advantage.name(),
                self.samples_per_prompt
            ),
        )
    }

    /// The reward sources (`rewards`, or exactly one reward input) and
    /// only the companions that fit them: a `baseline` with a preference
    /// model alone, a feedback model with one source of principles.
    fn check_bindings(&self, bound: &dyn Fn(&str) -> bool) -> Result<(), BindingError> {
        let rewards = effective_rewards(&self.rewards, bound);
        if self.rewards.is_empty() {
            match rewards.len() {
                0 => return Err(BindingError::new(
                    "inputs",
                    "no reward source: bind `reward_model` (a preference model), `feedback_model` (direct RLAIF) or `reward_program`, or list sources in `params.rewards`",
                )),
                1 => {}
                _ => return Err(BindingError::new(
                    &format!("inputs.{}", rewards[1].kind().input().unwrap_or_default()),
                    "bind exactly one reward source: `reward_model` (a preference model), `feedback_model` (direct RLAIF) or `reward_program`, not several (to mix them, weigh them in `params.rewards`)",
                )),
            }
        } else {
            check_reward_inputs(&self.rewards, bound)?;
        }
        let uses = |key: &str| rewards.iter().any(|c| c.kind().key() == key);
        if !uses("feedback") {
            if bound("constitution") {
                return Err(BindingError::new(
                    "inputs.constitution",
                    "`constitution` goes with `feedback_model` (direct RLAIF), not `reward_model`",
                ));
            }
            if self.principle.is_some() {
                return Err(BindingError::new(
                    "params.principle",
                    "`principle` goes with `feedback_model` (direct RLAIF), not `reward_model`",
                ));
            }
        }
        if bound("baseline") && !(rewards.len() == 1 && uses("pm")) {
            return Err(BindingError::new(
                "inputs.baseline",
                "`baseline` (contrastive rewards) needs `reward_model` as the only reward source: the baseline scores are preference-model scores",
            ));
        }
        if !uses("pm") && self.value_init == PpoValueInit::RewardModel {
            return Err(BindingError::new(
                "params.value_init",
                "`reward_model` needs a `reward_model` input; without a preference model use `policy`",
            ));
        }
        if !uses("feedback") {
            return Ok(());
        }
        match (&self.principle, bound("constitution")) {
            (Some(_), true) => Err(BindingError::new(
                "params.principle",
                "give the feedback model `principle` or a `constitution` input, not both",
            )),
            (None, false) => Err(BindingError::new(
                "inputs.constitution",
                "`feedback_model` needs a principle to rate under: `params.principle` or a `constitution` input",
            )),
            (Some(text), false) if text.trim().is_empty() => {
                Err(BindingError::new("params.principle", "empty"))
            }
            _ => Ok(()),
        }
    }
}

impl PpoAdvantage {
    /// The manifest spelling.
    pub fn name(self) -> &'static str {
        match self {
            PpoAdvantage::Gae => "gae",
            PpoAdvantage::Grpo => "grpo",
            PpoAdvantage::Rloo => "rloo",
        }
    }
}

/// The `ppo` op.
pub const OP: OpDecl = OpDecl {
    name: "ppo",
    version: 7,
    summary: "RL from (AI) feedback: PPO of a policy against a preference model with a KL penalty to the starting policy",
    inputs: &[
        Port::input(
            "policy",
            "the model folder to optimise (e.g. an SL-CAI model)",
        ),
        Port::optional(
            "reward_model",
            "a preference model folder (pm.train): a reward source (alone, or as `pm` in params.rewards)",
        ),
        Port::input("prompts", "JSONL records with a prompt field"),
        Port::optional("chat_template", CHAT_TEMPLATE_INPUT),
        Port::optional(
            "baseline",
            "contrastive rewards: baseline_scores of the same prompts; the reward becomes the PM score minus the prompt's mean baseline score",
        ),
        Port::optional(
            "feedback_model",
            "direct RLAIF: a language model folder that rates each response from 1 to 10; the reward is its expected rating rescaled to [-1, 1]",
        ),
        Port::optional(
            "constitution",
            "with feedback_model: its feedback principles, one drawn per response (instead of `principle`)",
        ),
        Port::optional(PROGRAM_INPUT, PROGRAM_INPUT_DOC),
    ],
    outputs: Outputs::Declared(&[
        Port::output("model", "the optimised policy folder"),
        Port::output(
            "samples",
            "samples.jsonl: every response of the first and of the last iteration: iteration, row, prompt, prompt_text, response (up to its first EOS), score (the reward source's raw score), kl (summed over the response), and for a chat prompt messages (its conversation with the response as the new assistant turn)",
        ),
        Port::volatile(
            "metrics",
            "metrics.jsonl: iteration, score (the reward before the KL penalty: with a baseline, raw_score minus the baseline), raw_score, kl, kl_coef, non_score_reward, entropy, clip_frac, approx_kl, policy_loss, value_loss, explained_variance, response_len, tokens_per_s, lr, seconds (reward_gain, reward_bias with reward_norm; baseline_score with a baseline; with grpo / rloo value_loss and explained_variance are null, and kl_loss, group_reward_std, flat_groups are added; with several reward sources or a program, reward_<source> (the mean unweighted score of each entry of params.rewards) and reward_program_<name> for a program's named scores)",
        ),
    ]),
    params: ParamsDecl::of::<PpoParams>(),
    placement: Placement::Worker,
    conventions: &[
        CHAT_PROMPT_CONVENTION,
        "reward of a response: the reward source's score on its last token (the EOS, or the last sampled token), plus -kl_coef * KL per response token",
        "reward sources: `reward_model` (pm), `feedback_model` (feedback), `reward_program` (program), or several weighed in `params.rewards`: score = sum of weight * source score; built-in `exact_match` (1 if the response equals the record's `reference` after normalising case, whitespace and a trailing period), `regex` (1 if the pattern matches), `length` (-max(0, chars - free_chars))",
        "reward program protocol: started once per stage as `[interpreter..] PROGRAM args..`; stdin gets JSON lines {id, prompt, response, messages?, ...the prompt record's fields (reference, ..)} in batches of `batch_size`; it answers each, in order, with {id, score} or {id, scores: {name: value}} (score = their sum) on stdout and flushes; its stderr goes to the stage log; exiting, taking over `timeout_s` per batch, a wrong id, a non-number, NaN or a malformed line fails the stage naming the program, the record and the answer line",
        "policy loss: clipped surrogate, max(-A r, -A clip(r, 1 - eps, 1 + eps)), a masked mean over every response token of the minibatch",
        "value loss: 0.5 max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2), a masked mean over response tokens",
        "KL: per response token, k1 = log pi - log ref (or k2/k3 with `kl_estimator`), summed per response in the `kl` metric",
        "dropout: off (as TRL's PPO trainer); `dropout: true` turns the checkpoints' own on in the update's policy and value forwards, never in the rollout's",
    ],
};

/// The numbers whose value outside their range still trains, wrongly:
/// a greedy rollout has no distribution to take a ratio or a KL of (the
/// log-probs are taken at the sampling temperature), a zero horizon
/// makes the adaptive KL coefficient infinite, a negative clip inverts
/// the clamp, a positive no-EOS penalty rewards truncation.
fn check_ranges(p: &PpoParams) -> Result<(), ParamError> {
    let positive = |x: f64| x.is_finite() && x > 0.0;
    let unit = |x: f64| (0.0..=1.0).contains(&x);
    require(
        positive(p.temperature),
        "temperature",
        "must be a finite number > 0: PPO scores its rollouts at the temperature they were sampled at, and greedy decoding (0) has no distribution to take a ratio or a KL of",
    )?;
    require(positive(p.lr), "lr", "must be a finite number > 0")?;
    require(p.ppo_epochs > 0, "ppo_epochs", "must be at least 1")?;
    require(p.minibatches > 0, "minibatches", "must be at least 1")?;
    require(positive(p.clip), "clip", "must be a finite number > 0")?;
    require(
        positive(p.value_clip),
        "value_clip",
        "must be a finite number > 0",
    )?;
    require(unit(p.gamma), "gamma", "must be between 0 and 1")?;
    require(unit(p.lam), "lam", "must be between 0 and 1")?;
    require(
        p.kl_coef.is_finite() && p.kl_coef >= 0.0,
        "kl_coef",
        "must be a finite number >= 0",
    )?;
    require(
        p.target_kl.is_none_or(positive),
        "target_kl",
        "must be a finite number > 0",
    )?;
    require(
        positive(p.horizon),
        "horizon",
        "must be a finite number > 0",
    )?;
    require(
        p.no_eos_penalty.is_none_or(|p| p.is_finite() && p <= 0.0),
        "no_eos_penalty",
        "is added to the score of a response without EOS: give a number <= 0 (TRL's `missing_eos_penalty` is the same penalty written positive)",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Values that would train wrongly, each refused naming its field.
    #[test]
    fn out_of_range_numbers_are_refused() {
        assert!(OP.normalize_params(&json!({})).is_ok());
        for (params, field) in [
            (json!({"temperature": 0.0}), "temperature"),
            (json!({"lr": 0.0}), "lr"),
            (json!({"ppo_epochs": 0}), "ppo_epochs"),
            (json!({"minibatches": 0}), "minibatches"),
            (json!({"clip": -0.2}), "clip"),
            (json!({"value_clip": 0.0}), "value_clip"),
            (json!({"gamma": 1.5}), "gamma"),
            (json!({"lam": -0.1}), "lam"),
            (json!({"kl_coef": -0.05}), "kl_coef"),
            (json!({"target_kl": 0.0}), "target_kl"),
            (json!({"horizon": 0.0}), "horizon"),
            (json!({"no_eos_penalty": 1.0}), "no_eos_penalty"),
        ] {
            let err = OP.normalize_params(&params).unwrap_err();
            assert_eq!(err.field, field, "{params}");
        }
        let ok = json!({"no_eos_penalty": -1.0, "target_kl": 6.0, "gamma": 1.0, "lam": 0.0});
        assert!(OP.normalize_params(&ok).is_ok());
    }
}
