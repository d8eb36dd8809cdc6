//! `ppo`: PPO of a policy against a preference model, with a per-token KL
//! penalty to a frozen copy of the starting policy (InstructGPT / TRL).
//!
//! Four models: the policy (trained, fully or through LoRA adapters), a
//! frozen reference (the policy folder loaded again, or with LoRA the
//! policy itself with its adapters switched off, so no second copy of the
//! weights), a value model (the policy or the preference-model folder with a
//! fresh value head, its own optimizer) and the frozen reward source: a
//! preference model, or (direct RLAIF) a feedback model rating each
//! response from 1 to 10, optionally minus a per-prompt baseline
//! (contrastive rewards); see [`reward_source`].
//!
//! With `advantage: grpo | rloo` there is no value model: each prompt is
//! sampled `samples_per_prompt` times, a response's sequence reward (its
//! score, less `kl_coef` times its summed KL with `kl_mode: reward`) is
//! compared with the other responses to the same prompt
//! ([`crate::rl::group`]), and that one advantage is broadcast over the
//! response's tokens into the same clipped surrogate. The surrogate stays
//! a token-level masked mean over the batch (as DAPO / Dr. GRPO), not
//! GRPO's per-sequence mean, which favours short responses.
//!
//! Resumable: every `checkpoint_every` iterations one atomic checkpoint
//! holds both models, both AdamW states, the KL controller, the reward
//! normalisation and the iteration. Nothing else needs saving: the prompt
//! order is a pure function of `(seed, iteration)`, sampling draws from a
//! generator seeded per iteration, and torch is reseeded before each
//! update epoch, so a resumed run is bit-identical to an uninterrupted one
//! on CPU.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use alignflow_ops::protocol::Metrics;
use alignflow_ops::text::Tokenizer;
use alignflow_ops::{
    PpoAdvantage, PpoKlEstimator, PpoKlMode, PpoLrSchedule, PpoParams, PpoValueInit, StageContext,
};

use super::prompts::{read_prompts, PromptSource};
use crate::model::sample::{generate, left_pad, SamplingConfig};
use crate::model::{self, without_adapters, BuildOptions, Head, Keep, LoraConfig, Model};
use crate::rl::{
    compute_gae, contains_eos, explained_variance, group_advantages, group_spread, kl_k3,
    kl_per_token, masked_entropy, masked_mean, masked_sum, masked_whiten, mean_sequence_kl,
    policy_loss, response_mask, shape_rewards, value_loss, GaeConfig, GroupBaseline, KlController,
    KlEstimator, RewardNorm,
};
use crate::train::{
    clip_grad_norm, epoch_permutation, load_checkpoint_parts, seed_torch_for_step, step_seed,
    AdamW, AdamWConfig, CheckpointPart, CheckpointPartMut, CheckpointState, Checkpoints, Decay,
    Schedule, ScheduleConfig, TrainState,
};

pub(crate) mod baseline_scores;
mod reward_source;
#[cfg(test)]
mod tests;

use reward_source::{Rewards, Source};

/// Policy log-probs of the response tokens of `ids`, and of every token of
/// the vocabulary at those positions (for the entropy).
///
/// # Shapes
/// `ids`, `mask`: `[b, p + r]`, `resp`: `[b, r]` -> `([b, r], [b, r, vocab])`.
pub fn response_logprobs(
    m: &Model,
    ids: &Tensor,
    mask: &Tensor,
    resp: &Tensor,
    p_len: i64,
    temperature: f64,
) -> (Tensor, Tensor) {
    let r = resp.size()[1];
    let hidden =
        m.lm.hidden_kept(ids, mask, before_each_response_token(p_len, r), false);
    let mut logits = m.lm.logits(&hidden).to_kind(Kind::Float);
    if temperature > 0.0 && temperature != 1.0 {
        logits /= temperature;
    }
    let all = logits.log_softmax(-1, Kind::Float);
    let logp = all.gather(2, &resp.unsqueeze(-1), false).squeeze_dim(-1);
    (logp, all)
}

/// The positions whose outputs score the response tokens: from the last
/// prompt token to the one before the last response token.
fn before_each_response_token(p_len: i64, r: i64) -> Keep {
    Keep::Span {
        start: p_len - 1,
        len: r,
    }
}

