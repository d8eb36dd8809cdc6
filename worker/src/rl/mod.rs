//! Core math of PPO for language models (RLHF / RLAIF), following OpenAI's
//! `lm-human-preferences` / InstructGPT recipe as TRL's PPO trainer and
//! OpenRLHF implement it.
//!
//! Conventions used throughout:
//! - `b` is the batch size (rows), `t` the number of *response* tokens.
//! - Per-token quantities (log-probs, values, rewards, advantages) are `[b, t]`.
//! - Masks are float 0/1 tensors `[b, t]` over response tokens (1 = a real
//!   response token, up to and including the first EOS; 0 = after it / padding).
//!   A mask of any kind is accepted; it is converted to the kind of the data.
//!
//! Modules:
//! - [`kl`]: per-token KL estimators (k1, k2, k3).
//! - [`reward`]: reward shaping (per-token KL penalty + score on the last token).
//! - [`gae`]: generalized advantage estimation.
//! - [`whiten`]: masked whitening.
//! - [`loss`]: clipped policy / value losses, entropy, explained variance.
//! - [`kl_ctl`]: fixed and adaptive KL coefficient controllers.
//! - [`eos_mask`]: response mask from generated token ids.
//! - [`reward_norm`]: normalising scores against reference samples.
//! - [`contrastive`]: contrastive rewards (score minus a per-prompt baseline).
//! - [`rating`]: direct RLAIF, the expected 1-10 rating of a feedback model.
//! - [`group`]: critic-free group-relative advantages (GRPO, RLOO).

pub mod contrastive;
pub mod eos_mask;
pub mod gae;
pub mod group;
pub mod kl;
pub mod kl_ctl;
pub mod loss;
pub mod rating;
pub mod reward;
pub mod reward_norm;
pub mod whiten;

pub use contrastive::{baseline_mean, contrastive_scores};
pub use eos_mask::{contains_eos, response_mask};
pub use gae::{compute_gae, GaeConfig};
pub use group::{group_advantages, group_spread, GroupBaseline, GROUP_STD_EPS};
pub use kl::{kl_k1, kl_k2, kl_k3, kl_per_token, mean_sequence_kl, mean_token_kl, KlEstimator};
pub use kl_ctl::KlController;
pub use loss::{
    entropy_from_log_probs, entropy_from_logits, explained_variance, masked_entropy, policy_loss,
    value_loss, PolicyLoss, ValueLoss,
};
pub use rating::{expected_rating, rating_continuation, rating_prompt, rating_reward};
pub use reward::{shape_rewards, ShapedRewards};
pub use reward_norm::RewardNorm;
pub use whiten::{masked_whiten, WHITEN_EPS};

use tch::Tensor;

/// `mask` converted to the kind and device of `x` (float 0/1).
///
/// # Shapes
/// - `x`: any; `mask`: any; returns the shape of `mask`.
pub fn mask_like(x: &Tensor, mask: &Tensor) -> Tensor {
    let m = mask.to_kind(x.kind());
    m.to_device(x.device())
}

/// Sum of `x * mask` over all elements (`dim = None`) or along `dim`.
///
/// # Shapes
/// - `x`, `mask`: `[b, t]` (any matching shapes).
/// - returns a scalar `[]` (`dim = None`) or `x` with `dim` removed.
pub fn masked_sum(x: &Tensor, mask: &Tensor, dim: Option<i64>) -> Tensor {
    let m = mask_like(x, mask);
    let xm = x * &m;
    match dim {
        None => xm.sum(x.kind()),
        Some(d) => xm.sum_dim_intlist([d].as_slice(), false, x.kind()),
    }
}

