//! The update of one iteration: advantages from the rollout's rewards, then
//! PPO epochs of minibatches, each a clipped-surrogate step of the policy
//! and a clipped value-loss step of the value model.

use tch::{Device, Kind, Tensor};

use alignflow_ops::PpoKlMode;

use super::rollout::{Experience, Forwards, Rollout};
use super::setup::{Models, Optimizers, Settings};
use super::stop::Stop;
use super::{scalar, Passes};
use crate::model::Model;
use crate::ops::scoring::{response_logprobs, response_values};
use crate::rl::{
    compute_gae, explained_variance, group_advantages, group_spread, kl_k3, masked_mean,
    masked_sum, masked_whiten, policy_loss, value_loss, GroupBaseline, PolicyLoss, ShapedRewards,
};
use crate::train::{clip_grad_norm, seed_torch_for_step, AdamW};

/// How the update splits the batch.
pub(super) struct Plan {
    pub minibatches: usize,
    /// One epoch of one minibatch, whose forwards stand in for the
    /// rollout's (see [`Passes::Auto`]).
    pub single_pass: bool,
}

impl Plan {
    pub(super) fn new(s: &Settings, ro: &Rollout, passes: Passes) -> Plan {
        let minibatches = s.params.minibatches.clamp(1, ro.batch.len());
        // Forwards with dropout differ from the rollout's dropout-free
        // ones, so they never stand in for them.
        // On several ranks the rollout's forwards are each rank's share,
        // gathered, and the update's are each rank's share of the
        // minibatch: they never coincide.
        let single_pass = passes == Passes::Auto
            && s.params.ppo_epochs.max(1) == 1
            && minibatches == 1
            && !s.params.dropout
            && s.ranks.is_none();
        Plan {
            minibatches,
            single_pass,
        }
    }

    /// The update's forwards, with grad, before anything else changes
    /// the weights (see `Passes::Auto`); `None` unless a single pass.
    pub(super) fn forwards(&self, s: &Settings, models: &Models, ro: &Rollout) -> Option<Forwards> {
        let sm = &ro.sampled;
        self.single_pass.then(|| {
            crate::train::autocast_if(s.autocast, || {
                let out = response_logprobs(
                    &models.policy,
                    &sm.ids,
                    &sm.mask,
                    &sm.resp,
                    sm.p_len,
                    s.params.temperature,
                    false,
                    true,
                );
                let (logp, entropy) = (out.logp, out.entropy.expect("asked for"));
                let values = models
                    .critic
                    .as_ref()
                    .map(|c| response_values(c, &sm.ids, &sm.mask, sm.p_len, sm.r, false));
                Forwards {
                    logp,
                    entropy,
                    values,
                }
            })
        })
    }
}

/// The value model's targets (GAE only).
pub(super) struct ValueTargets {
    /// `[b, r]` the GAE returns.
    pub returns: Tensor,
    /// How much of the returns' variance the rollout's values explain
    /// (NaN when the returns have none).
    pub explained_variance: f64,
}

/// Per-token advantages, and what else the update and metrics need.
pub(super) struct Advantages {
    /// `[b, r]`, zero off the response mask.
    pub adv: Tensor,
    /// `None` without a value model.
    pub value_targets: Option<ValueTargets>,
    /// With GRPO / RLOO: the mean within-group reward standard deviation
    /// and the fraction of groups with no spread (scalars).
    pub group_stats: Option<(Tensor, Tensor)>,
}

