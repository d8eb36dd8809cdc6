//! The stage before its first iteration: the params checked and turned into
//! settings, the four models loaded, the prompts read, the optimizers made.

use std::path::Path;

use tch::Device;

use alignflow_ops::text::Tokenizer;
use alignflow_ops::{PpoAdvantage, PpoParams, PpoValueInit, PpoValueModel, Role, StageContext};

use super::reward_source::{Rewards, Source};
use crate::dist::Group;
use crate::model::sample::SamplingConfig;
use crate::model::{self, without_adapters, Head, LoraConfig, Model, Packing};
use crate::ops::load::{self, stop_ids};
use crate::ops::prompts::{read_prompts, PromptSource};
use crate::ops::sampling::sampling_config;
use crate::ops::training::set_gradient_checkpointing;
use crate::rl::{GaeConfig, GroupBaseline, KlEstimator};
use crate::train::{AdamW, AdamWConfig, Schedule, ScheduleConfig};

/// The stage's settings: its params and what follows from them.
pub(super) struct Settings {
    pub params: PpoParams,
    pub stage: String,
    pub seed: u64,
    /// The policy's device: where rollouts are sampled and the update's
    /// tensors live (each model's own is in [`Devices`]).
    pub device: Device,
    /// bf16 autocast (CUDA only).
    pub autocast: bool,
    /// The ids an answer ends on (see `load::stop_ids`).
    pub eos: Vec<i64>,
    /// `None` with GAE; with GRPO / RLOO, how a group's rewards become
    /// advantages.
    pub baseline: Option<GroupBaseline>,
    /// Samples per prompt: consecutive rows of a batch.
    pub group: usize,
    /// Prompts per iteration.
    pub batch_size: usize,
    pub estimator: KlEstimator,
    pub gae: GaeConfig,
    pub schedule: Schedule,
    /// Sampling settings; each rollout sets its own seed.
    pub sampling: SamplingConfig,
    /// The data-parallel group, when the stage runs on several ranks.
    pub ranks: Option<&'static Group>,
}

impl Settings {
    /// The rows of an iteration's batch this rank samples, scores and
    /// trains on: all of them on one process, else its share of the
    /// prompts, each with its whole group of samples.
    pub fn my_rows(&self) -> std::ops::Range<usize> {
        match self.ranks {
            None => 0..self.batch_size * self.group,
            Some(g) => {
                let prompts = crate::dist::share(self.batch_size, g.rank(), g.world());
                prompts.start * self.group..prompts.end * self.group
            }
        }
    }

    /// Whether this process writes the outputs, metrics and checkpoints:
    /// rank 0, or the only process.
    pub fn is_root(&self) -> bool {
        self.ranks.is_none_or(Group::is_root)
    }
}

/// The device of each of the stage's models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Devices {
    pub policy: Device,
    pub reference: Device,
    pub reward: Device,
    pub value: Device,
}

impl Devices {
    /// The devices `params.placement` names (else the stage's), checked
    /// against the models that share weights: with `lora` the reference
    /// is the policy itself, and a LoRA critic sits on the reference's
    /// weights, so each runs where those weights are.
    fn of(ctx: &StageContext<'_>, p: &PpoParams) -> anyhow::Result<Devices> {
        let stage = &ctx.spec.stage;
        let placed = |role| load::role_device(ctx, &p.placement, role);
        let policy = placed(Role::Policy)?;
        let mut reference = placed(Role::Reference)?;
        if p.lora.is_some() {
            anyhow::ensure!(
                p.placement.reference.is_none() || reference == policy,
                "stage `{stage}`, field `params.placement.reference`: with `lora` the reference is the policy's own weights with the adapters off, on the policy's device ({policy:?}), not {reference:?}"
            );
            reference = policy;
        }
        let mut value = placed(Role::Value)?;
        if p.value_model == PpoValueModel::Lora {
            anyhow::ensure!(
                p.placement.value.is_none() || value == reference,
                "stage `{stage}`, field `params.placement.value`: a LoRA critic (`value_model: lora`) sits on the reference's weights, on their device ({reference:?}), not {value:?}"
            );
            value = reference;
        }
        Ok(Devices {
            policy,
            reference,
            reward: placed(Role::Reward)?,
            value,
        })
    }
}

/// The policy (trained), the value model (trained, absent without GAE),
/// the frozen reference and the frozen reward source.
pub(super) struct Models {
    pub policy: Model,
    pub critic: Option<Model>,
    pub reference: Reference,
    pub rewards: Rewards,
}

/// Everything the stage starts from.
pub(super) struct Setup {
    pub settings: Settings,
    pub models: Models,
    /// The prompts, tokenized, each cut to leave room for a response.
    pub prompts: Vec<Vec<i64>>,
}

