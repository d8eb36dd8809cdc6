//! Critic-free, group-relative advantages: each prompt is sampled `k` times
//! and a response's advantage is its sequence reward measured against the
//! other responses to the same prompt, so no value model is needed.
//!
//! - GRPO (Shao et al. 2024, DeepSeekMath): `(r_i - mean(r)) / (std(r) + eps)`
//!   over the group, with the *unbiased* standard deviation and `eps = 1e-4`
//!   as TRL's `GRPOTrainer` computes them; without the division
//!   (`scale_std = false`) it is Dr. GRPO's mean-centring (Liu et al. 2025).
//! - RLOO (Ahmadian et al. 2024): `r_i - mean(r_j, j != i)`, the
//!   leave-one-out baseline, which equals `k / (k - 1) * (r_i - mean(r))`.
//!
//! Rows are grouped contiguously: rows `g * k .. (g + 1) * k` are the `k`
//! samples of prompt `g`.

use tch::{Kind, Tensor};

/// Added to the group's standard deviation before dividing (TRL's value).
pub const GROUP_STD_EPS: f64 = 1e-4;

/// How a group's rewards become advantages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupBaseline {
    /// `r_i - mean(group)`, divided by `std(group) + eps` when `scale_std`.
    Grpo { scale_std: bool },
    /// `r_i - mean of the other k - 1 rewards`.
    Rloo,
}

/// Per-sequence advantages of `rewards` grouped by `k` consecutive rows,
/// computed without gradient, in the kind of `rewards`. A group whose
/// rewards are all equal gets zero advantages (never NaN).
///
/// # Shapes
/// - `rewards`: `[b]` with `b` a multiple of `k`, `k >= 2`; returns `[b]`.
///
/// # Panics
/// If `k < 2` or `b` is not a multiple of `k` (the op checks both first).
pub fn group_advantages(rewards: &Tensor, k: i64, baseline: GroupBaseline) -> Tensor {
    let b = rewards.size()[0];
    assert!(k >= 2, "a group needs at least 2 samples, got k = {k}");
    assert_eq!(b % k, 0, "{b} rewards do not split into groups of {k}");
    tch::no_grad(|| {
        let r = rewards.detach().view([b / k, k]);
        let mean = r.mean_dim([1i64].as_slice(), true, r.kind());
        let centred = &r - &mean;
        let adv = match baseline {
            GroupBaseline::Grpo { scale_std: false } => centred,
            GroupBaseline::Grpo { scale_std: true } => {
                // Unbiased, as torch's `std` (TRL).
                let std = r.std_dim([1i64].as_slice(), true, true);
                centred / (std + GROUP_STD_EPS)
            }
            GroupBaseline::Rloo => centred * (k as f64 / (k - 1) as f64),
        };
        // Equal rewards give exactly 0: in float32 their mean and std are
        // off by rounding (a std of 6e-8 for eight 0.7s), which divided
        // by the eps gave the whole group one advantage of about 6e-4.
        adv.masked_fill(&flat_groups(&r), 0.0).view([b])
    })
}

/// `[g, 1]`: whether each group's rewards (`[g, k]`) are all equal.
fn flat_groups(r: &Tensor) -> Tensor {
    r.amax([1i64].as_slice(), true)
        .eq_tensor(&r.amin([1i64].as_slice(), true))
}