/// The advantages: group-relative sequence rewards broadcast over the
/// tokens (GRPO / RLOO), or whitened GAE against the value model.
pub(super) fn advantages(s: &Settings, ro: &Rollout, ex: &Experience) -> Advantages {
    let rmask = &ro.rmask;
    let shaped = &ex.shaped;
    match (s.baseline, &ex.old_values) {
        (Some(bl), _) => {
            let (adv, stats) = group_relative(shaped, rmask, s.group as i64, bl);
            Advantages {
                adv,
                value_targets: None,
                group_stats: Some(stats),
            }
        }
        (None, Some(old_values)) => {
            let rewards = if s.params.whiten_rewards {
                masked_whiten(&shaped.rewards, rmask, false) * rmask
            } else {
                shaped.rewards.shallow_clone()
            };
            let (adv, returns) = compute_gae(old_values, &rewards, rmask, &s.gae);
            let adv = masked_whiten(&adv, rmask, true) * rmask;
            let ev = scalar(&explained_variance(old_values, &returns, rmask));
            Advantages {
                adv,
                value_targets: Some(ValueTargets {
                    returns,
                    explained_variance: ev,
                }),
                group_stats: None,
            }
        }
        (None, None) => unreachable!("gae loads a value model"),
    }
}

/// GRPO / RLOO advantages `[b, r]` of each response: its group-relative
/// sequence reward, the score (after any no-EOS penalty) plus the KL
/// penalty summed over its tokens, on every response token; and the
/// groups' spread (mean std, flat fraction).
fn group_relative(
    shaped: &ShapedRewards,
    rmask: &Tensor,
    group: i64,
    baseline: GroupBaseline,
) -> (Tensor, (Tensor, Tensor)) {
    let seq = &shaped.scores + masked_sum(&shaped.non_score_reward, rmask, Some(1));
    let stats = group_spread(&seq, group);
    let adv = group_advantages(&seq, group, baseline);
    (adv.unsqueeze(1) * rmask, stats)
}

/// Sums over the update's minibatches, for the metrics.
#[derive(Default)]
pub(super) struct UpdateSums {
    pub entropy: f64,
    pub clip_frac: f64,
    pub approx_kl: f64,
    pub value_loss: f64,
    pub policy_loss: f64,
    pub kl_loss: f64,
    /// Minibatches.
    pub count: f64,
}

impl UpdateSums {
    fn add(&mut self, f: &Figures) {
        self.entropy += f.entropy;
        self.clip_frac += f.clip_frac;
        self.approx_kl += f.approx_kl;
        self.value_loss += f.value_loss;
        self.policy_loss += f.policy_loss;
        self.kl_loss += f.kl_loss;
        self.count += 1.0;
    }
}

/// One minibatch's figures: each a token-level masked mean over its rows.
#[derive(Default, Clone, Copy)]
struct Figures {
    entropy: f64,
    clip_frac: f64,
    approx_kl: f64,
    policy_loss: f64,
    kl_loss: f64,
    value_loss: f64,
}

/// This rank's part of a minibatch: its share of the rows, and how many
/// of the minibatch's scored tokens are its and in all. Every loss is a
/// token-level masked mean, so a share's mean weighted by its tokens,
/// summed over the ranks, is the minibatch's mean: each rank's loss is
/// scaled by `world * mine / all` before the gradients are averaged.
struct Part {
    rows: Tensor,
    mine: f64,
    all: f64,
}

impl Part {
    fn of(s: &Settings, ro: &Rollout, rows: Tensor) -> Part {
        let Some(g) = s.ranks else {
            return Part {
                rows,
                mine: 1.0,
                all: 1.0,
            };
        };
        let tokens = |rows: &Tensor| scalar(&ro.rmask.index_select(0, rows).sum(Kind::Double));
        let all = tokens(&rows);
        let share = crate::dist::share(rows.size()[0] as usize, g.rank(), g.world());
        let rows = rows.narrow(0, share.start as i64, share.len() as i64);
        Part {
            mine: tokens(&rows),
            all,
            rows,
        }
    }

    /// The factor of this rank's losses.
    fn scale(&self, s: &Settings) -> f64 {
        match s.ranks {
            None => 1.0,
            Some(g) if self.all > 0.0 => g.world() as f64 * self.mine / self.all,
            Some(_) => 0.0,
        }
    }

