//! Generalized advantage estimation (Schulman et al. 2015) over masked
//! response sequences, as in TRL's PPO trainer.

use serde::{Deserialize, Serialize};
use tch::Tensor;

/// GAE discount `gamma` and trace decay `lam` (defaults 1.0 and 0.95, the
/// InstructGPT / TRL settings).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GaeConfig {
    pub gamma: f64,
    pub lam: f64,
}

impl Default for GaeConfig {
    fn default() -> Self {
        GaeConfig {
            gamma: 1.0,
            lam: 0.95,
        }
    }
}

/// Advantages and returns by GAE, computed without gradient.
///
/// Backward over `t`, with `V_T = 0`, `m_T = 0`, values and rewards zeroed
/// where `mask = 0`:
/// `delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t`,
/// `A_t = delta_t + gamma * lam * A_{t+1} * m_{t+1}`,
/// `returns = A + V`. Both outputs are zero where `mask = 0` (after the last
/// valid token, i.e. after EOS), so nothing past a row's end leaks into it.
///
/// # Shapes
/// - `values`, `rewards`, `mask`: `[b, t]`.
/// - returns `(advantages, returns)`, both `[b, t]` in the kind of `values`.
pub fn compute_gae(
    values: &Tensor,
    rewards: &Tensor,
    mask: &Tensor,
    cfg: &GaeConfig,
) -> (Tensor, Tensor) {
    tch::no_grad(|| {
        let values = values.detach();
        let m = super::mask_like(&values, mask);
        let v = &values * &m;
        let r = rewards
            .detach()
            .to_kind(values.kind())
            .to_device(values.device())
            * &m;
        let t_len = values.size()[1];
        let mut last = v.select(1, 0).zeros_like(); // A_{t+1}, [b]
        let mut advs: Vec<Tensor> = Vec::with_capacity(t_len as usize);
        for t in (0..t_len).rev() {
            let v_t = v.select(1, t);
            let r_t = r.select(1, t);
            let (next_v, next_m) = if t + 1 < t_len {
                (v.select(1, t + 1), m.select(1, t + 1))
            } else {
                (v_t.zeros_like(), v_t.zeros_like())
            };
            let delta = r_t + &next_v * &next_m * cfg.gamma - &v_t;
            last = delta + &last * &next_m * (cfg.gamma * cfg.lam);
            advs.push(last.shallow_clone());
        }
        advs.reverse();
        let adv = Tensor::stack(&advs, 1) * &m;
        let ret = (&adv + &v) * &m;
        (adv, ret)
    })
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    #[test]
    fn defaults() {
        let c = GaeConfig::default();
        assert_eq!((c.gamma, c.lam), (1.0, 0.95));
    }

    #[test]
    fn three_tokens_gamma_one() {
        // V = [0.5, 1.0, 1.5], r = [0, 0, 1], gamma = 1, lam = 0.95
        // t2: delta = 1 - 1.5 = -0.5                     A2 = -0.5
        // t1: delta = 0 + 1.5 - 1.0 = 0.5                A1 = 0.5 + 0.95*(-0.5) = 0.025
        // t0: delta = 0 + 1.0 - 0.5 = 0.5                A0 = 0.5 + 0.95*0.025 = 0.52375
        // returns = A + V = [1.02375, 1.025, 1.0]
        let vals = t2(1, 3, &[0.5, 1.0, 1.5]);
        let rew = t2(1, 3, &[0.0, 0.0, 1.0]);
        let m = t2(1, 3, &[1.0, 1.0, 1.0]);
        let (a, r) = compute_gae(&vals, &rew, &m, &GaeConfig::default());
        assert_vec_close(&v(&a), &[0.52375, 0.025, -0.5], 1e-12);
        assert_vec_close(&v(&r), &[1.02375, 1.025, 1.0], 1e-12);
    }

    #[test]
    fn three_tokens_gamma_below_one() {
        // gamma = 0.9, lam = 0.5 (gamma*lam = 0.45)
        // t2: delta = 1 - 1.5 = -0.5                     A2 = -0.5
        // t1: delta = 0.9*1.5 - 1.0 = 0.35               A1 = 0.35 + 0.45*(-0.5) = 0.125
        // t0: delta = 0.9*1.0 - 0.5 = 0.4                A0 = 0.4 + 0.45*0.125 = 0.45625
        // returns = [0.95625, 1.125, 1.0]
        let vals = t2(1, 3, &[0.5, 1.0, 1.5]);
        let rew = t2(1, 3, &[0.0, 0.0, 1.0]);
        let m = t2(1, 3, &[1.0, 1.0, 1.0]);
        let (a, r) = compute_gae(
            &vals,
            &rew,
            &m,
            &GaeConfig {
                gamma: 0.9,
                lam: 0.5,
            },
        );
        assert_vec_close(&v(&a), &[0.45625, 0.125, -0.5], 1e-12);
        assert_vec_close(&v(&r), &[0.95625, 1.125, 1.0], 1e-12);
    }

    #[test]
    fn masked_tail_is_ignored_and_zeroed() {
        // row 0: as above plus a masked 4th token with junk value/reward.
        // row 1: 2 valid tokens, V = [2, 1], r = [0.5, -1], gamma 1, lam 0.95
        //   t1: delta = -1 - 1 = -2                      A1 = -2
        //   t0: delta = 0.5 + 1 - 2 = -0.5               A0 = -0.5 + 0.95*(-2) = -2.4
        //   returns = [-0.4, -1.0]
        let vals = t2(2, 4, &[0.5, 1.0, 1.5, 7.0, 2.0, 1.0, 9.0, 9.0]);
        let rew = t2(2, 4, &[0.0, 0.0, 1.0, 5.0, 0.5, -1.0, 9.0, 9.0]);
        let m = t2(2, 4, &[1., 1., 1., 0., 1., 1., 0., 0.]);
        let (a, r) = compute_gae(&vals, &rew, &m, &GaeConfig::default());
        assert_vec_close(
            &v(&a),
            &[0.52375, 0.025, -0.5, 0.0, -2.4, -2.0, 0.0, 0.0],
            1e-12,
        );
        assert_vec_close(
            &v(&r),
            &[1.02375, 1.025, 1.0, 0.0, -0.4, -1.0, 0.0, 0.0],
            1e-12,
        );
    }

    #[test]
    fn no_gradient() {
        let vals = t2(1, 2, &[0.5, 1.0]).set_requires_grad(true);
        let (a, r) = compute_gae(
            &vals,
            &t2(1, 2, &[0.0, 1.0]),
            &t2(1, 2, &[1.0, 1.0]),
            &GaeConfig::default(),
        );
        assert!(!a.requires_grad() && !r.requires_grad());
    }
}