/// Mean over groups of each group's (unbiased) reward standard deviation,
/// and the fraction of groups whose rewards are all equal (they carry no
/// learning signal): a diagnostic for the metrics.
///
/// # Shapes
/// - `rewards`: `[b]`, `b` a multiple of `k >= 2`; returns two scalars `[]`.
pub fn group_spread(rewards: &Tensor, k: i64) -> (Tensor, Tensor) {
    tch::no_grad(|| {
        let b = rewards.size()[0];
        let r = rewards.detach().view([b / k, k]);
        let std = r.std_dim([1i64].as_slice(), true, false);
        let flat = flat_groups(&r).to_kind(Kind::Float).mean(Kind::Float);
        (std.mean(r.kind()), flat)
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    // One group [1, 2, 3, 6]: mean 3, deviations [-2, -1, 0, 3], squares
    // sum to 14, unbiased variance 14 / 3, std sqrt(14 / 3) = 2.1602468994692865.
    const STD: f64 = 2.1602468994692865;

    #[test]
    fn grpo_one_group_scales_by_the_unbiased_std() {
        let a = group_advantages(
            &t1(&[1.0, 2.0, 3.0, 6.0]),
            4,
            GroupBaseline::Grpo { scale_std: true },
        );
        let d = STD + 1e-4;
        assert_vec_close(&v(&a), &[-2.0 / d, -1.0 / d, 0.0, 3.0 / d], 1e-12);
        // Written out: [-0.925777..., -0.462888..., 0, 1.388665...].
        assert_vec_close(
            &v(&a),
            &[
                -0.9257772446135025,
                -0.46288862230675126,
                0.0,
                1.3886658669202538,
            ],
            1e-12,
        );
    }

    #[test]
    fn grpo_without_std_scaling_only_centres() {
        let a = group_advantages(
            &t1(&[1.0, 2.0, 3.0, 6.0]),
            4,
            GroupBaseline::Grpo { scale_std: false },
        );
        assert_vec_close(&v(&a), &[-2.0, -1.0, 0.0, 3.0], 1e-12);
    }

    #[test]
    fn rloo_subtracts_the_mean_of_the_others() {
        // 1 - (2+3+6)/3 = -8/3; 2 - 10/3 = -4/3; 3 - 9/3 = 0; 6 - 6/3 = 4.
        let a = group_advantages(&t1(&[1.0, 2.0, 3.0, 6.0]), 4, GroupBaseline::Rloo);
        assert_vec_close(&v(&a), &[-8.0 / 3.0, -4.0 / 3.0, 0.0, 4.0], 1e-12);
    }

    #[test]
    fn two_groups_are_independent() {
        // Groups [1, 2, 3, 6] and [10, 10, 12, 8]: mean 10, deviations
        // [0, 0, 2, -2], unbiased var 8 / 3, std 1.632993161855452.
        let r = t1(&[1.0, 2.0, 3.0, 6.0, 10.0, 10.0, 12.0, 8.0]);
        let s2 = 1.632993161855452 + 1e-4;
        let d = STD + 1e-4;
        let a = group_advantages(&r, 4, GroupBaseline::Grpo { scale_std: true });
        assert_vec_close(
            &v(&a),
            &[
                -2.0 / d,
                -1.0 / d,
                0.0,
                3.0 / d,
                0.0,
                0.0,
                2.0 / s2,
                -2.0 / s2,
            ],
            1e-12,
        );
        let a = group_advantages(&r, 4, GroupBaseline::Rloo);
        // 12 - (10+10+8)/3 = 8/3; 8 - 32/3 = -8/3; 10 - 30/3 = 0.
        assert_vec_close(
            &v(&a),
            &[
                -8.0 / 3.0,
                -4.0 / 3.0,
                0.0,
                4.0,
                0.0,
                0.0,
                8.0 / 3.0,
                -8.0 / 3.0,
            ],
            1e-12,
        );
        // k = 2: [1, 2] -> rloo [-1, 1]; grpo std sqrt(0.5).
        let a = group_advantages(&t1(&[1.0, 2.0]), 2, GroupBaseline::Rloo);
        assert_vec_close(&v(&a), &[-1.0, 1.0], 1e-12);
        let a = group_advantages(&t1(&[1.0, 2.0]), 2, GroupBaseline::Grpo { scale_std: true });
        let h = 0.5 / (0.5f64.sqrt() + 1e-4);
        assert_vec_close(&v(&a), &[-h, h], 1e-12);
    }

    #[test]
    fn equal_rewards_give_zero_advantage_not_nan() {
        let r = t1(&[0.7, 0.7, 0.7, 0.7, 1.0, 2.0, 3.0, 6.0]);
        for baseline in [
            GroupBaseline::Grpo { scale_std: true },
            GroupBaseline::Grpo { scale_std: false },
            GroupBaseline::Rloo,
        ] {
            let a = v(&group_advantages(&r, 4, baseline));
            assert!(a.iter().all(|x| x.is_finite()), "{baseline:?}: {a:?}");
            assert_vec_close(&a[..4], &[0.0; 4], 1e-12);
        }
        // float32, as the op passes them
        let a = group_advantages(
            &t1(&[-3.0, -3.0]).to_kind(Kind::Float),
            2,
            GroupBaseline::Grpo { scale_std: true },
        );
        assert_vec_close(&v(&a), &[0.0, 0.0], 0.0);
        // Eight float32 0.7s: their std is 6.4e-8, not 0, and divided by
        // the eps gave each +6e-4; the group must count as flat too.
        let r = t1(&[0.7; 8]).to_kind(Kind::Float);
        for baseline in [
            GroupBaseline::Grpo { scale_std: true },
            GroupBaseline::Grpo { scale_std: false },
            GroupBaseline::Rloo,
        ] {
            assert_vec_close(&v(&group_advantages(&r, 8, baseline)), &[0.0; 8], 0.0);
        }
        let (_, flat) = group_spread(&r, 8);
        assert_eq!(flat.double_value(&[]), 1.0);
    }

    #[test]
    fn spread_reports_the_mean_group_std_and_the_flat_groups() {
        let r = t1(&[0.7, 0.7, 0.7, 0.7, 1.0, 2.0, 3.0, 6.0]);
        let (std, flat) = group_spread(&r, 4);
        assert_close(s(&std), STD / 2.0, 1e-12);
        assert_close(s(&flat), 0.5, 1e-7);
    }
}