/// Values of the states before each response token.
///
/// # Shapes
/// `ids`, `mask`: `[b, p + r]` -> `[b, r]`.
pub fn response_values(m: &Model, ids: &Tensor, mask: &Tensor, p_len: i64, r: i64) -> Tensor {
    let hidden =
        m.lm.hidden_kept(ids, mask, before_each_response_token(p_len, r), false);
    m.value
        .as_ref()
        .expect("value head")
        .forward(&hidden)
        .to_kind(Kind::Float)
}

/// The preference model's raw score of each full sequence.
///
/// # Shapes
/// `ids`, `mask`: `[b, t]` -> `[b]` float32.
pub fn pm_scores(pm: &Model, ids: &Tensor, mask: &Tensor) -> Tensor {
    pm.scores(ids, mask, false).to_kind(Kind::Float)
}

fn scalar(t: &Tensor) -> f64 {
    t.to_kind(Kind::Double).double_value(&[])
}

/// The value model: the policy or the preference-model folder with a fresh
/// value head (`v_head.summary`, TRL's name), fully trainable. From the PM,
/// `Head::Value` builds no `score` head, so the PM's is left unread.
fn value_model(
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
    Model::load(
        dir,
        &BuildOptions {
            device,
            head: Head::Value,
            lora: None,
        },
    )
}

/// The frozen reference: its own copy of the starting weights, or (with
/// LoRA) the policy with its adapters off.
enum Reference {
    Copy(Model),
    AdaptersOff,
}

impl Reference {
    /// Runs `f` on the reference model.
    fn with<R>(&self, policy: &Model, f: impl FnOnce(&Model) -> R) -> R {
        match self {
            Reference::Copy(m) => f(m),
            Reference::AdaptersOff => without_adapters(|| f(policy)),
        }
    }
}

/// A batch of sampled responses, padded into tensors.
struct Rollout {
    /// `[b, p + r]` prompt (left-padded) and response (right-padded).
    ids: Tensor,
    mask: Tensor,
    /// `[b, r]` response tokens and 0/1 generated-token mask.
    resp: Tensor,
    gen_mask: Tensor,
    /// Prompt width `p` and response width `r`.
    p_len: i64,
    r: i64,
    /// Generated tokens in the batch.
    tokens: u64,
}

/// Samples one response per prompt of `batch` from `m`.
fn sample(m: &Model, batch: &[Vec<i64>], cfg: &SamplingConfig, device: Device) -> Rollout {
    let pad = cfg.pad_token_id;
    let samples = generate(&m.lm, batch, cfg, device, |_, _| false);
    let r_len = samples
        .iter()
        .map(|s| s.tokens.len())
        .max()
        .unwrap_or(1)
        .max(1);
    let b = batch.len() as i64;
    let mut resp_v = Vec::with_capacity(batch.len() * r_len);
    let mut len_v = Vec::with_capacity(batch.len() * r_len);
    for s in &samples {
        for k in 0..r_len {
            resp_v.push(s.tokens.get(k).copied().unwrap_or(pad));
            len_v.push(i64::from(k < s.tokens.len()));
        }
    }
    let r = r_len as i64;
    let resp = Tensor::from_slice(&resp_v).view([b, r]).to_device(device);
    let gen_mask = Tensor::from_slice(&len_v).view([b, r]).to_device(device);
    let (prompt_ids, prompt_mask) = left_pad(batch, pad, device);
    let p_len = prompt_ids.size()[1];
    Rollout {
        ids: Tensor::cat(&[&prompt_ids, &resp], 1),
        mask: Tensor::cat(&[&prompt_mask, &gen_mask], 1),
        resp,
        gen_mask,
        p_len,
        r,
        tokens: len_v.iter().sum::<i64>() as u64,
    }
}

/// The op state a checkpoint carries besides weights, optimizers and the
/// iteration (`CheckpointState::extra`). Floats are also kept as their bit
/// patterns: JSON parsing is not guaranteed to round-trip every f64, and a
/// resume must be bit-identical.
#[derive(Serialize, Deserialize)]
struct ResumeState {
    kl_controller: KlController,
    kl_coef_bits: u64,
    reward_norm: Option<SavedNorm>,
}

#[derive(Serialize, Deserialize)]
struct SavedNorm {
    gain: f64,
    bias: f64,
    gain_bits: u64,
    bias_bits: u64,
}

