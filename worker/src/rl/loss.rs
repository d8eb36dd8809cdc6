//! PPO losses and metrics: clipped surrogate policy loss, clipped value loss,
//! entropy from logits and explained variance (all masked).

use tch::{Kind, Tensor};

use super::{mask_like, masked_mean, masked_var};

/// Default policy ratio clip range `eps` (`cliprange` in TRL).
pub const DEFAULT_CLIP_EPS: f64 = 0.2;
/// Default value clip range `c` (`cliprange_value` in TRL).
pub const DEFAULT_VALUE_CLIP: f64 = 0.2;

/// Output of [`policy_loss`].
#[derive(Debug)]
pub struct PolicyLoss {
    /// `[]` loss to minimise (carries the gradient of `logp`).
    pub loss: Tensor,
    /// `[]` fraction of masked tokens where the clipped term was active
    /// (`-A * clip(ratio) > -A * ratio`), detached.
    pub clip_frac: Tensor,
    /// `[]` `0.5 * mean((logp - old_logp)^2)` over masked tokens, detached.
    pub approx_kl: Tensor,
}

/// Clipped surrogate policy loss (PPO), masked mean over tokens:
/// `ratio = exp(logp - old_logp)`,
/// `loss = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))`.
///
/// # Shapes
/// - `logp`: `[b, t]` log-probs of the sampled tokens under the current policy
///   (with gradient); `old_logp`: `[b, t]` the same at rollout time.
/// - `advantages`, `mask`: `[b, t]`.
/// - returns [`PolicyLoss`] of scalars `[]`.
pub fn policy_loss(
    logp: &Tensor,
    old_logp: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    clip_eps: f64,
) -> PolicyLoss {
    let m = mask_like(logp, mask);
    let old = old_logp.detach();
    let adv = advantages.detach();
    let log_ratio = logp - &old;
    let ratio = log_ratio.exp();
    let pg1 = -&adv * &ratio;
    let pg2 = -&adv * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps);
    let loss = masked_mean(&pg1.maximum(&pg2), &m, None);
    let (clip_frac, approx_kl) = tch::no_grad(|| {
        let cf = masked_mean(&pg2.gt_tensor(&pg1).to_kind(logp.kind()), &m, None);
        let lr = log_ratio.detach();
        let ak = masked_mean(&(&lr * &lr), &m, None) * 0.5;
        (cf, ak)
    });
    PolicyLoss {
        loss,
        clip_frac,
        approx_kl,
    }
}

/// Output of [`value_loss`].
#[derive(Debug)]
pub struct ValueLoss {
    /// `[]` loss to minimise (carries the gradient of `values`).
    pub loss: Tensor,
    /// `[]` fraction of masked tokens where the clipped term was larger, detached.
    pub clip_frac: Tensor,
}

/// Clipped value loss, masked mean over tokens:
/// `0.5 * mean(max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2))`.
///
/// # Shapes
/// - `values`: `[b, t]` current value predictions (with gradient).
/// - `old_values`: `[b, t]` values at rollout time; `returns`, `mask`: `[b, t]`.
/// - returns [`ValueLoss`] of scalars `[]`.
pub fn value_loss(
    values: &Tensor,
    old_values: &Tensor,
    returns: &Tensor,
    mask: &Tensor,
    clip_value: f64,
) -> ValueLoss {
    let m = mask_like(values, mask);
    let old = old_values.detach();
    let ret = returns.detach();
    let clipped = values
        .maximum(&(&old - clip_value))
        .minimum(&(&old + clip_value));
    let d1 = values - &ret;
    let d2 = clipped - &ret;
    let l1 = &d1 * &d1;
    let l2 = &d2 * &d2;
    let loss = masked_mean(&l1.maximum(&l2), &m, None) * 0.5;
    let clip_frac =
        tch::no_grad(|| masked_mean(&l2.gt_tensor(&l1).to_kind(values.kind()), &m, None));
    ValueLoss { loss, clip_frac }
}

/// Per-token entropy of the categorical distribution given by `logits`.
///
/// # Shapes
/// - `logits`: `[b, t, v]`; returns `[b, t]`.
pub fn entropy_from_logits(logits: &Tensor) -> Tensor {
    entropy_from_log_probs(&logits.log_softmax(-1, logits.kind()))
}

