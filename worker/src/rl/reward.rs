//! Reward shaping (Ziegler et al. 2019 / InstructGPT): a per-token KL penalty
//! `-kl_coef * kl_t` on every response token plus the preference-model score
//! on the last response token of each row.

use tch::{Kind, Tensor};

/// Output of [`shape_rewards`] (all detached).
#[derive(Debug)]
pub struct ShapedRewards {
    /// `[b, t]` per-token rewards fed to GAE; zero where `mask = 0`.
    pub rewards: Tensor,
    /// `[b, t]` the KL part `-kl_coef * kl_t` alone (zero where `mask = 0`);
    /// summed per row it is TRL's `objective/non_score_reward`.
    pub non_score_reward: Tensor,
    /// `[b]` the scores actually added (after the no-EOS penalty).
    pub scores: Tensor,
}

/// Shapes the rewards for PPO.
///
/// `rewards[i, t] = -kl_coef * kl[i, t]` for every response token with
/// `mask = 1`, plus `score_i` on the last token of row `i` with `mask = 1`,
/// where `score_i = scores[i] + no_eos_penalty` if row `i` has no EOS
/// (`has_eos[i]` false/0) and a penalty is given, else `scores[i]`.
/// The penalty is *added*: pass a negative number to penalise truncated
/// responses (TRL's `missing_eos_penalty = p` is `Some(-p)` here).
/// A row whose mask is all zero gets no reward at all.
///
/// # Shapes
/// - `scores`: `[b]` preference-model scores.
/// - `kl`: `[b, t]` per-token KL estimates (see [`super::kl`]).
/// - `mask`: `[b, t]` float 0/1 response mask.
/// - `has_eos`: `[b]` bool or 0/1 (see [`super::contains_eos`]).
/// - returns [`ShapedRewards`]: `rewards` and `non_score_reward` `[b, t]`,
///   `scores` `[b]`, all in the kind of `kl`.
pub fn shape_rewards(
    scores: &Tensor,
    kl: &Tensor,
    mask: &Tensor,
    has_eos: &Tensor,
    kl_coef: f64,
    no_eos_penalty: Option<f64>,
) -> ShapedRewards {
    tch::no_grad(|| {
        let kind = kl.kind();
        let dev = kl.device();
        let kl = kl.detach();
        let m = super::mask_like(&kl, mask);
        let mut sc = scores.detach().to_kind(kind).to_device(dev);
        if let Some(p) = no_eos_penalty {
            let missing = 1.0 - has_eos.to_kind(kind).to_device(dev).ne(0.0).to_kind(kind);
            sc = sc + missing * p;
        }
        let non_score_reward = kl * (-kl_coef) * &m;
        // index of the last position with mask = 1 in each row
        let t = m.size()[1];
        let pos = Tensor::arange(t, (Kind::Int64, dev)).unsqueeze(0);
        let last = (pos * m.gt(0.5).to_kind(Kind::Int64)).argmax(1, true); // [b, 1]
        let one_hot = Tensor::zeros_like(&m).scatter_value(1, &last, 1.0) * &m;
        let rewards = (&non_score_reward + one_hot * sc.unsqueeze(1)) * &m;
        ShapedRewards {
            rewards,
            non_score_reward,
            scores: sc,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn score_on_last_token_kl_per_token_and_penalty() {
        // row 0: 3 valid tokens, has EOS; row 1: 2 valid tokens (truncated, no EOS);
        // row 2: 4 valid tokens, has EOS.
        let kl = t2(
            3,
            4,
            &[0.1, 0.2, 0.3, 9.0, 0.5, -0.5, 9.0, 9.0, 0.0, 0.0, 0.0, 1.0],
        );
        let m = t2(3, 4, &[1., 1., 1., 0., 1., 1., 0., 0., 1., 1., 1., 1.]);
        let scores = t1(&[2.0, 3.0, -1.0]);
        let has_eos = Tensor::from_slice(&[true, false, true]);
        let out = shape_rewards(&scores, &kl, &m, &has_eos, 0.1, Some(-1.0));
        // non-score: -0.1 * kl on valid tokens
        //   row0: [-0.01, -0.02, -0.03, 0]; row1: [-0.05, 0.05, 0, 0]; row2: [0, 0, 0, -0.1]
        assert_vec_close(
            &v(&out.non_score_reward),
            &[
                -0.01, -0.02, -0.03, 0.0, -0.05, 0.05, 0.0, 0.0, 0.0, 0.0, 0.0, -0.1,
            ],
            1e-12,
        );
        // scores: row1 has no EOS -> 3 + (-1) = 2
        assert_vec_close(&v(&out.scores), &[2.0, 2.0, -1.0], 1e-12);
        // rewards: score added on the last valid token
        //   row0: [-0.01, -0.02, -0.03 + 2 = 1.97, 0]
        //   row1: [-0.05, 0.05 + 2 = 2.05, 0, 0]
        //   row2: [0, 0, 0, -0.1 - 1 = -1.1]
        assert_vec_close(
            &v(&out.rewards),
            &[
                -0.01, -0.02, 1.97, 0.0, -0.05, 2.05, 0.0, 0.0, 0.0, 0.0, 0.0, -1.1,
            ],
            1e-12,
        );
    }

    #[test]
    fn no_penalty_and_float_has_eos() {
        let kl = t2(2, 2, &[1.0, 1.0, 1.0, 1.0]);
        let m = t2(2, 2, &[1.0, 0.0, 0.0, 0.0]); // row 1 fully masked: no reward
        let out = shape_rewards(&t1(&[5.0, 7.0]), &kl, &m, &t1(&[0.0, 0.0]), 0.5, None);
        assert_vec_close(&v(&out.scores), &[5.0, 7.0], 1e-12);
        // row0: -0.5 + 5 = 4.5
        assert_vec_close(&v(&out.rewards), &[4.5, 0.0, 0.0, 0.0], 1e-12);
    }
}