impl From<RewardNorm> for SavedNorm {
    fn from(n: RewardNorm) -> Self {
        SavedNorm {
            gain: n.gain,
            bias: n.bias,
            gain_bits: n.gain.to_bits(),
            bias_bits: n.bias.to_bits(),
        }
    }
}

impl From<&SavedNorm> for RewardNorm {
    fn from(s: &SavedNorm) -> Self {
        RewardNorm {
            gain: f64::from_bits(s.gain_bits),
            bias: f64::from_bits(s.bias_bits),
        }
    }
}

/// The iteration seeds of the reward-normalisation rollouts count down from
/// here, far from the training iterations' `1..=iterations`.
const NORM_STREAM: u64 = u64::MAX;

/// The raw preference-model scores of `samples` responses of the reference
/// policy, to prompts in a seeded order of their own, in batches of
/// `batch_size`.
#[allow(clippy::too_many_arguments)]
fn reference_scores(
    policy: &Model,
    reference: &Reference,
    rewards: &Rewards,
    prompts: &[Vec<i64>],
    samples: usize,
    batch_size: usize,
    base_cfg: &SamplingConfig,
    seed: u64,
    autocast: bool,
) -> anyhow::Result<Vec<f64>> {
    let n = prompts.len();
    let mut scores = Vec::with_capacity(samples);
    let mut chunk = 0u64;
    while scores.len() < samples {
        let batch: Vec<Vec<i64>> = (scores.len()..samples.min(scores.len() + batch_size))
            .map(|pos| {
                let order = epoch_permutation(n, seed, NORM_STREAM - (pos / n) as u64);
                prompts[order[pos % n]].clone()
            })
            .collect();
        let cfg = SamplingConfig {
            seed: step_seed(seed, NORM_STREAM - chunk) as u64,
            ..base_cfg.clone()
        };
        let device = policy.vs.device();
        let sc = tch::no_grad(|| {
            crate::train::autocast_if(autocast, || {
                let ro = reference.with(policy, |m| sample(m, &batch, &cfg, device));
                rewards.raw_scores(&batch, &ro.ids, &ro.mask, &ro.resp, &ro.gen_mask)
            })
        })?;
        scores.extend(Vec::<f64>::try_from(&sc.to_kind(Kind::Double)).expect("scores"));
        chunk += 1;
    }
    Ok(scores)
}

/// Drops metric lines past `iteration` (they belong to the interrupted run).
fn truncate_metrics(path: &Path, iteration: u64) -> anyhow::Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["iteration"].as_u64())
                .is_some_and(|i| i <= iteration)
        })
        .collect();
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    std::fs::write(path, body).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// How the update gets the rollout's log-probs and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Passes {
    /// With one epoch of one minibatch the update's own forward passes,
    /// run before any weight changes, give the rollout's log-probs and
    /// values (detached): the same numbers as separate no-grad passes, for
    /// two forwards fewer per iteration. Otherwise as [`Passes::Separate`].
    Auto,
    /// No-grad policy and value forwards after sampling, then the update.
    #[cfg_attr(not(test), allow(dead_code))]
    Separate,
}

pub fn run(ctx: &StageContext<'_>) -> anyhow::Result<Metrics> {
    run_with(ctx, Passes::Auto)
}