/// Per-token entropy `-sum(p * log p)` from log-probabilities (a
/// `log_softmax`, which PPO's loss has computed already), with
/// `0 * log 0 = 0` for tokens of probability 0.
///
/// # Shapes
/// - `logp`: `[b, t, v]`; returns `[b, t]`.
pub fn entropy_from_log_probs(logp: &Tensor) -> Tensor {
    // -inf log-probs (masked tokens) would give 0 * -inf = NaN; any finite
    // stand-in gives the 0 their probability contributes.
    let finite = logp.clamp_min(-1e30);
    -(logp.exp() * finite).sum_dim_intlist([-1i64].as_slice(), false, logp.kind())
}

/// Masked mean of [`entropy_from_log_probs`].
///
/// # Shapes
/// - `logp`: `[b, t, v]`; `mask`: `[b, t]`; returns `[]`.
pub fn masked_entropy(logp: &Tensor, mask: &Tensor) -> Tensor {
    masked_mean(&entropy_from_log_probs(logp), mask, None)
}

/// Explained variance of the value head, `1 - var(R - V) / var(R)` over the
/// masked tokens (detached; NaN when `var(R) = 0`).
///
/// # Shapes
/// - `values`, `returns`, `mask`: `[b, t]`; returns `[]`.
pub fn explained_variance(values: &Tensor, returns: &Tensor, mask: &Tensor) -> Tensor {
    tch::no_grad(|| {
        let v = values.detach().to_kind(Kind::Double);
        let r = returns.detach().to_kind(Kind::Double);
        let m = mask_like(&v, mask);
        let ratio: Tensor = masked_var(&(&r - &v), &m, false) / masked_var(&r, &m, false);
        let ev: Tensor = 1.0 - ratio;
        ev.to_kind(values.kind())
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn clipped_policy_loss_both_signs_and_clip_frac() {
        // eps = 0.2, clip range [0.8, 1.2]
        //   tok  A   ratio  -A*r   -A*clip(r)  max   clipped?
        //   0   +1   1.1    -1.1   -1.1        -1.1  no (inside)
        //   1   +1   1.5    -1.5   -1.2        -1.2  yes
        //   2   -1   1.5     1.5    1.2         1.5  no
        //   3   -2   0.5     1.0    1.6         1.6  yes
        //   4   +2   0.5    -1.0   -1.6        -1.0  no
        //   5   masked (junk)
        // loss = (-1.1 - 1.2 + 1.5 + 1.6 - 1.0) / 5 = -0.04; clip_frac = 2/5
        // approx_kl = 0.5 * mean(ln(r)^2)
        //   = 0.5 * (0.009084030374332749 + 2*0.16440195389316542 + 2*0.4804530139182014) / 5
        //   = 0.12987939659970663
        let old = t2(1, 6, &[-1.0, -2.0, -0.5, -1.5, -3.0, -1.0]);
        let ratios = [1.1f64, 1.5, 1.5, 0.5, 0.5, 3.0];
        let lr: Vec<f64> = ratios.iter().map(|r| r.ln()).collect();
        let logp = (&old + t2(1, 6, &lr)).set_requires_grad(true);
        let adv = t2(1, 6, &[1.0, 1.0, -1.0, -2.0, 2.0, 100.0]);
        let m = t2(1, 6, &[1., 1., 1., 1., 1., 0.]);
        let out = policy_loss(&logp, &old, &adv, &m, DEFAULT_CLIP_EPS);
        assert_close(s(&out.loss), -0.04, 1e-12);
        assert_close(s(&out.clip_frac), 0.4, 1e-12);
        assert_close(s(&out.approx_kl), 0.12987939659970663, 1e-12);
        assert!(!out.clip_frac.requires_grad() && !out.approx_kl.requires_grad());
        // d loss / d logp = -A * ratio / 5 where unclipped, 0 where clipped or masked
        //   = [-0.22, 0, 0.3, 0, -0.2, 0]
        out.loss.backward();
        assert_vec_close(&v(&logp.grad()), &[-0.22, 0.0, 0.3, 0.0, -0.2, 0.0], 1e-12);
    }

    #[test]
    fn clipped_value_loss_and_clip_frac() {
        // c = 0.2, V_old = 1 everywhere -> clip(V) in [0.8, 1.2]
        //   tok  V    R   (V-R)^2  clip(V)  (clip-R)^2  max   clipped?
        //   0   1.1   2   0.81     1.1      0.81        0.81  no
        //   1   1.5   2   0.25     1.2      0.64        0.64  yes
        //   2   0.5   2   2.25     0.8      1.44        2.25  no
        //   3   1.5   0   2.25     1.2      1.44        2.25  no
        //   4   0.5   0   0.25     0.8      0.64        0.64  yes
        //   5   masked
        // loss = 0.5 * (0.81 + 0.64 + 2.25 + 2.25 + 0.64) / 5 = 0.5 * 1.318 = 0.659
        let vals = t2(1, 6, &[1.1, 1.5, 0.5, 1.5, 0.5, 50.0]).set_requires_grad(true);
        let old = t2(1, 6, &[1.0; 6]);
        let ret = t2(1, 6, &[2.0, 2.0, 2.0, 0.0, 0.0, 0.0]);
        let m = t2(1, 6, &[1., 1., 1., 1., 1., 0.]);
        let out = value_loss(&vals, &old, &ret, &m, DEFAULT_VALUE_CLIP);
        assert_close(s(&out.loss), 0.659, 1e-12);
        assert_close(s(&out.clip_frac), 0.4, 1e-12);
        // grad = 0.5 * 2 * (V - R) / 5 on unclipped tokens: [-0.18, 0, -0.3, 0.3, 0, 0]
        out.loss.backward();
        assert_vec_close(&v(&vals.grad()), &[-0.18, 0.0, -0.3, 0.3, 0.0, 0.0], 1e-12);
    }

    #[test]
    fn entropy_values() {
        // [0, 0]      -> ln 2 = 0.6931471805599453
        // [0, ln 3]   -> p = [0.25, 0.75]: 0.25*ln 4 + 0.75*ln(4/3)
        //             = 0.34657359027997264 + 0.21576155433883568 = 0.5623351446188083
        // [100, 0]    -> masked
        let logits = Tensor::from_slice(&[0.0f64, 0.0, 0.0, 3f64.ln(), 100.0, 0.0]).view([1, 3, 2]);
        let h = entropy_from_logits(&logits);
        assert_eq!(h.size(), vec![1, 3]);
        let hv = v(&h);
        assert_close(hv[0], std::f64::consts::LN_2, 1e-12);
        assert_close(hv[1], 0.5623351446188083, 1e-12);
        let m = t2(1, 3, &[1.0, 1.0, 0.0]);
        // (0.6931471805599453 + 0.5623351446188083) / 2
        let logp = logits.log_softmax(-1, Kind::Double);
        assert_close(s(&masked_entropy(&logp, &m)), 0.6277411625893768, 1e-12);
        // A token of probability 0 adds nothing (not NaN).
        let with_zero = Tensor::from_slice(&[0.0f64, 0.0, f64::NEG_INFINITY]).view([1, 1, 3]);
        assert_close(
            v(&entropy_from_logits(&with_zero))[0],
            std::f64::consts::LN_2,
            1e-12,
        );
    }

    #[test]
    fn explained_variance_value() {
        // R = [1, 2, 3, 4], V = [1, 2, 2, 5] (5th masked)
        // R - V = [0, 0, 1, -1]: var = 0.5; var(R) = 1.25 -> 1 - 0.4 = 0.6
        let r = t2(1, 5, &[1.0, 2.0, 3.0, 4.0, 100.0]);
        let vals = t2(1, 5, &[1.0, 2.0, 2.0, 5.0, -100.0]);
        let m = t2(1, 5, &[1., 1., 1., 1., 0.]);
        assert_close(s(&explained_variance(&vals, &r, &m)), 0.6, 1e-12);
        // perfect value head -> 1
        assert_close(s(&explained_variance(&r, &r, &m)), 1.0, 1e-12);
    }
}