/// Mean of `x` over the entries where `mask = 1` (all elements when
/// `dim = None`, else along `dim`). NaN where the mask is all zero.
///
/// # Shapes
/// - `x`, `mask`: `[b, t]`.
/// - returns a scalar `[]` (`dim = None`) or `x` with `dim` removed.
pub fn masked_mean(x: &Tensor, mask: &Tensor, dim: Option<i64>) -> Tensor {
    let m = mask_like(x, mask);
    let s = masked_sum(x, &m, dim);
    let n = match dim {
        None => m.sum(x.kind()),
        Some(d) => m.sum_dim_intlist([d].as_slice(), false, x.kind()),
    };
    s / n
}

/// Variance of `x` over the entries where `mask = 1` (all elements).
/// With `unbiased = true` the Bessel correction `n / (n - 1)` is applied, as
/// TRL's `masked_var` does (skipped when `n <= 1`).
///
/// # Shapes
/// - `x`, `mask`: `[b, t]`; returns a scalar `[]`.
pub fn masked_var(x: &Tensor, mask: &Tensor, unbiased: bool) -> Tensor {
    let m = mask_like(x, mask);
    let mean = masked_mean(x, &m, None);
    let centered = x - &mean;
    let var = masked_mean(&(&centered * &centered), &m, None);
    if unbiased {
        let n = m.sum(x.kind());
        let denom = (&n - 1.0).clamp_min(1.0);
        let bessel = (&n / denom).clamp_min(1.0);
        var * bessel
    } else {
        var
    }
}

#[cfg(test)]
pub(crate) mod test_util {
    use tch::{Kind, Tensor};

    /// f64 tensor `[rows, cols]` from row-major data.
    pub fn t2(rows: i64, cols: i64, data: &[f64]) -> Tensor {
        assert_eq!(data.len() as i64, rows * cols);
        Tensor::from_slice(data).view([rows, cols])
    }

    /// f64 tensor `[n]`.
    pub fn t1(data: &[f64]) -> Tensor {
        Tensor::from_slice(data)
    }

    /// Flattened values as f64.
    pub fn v(x: &Tensor) -> Vec<f64> {
        Vec::<f64>::try_from(&x.to_kind(Kind::Double).flatten(0, -1)).unwrap()
    }

    /// Scalar value as f64.
    pub fn s(x: &Tensor) -> f64 {
        x.to_kind(Kind::Double).double_value(&[])
    }

    pub fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol || (a.is_nan() && b.is_nan())
    }

    #[track_caller]
    pub fn assert_close(got: f64, want: f64, tol: f64) {
        assert!(close(got, want, tol), "got {got}, want {want} (tol {tol})");
    }

    #[track_caller]
    pub fn assert_vec_close(got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len(), "length: got {got:?}, want {want:?}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                close(*g, *w, tol),
                "index {i}: got {got:?}, want {want:?} (tol {tol})"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_util::*;
    use super::*;

    #[test]
    fn masked_mean_sum_var() {
        let x = t2(2, 3, &[1.0, 2.0, 100.0, 3.0, 4.0, 5.0]);
        let m = t2(2, 3, &[1.0, 1.0, 0.0, 1.0, 1.0, 1.0]);
        // masked entries: 1, 2, 3, 4, 5 -> sum 15, mean 3
        assert_close(s(&masked_sum(&x, &m, None)), 15.0, 1e-12);
        assert_close(s(&masked_mean(&x, &m, None)), 3.0, 1e-12);
        // per row: (1+2)/2 = 1.5, (3+4+5)/3 = 4
        assert_vec_close(&v(&masked_mean(&x, &m, Some(1))), &[1.5, 4.0], 1e-12);
        // biased var: (4+1+0+1+4)/5 = 2; unbiased: 10/4 = 2.5
        assert_close(s(&masked_var(&x, &m, false)), 2.0, 1e-12);
        assert_close(s(&masked_var(&x, &m, true)), 2.5, 1e-12);
        // bool mask accepted
        let mb = m.to_kind(tch::Kind::Bool);
        assert_close(s(&masked_mean(&x, &mb, None)), 3.0, 1e-12);
    }
}
