//! Per-token KL estimators between the policy and the reference model,
//! computed from the log-probs of the sampled tokens (Schulman, "Approximating
//! KL Divergence", 2020). With `log r = logp_ref - logp` and samples drawn
//! from the policy, each estimates `KL(policy || ref)` per token.

use serde::{Deserialize, Serialize};
use tch::Tensor;

use alignflow_ops::PpoKlEstimator;

/// Which per-token KL estimator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KlEstimator {
    /// `k1 = logp - logp_ref` (unbiased, can be negative; TRL's default).
    #[default]
    K1,
    /// `k2 = 0.5 * (logp - logp_ref)^2` (biased, non-negative, low variance).
    K2,
    /// `k3 = (r - 1) - log r`, `r = exp(logp_ref - logp)` (unbiased, non-negative).
    K3,
}

/// `ppo`'s `params.kl_estimator`.
impl From<PpoKlEstimator> for KlEstimator {
    fn from(e: PpoKlEstimator) -> Self {
        match e {
            PpoKlEstimator::K1 => KlEstimator::K1,
            PpoKlEstimator::K2 => KlEstimator::K2,
            PpoKlEstimator::K3 => KlEstimator::K3,
        }
    }
}

/// `k1 = logp - logp_ref`.
///
/// # Shapes
/// - `logp`, `logp_ref`: `[b, t]` log-probs of the sampled tokens.
/// - returns `[b, t]`.
pub fn kl_k1(logp: &Tensor, logp_ref: &Tensor) -> Tensor {
    logp - logp_ref
}

/// `k2 = 0.5 * (logp - logp_ref)^2`.
///
/// # Shapes
/// - `logp`, `logp_ref`: `[b, t]`; returns `[b, t]`.
pub fn kl_k2(logp: &Tensor, logp_ref: &Tensor) -> Tensor {
    let d = logp - logp_ref;
    (&d * &d) * 0.5
}

/// Schulman's `k3 = (r - 1) - log r` with `r = exp(logp_ref - logp)`;
/// non-negative, zero iff `logp == logp_ref`. `r - 1` is `expm1`: in
/// float32, `exp(x) - 1` loses the digits that k3 (about x²/2) is made
/// of when x is small, and comes out negative.
///
/// # Shapes
/// - `logp`, `logp_ref`: `[b, t]`; returns `[b, t]`.
pub fn kl_k3(logp: &Tensor, logp_ref: &Tensor) -> Tensor {
    let log_r = logp_ref - logp;
    log_r.expm1() - log_r
}

/// The chosen estimator, per token.
///
/// # Shapes
/// - `logp`, `logp_ref`: `[b, t]`; returns `[b, t]`.
pub fn kl_per_token(logp: &Tensor, logp_ref: &Tensor, est: KlEstimator) -> Tensor {
    match est {
        KlEstimator::K1 => kl_k1(logp, logp_ref),
        KlEstimator::K2 => kl_k2(logp, logp_ref),
        KlEstimator::K3 => kl_k3(logp, logp_ref),
    }
}

/// Sequence-level KL metric as TRL reports it (`objective/kl`): the per-token
/// KL summed over the masked response tokens of each row, then averaged over
/// rows.
///
/// # Shapes
/// - `kl`, `mask`: `[b, t]`; returns a scalar `[]`.
pub fn mean_sequence_kl(kl: &Tensor, mask: &Tensor) -> Tensor {
    super::masked_sum(kl, mask, Some(1)).mean(kl.kind())
}

/// Token-level KL metric: mean of the per-token KL over masked tokens.
///
/// # Shapes
/// - `kl`, `mask`: `[b, t]`; returns a scalar `[]`.
pub fn mean_token_kl(kl: &Tensor, mask: &Tensor) -> Tensor {
    super::masked_mean(kl, mask, None)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn k1_k2_k3_values() {
        // logp = [-1, -2, -0.5], logp_ref = [-1.5, -1, -0.5]
        let lp = t2(1, 3, &[-1.0, -2.0, -0.5]);
        let lr = t2(1, 3, &[-1.5, -1.0, -0.5]);
        // k1 = logp - logp_ref = [0.5, -1, 0]
        assert_vec_close(&v(&kl_k1(&lp, &lr)), &[0.5, -1.0, 0.0], 1e-12);
        // k2 = 0.5 * d^2 = [0.125, 0.5, 0]
        assert_vec_close(&v(&kl_k2(&lp, &lr)), &[0.125, 0.5, 0.0], 1e-12);
        // k3: log r = logp_ref - logp = [-0.5, 1, 0]
        //   t0: e^-0.5 - 1 + 0.5 = 0.6065306597126334 - 0.5 = 0.10653065971263342
        //   t1: e^1 - 1 - 1     = 2.718281828459045 - 2   = 0.7182818284590451
        //   t2: 0
        let k3 = v(&kl_k3(&lp, &lr));
        assert_vec_close(&k3, &[0.10653065971263342, 0.7182818284590451, 0.0], 1e-12);
        assert!(k3.iter().all(|&x| x >= 0.0));
        assert_vec_close(&v(&kl_per_token(&lp, &lr, KlEstimator::K3)), &k3, 0.0);
        // Tiny log-ratios in float32, as the op has them: k3 ~ x²/2 stays
        // positive and right (exp(x) - 1 gave +1.7e-8 and -5.1e-8).
        let lp = t2(1, 2, &[-1e-4, -5e-5]).to_kind(tch::Kind::Float);
        let zero = lp.zeros_like();
        let k3 = v(&kl_k3(&lp, &zero));
        assert!(k3.iter().all(|&x| x >= 0.0), "{k3:?}");
        assert_vec_close(&k3, &[5.0e-9, 1.25e-9], 5e-11);
    }

    #[test]
    fn kl_metrics_masked() {
        let kl = t2(2, 3, &[0.5, -1.0, 9.0, 1.0, 2.0, 3.0]);
        let m = t2(2, 3, &[1.0, 1.0, 0.0, 1.0, 1.0, 1.0]);
        // row sums: -0.5 and 6 -> mean 2.75
        assert_close(s(&mean_sequence_kl(&kl, &m)), 2.75, 1e-12);
        // token mean: 5.5 / 5 = 1.1
        assert_close(s(&mean_token_kl(&kl, &m)), 1.1, 1e-12);
    }
}