    /// The minibatch's figures from this rank's (`mine`): on several
    /// ranks, the token-weighted sum of every rank's.
    fn whole_minibatch(&self, s: &Settings, mine: Figures) -> anyhow::Result<Figures> {
        let Some(g) = s.ranks else {
            return Ok(mine);
        };
        let w = self.mine;
        let all = g.sum_f64(&[
            w * mine.entropy,
            w * mine.clip_frac,
            w * mine.approx_kl,
            w * mine.policy_loss,
            w * mine.kl_loss,
            w * mine.value_loss,
        ])?;
        let total = self.all.max(1e-12);
        Ok(Figures {
            entropy: all[0] / total,
            clip_frac: all[1] / total,
            approx_kl: all[2] / total,
            policy_loss: all[3] / total,
            kl_loss: all[4] / total,
            value_loss: all[5] / total,
        })
    }
}

/// The step of a rank whose share of a minibatch is empty: zero
/// gradients into the others' average, then the same optimizer step.
fn idle_step(s: &Settings, opt: &mut AdamW, lr: f64) -> anyhow::Result<()> {
    opt.zero_grad();
    average_gradients(s, opt)?;
    opt.step(lr)?;
    Ok(())
}

/// On several ranks, replaces every gradient by its mean over the ranks.
fn average_gradients(s: &Settings, opt: &AdamW) -> anyhow::Result<()> {
    if let Some(g) = s.ranks {
        crate::dist::average_gradients(g, &opt.params())?;
    }
    Ok(())
}

/// One iteration's rollout, as the update reads it.
pub(super) struct Batch<'a> {
    pub ro: &'a Rollout,
    pub ex: &'a Experience,
    pub adv: &'a Advantages,
}

/// Rows of one minibatch, and the rollout's tensors at those rows.
struct Minibatch {
    rows: Tensor,
    ids: Tensor,
    mask: Tensor,
    resp: Tensor,
    rmask: Tensor,
}

impl Minibatch {
    fn new(ro: &Rollout, rows: Tensor) -> Minibatch {
        let sm = &ro.sampled;
        let pick = |t: &Tensor| t.index_select(0, &rows);
        let (ids, mask, resp, rmask) = (
            pick(&sm.ids),
            pick(&sm.mask),
            pick(&sm.resp),
            pick(&ro.rmask),
        );
        Minibatch {
            rows,
            ids,
            mask,
            resp,
            rmask,
        }
    }

    /// `t` at this minibatch's rows.
    fn pick(&self, t: &Tensor) -> Tensor {
        t.index_select(0, &self.rows)
    }
}

