//! Contrastive rewards (Shen et al. 2024): the reward of a response is its
//! preference-model score minus the mean score of `k` baseline responses of
//! the starting policy to the same prompt (computed offline by the
//! `baseline_scores` op). The baseline calibrates the PM per prompt: easy
//! prompts that every answer scores well on stop dominating the update.
//!
//! With reward normalisation (`gain * s + bias`) both sides are mapped, so
//! the bias cancels: `gain * (s - baseline)`.

use tch::{Kind, Tensor};

use super::RewardNorm;

/// The mean of one prompt's baseline scores; `None` for none (or a
/// non-finite one).
pub fn baseline_mean(scores: &[f64]) -> Option<f64> {
    if scores.is_empty() || scores.iter().any(|s| !s.is_finite()) {
        return None;
    }
    Some(scores.iter().sum::<f64>() / scores.len() as f64)
}

/// Contrastive scores: `scores - norm(baseline)`, `norm` the identity
/// without reward normalisation.
///
/// # Shapes
/// `scores`: `[b]` (already normalised when `norm` is given),
/// `baseline`: `b` raw mean baseline scores -> `[b]` float32.
pub fn contrastive_scores(scores: &Tensor, baseline: &[f64], norm: Option<&RewardNorm>) -> Tensor {
    assert_eq!(
        scores.size(),
        [baseline.len() as i64],
        "one baseline per score"
    );
    let mapped: Vec<f64> = baseline
        .iter()
        .map(|b| match norm {
            Some(n) => n.gain * b + n.bias,
            None => *b,
        })
        .collect();
    let base = Tensor::from_slice(&mapped).to_device(scores.device());
    (scores.to_kind(Kind::Double) - base).to_kind(Kind::Float)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rl::test_util::{assert_close, assert_vec_close, t1, v};

    #[test]
    fn the_baseline_mean_is_the_plain_mean() {
        assert_close(baseline_mean(&[1.0, 2.0, 6.0]).unwrap(), 3.0, 1e-12);
        assert_eq!(baseline_mean(&[]), None);
        assert_eq!(baseline_mean(&[1.0, f64::NAN]), None);
    }

    #[test]
    fn scores_minus_their_prompt_baselines() {
        let s = t1(&[1.5, -0.5, 2.0]);
        let got = contrastive_scores(&s, &[1.0, -1.0, 3.0], None);
        assert_eq!(got.kind(), Kind::Float);
        assert_vec_close(&v(&got), &[0.5, 0.5, -1.0], 1e-6);
    }

    #[test]
    fn with_normalisation_the_bias_cancels() {
        // Raw 3 and 1 against baselines 1 and 2; gain 2, bias 5: normalised
        // scores 11 and 7, baselines 7 and 9 -> 4 and -2 = 2 * (raw - base).
        let norm = RewardNorm {
            gain: 2.0,
            bias: 5.0,
        };
        let s = t1(&[3.0, 1.0]) * 2.0 + 5.0;
        let got = contrastive_scores(&s, &[1.0, 2.0], Some(&norm));
        assert_vec_close(&v(&got), &[4.0, -2.0], 1e-6);
    }
}
