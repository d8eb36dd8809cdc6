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
    masked_sum, masked_whiten, policy_loss, value_loss, PolicyLoss,
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
        let single_pass = passes == Passes::Auto
            && s.params.ppo_epochs.max(1) == 1
            && minibatches == 1
            && !s.params.dropout;
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
            // The sequence reward: the score (after any no-EOS penalty)
            // plus the KL penalty summed over the response's tokens.
            let seq = &shaped.scores + masked_sum(&shaped.non_score_reward, rmask, Some(1));
            let group_stats = Some(group_spread(&seq, s.group as i64));
            let adv = group_advantages(&seq, s.group as i64, bl);
            Advantages {
                adv: adv.unsqueeze(1) * rmask,
                value_targets: None,
                group_stats,
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
        let mut at = 0;
        while at < b {
            let size = per.min(b - at);
            let mb = Minibatch::new(batch.ro, order.narrow(0, at, size));
            at += size;
            let precomputed = forwards.take();
            let step = Step {
                s,
                batch,
                mb: &mb,
                precomputed: precomputed.as_ref(),
                lr,
                it,
                stop,
            };
            let (pl, pl_v, entropy) = step.policy(&models.policy, &mut opts.policy, &mut sums)?;
            if let (Some(critic), Some(critic_opt), Some(targets)) = (
                &models.critic,
                opts.critic.as_mut(),
                &batch.adv.value_targets,
            ) {
                sums.value_loss += step.value(critic, critic_opt, targets)?;
            }

            sums.entropy += tch::no_grad(|| scalar(&masked_mean(&entropy, &mb.rmask, None)));
            sums.clip_frac += scalar(&pl.clip_frac);
            sums.approx_kl += scalar(&pl.approx_kl);
            sums.policy_loss += pl_v;
            sums.count += 1.0;
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
    lr: f64,
    it: u64,
    stop: &'a Stop<'a>,
}

impl Step<'_> {
    /// The policy's step; returns its loss, the loss's value and the
    /// entropy at each response token.
    fn policy(
        &self,
        policy: &Model,
        opt: &mut AdamW,
        sums: &mut UpdateSums,
    ) -> anyhow::Result<(PolicyLoss, f64, Tensor)> {
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
        let pl_v = scalar(&pl.loss);
        self.stop.unless_finite(self.it, "policy loss", pl_v)?;
        let loss = match &kl_loss {
            Some(kl_loss) => {
                let v = scalar(kl_loss);
                self.stop.unless_finite(self.it, "KL loss", v)?;
                sums.kl_loss += v;
                &pl.loss + kl_loss * ex.kl_coef
            }
            None => pl.loss.shallow_clone(),
        };
        opt.zero_grad();
        loss.backward();
        self.clip_and_step(opt, "policy gradient norm")?;
        Ok((pl, pl_v, entropy))
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
        vl.loss.backward();
        self.clip_and_step(opt, "value gradient norm")?;
        Ok(vl_v)
    }

    /// Clips the gradient norm (if asked), then steps.
    fn clip_and_step(&self, opt: &mut AdamW, what: &str) -> anyhow::Result<()> {
        if let Some(c) = self.s.params.grad_clip {
            let norm = clip_grad_norm(&opt.params(), c);
            self.stop.unless_finite(self.it, what, norm)?;
        }
        opt.step(self.lr)?;
        Ok(())
    }
}