/// The frozen reference: its own copy of the starting weights, or (with
/// LoRA) the policy with its adapters off.
pub(super) enum Reference {
    Copy(Model),
    AdaptersOff,
}

impl Reference {
    /// Runs `f` on the reference model.
    pub(super) fn with<R>(&self, policy: &Model, f: impl FnOnce(&Model) -> R) -> R {
        match self {
            Reference::Copy(m) => f(m),
            Reference::AdaptersOff => without_adapters(|| f(policy)),
        }
    }

    /// Packs the reference's copy, if it has one, for the stage (see
    /// [`Model::packed`]).
    pub(super) fn packed(&self) -> Option<Packing<'_>> {
        match self {
            Reference::Copy(m) => Some(m.lm.packed(8)),
            Reference::AdaptersOff => None,
        }
    }
}

/// One AdamW per trained model.
pub(super) struct Optimizers {
    pub policy: AdamW,
    pub critic: Option<AdamW>,
}

impl Optimizers {
    pub(super) fn new(models: &Models) -> anyhow::Result<Optimizers> {
        Ok(Optimizers {
            policy: AdamW::new(models.policy.trainable(), AdamWConfig::default())?,
            critic: match &models.critic {
                Some(c) => Some(AdamW::new(c.trainable(), AdamWConfig::default())?),
                None => None,
            },
        })
    }
}

/// Checks the params, loads the models and reads the prompts.
pub(super) fn load(ctx: &StageContext<'_>) -> anyhow::Result<Setup> {
    let p: PpoParams = ctx.params()?;
    let stage = ctx.spec.stage.clone();
    let seed = ctx.spec.seed;
    let devices = Devices::of(ctx, &p)?;
    if !p.placement.is_empty() {
        tracing::info!(?devices, "models placed by role");
    }
    let device = devices.policy;
    let autocast = p.bf16 && device.is_cuda();
    if p.bf16 && !autocast {
        tracing::info!("bf16 applies on CUDA only: this stage runs in float32 on {device:?}");
    }
    let policy_dir = ctx.input("policy")?;
    let pm_dir = ctx.spec.inputs.get("reward_model").map(|d| d.as_path());
    let tokenizer = Tokenizer::from_dir(policy_dir)?;
    // Adapters and the value head are initialised randomly: `trainable`
    // seeds torch first, for byte-identical reruns.
    let (mut policy, reference) = policy_and_reference(&p, &stage, policy_dir, devices, seed)?;
    let (baseline, group) = baseline_and_group(&p, &stage)?;
    // Critic-free modes load no value model at all.
    let mut critic = match (baseline, p.value_model) {
        (None, PpoValueModel::Full) => Some(value_model(
            p.value_init,
            policy_dir,
            pm_dir,
            devices.value,
        )?),
        (None, PpoValueModel::Lora) => Some(lora_critic(&p, &policy, &reference)?),
        (Some(_), _) => None,
    };
    set_gradient_checkpointing(&mut policy, p.gradient_checkpointing);
    if let Some(critic) = critic.as_mut() {
        set_gradient_checkpointing(critic, p.gradient_checkpointing);
    }
    let source = Source::load(ctx, &p, policy.lm.cfg.vocab_size, devices.reward)?;
    let eos = stop_ids(&tokenizer, &policy);
    let max_new = p.max_new_tokens.max(1);
    let max_positions = policy
        .lm
        .cfg
        .max_positions
        .min(source.max_positions().unwrap_or(i64::MAX))
        .min(critic.as_ref().map_or(i64::MAX, |c| c.lm.cfg.max_positions));
    let prompt_source = PromptSource::new(ctx, &p.prompt, policy_dir, max_positions, max_new)?;
    let (prompts, rewards) = prompts_and_rewards(
        ctx,
        &tokenizer,
        &prompt_source,
        source,
        policy_dir,
        eos.clone(),
    )?;
    let sampling = sampling_config(&tokenizer, &policy, max_new, p.temperature);
    Ok(Setup {
        settings: Settings {
            estimator: KlEstimator::from(p.kl_estimator),
            gae: GaeConfig {
                gamma: p.gamma,
                lam: p.lam,
            },
            schedule: lr_schedule(&p),
            batch_size: p.batch_size.max(1),
            params: p,
            stage,
            seed,
            device,
            autocast,
            eos,
            baseline,
            group,
            sampling,
            ranks: crate::dist::group(),
        },
        models: Models {
            policy,
            critic,
            reference,
            rewards,
        },
        prompts,
    })
}

