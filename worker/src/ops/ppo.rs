//! `ppo`: PPO of a policy against a preference model, with a per-token KL
//! penalty to a frozen copy of the starting policy (InstructGPT / TRL).
//!
//! Four models: the policy (trained), a frozen reference (the policy folder
//! loaded again), a value model (the policy folder with a value head, its
//! own optimizer) and the frozen preference model. No checkpoint/resume: a
//! rerun starts over.

use std::io::Write;
use std::time::Instant;

use anyhow::Context;
use tch::{Device, Kind, Tensor};

use alignflow::data::read_jsonl;
use alignflow::ops::{PpoKlEstimator, PpoParams, StageContext};
use alignflow::protocol::Metrics;
use alignflow::text::{apply_template, Tokenizer};

use crate::model::sample::{generate, left_pad, SamplingConfig};
use crate::model::{self, positions_from_mask, BuildOptions, Head, Model};
use crate::rl::{
    compute_gae, contains_eos, explained_variance, kl_per_token, masked_entropy, masked_mean,
    masked_whiten, mean_sequence_kl, policy_loss, response_mask, shape_rewards, value_loss,
    GaeConfig, KlController, KlEstimator,
};
use crate::train::{clip_grad_norm, epoch_permutation, seed_torch_for_step, AdamW, AdamWConfig};

/// Policy log-probs (and logits) of the response tokens of `ids`.
///
/// # Shapes
/// `ids`, `mask`: `[b, p + r]`, `resp`: `[b, r]` -> `([b, r], [b, r, vocab])`.
pub(crate) fn response_logprobs(
    m: &Model,
    ids: &Tensor,
    mask: &Tensor,
    resp: &Tensor,
    p_len: i64,
    temperature: f64,
) -> (Tensor, Tensor) {
    let r = resp.size()[1];
    let hidden =
        m.lm.hidden(ids, &positions_from_mask(mask), mask, None, false);
    let mut logits =
        m.lm.logits(&hidden.narrow(1, p_len - 1, r))
            .to_kind(Kind::Float);
    if temperature > 0.0 && temperature != 1.0 {
        logits /= temperature;
    }
    let logp = logits
        .log_softmax(-1, Kind::Float)
        .gather(2, &resp.unsqueeze(-1), false)
        .squeeze_dim(-1);
    (logp, logits)
}

/// Values of the states before each response token.
///
/// # Shapes
/// `ids`, `mask`: `[b, p + r]` -> `[b, r]`.
fn response_values(m: &Model, ids: &Tensor, mask: &Tensor, p_len: i64, r: i64) -> Tensor {
    let hidden =
        m.lm.hidden(ids, &positions_from_mask(mask), mask, None, false);
    m.value
        .as_ref()
        .expect("value head")
        .forward(&hidden.narrow(1, p_len - 1, r))
        .to_kind(Kind::Float)
}

fn scalar(t: &Tensor) -> f64 {
    t.to_kind(Kind::Double).double_value(&[])
}

