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
//!
//! Layout: `setup` checks the params and loads the models and prompts;
//! each iteration is a `rollout` (sampling, scoring, KL and reward
//! shaping), an `update` (advantages, PPO epochs of minibatches), a
//! `metrics` line and, when due, a `checkpoint`; `stop` is the error for a
//! NaN; `reward_norm` fits the score map before the first iteration.

use std::time::Instant;

use tch::{Kind, Tensor};

use alignflow_ops::protocol::Metrics;
use alignflow_ops::StageContext;

mod checkpoint;
mod metrics;
mod reward_norm;
mod reward_source;
mod rollout;
mod samples;
mod setup;
mod stop;
#[cfg(test)]
mod tests;
mod update;

use checkpoint::Progress;
use metrics::Iteration;

use super::metrics_log::MetricsLog;
use crate::train::Checkpoints;
use setup::{Models, Optimizers, Settings, Setup};
use stop::Stop;
use update::{Batch, Plan};

pub use super::scoring::{pm_scores, response_logprobs, response_values};

fn scalar(t: &Tensor) -> f64 {
    t.to_kind(Kind::Double).double_value(&[])
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
    let Setup {
        settings: s,
        mut models,
        prompts,
    } = setup::load(ctx)?;
    // The reference and the reward source never change: their no-grad
    // forwards run through oneDNN packs made once for the stage (CPU only).
    let _reference_packing = models.reference.packed();
    let _reward_packing = models.rewards.packed();
    let mut opts = Optimizers::new(&models)?;

    std::fs::create_dir_all(&ctx.spec.checkpoint_dir)?;
    let checkpoints = Checkpoints::new(ctx.spec.checkpoint_dir.join("ppo"), 2);
    let agreed =
        crate::dist::agreed_checkpoint(s.ranks, &checkpoints, crate::dist::CHECKPOINT_PATIENCE)?;
    let (mut progress, resumed) = match agreed {
        Some(dir) => {
            let progress = checkpoint::resume(
                &dir,
                &s,
                &mut models.policy,
                models.critic.as_mut(),
                &mut opts,
            )?;
            // The metric lines past the checkpoint belong to the
            // interrupted run.
            let done = progress.done;
            (progress, Some(("iteration", done)))
        }
        None => {
            let norm = reward_norm::fit(ctx, &s, &models, &prompts)?;
            (Progress::fresh(&s, norm), None)
        }
    };
    if let Some(g) = s.ranks {
        // Every rank fitted the score map on the same reference samples;
        // on GPUs their scores need not agree bit for bit, so all take
        // rank 0's, as they take its weights.
        if let Some(norm) = progress.norm.as_mut() {
            let map = g.broadcast_f64(&[norm.gain, norm.bias], 0)?;
            (norm.gain, norm.bias) = (map[0], map[1]);
        }
        // Every rank starts from rank 0's weights: the same checkpoint or
        // the same initialisation, bit for bit.
        crate::dist::broadcast_weights(g, &models.policy.vs)?;
        if let Some(critic) = &models.critic {
            crate::dist::broadcast_weights(g, &critic.vs)?;
        }
    }
    // Rank 0 alone writes the log, the samples, the checkpoints and the
    // outputs (the checkpoint folder is every rank's).
    let mut metrics_log = match s.is_root() {
        true => Some(MetricsLog::open(&ctx.spec.checkpoint_dir, resumed)?),
        false => None,
    };
    let start = Instant::now();
    let start_tokens = progress.total_tokens;
    let mut last = serde_json::Value::Null;
    let mut last_samples = Vec::new();
    let stage = Stage {
        ctx,
        s: &s,
        models: &models,
        prompts: &prompts,
        passes,
        checkpoints: &checkpoints,
    };
    for it in progress.done + 1..=s.params.iterations {
        ctx.cancel.check()?;
        last = stage.iteration(
            it,
            &mut opts,
            &mut progress,
            &mut metrics_log,
            &mut last_samples,
        )?;
    }
    if let Some(log) = metrics_log {
        log.publish(ctx)?;
        samples::publish(ctx, &last_samples)?;
        // Merges the LoRA adapters (if any) into the saved weights.
        models.policy.save(&ctx.output("model"))?;
    }
    let secs = start.elapsed().as_secs_f64();
    let tokens = progress.total_tokens - start_tokens;
    Ok(metrics::summary(
        &s,
        &last,
        progress.total_tokens,
        tokens,
        secs,
        progress.norm.as_ref(),
    ))
}

/// What every iteration reads.
struct Stage<'a> {
    ctx: &'a StageContext<'a>,
    s: &'a Settings,
    models: &'a Models,
    prompts: &'a [Vec<i64>],
    passes: Passes,
    checkpoints: &'a Checkpoints,
}

impl Stage<'_> {
    /// Iteration `it`: the rollout, the update, the KL controller's step,
    /// the metrics line (returned), the samples of the first iteration
    /// (kept in the checkpoint folder) and the last (into `last_samples`)
    /// and, when due, a checkpoint.
    fn iteration(
        &self,
        it: u64,
        opts: &mut Optimizers,
        progress: &mut Progress,
        metrics_log: &mut Option<MetricsLog>,
        last_samples: &mut Vec<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let (s, models) = (self.s, self.models);
        let stop = Stop {
            stage: &s.stage,
            checkpoints: self.checkpoints,
        };
        let t0 = Instant::now();
        let lr = s.schedule.lr_at(it - 1);
        let ro = rollout::roll_out(s, &models.policy, self.prompts, it)?;
        progress.total_tokens += ro.sampled.tokens;
        let plan = Plan::new(s, &ro, self.passes);
        let forwards = plan.forwards(s, models, &ro);
        let ex = rollout::experience(
            s,
            models,
            &ro,
            forwards.as_ref(),
            progress.norm.as_ref(),
            progress.kl_ctl.value(),
            it,
            &stop,
        )?;
        if s.is_root() && (it == 1 || it == s.params.iterations) {
            let records = samples::records(s, models, &ro, &ex, it)?;
            if it == 1 {
                samples::keep_first(&self.ctx.spec.checkpoint_dir, &records)?;
            }
            if it == s.params.iterations {
                *last_samples = records;
            }
        }
        let adv = update::advantages(s, &ro, &ex);
        let batch = Batch {
            ro: &ro,
            ex: &ex,
            adv: &adv,
        };
        let sums = update::update(s, models, opts, &batch, &plan, forwards, lr, it, &stop)?;
        // One step per sampled response (`batch_size` with GAE).
        progress.kl_ctl.update(ex.mean_kl, ro.b as u64);

        let line = metrics::line(
            s,
            &Iteration {
                it,
                lr,
                secs: t0.elapsed().as_secs_f64(),
                ro: &ro,
                ex: &ex,
                adv: &adv,
                sums: &sums,
                norm: progress.norm.as_ref(),
            },
        );
        metrics::report(self.ctx, s, it, &ex, lr);
        progress.done = it;
        if let Some(log) = metrics_log.as_mut() {
            log.write(&line)?;
            let periodic = s.params.checkpoint_every > 0 && it % s.params.checkpoint_every == 0;
            // Asked for: SIGUSR1 before a Slurm time limit.
            let asked = alignflow_ops::checkpoint_request::take();
            if (periodic || asked) && it < s.params.iterations {
                if asked {
                    tracing::info!(iteration = it, "checkpoint asked for (SIGUSR1): saving");
                }
                // The metrics lines up to `it` must be on disk before a
                // checkpoint that says `it` is done.
                log.sync()?;
                checkpoint::save(self.checkpoints, s, models, opts, progress, lr)?;
            }
        }
        Ok(line)
    }
}