pub(crate) fn run_with(ctx: &StageContext<'_>, passes: Passes) -> anyhow::Result<Metrics> {
    let p: PpoParams = ctx.params()?;
    let stage = ctx.spec.stage.clone();
    let seed = ctx.spec.seed;
    let device = model::device(&ctx.spec.device)?;
    let autocast = p.bf16 && device.is_cuda();
    if p.bf16 && !autocast {
        tracing::info!("bf16 applies on CUDA only: this stage runs in float32 on {device:?}");
    }
    let policy_dir = ctx.input("policy")?;
    let pm_dir = ctx.spec.inputs.get("reward_model").map(|d| d.as_path());
    let tokenizer = Tokenizer::from_dir(policy_dir)?;
    let lora = p.lora.as_ref().map(|l| LoraConfig {
        rank: l.rank,
        alpha: l.alpha,
        dropout: l.dropout,
        targets: l.targets.clone(),
    });
    // Adapters and the value head are initialised randomly: seed first, for
    // byte-identical reruns.
    tch::manual_seed(seed as i64);
    let opts = |head, lora: Option<LoraConfig>| BuildOptions { device, head, lora };
    let mut policy = Model::load(policy_dir, &opts(Head::Lm, lora.clone()))?;
    let reference = match &lora {
        Some(l) => {
            anyhow::ensure!(
                policy.trainable().iter().any(|(n, _)| n.contains("lora_")),
                "stage `{stage}`, field `params.lora.targets`: {:?} names no module of the policy (GPT-2: c_attn, c_proj, c_fc; Llama: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj)",
                l.targets
            );
            Reference::AdaptersOff
        }
        None => {
            let mut r = Model::load(policy_dir, &opts(Head::Lm, None))?;
            r.vs.freeze();
            Reference::Copy(r)
        }
    };
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
    // Critic-free modes load no value model at all.
    let mut critic = match baseline {
        None => Some(value_model(p.value_init, policy_dir, pm_dir, device)?),
        Some(_) => None,
    };
    let source = Source::load(ctx, &p, policy.lm.cfg.vocab_size, device)?;
    let eos = tokenizer
        .eos_id
        .map(i64::from)
        .or(policy.lm.cfg.eos_token_id);
    let pad = policy.lm.cfg.pad_id();
    let max_new = p.max_new_tokens.max(1);
    let max_positions = policy
        .lm
        .cfg
        .max_positions
        .min(source.max_positions().unwrap_or(i64::MAX))
        .min(critic.as_ref().map_or(i64::MAX, |c| c.lm.cfg.max_positions));
    anyhow::ensure!(
        max_new < max_positions,
        "stage `{stage}`: max_new_tokens {max_new} leaves no room for a prompt in {max_positions} positions"
    );
    let prompt_budget = (max_positions - max_new) as usize;

    // Prompts, tokenized, keeping each one's end.
    let read = read_prompts(
        ctx,
        &PromptSource {
            field: &p.prompt_field,
            template: &p.template,
            limit: None,
            budget: prompt_budget,
        },
        &tokenizer,
    )?;
    let (prompts, texts): (Vec<Vec<i64>>, Vec<String>) =
        read.into_iter().map(|pr| (pr.ids, pr.text)).unzip();
    let rewards = Rewards::new(
        ctx,
        source,
        Tokenizer::from_dir(policy_dir)?,
        eos,
        &prompts,
        &texts,
    )?;

    // The reference and the reward source never change: their no-grad
    // forwards run through oneDNN packs made once for the stage (CPU only).
    let _reference_packing = match &reference {
        Reference::Copy(m) => Some(m.lm.packed(8)),
        Reference::AdaptersOff => None,
    };
    let _reward_packing = rewards.packed();
    let mut policy_opt = AdamW::new(policy.trainable(), AdamWConfig::default())?;
    let mut critic_opt = match &critic {
        Some(c) => Some(AdamW::new(c.trainable(), AdamWConfig::default())?),
        None => None,
    };
    let mut kl_ctl = match p.target_kl {
        Some(target) => KlController::adaptive(p.kl_coef, target, p.horizon),
        None => KlController::fixed(p.kl_coef),
    };
    let estimator = match p.kl_estimator {
        PpoKlEstimator::K1 => KlEstimator::K1,
        PpoKlEstimator::K2 => KlEstimator::K2,
        PpoKlEstimator::K3 => KlEstimator::K3,
    };
    let gae = GaeConfig {
        gamma: p.gamma,
        lam: p.lam,
    };
    // One rate per iteration (step `it - 1` of `iterations`), as TRL's
    // `anneal_lr`; both models follow it.
    let schedule = Schedule::new(
        ScheduleConfig {
            lr: p.lr,
            warmup_steps: p.warmup_iterations,
            decay: match p.lr_schedule {
                PpoLrSchedule::Constant => Decay::Constant,
                PpoLrSchedule::Linear => Decay::Linear,
            },
            min_lr_ratio: 0.0,
        },
        p.iterations,
    );
    let sampling = SamplingConfig {
        max_new_tokens: max_new,
        temperature: p.temperature,
        eos_token_id: eos,
        pad_token_id: pad,
        ..Default::default()
    };
    let batch_size = p.batch_size.max(1);

    std::fs::create_dir_all(&ctx.spec.checkpoint_dir)?;
    let metrics_path = ctx.spec.checkpoint_dir.join("metrics.jsonl");
    let checkpoints = Checkpoints::new(ctx.spec.checkpoint_dir.join("ppo"), 2);
    let mut done = 0u64;
    let mut total_tokens = 0u64;
    let mut norm: Option<RewardNorm> = None;
    if let Some(dir) = checkpoints.latest()? {
        let mut parts = vec![CheckpointPartMut {
            name: "policy",
            vs: &mut policy.vs,
            opt: &mut policy_opt,
        }];
        if let (Some(c), Some(o)) = (critic.as_mut(), critic_opt.as_mut()) {
            parts.push(CheckpointPartMut {
                name: "value",
                vs: &mut c.vs,
                opt: o,
            });
        }
        let saved = load_checkpoint_parts(&dir, &mut parts)
            .with_context(|| format!("stage `{stage}`: resuming"))?;
        let extra: ResumeState = serde_json::from_value(saved.extra).with_context(|| {
            format!(
                "stage `{stage}`: the PPO state in {}",
                dir.join("state.json").display()
            )
        })?;
        kl_ctl = extra.kl_controller;
        kl_ctl.set_value(f64::from_bits(extra.kl_coef_bits));
        norm = extra.reward_norm.as_ref().map(RewardNorm::from);
        done = saved.train.step;
        total_tokens = saved.train.tokens_seen;
        tracing::info!(
            iteration = done,
            "resuming from checkpoint {}",
            dir.display()
        );
        truncate_metrics(&metrics_path, done)?;
    } else {
        let _ = std::fs::remove_file(&metrics_path);
        if let Some(rn) = &p.reward_norm {
            anyhow::ensure!(
                rn.samples >= 2,
                "stage `{stage}`, field `params.reward_norm.samples`: {} reference samples cannot give a standard deviation (need at least 2)",
                rn.samples
            );
            ctx.reporter.progress(
                0,
                Some(p.iterations),
                &format!("scoring {} reference samples", rn.samples),
            );
            let raw = reference_scores(
                &policy, &reference, &rewards, &prompts, rn.samples, batch_size, &sampling, seed,
                autocast,
            )?;
            norm = Some(RewardNorm::fit(&raw, rn.mean, rn.std).with_context(|| {
                format!(
                    "stage `{stage}`, field `params.reward_norm`: the {} reference scores have no spread (or are not finite): {:?}",
                    raw.len(),
                    &raw[..raw.len().min(8)]
                )
            })?);
        }
    }
    if p.reward_norm.is_none() {
        norm = None;
    }
    let mut metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("opening {}", metrics_path.display()))?;
    let n = prompts.len();
    let start = Instant::now();
    let start_tokens = total_tokens;
    let mut last = serde_json::Value::Null;
    let stopped = |it: u64, what: &str, value: f64| {
        anyhow::anyhow!(
            "stage `{stage}`: iteration {it}: the {what} is {value} (NaN or inf); stopped, keeping the last good checkpoint{}",
            match checkpoints.latest() {
                Ok(Some(dir)) => format!(" ({})", dir.display()),
                _ => " (none yet)".to_string(),
            }
        )
    };

    for it in done + 1..=p.iterations {
        ctx.cancel.check()?;
        let t0 = Instant::now();
        let lr = schedule.lr_at(it - 1);
        // The next prompts, cycling over seeded orders, each repeated
        // `group` times in consecutive rows (one group per prompt).
        let batch: Vec<Vec<i64>> = (0..batch_size)
            .flat_map(|j| {
                let pos = (it - 1) as usize * batch_size + j;
                let order = epoch_permutation(n, seed, (pos / n) as u64);
                std::iter::repeat_n(&prompts[order[pos % n]], group).cloned()
            })
            .collect();
        let b = batch.len() as i64;

        // Rollout.
        let cfg = SamplingConfig {
            seed: step_seed(seed, it) as u64,
            ..sampling.clone()
        };
        let Rollout {
            ids,
            mask,
            resp,
            gen_mask,
            p_len,
            r,
            tokens: resp_tokens,
        } = tch::no_grad(|| {
            crate::train::autocast_if(autocast, || sample(&policy, &batch, &cfg, device))
        });
        let rmask = match eos {
            Some(e) => response_mask(&resp, e, None) * gen_mask.to_kind(Kind::Float),
            None => gen_mask.to_kind(Kind::Float),
        };
        let has_eos = match eos {
            Some(e) => contains_eos(&resp, e),
            None => Tensor::zeros([b], (Kind::Bool, device)),
        };
        total_tokens += resp_tokens;

        let minibatches = p.minibatches.clamp(1, batch.len());
        let single_pass = passes == Passes::Auto && p.ppo_epochs.max(1) == 1 && minibatches == 1;
        // The update's forwards, with grad, before anything else changes
        // the weights (see `Passes::Auto`).
        let mut update_forwards = single_pass.then(|| {
            crate::train::autocast_if(autocast, || {
                let (logp, all) =
                    response_logprobs(&policy, &ids, &mask, &resp, p_len, p.temperature);
                let values = critic
                    .as_ref()
                    .map(|c| response_values(c, &ids, &mask, p_len, r));
                (logp, all, values)
            })
        });
        let (old_logp, ref_logp, old_values, raw_scores) = tch::no_grad(|| {
            crate::train::autocast_if(autocast, || {
                let (old, v) = match &update_forwards {
                    Some((logp, _, values)) => {
                        (logp.detach(), values.as_ref().map(|v| v.detach() * &rmask))
                    }
                    None => (
                        response_logprobs(&policy, &ids, &mask, &resp, p_len, p.temperature).0,
                        critic
                            .as_ref()
                            .map(|c| response_values(c, &ids, &mask, p_len, r) * &rmask),
                    ),
                };
                let rf = reference.with(&policy, |m| {
                    response_logprobs(m, &ids, &mask, &resp, p_len, p.temperature).0
                });
                let sc = rewards.raw_scores(&batch, &ids, &mask, &resp, &gen_mask);
                (old, rf, v, sc)
            })
        });
        let raw_scores = raw_scores?;
        let scores = match &norm {
            Some(nm) => &raw_scores * nm.gain + nm.bias,
            None => raw_scores.shallow_clone(),
        };
        let (scores, baseline_score) = rewards.contrastive(&batch, scores, norm.as_ref());
        let kl = kl_per_token(&old_logp, &ref_logp, estimator) * &rmask;
        let mean_kl = scalar(&mean_sequence_kl(&kl, &rmask));
        let mean_score = scalar(&scores.mean(Kind::Float));
        if !mean_score.is_finite() {
            return Err(stopped(it, "score", mean_score));
        }
        if !mean_kl.is_finite() {
            return Err(stopped(it, "KL", mean_kl));
        }
        let kl_coef = kl_ctl.value();
        // With `kl_mode: loss` the KL is a loss term, not a reward.
        let reward_kl_coef = match p.kl_mode {
            PpoKlMode::Reward => kl_coef,
            PpoKlMode::Loss => 0.0,
        };
        let shaped = shape_rewards(
            &scores,
            &kl,
            &rmask,
            &has_eos,
            reward_kl_coef,
            p.no_eos_penalty,
        );
        let mut group_stats = None;
        let (adv, critic_targets) = match (baseline, &old_values) {
            (Some(bl), _) => {
                // The sequence reward: the score (after any no-EOS penalty)
                // plus the KL penalty summed over the response's tokens.
                let seq = &shaped.scores + masked_sum(&shaped.non_score_reward, &rmask, Some(1));
                group_stats = Some(group_spread(&seq, group as i64));
                let adv = group_advantages(&seq, group as i64, bl);
                (adv.unsqueeze(1) * &rmask, None)
            }
            (None, Some(old_values)) => {
                let rewards = if p.whiten_rewards {
                    masked_whiten(&shaped.rewards, &rmask, false) * &rmask
                } else {
                    shaped.rewards.shallow_clone()
                };
                let (adv, returns) = compute_gae(old_values, &rewards, &rmask, &gae);
                let adv = masked_whiten(&adv, &rmask, true) * &rmask;
                let ev = scalar(&explained_variance(old_values, &returns, &rmask));
                (adv, Some((old_values, returns, ev)))
            }
            (None, None) => unreachable!("gae loads a value model"),
        };

        // Update.
        let (mut ent_sum, mut cf_sum, mut ak_sum, mut vl_sum, mut pl_sum, mut kll_sum, mut count) =
            (0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
        for epoch in 0..p.ppo_epochs.max(1) {
            seed_torch_for_step(seed, it * 1000 + epoch as u64);
            // One minibatch of everything: the row order changes nothing.
            let order = if single_pass {
                Tensor::arange(b, (Kind::Int64, device))
            } else {
                Tensor::randperm(b, (Kind::Int64, Device::Cpu)).to_device(device)
            };
            let per = (b as usize).div_ceil(minibatches) as i64;
            let mut at = 0;
            while at < b {
                let size = per.min(b - at);
                let rows = order.narrow(0, at, size);
                at += size;
                let pick = |t: &Tensor| t.index_select(0, &rows);
                let (mb_ids, mb_mask, mb_resp, mb_rmask) =
                    (pick(&ids), pick(&mask), pick(&resp), pick(&rmask));

                let precomputed = update_forwards.take();
                let (pl, kl_loss, all) = crate::train::autocast_if(autocast, || {
                    let (logp, all) = match &precomputed {
                        Some((logp, all, _)) => (logp.shallow_clone(), all.shallow_clone()),
                        None => response_logprobs(
                            &policy,
                            &mb_ids,
                            &mb_mask,
                            &mb_resp,
                            p_len,
                            p.temperature,
                        ),
                    };
                    let pl = policy_loss(&logp, &pick(&old_logp), &pick(&adv), &mb_rmask, p.clip);
                    // GRPO's KL term: k3 of the current policy against the
                    // reference, token-level masked mean like the surrogate.
                    let kl_loss = (p.kl_mode == PpoKlMode::Loss)
                        .then(|| masked_mean(&kl_k3(&logp, &pick(&ref_logp)), &mb_rmask, None));
                    (pl, kl_loss, all)
                });
                let pl_v = scalar(&pl.loss);
                if !pl_v.is_finite() {
                    return Err(stopped(it, "policy loss", pl_v));
                }
                let loss = match &kl_loss {
                    Some(kl_loss) => {
                        let v = scalar(kl_loss);
                        if !v.is_finite() {
                            return Err(stopped(it, "KL loss", v));
                        }
                        kll_sum += v;
                        &pl.loss + kl_loss * kl_coef
                    }
                    None => pl.loss.shallow_clone(),
                };
                policy_opt.zero_grad();
                loss.backward();
                if let Some(c) = p.grad_clip {
                    let norm = clip_grad_norm(&policy_opt.params(), c);
                    if !norm.is_finite() {
                        return Err(stopped(it, "policy gradient norm", norm));
                    }
                }
                policy_opt.step(lr)?;

                if let (Some(critic), Some(critic_opt), Some((old_values, returns, _))) =
                    (&critic, critic_opt.as_mut(), &critic_targets)
                {
                    let vl = crate::train::autocast_if(autocast, || {
                        let values = match precomputed.as_ref().and_then(|(_, _, v)| v.as_ref()) {
                            Some(v) => v.shallow_clone(),
                            None => response_values(critic, &mb_ids, &mb_mask, p_len, r),
                        };
                        value_loss(
                            &values,
                            &pick(old_values),
                            &pick(returns),
                            &mb_rmask,
                            p.value_clip,
                        )
                    });
                    let vl_v = scalar(&vl.loss);
                    if !vl_v.is_finite() {
                        return Err(stopped(it, "value loss", vl_v));
                    }
                    critic_opt.zero_grad();
                    vl.loss.backward();
                    if let Some(c) = p.grad_clip {
                        let norm = clip_grad_norm(&critic_opt.params(), c);
                        if !norm.is_finite() {
                            return Err(stopped(it, "value gradient norm", norm));
                        }
                    }
                    critic_opt.step(lr)?;
                    vl_sum += vl_v;
                }

                ent_sum += tch::no_grad(|| scalar(&masked_entropy(&all.detach(), &mb_rmask)));
                cf_sum += scalar(&pl.clip_frac);
                ak_sum += scalar(&pl.approx_kl);
                pl_sum += pl_v;
                count += 1.0;
            }
        }
        // One step per sampled response (`batch_size` with GAE).
        kl_ctl.update(mean_kl, b as u64);

        let secs = t0.elapsed().as_secs_f64();
        let mut line = serde_json::json!({
            "iteration": it,
            "score": mean_score,
            "raw_score": scalar(&raw_scores.mean(Kind::Float)),
            "kl": mean_kl,
            "kl_coef": kl_coef,
            "non_score_reward": scalar(&shaped.non_score_reward.sum(Kind::Float)) / b as f64,
            "entropy": ent_sum / count,
            "clip_frac": cf_sum / count,
            "approx_kl": ak_sum / count,
            "policy_loss": pl_sum / count,
            // Null without a value model.
            "value_loss": critic_targets.as_ref().map(|_| vl_sum / count),
            "explained_variance": critic_targets.as_ref().and_then(|(_, _, ev)| ev.is_finite().then_some(*ev)),
            "response_len": scalar(&masked_mean(&rmask.sum_dim_intlist([1i64].as_slice(), false, Kind::Float), &Tensor::ones([b], (Kind::Float, device)), None)),
            "tokens_per_s": if secs > 0.0 { resp_tokens as f64 / secs } else { 0.0 },
            "lr": lr,
            "seconds": secs,
        });
        if p.kl_mode == PpoKlMode::Loss {
            line["kl_loss"] = (kll_sum / count).into();
        }
        if let Some((std, flat)) = &group_stats {
            line["group_reward_std"] = scalar(std).into();
            line["flat_groups"] = scalar(flat).into();
        }
        if let Some(nm) = &norm {
            line["reward_gain"] = nm.gain.into();
            line["reward_bias"] = nm.bias.into();
        }
        if let Some(bs) = baseline_score {
            line["baseline_score"] = bs.into();
        }
        writeln!(metrics_file, "{line}")?;
        ctx.reporter.metric(
            &[
                ("iteration".to_string(), it as f64),
                ("score".to_string(), mean_score),
                ("kl".to_string(), mean_kl),
                ("kl_coef".to_string(), kl_coef),
                ("lr".to_string(), lr),
            ]
            .into_iter()
            .collect(),
        );
        ctx.reporter.progress(
            it,
            Some(p.iterations),
            &format!("score {mean_score:.4} kl {mean_kl:.4}"),
        );
        last = line;
        if p.checkpoint_every > 0 && it % p.checkpoint_every == 0 && it < p.iterations {
            // The metrics lines up to `it` must be on disk before a
            // checkpoint that says `it` is done.
            metrics_file.flush()?;
            metrics_file.sync_data()?;
            let extra = ResumeState {
                kl_controller: kl_ctl.clone(),
                kl_coef_bits: kl_ctl.value().to_bits(),
                reward_norm: norm.map(SavedNorm::from),
            };
            let mut parts = vec![CheckpointPart {
                name: "policy",
                vs: &policy.vs,
                opt: &policy_opt,
            }];
            if let (Some(c), Some(o)) = (&critic, &critic_opt) {
                parts.push(CheckpointPart {
                    name: "value",
                    vs: &c.vs,
                    opt: o,
                });
            }
            checkpoints
                .save_parts(
                    &parts,
                    &CheckpointState {
                        train: TrainState {
                            step: it,
                            tokens_seen: total_tokens,
                            ..Default::default()
                        },
                        lr,
                        extra: serde_json::to_value(extra)?,
                    },
                )
                .with_context(|| format!("stage `{stage}`: iteration {it}: checkpoint"))?;
        }
    }
    metrics_file.flush()?;
    drop(metrics_file);
    std::fs::create_dir_all(&ctx.spec.out_dir)?;
    std::fs::copy(&metrics_path, ctx.output("metrics")).context("copying metrics.jsonl")?;
    // Merges the LoRA adapters (if any) into the saved weights.
    policy.save(&ctx.output("model"))?;
    let secs = start.elapsed().as_secs_f64();
    let tokens = total_tokens - start_tokens;
    let mut out = Metrics::new();
    out.insert("iterations".into(), p.iterations.into());
    out.insert("final_score".into(), last["score"].clone());
    out.insert("final_kl".into(), last["kl"].clone());
    out.insert("tokens".into(), total_tokens.into());
    out.insert(
        "tokens_per_s".into(),
        serde_json::json!(if secs > 0.0 {
            tokens as f64 / secs
        } else {
            0.0
        }),
    );
    if let Some(nm) = &norm {
        out.insert("reward_gain".into(), nm.gain.into());
        out.insert("reward_bias".into(), nm.bias.into());
    }
    Ok(out)
}