/// PPO epochs over the batch at rate `lr`. `forwards`, if any, stand in
/// for the first minibatch's forwards.
#[allow(clippy::too_many_arguments)]
pub(super) fn update(
    s: &Settings,
    models: &Models,
    opts: &mut Optimizers,
    batch: &Batch<'_>,
    plan: &Plan,
    mut forwards: Option<Forwards>,
    lr: f64,
    it: u64,
    stop: &Stop<'_>,
) -> anyhow::Result<UpdateSums> {
    let b = batch.ro.b;
    let mut sums = UpdateSums::default();
    for epoch in 0..s.params.ppo_epochs.max(1) {
        seed_torch_for_step(s.seed, it * 1000 + epoch as u64);
        // One minibatch of everything: the row order changes nothing.
        let order = if plan.single_pass {
            Tensor::arange(b, (Kind::Int64, s.device))
        } else {
            Tensor::randperm(b, (Kind::Int64, Device::Cpu)).to_device(s.device)
        };
        let per = (b as usize).div_ceil(plan.minibatches) as i64;
        let chunks = (b as u64).div_ceil(per as u64);
        let epochs = s.params.ppo_epochs.max(1) as u64;
        let mut at = 0;
        while at < b {
            // The policy's optimizer steps so far, this one included.
            let number = ((it - 1) * epochs + epoch as u64) * chunks + (at / per) as u64 + 1;
            let size = per.min(b - at);
            let part = Part::of(s, batch.ro, order.narrow(0, at, size));
            at += size;
            let precomputed = forwards.take();
            let figures = match part.rows.size()[0] {
                0 => {
                    // A share with no rows still meets the others in each
                    // step's all-reduce, with zero gradients.
                    crate::dist::test_fault_point(number);
                    idle_step(s, &mut opts.policy, lr)?;
                    crate::dist::test_dump_grads(&models.policy.vs, number)?;
                    if let Some(critic_opt) = opts.critic.as_mut() {
                        idle_step(s, critic_opt, lr)?;
                    }
                    Figures::default()
                }
                _ => {
                    let mb = Minibatch::new(batch.ro, part.rows.shallow_clone());
                    let step = Step {
                        s,
                        batch,
                        mb: &mb,
                        precomputed: precomputed.as_ref(),
                        scale: part.scale(s),
                        number,
                        lr,
                        it,
                        stop,
                    };
                    let (pl, pl_v, kl_loss, entropy) =
                        step.policy(&models.policy, &mut opts.policy)?;
                    let value_loss = match (
                        &models.critic,
                        opts.critic.as_mut(),
                        &batch.adv.value_targets,
                    ) {
                        (Some(critic), Some(critic_opt), Some(targets)) => {
                            step.value(critic, critic_opt, targets)?
                        }
                        _ => 0.0,
                    };
                    Figures {
                        entropy: tch::no_grad(|| scalar(&masked_mean(&entropy, &mb.rmask, None))),
                        clip_frac: scalar(&pl.clip_frac),
                        approx_kl: scalar(&pl.approx_kl),
                        policy_loss: pl_v,
                        kl_loss,
                        value_loss,
                    }
                }
            };
            sums.add(&part.whole_minibatch(s, figures)?);
        }
    }
    Ok(sums)
}

/// One minibatch's optimizer steps.
struct Step<'a> {
    s: &'a Settings,
    batch: &'a Batch<'a>,
    mb: &'a Minibatch,
    precomputed: Option<&'a Forwards>,
    /// The factor of this rank's losses (see [`Part`]); 1 on one process.
    scale: f64,
    /// The policy's optimizer steps so far, this one included.
    number: u64,
    lr: f64,
    it: u64,
    stop: &'a Stop<'a>,
}

