//! The state carried from one iteration to the next, and its checkpoints:
//! saving it, and resuming from the latest.

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::setup::{Models, Optimizers, Settings};
use crate::model::Model;
use crate::rl::{KlController, RewardNorm};
use crate::train::{
    load_checkpoint_parts, CheckpointPart, CheckpointPartMut, CheckpointState, Checkpoints,
    TrainState,
};

/// What one iteration hands the next besides the weights and optimizers.
pub(super) struct Progress {
    /// The last iteration done (0 before the first).
    pub done: u64,
    /// Response tokens sampled so far.
    pub total_tokens: u64,
    pub kl_ctl: KlController,
    /// The map applied to every raw score; `None` without `reward_norm`.
    pub norm: Option<RewardNorm>,
}

impl Progress {
    /// Before the first iteration.
    pub(super) fn fresh(s: &Settings, norm: Option<RewardNorm>) -> Progress {
        Progress {
            done: 0,
            total_tokens: 0,
            kl_ctl: initial_kl_controller(s),
            norm,
        }
    }
}

fn initial_kl_controller(s: &Settings) -> KlController {
    match s.params.target_kl {
        Some(target) => KlController::adaptive(s.params.kl_coef, target, s.params.horizon),
        None => KlController::fixed(s.params.kl_coef),
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

/// Loads the checkpoint in `dir` into the trained models and their
/// optimizers.
pub(super) fn resume(
    dir: &Path,
    s: &Settings,
    policy: &mut Model,
    critic: Option<&mut Model>,
    opts: &mut Optimizers,
) -> anyhow::Result<Progress> {
    let stage = &s.stage;
    let mut parts = vec![CheckpointPartMut {
        name: "policy",
        vs: &mut policy.vs,
        opt: &mut opts.policy,
    }];
    if let (Some(c), Some(o)) = (critic, opts.critic.as_mut()) {
        parts.push(CheckpointPartMut {
            name: "value",
            vs: &mut c.vs,
            opt: o,
        });
    }
    let saved = load_checkpoint_parts(dir, &mut parts)
        .with_context(|| format!("stage `{stage}`: resuming"))?;
    let extra: ResumeState = serde_json::from_value(saved.extra).with_context(|| {
        format!(
            "stage `{stage}`: the PPO state in {}",
            dir.join("state.json").display()
        )
    })?;
    let mut kl_ctl = extra.kl_controller;
    kl_ctl.set_value(f64::from_bits(extra.kl_coef_bits));
    let norm = match s.params.reward_norm {
        Some(_) => extra.reward_norm.as_ref().map(RewardNorm::from),
        None => None,
    };
    let done = saved.train.step;
    tracing::info!(
        iteration = done,
        "resuming from checkpoint {}",
        dir.display()
    );
    Ok(Progress {
        done,
        total_tokens: saved.train.tokens_seen,
        kl_ctl,
        norm,
    })
}

/// Saves both trained models, their optimizers and `progress` (iteration
/// `progress.done` at rate `lr`) as one atomic checkpoint.
pub(super) fn save(
    checkpoints: &Checkpoints,
    s: &Settings,
    models: &Models,
    opts: &Optimizers,
    progress: &Progress,
    lr: f64,
) -> anyhow::Result<()> {
    let it = progress.done;
    let extra = ResumeState {
        kl_controller: progress.kl_ctl.clone(),
        kl_coef_bits: progress.kl_ctl.value().to_bits(),
        reward_norm: progress.norm.map(SavedNorm::from),
    };
    let mut parts = vec![CheckpointPart {
        name: "policy",
        vs: &models.policy.vs,
        opt: &opts.policy,
    }];
    if let (Some(c), Some(o)) = (&models.critic, &opts.critic) {
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
                    tokens_seen: progress.total_tokens,
                    ..Default::default()
                },
                lr,
                extra: serde_json::to_value(extra)?,
            },
        )
        .with_context(|| format!("stage `{}`: iteration {it}: checkpoint", s.stage))?;
    Ok(())
}