pub fn run(ctx: &StageContext<'_>) -> anyhow::Result<Metrics> {
    let p: PpoParams = ctx.params()?;
    let stage = ctx.spec.stage.clone();
    let seed = ctx.spec.seed;
    let device = model::device(&ctx.spec.device)?;
    let policy_dir = ctx.input("policy")?;
    let pm_dir = ctx.input("reward_model")?;
    let tokenizer = Tokenizer::from_dir(policy_dir)?;
    tch::manual_seed(seed as i64);
    let opts = |head| BuildOptions {
        device,
        head,
        lora: None,
    };
    let mut policy = Model::load(policy_dir, &opts(Head::Lm))?;
    let mut reference = Model::load(policy_dir, &opts(Head::Lm))?;
    reference.vs.freeze();
    let critic = Model::load(policy_dir, &opts(Head::Value))?;
    let mut pm = Model::load(pm_dir, &opts(Head::Reward))?;
    pm.vs.freeze();
    anyhow::ensure!(
        pm.lm.cfg.vocab_size == policy.lm.cfg.vocab_size,
        "stage `{stage}`: the reward model's vocabulary ({}) differs from the policy's ({}): they must share a tokenizer",
        pm.lm.cfg.vocab_size,
        policy.lm.cfg.vocab_size
    );
    let eos = tokenizer
        .eos_id
        .map(i64::from)
        .or(policy.lm.cfg.eos_token_id);
    let pad = policy.lm.cfg.pad_id();
    let max_new = p.max_new_tokens.max(1);
    let max_positions = policy.lm.cfg.max_positions.min(pm.lm.cfg.max_positions);
    anyhow::ensure!(
        max_new < max_positions,
        "stage `{stage}`: max_new_tokens {max_new} leaves no room for a prompt in {max_positions} positions"
    );
    let prompt_budget = (max_positions - max_new) as usize;

    // Prompts, tokenized, keeping each one's end.
    let path = ctx.input("prompts")?;
    let mut prompts: Vec<Vec<i64>> = Vec::new();
    for (line, record) in read_jsonl::<serde_json::Value>(path)? {
        let record = record
            .map_err(|e| anyhow::anyhow!("stage `{stage}`: {}:{line}: {e}", path.display()))?;
        let text = record[&p.prompt_field].as_str().with_context(|| {
            format!(
                "stage `{stage}`: {}:{line}: no string field `{}`",
                path.display(),
                p.prompt_field
            )
        })?;
        let mut ids = tokenizer.encode(&apply_template(&p.template, text))?;
        if ids.len() > prompt_budget {
            ids.drain(..ids.len() - prompt_budget);
        }
        anyhow::ensure!(
            !ids.is_empty(),
            "stage `{stage}`: {}:{line}: empty prompt",
            path.display()
        );
        prompts.push(ids);
    }
    anyhow::ensure!(!prompts.is_empty(), "stage `{stage}`: no prompts");

    let mut policy_opt = AdamW::new(policy.trainable(), AdamWConfig::default())?;
    let mut critic_opt = AdamW::new(critic.trainable(), AdamWConfig::default())?;
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

    let metrics_path = ctx.spec.checkpoint_dir.join("metrics.jsonl");
    std::fs::create_dir_all(&ctx.spec.checkpoint_dir)?;
    let mut metrics_file = std::fs::File::create(&metrics_path)
        .with_context(|| format!("creating {}", metrics_path.display()))?;
    let batch_size = p.batch_size.max(1);
    let n = prompts.len();
    let start = Instant::now();
    let mut total_tokens = 0u64;
    let mut last = serde_json::Value::Null;

    for it in 1..=p.iterations {
        ctx.cancel.check()?;
        let t0 = Instant::now();
        // The next prompts, cycling over seeded orders.
        let batch: Vec<Vec<i64>> = (0..batch_size)
            .map(|j| {
                let pos = (it - 1) as usize * batch_size + j;
                let order = epoch_permutation(n, seed, (pos / n) as u64);
                prompts[order[pos % n]].clone()
            })
            .collect();
        let b = batch.len() as i64;

        // Rollout.
        let cfg = SamplingConfig {
            max_new_tokens: max_new,
            temperature: p.temperature,
            eos_token_id: eos,
            pad_token_id: pad,
            seed: crate::train::step_seed(seed, it) as u64,
            ..Default::default()
        };
        let samples = generate(&policy.lm, &batch, &cfg, device, |_, _| false);
        let r_len = samples
            .iter()
            .map(|s| s.tokens.len())
            .max()
            .unwrap_or(1)
            .max(1);
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
        let (prompt_ids, prompt_mask) = left_pad(&batch, pad, device);
        let p_len = prompt_ids.size()[1];
        let ids = Tensor::cat(&[&prompt_ids, &resp], 1);
        let mask = Tensor::cat(&[&prompt_mask, &gen_mask], 1);
        let rmask = match eos {
            Some(e) => response_mask(&resp, e, None) * gen_mask.to_kind(Kind::Float),
            None => gen_mask.to_kind(Kind::Float),
        };
        let has_eos = match eos {
            Some(e) => contains_eos(&resp, e),
            None => Tensor::zeros([b], (Kind::Bool, device)),
        };
        let resp_tokens = len_v.iter().sum::<i64>() as u64;
        total_tokens += resp_tokens;

        let (old_logp, ref_logp, old_values, scores) = tch::no_grad(|| {
            let (old, _) = response_logprobs(&policy, &ids, &mask, &resp, p_len, p.temperature);
            let (rf, _) = response_logprobs(&reference, &ids, &mask, &resp, p_len, p.temperature);
            let v = response_values(&critic, &ids, &mask, p_len, r) * &rmask;
            let hidden = pm
                .lm
                .hidden(&ids, &positions_from_mask(&mask), &mask, None, false);
            let sc = pm
                .reward
                .as_ref()
                .expect("reward head")
                .forward(&hidden, &mask)
                .to_kind(Kind::Float);
            (old, rf, v, sc)
        });
        let kl = kl_per_token(&old_logp, &ref_logp, estimator) * &rmask;
        let mean_kl = scalar(&mean_sequence_kl(&kl, &rmask));
        let kl_coef = kl_ctl.value();
        let shaped = shape_rewards(&scores, &kl, &rmask, &has_eos, kl_coef, p.no_eos_penalty);
        let rewards = if p.whiten_rewards {
            masked_whiten(&shaped.rewards, &rmask, false) * &rmask
        } else {
            shaped.rewards.shallow_clone()
        };
        let (adv, returns) = compute_gae(&old_values, &rewards, &rmask, &gae);
        let adv = masked_whiten(&adv, &rmask, true) * &rmask;
        let ev = scalar(&explained_variance(&old_values, &returns, &rmask));

        // Update.
        let minibatches = p.minibatches.clamp(1, batch.len());
        let (mut ent_sum, mut cf_sum, mut ak_sum, mut vl_sum, mut pl_sum, mut count) =
            (0.0, 0.0, 0.0, 0.0, 0.0, 0.0);
        for epoch in 0..p.ppo_epochs.max(1) {
            seed_torch_for_step(seed, it * 1000 + epoch as u64);
            let order = Tensor::randperm(b, (Kind::Int64, Device::Cpu)).to_device(device);
            let per = (b as usize).div_ceil(minibatches) as i64;
            let mut at = 0;
            while at < b {
                let size = per.min(b - at);
                let rows = order.narrow(0, at, size);
                at += size;
                let pick = |t: &Tensor| t.index_select(0, &rows);
                let (mb_ids, mb_mask, mb_resp, mb_rmask) =
                    (pick(&ids), pick(&mask), pick(&resp), pick(&rmask));

                let (logp, logits) =
                    response_logprobs(&policy, &mb_ids, &mb_mask, &mb_resp, p_len, p.temperature);
                let pl = policy_loss(&logp, &pick(&old_logp), &pick(&adv), &mb_rmask, p.clip);
                let pl_v = scalar(&pl.loss);
                anyhow::ensure!(
                    pl_v.is_finite(),
                    "stage `{stage}`: iteration {it}: the policy loss is {pl_v} (NaN or inf); stopped"
                );
                policy_opt.zero_grad();
                pl.loss.backward();
                if let Some(c) = p.grad_clip {
                    let norm = clip_grad_norm(&policy_opt.params(), c);
                    anyhow::ensure!(
                        norm.is_finite(),
                        "stage `{stage}`: iteration {it}: the policy gradient norm is {norm} (NaN or inf); stopped"
                    );
                }
                policy_opt.step(p.lr)?;

                let values = response_values(&critic, &mb_ids, &mb_mask, p_len, r);
                let vl = value_loss(
                    &values,
                    &pick(&old_values),
                    &pick(&returns),
                    &mb_rmask,
                    p.value_clip,
                );
                let vl_v = scalar(&vl.loss);
                anyhow::ensure!(
                    vl_v.is_finite(),
                    "stage `{stage}`: iteration {it}: the value loss is {vl_v} (NaN or inf); stopped"
                );
                critic_opt.zero_grad();
                vl.loss.backward();
                if let Some(c) = p.grad_clip {
                    let norm = clip_grad_norm(&critic_opt.params(), c);
                    anyhow::ensure!(
                        norm.is_finite(),
                        "stage `{stage}`: iteration {it}: the value gradient norm is {norm} (NaN or inf); stopped"
                    );
                }
                critic_opt.step(p.lr)?;

                ent_sum += tch::no_grad(|| scalar(&masked_entropy(&logits.detach(), &mb_rmask)));
                cf_sum += scalar(&pl.clip_frac);
                ak_sum += scalar(&pl.approx_kl);
                vl_sum += vl_v;
                pl_sum += pl_v;
                count += 1.0;
            }
        }
        kl_ctl.update(mean_kl, batch_size as u64);

        let mean_score = scalar(&scores.mean(Kind::Float));
        anyhow::ensure!(
            mean_score.is_finite() && mean_kl.is_finite(),
            "stage `{stage}`: iteration {it}: the {} is not finite; stopped",
            if mean_score.is_finite() {
                "KL"
            } else {
                "score"
            }
        );
        let secs = t0.elapsed().as_secs_f64();
        let line = serde_json::json!({
            "iteration": it,
            "score": mean_score,
            "kl": mean_kl,
            "kl_coef": kl_coef,
            "non_score_reward": scalar(&shaped.non_score_reward.sum(Kind::Float)) / b as f64,
            "entropy": ent_sum / count,
            "clip_frac": cf_sum / count,
            "approx_kl": ak_sum / count,
            "policy_loss": pl_sum / count,
            "value_loss": vl_sum / count,
            "explained_variance": if ev.is_finite() { serde_json::json!(ev) } else { serde_json::Value::Null },
            "response_len": scalar(&masked_mean(&rmask.sum_dim_intlist([1i64].as_slice(), false, Kind::Float), &Tensor::ones([b], (Kind::Float, device)), None)),
            "tokens_per_s": if secs > 0.0 { resp_tokens as f64 / secs } else { 0.0 },
        });
        writeln!(metrics_file, "{line}")?;
        ctx.reporter.metric(
            &[
                ("iteration".to_string(), it as f64),
                ("score".to_string(), mean_score),
                ("kl".to_string(), mean_kl),
                ("kl_coef".to_string(), kl_coef),
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
    }
    metrics_file.flush()?;
    drop(metrics_file);
    std::fs::create_dir_all(&ctx.spec.out_dir)?;
    std::fs::copy(&metrics_path, ctx.output("metrics")).context("copying metrics.jsonl")?;
    policy.save(&ctx.output("model"))?;
    let secs = start.elapsed().as_secs_f64();
    let mut out = Metrics::new();
    out.insert("iterations".into(), p.iterations.into());
    out.insert("final_score".into(), last["score"].clone());
    out.insert("final_kl".into(), last["kl"].clone());
    out.insert("tokens".into(), total_tokens.into());
    out.insert(
        "tokens_per_s".into(),
        serde_json::json!(if secs > 0.0 {
            total_tokens as f64 / secs
        } else {
            0.0
        }),
    );
    Ok(out)
}