/// The policy (with LoRA adapters if asked) and its frozen reference.
fn policy_and_reference(
    p: &PpoParams,
    stage: &str,
    policy_dir: &Path,
    devices: Devices,
    seed: u64,
) -> anyhow::Result<(Model, Reference)> {
    let frozen = load::weights_kind(p.dtype, devices.policy);
    let policy = load::trainable(
        stage,
        policy_dir,
        devices.policy,
        Head::Lm,
        p.lora.as_ref(),
        seed,
        frozen,
    )?;
    let reference = match &p.lora {
        // `trainable` checked that the targets name modules of the policy.
        Some(_) => Reference::AdaptersOff,
        None => Reference::Copy(load::frozen(
            policy_dir,
            devices.reference,
            Head::Lm,
            p.dtype,
        )?),
    };
    Ok((policy, reference))
}

/// How a group's rewards become advantages (`None`: GAE), and the samples
/// per prompt.
fn baseline_and_group(
    p: &PpoParams,
    stage: &str,
) -> anyhow::Result<(Option<GroupBaseline>, usize)> {
    let baseline = match p.advantage {
        PpoAdvantage::Gae => None,
        PpoAdvantage::Grpo => Some(GroupBaseline::Grpo {
            scale_std: p.scale_std,
        }),
        PpoAdvantage::Rloo => Some(GroupBaseline::Rloo),
    };
    let group = p.samples_per_prompt.max(1);
    anyhow::ensure!(
        baseline.is_none() || group >= 2,
        "stage `{stage}`, field `params.samples_per_prompt`: `advantage: {}` needs at least 2 samples per prompt, got {group}",
        p.advantage.name()
    );
    Ok((baseline, group))
}

/// The prompts of `prompt_source`, tokenized, and the rewards of `source`
/// for responses to them.
fn prompts_and_rewards(
    ctx: &StageContext<'_>,
    tokenizer: &Tokenizer,
    prompt_source: &PromptSource<'_>,
    source: Source,
    policy_dir: &Path,
    eos: Vec<i64>,
) -> anyhow::Result<(Vec<Vec<i64>>, Rewards)> {
    // Prompts, tokenized, keeping each one's end.
    let read = read_prompts(ctx, prompt_source, tokenizer)?;
    let rewards = Rewards::new(ctx, source, Tokenizer::from_dir(policy_dir)?, eos, &read)?;
    let prompts = read.into_iter().map(|pr| pr.ids).collect();
    Ok((prompts, rewards))
}

/// The value model: the policy or the preference-model folder with a fresh
/// value head (`v_head.summary`, TRL's name), fully trainable. From the PM,
/// `Head::Value` builds no `score` head, so the PM's is left unread.
pub(super) fn value_model(
    init: PpoValueInit,
    policy_dir: &Path,
    pm_dir: Option<&Path>,
    device: Device,
) -> anyhow::Result<Model> {
    let dir = match (init, pm_dir) {
        (PpoValueInit::RewardModel, Some(pm_dir)) => pm_dir,
        // `Source::load` rejects `reward_model` without a PM.
        _ => policy_dir,
    };
    load::model(dir, device, Head::Value)
}

/// `value_model: lora`: adapters (`critic_lora`, else the policy's `lora`,
/// else LoRA's defaults) and a value head on the frozen starting weights
/// (see [`Model::sharing_base`]): the LoRA policy's own base, or the
/// reference's copy when the policy trains in full.
pub(super) fn lora_critic(
    p: &PpoParams,
    policy: &Model,
    reference: &Reference,
) -> anyhow::Result<Model> {
    let base = match reference {
        Reference::AdaptersOff => policy,
        Reference::Copy(m) => m,
    };
    let settings = match p.critic_lora.as_ref().or(p.lora.as_ref()) {
        Some(l) => l.clone(),
        None => serde_json::from_value(serde_json::json!({}))?,
    };
    let critic = Model::sharing_base(base, &LoraConfig::from(&settings), Head::Value);
    let (own, shared) = model::storage_bytes(&critic, base);
    tracing::info!(
        "LoRA critic: {own} bytes of its own (adapters, value head), {shared} bytes of base weights shared with the {}",
        match reference {
            Reference::AdaptersOff => "policy",
            Reference::Copy(_) => "reference",
        }
    );
    Ok(critic)
}

/// One rate per iteration (step `it - 1` of `iterations`), as TRL's
/// `anneal_lr`; both models follow it.
fn lr_schedule(p: &PpoParams) -> Schedule {
    Schedule::new(
        ScheduleConfig {
            lr: p.lr,
            warmup_steps: p.warmup_iterations,
            decay: p.lr_schedule.into(),
            min_lr_ratio: 0.0,
        },
        p.iterations,
    )
}