impl Step<'_> {
    /// The policy's step; returns its loss, the loss's value, the KL
    /// loss's (0 unless `kl_mode: loss`) and the entropy at each response
    /// token.
    fn policy(
        &self,
        policy: &Model,
        opt: &mut AdamW,
    ) -> anyhow::Result<(PolicyLoss, f64, f64, Tensor)> {
        let (s, mb, ex) = (self.s, self.mb, self.batch.ex);
        let p_len = self.batch.ro.sampled.p_len;
        let (pl, kl_loss, entropy) = crate::train::autocast_if(s.autocast, || {
            let (logp, entropy) = match self.precomputed {
                Some(f) => (f.logp.shallow_clone(), f.entropy.shallow_clone()),
                None => {
                    let out = response_logprobs(
                        policy,
                        &mb.ids,
                        &mb.mask,
                        &mb.resp,
                        p_len,
                        s.params.temperature,
                        s.params.dropout,
                        true,
                    );
                    (out.logp, out.entropy.expect("asked for"))
                }
            };
            let pl = policy_loss(
                &logp,
                &mb.pick(&ex.old_logp),
                &mb.pick(&self.batch.adv.adv),
                &mb.rmask,
                s.params.clip,
            );
            // GRPO's KL term: k3 of the current policy against the
            // reference, token-level masked mean like the surrogate.
            let kl_loss = (s.params.kl_mode == PpoKlMode::Loss)
                .then(|| masked_mean(&kl_k3(&logp, &mb.pick(&ex.ref_logp)), &mb.rmask, None));
            (pl, kl_loss, entropy)
        });
        crate::dist::test_fault_point(self.number);
        let pl_v = scalar(&pl.loss);
        self.stop.unless_finite(self.it, "policy loss", pl_v)?;
        let (loss, kl_v) = match &kl_loss {
            Some(kl_loss) => {
                let v = scalar(kl_loss);
                self.stop.unless_finite(self.it, "KL loss", v)?;
                (&pl.loss + kl_loss * ex.kl_coef, v)
            }
            None => (pl.loss.shallow_clone(), 0.0),
        };
        opt.zero_grad();
        (loss * self.scale).backward();
        self.clip_and_step(opt, "policy gradient norm")?;
        crate::dist::test_dump_grads(&policy.vs, self.number)?;
        Ok((pl, pl_v, kl_v, entropy))
    }

    /// The value model's step; returns the value loss.
    fn value(
        &self,
        critic: &Model,
        opt: &mut AdamW,
        targets: &ValueTargets,
    ) -> anyhow::Result<f64> {
        let (s, mb, ro) = (self.s, self.mb, self.batch.ro);
        let old_values = self.batch.ex.old_values.as_ref().expect("GAE's values");
        let vl = crate::train::autocast_if(s.autocast, || {
            let values = match self.precomputed.and_then(|f| f.values.as_ref()) {
                Some(v) => v.shallow_clone(),
                None => response_values(
                    critic,
                    &mb.ids,
                    &mb.mask,
                    ro.sampled.p_len,
                    ro.sampled.r,
                    s.params.dropout,
                ),
            };
            value_loss(
                &values,
                &mb.pick(old_values),
                &mb.pick(&targets.returns),
                &mb.rmask,
                s.params.value_clip,
            )
        });
        let vl_v = scalar(&vl.loss);
        self.stop.unless_finite(self.it, "value loss", vl_v)?;
        opt.zero_grad();
        (&vl.loss * self.scale).backward();
        self.clip_and_step(opt, "value gradient norm")?;
        Ok(vl_v)
    }

    /// Averages the gradients over the ranks (if several), clips their
    /// norm (if asked), then steps.
    fn clip_and_step(&self, opt: &mut AdamW, what: &str) -> anyhow::Result<()> {
        average_gradients(self.s, opt)?;
        if let Some(c) = self.s.params.grad_clip {
            let norm = clip_grad_norm(&opt.params(), c);
            self.stop.unless_finite(self.it, what, norm)?;
        }
        opt.step(self.lr)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rl::shape_rewards;

    /// RLOO over 2 prompts of 2 samples, worked by hand. Scores [1, 1, 0,
    /// 2]; per-token KL [0.5, 0.5] on row 0 only (it sums to 1), kl_coef
    /// 0.1: sequence rewards [0.9, 1, 0, 2], each minus the other of its
    /// group: [-0.1, 0.1, -2, 2] on both response tokens (the second
    /// token of row 3 is past its end: 0).
    #[test]
    fn rloo_takes_the_summed_kl_penalty_into_the_sequence_reward() {
        let scores = Tensor::from_slice(&[1.0f64, 1.0, 0.0, 2.0]);
        let kl = Tensor::from_slice(&[0.5f64, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]).view([4, 2]);
        let rmask = Tensor::from_slice(&[1.0f64, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]).view([4, 2]);
        let has_eos = Tensor::from_slice(&[1.0f64; 4]);
        let shaped = shape_rewards(&scores, &kl, &rmask, &has_eos, 0.1, None);
        let (adv, (std, flat)) = group_relative(&shaped, &rmask, 2, GroupBaseline::Rloo);
        let got = Vec::<f64>::try_from(&adv.flatten(0, -1)).unwrap();
        let want = [-0.1, -0.1, 0.1, 0.1, -2.0, -2.0, 2.0, 0.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-12, "{got:?} != {want:?}");
        }
        // Stds sqrt(0.005) and sqrt(2), no flat group.
        let mean_std = (0.005f64.sqrt() + 2.0f64.sqrt()) / 2.0;
        assert!((std.double_value(&[]) - mean_std).abs() < 1e-12);
        assert_eq!(flat.double_value(&[]), 0.0);
    }
}
