//! Reward normalisation against reference samples (Ziegler et al. 2019,
//! `lm-human-preferences`): before training, score responses sampled from
//! the reference policy, then map every later score through the affine map
//! `gain * score + bias` that gives those reference scores a chosen mean and
//! standard deviation. The map is fixed for the whole run, so the scale of
//! the reward (and of the KL penalty against it) does not depend on the
//! preference model's arbitrary offset and spread.

use serde::{Deserialize, Serialize};

/// The affine map applied to every preference-model score.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RewardNorm {
    /// Multiplies the raw score.
    pub gain: f64,
    /// Added after the gain.
    pub bias: f64,
}

impl RewardNorm {
    /// The map that sends `scores` (the reference samples' raw scores) to
    /// mean `mean` and population standard deviation `std` (NumPy's
    /// `np.std`, ddof 0, as `lm-human-preferences` computes it):
    /// `gain = std / std(scores)`, `bias = mean - gain * mean(scores)`.
    /// `None` when there are fewer than two scores, a score is not finite,
    /// or they are all equal (no spread to scale).
    pub fn fit(scores: &[f64], mean: f64, std: f64) -> Option<RewardNorm> {
        if scores.len() < 2 || scores.iter().any(|s| !s.is_finite()) {
            return None;
        }
        let n = scores.len() as f64;
        let m = scores.iter().sum::<f64>() / n;
        let var = scores.iter().map(|s| (s - m) * (s - m)).sum::<f64>() / n;
        let sd = var.sqrt();
        if sd <= 0.0 || !sd.is_finite() {
            return None;
        }
        let gain = std / sd;
        Some(RewardNorm {
            gain,
            bias: mean - gain * m,
        })
    }

    /// `gain * score + bias`.
    pub fn apply(&self, score: f64) -> f64 {
        self.gain * score + self.bias
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::*;

    fn mean_std(xs: &[f64]) -> (f64, f64) {
        let n = xs.len() as f64;
        let m = xs.iter().sum::<f64>() / n;
        (
            m,
            (xs.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / n).sqrt(),
        )
    }

    #[test]
    fn gain_and_bias_by_hand() {
        // scores 1, 2, 3, 6: mean 3; deviations -2, -1, 0, 3; squares sum 14;
        // population variance 14 / 4 = 3.5, std sqrt(3.5) = 1.8708286933869707.
        let scores = [1.0, 2.0, 3.0, 6.0];
        let n = RewardNorm::fit(&scores, 0.0, 1.0).unwrap();
        // gain = 1 / sqrt(3.5) = 0.5345224838248488; bias = 0 - 3 * gain.
        assert_close(n.gain, 0.534_522_483_824_848_8, 1e-15);
        assert_close(n.bias, -1.603_567_451_474_546_4, 1e-15);
        // The map is exact at hand points: score 3 (the mean) -> 0,
        // score 6 -> 3 / sqrt(3.5) = 1.6035674514745464.
        assert_close(n.apply(3.0), 0.0, 1e-15);
        assert_close(n.apply(6.0), 1.603_567_451_474_546_4, 1e-15);
        // Other targets: mean 2, std 0.5 -> gain 0.5 / sqrt(3.5), bias 2 - 3 gain.
        let n2 = RewardNorm::fit(&scores, 2.0, 0.5).unwrap();
        assert_close(n2.gain, 0.267_261_241_912_424_4, 1e-15);
        assert_close(n2.bias, 2.0 - 3.0 * 0.267_261_241_912_424_4, 1e-15);
    }

    #[test]
    fn normalized_reference_scores_have_the_target_mean_and_std() {
        // Skewed, offset, wide-ranged reference scores.
        let scores: Vec<f64> = (0..257)
            .map(|i| {
                let x = i as f64 * 0.731;
                40.0 + 7.0 * x.sin() + (x * 0.13).exp()
            })
            .collect();
        for (mean, std) in [(0.0, 1.0), (-3.0, 2.5)] {
            let n = RewardNorm::fit(&scores, mean, std).unwrap();
            let normed: Vec<f64> = scores.iter().map(|&s| n.apply(s)).collect();
            let (m, sd) = mean_std(&normed);
            assert_close(m, mean, 1e-12);
            assert_close(sd, std, 1e-12);
        }
    }

    #[test]
    fn degenerate_reference_scores_are_refused() {
        assert_eq!(RewardNorm::fit(&[1.0], 0.0, 1.0), None);
        assert_eq!(RewardNorm::fit(&[2.0, 2.0, 2.0], 0.0, 1.0), None);
        assert_eq!(RewardNorm::fit(&[2.0, f64::NAN], 0.0, 1.0), None);
    }
}
