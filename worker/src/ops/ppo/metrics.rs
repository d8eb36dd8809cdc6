//! What the stage reports: one metrics line per iteration (to
//! `metrics.jsonl` and the reporter) and the summary at the end.

use serde_json::Value;
use tch::{Kind, Tensor};

use alignflow_ops::protocol::Metrics;
use alignflow_ops::{PpoKlMode, StageContext};

use super::rollout::{Experience, Rollout};
use super::scalar;
use super::setup::Settings;
use super::update::{Advantages, UpdateSums};
use crate::rl::{masked_mean, RewardNorm};
use crate::train::per_second;

/// One iteration, as the metrics report it.
pub(super) struct Iteration<'a> {
    pub it: u64,
    pub lr: f64,
    /// Seconds the iteration took.
    pub secs: f64,
    pub ro: &'a Rollout,
    pub ex: &'a Experience,
    pub adv: &'a Advantages,
    pub sums: &'a UpdateSums,
    pub norm: Option<&'a RewardNorm>,
}

/// The metrics line of an iteration.
pub(super) fn line(s: &Settings, i: &Iteration<'_>) -> Value {
    let (ex, sums, ro) = (i.ex, i.sums, i.ro);
    let (b, rmask) = (ro.b, &ro.rmask);
    let count = sums.count;
    let targets = i.adv.value_targets.as_ref();
    let mut line = serde_json::json!({
        "iteration": i.it,
        "score": ex.mean_score,
        "raw_score": scalar(&ex.raw_scores.mean(Kind::Float)),
        "kl": ex.mean_kl,
        "kl_coef": ex.kl_coef,
        "non_score_reward": scalar(&ex.shaped.non_score_reward.sum(Kind::Float)) / b as f64,
        "entropy": sums.entropy / count,
        "clip_frac": sums.clip_frac / count,
        "approx_kl": sums.approx_kl / count,
        "policy_loss": sums.policy_loss / count,
        // Null without a value model.
        "value_loss": targets.map(|_| sums.value_loss / count),
        "explained_variance": targets.and_then(|t| t.explained_variance.is_finite().then_some(t.explained_variance)),
        "response_len": scalar(&masked_mean(&rmask.sum_dim_intlist([1i64].as_slice(), false, Kind::Float), &Tensor::ones([b], (Kind::Float, s.device)), None)),
        "tokens_per_s": per_second(ro.sampled.tokens, i.secs),
        "lr": i.lr,
        "seconds": i.secs,
    });
    if s.params.kl_mode == PpoKlMode::Loss {
        line["kl_loss"] = (sums.kl_loss / count).into();
    }
    if let Some((std, flat)) = &i.adv.group_stats {
        line["group_reward_std"] = scalar(std).into();
        line["flat_groups"] = scalar(flat).into();
    }
    if let Some(nm) = i.norm {
        line["reward_gain"] = nm.gain.into();
        line["reward_bias"] = nm.bias.into();
    }
    for (name, mean) in &ex.source_scores {
        line[name.as_str()] = (*mean).into();
    }
    if let Some(bs) = ex.baseline_score {
        line["baseline_score"] = bs.into();
    }
    line
}

/// Tells the reporter about iteration `it`.
pub(super) fn report(ctx: &StageContext<'_>, s: &Settings, it: u64, ex: &Experience, lr: f64) {
    let (mean_score, mean_kl) = (ex.mean_score, ex.mean_kl);
    ctx.reporter.metric(
        &[
            ("iteration".to_string(), it as f64),
            ("score".to_string(), mean_score),
            ("kl".to_string(), mean_kl),
            ("kl_coef".to_string(), ex.kl_coef),
            ("lr".to_string(), lr),
        ]
        .into_iter()
        .collect(),
    );
    ctx.reporter.progress(
        it,
        Some(s.params.iterations),
        &format!("score {mean_score:.4} kl {mean_kl:.4}"),
    );
}

/// The stage's summary: `last`, the last metrics line, and the tokens
/// sampled, `tokens` of them in `secs` by this run.
pub(super) fn summary(
    s: &Settings,
    last: &Value,
    total_tokens: u64,
    tokens: u64,
    secs: f64,
    norm: Option<&RewardNorm>,
) -> Metrics {
    let mut out = Metrics::new();
    out.insert("iterations".into(), s.params.iterations.into());
    out.insert("final_score".into(), last["score"].clone());
    out.insert("final_kl".into(), last["kl"].clone());
    out.insert("tokens".into(), total_tokens.into());
    out.insert("tokens_per_s".into(), per_second(tokens, secs).into());
    if let Some(nm) = norm {
        out.insert("reward_gain".into(), nm.gain.into());
        out.insert("reward_bias".into(), nm.bias.into());
    }
    out
}
