//! Held-out figures of a preference model from its margins `rA - rB` and
//! the labels `p` (probability that A is preferred).
//!
//! - `accuracy`: over the *decisive* pairs (`p != 0.5`), the fraction where
//!   `rA > rB` agrees with `p > 0.5`; an exact tie `rA == rB` counts as
//!   wrong. Pairs labelled exactly 0.5 are excluded (none: `null`).
//! - `mean_margin`: mean of `rA - rB` over all pairs (A as given: `chosen`
//!   or `response_a`); `mean_abs_margin` the mean of `|rA - rB|`.
//! - `loss`: the mean soft Bradley-Terry loss, in f64.
//! - `ece`: expected calibration error of `q = sigmoid(rA - rB)` against
//!   `p`, made independent of which response a dataset calls A: every pair
//!   enters twice, as `(q, p)` and `(1 - q, 1 - p)`. With 10 equal-width
//!   bins on [0, 1] (bin `k = min(floor(10 q), 9)`) over these `2N` points,
//!   `ECE = sum_k (n_k / 2N) * |mean_{i in k} q_i - mean_{i in k} p_i|`.
//!   Hard labels make `mean p` the bin's observed frequency of the response
//!   in question being preferred; soft labels enter as probabilities. (One
//!   orientation alone would, with hard labels that always prefer A, score
//!   a calibrated 60%-confident model as 0.4 off.)
use serde::Serialize;

/// Equal-width calibration bins.
pub const BINS: usize = 10;

/// One calibration bin.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Bin {
    /// `[lo, hi)` of the predicted probability (the last bin includes 1).
    pub range: (f64, f64),
    /// Points in the bin (each pair counts once per orientation).
    pub points: usize,
    /// Mean `sigmoid(rA - rB)` in the bin (null when empty).
    pub mean_predicted: Option<f64>,
    /// Mean label `p` in the bin (null when empty).
    pub mean_label: Option<f64>,
}

/// The held-out figures (see the module docs for definitions).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Figures {
    pub pairs: usize,
    pub decisive_pairs: usize,
    pub accuracy: Option<f64>,
    pub mean_margin: Option<f64>,
    pub mean_abs_margin: Option<f64>,
    pub loss: Option<f64>,
    pub ece: Option<f64>,
    pub bins: Vec<Bin>,
}

/// `ln sigmoid(x)`, stable for large |x|.
pub fn log_sigmoid(x: f64) -> f64 {
    -((-x).max(0.0) + (-x.abs()).exp().ln_1p())
}

pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// The soft Bradley-Terry loss of one pair, in f64.
pub fn pair_loss(margin: f64, p: f64) -> f64 {
    -(p * log_sigmoid(margin) + (1.0 - p) * log_sigmoid(-margin))
}

/// Figures of `margins[i] = rA - rB` against `labels[i] = p`.
pub fn figures(margins: &[f64], labels: &[f64]) -> Figures {
    assert_eq!(margins.len(), labels.len());
    let n = margins.len();
    let mean = |it: &mut dyn Iterator<Item = f64>| -> Option<f64> {
        let (s, c) = it.fold((0.0, 0usize), |(s, c), x| (s + x, c + 1));
        (c > 0).then(|| s / c as f64)
    };
    let decisive: Vec<(f64, f64)> = margins
        .iter()
        .zip(labels)
        .filter(|(_, &p)| p != 0.5)
        .map(|(&m, &p)| (m, p))
        .collect();
    let accuracy = mean(
        &mut decisive
            .iter()
            .map(|&(m, p)| f64::from(u8::from((m > 0.0 && p > 0.5) || (m < 0.0 && p < 0.5)))),
    );
    let mut sums = [(0usize, 0.0f64, 0.0f64); BINS];
    for (&m, &p) in margins.iter().zip(labels) {
        // Both orientations: (A over B) and (B over A).
        for (q, p) in [(sigmoid(m), p), (sigmoid(-m), 1.0 - p)] {
            let k = ((q * BINS as f64).floor() as usize).min(BINS - 1);
            sums[k].0 += 1;
            sums[k].1 += q;
            sums[k].2 += p;
        }
    }
    let bins: Vec<Bin> = sums
        .iter()
        .enumerate()
        .map(|(k, &(c, q, p))| Bin {
            range: (k as f64 / BINS as f64, (k + 1) as f64 / BINS as f64),
            points: c,
            mean_predicted: (c > 0).then(|| q / c as f64),
            mean_label: (c > 0).then(|| p / c as f64),
        })
        .collect();
    let ece = (n > 0).then(|| {
        sums.iter()
            .filter(|(c, _, _)| *c > 0)
            .map(|&(c, q, p)| (c as f64 / (2 * n) as f64) * ((q - p) / c as f64).abs())
            .sum()
    });
    Figures {
        pairs: n,
        decisive_pairs: decisive.len(),
        accuracy,
        mean_margin: mean(&mut margins.iter().copied()),
        mean_abs_margin: mean(&mut margins.iter().map(|m| m.abs())),
        loss: mean(&mut margins.iter().zip(labels).map(|(&m, &p)| pair_loss(m, p))),
        ece,
        bins,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_by_hand() {
        // Margins 2, -1, 0.5, 0 with labels 1, 1, 0.5, 0.
        let f = figures(&[2.0, -1.0, 0.5, 0.0], &[1.0, 1.0, 0.5, 0.0]);
        assert_eq!(f.pairs, 4);
        assert_eq!(f.decisive_pairs, 3);
        // Right, wrong, (excluded), tie counts as wrong.
        assert_eq!(f.accuracy, Some(1.0 / 3.0));
        assert_eq!(f.mean_margin, Some(1.5 / 4.0));
        assert_eq!(f.mean_abs_margin, Some(3.5 / 4.0));
        // Points (q, p): (0.881, 1) bin 8 and (0.119, 0) bin 1; (0.269, 1)
        // bin 2 and (0.731, 0) bin 7; (0.622, 0.5) bin 6 and (0.378, 0.5)
        // bin 3; (0.5, 0) and (0.5, 1) both in bin 5, whose means cancel.
        let q = [sigmoid(2.0), sigmoid(-1.0), sigmoid(0.5)];
        let expected =
            (2.0 * (q[0] - 1.0).abs() + 2.0 * (q[1] - 1.0).abs() + 2.0 * (q[2] - 0.5).abs()) / 8.0;
        assert!((f.ece.unwrap() - expected).abs() < 1e-12, "{f:?}");
        assert_eq!(f.bins[8].points, 1);
        assert_eq!(f.bins[5].points, 2);
        assert_eq!(f.bins[5].mean_label, Some(0.5));
        // Two pairs in one bin: the bin's means are compared, not each pair.
        let g = figures(&[2.0, 2.1], &[1.0, 0.0]);
        let qm = (sigmoid(2.0) + sigmoid(2.1)) / 2.0;
        assert!((g.ece.unwrap() - (qm - 0.5).abs()).abs() < 1e-12);
        // Swapping A and B changes nothing.
        let h = figures(&[-2.0, -2.1], &[0.0, 1.0]);
        assert!((g.ece.unwrap() - h.ece.unwrap()).abs() < 1e-12);
        assert_eq!(figures(&[], &[]).accuracy, None);
        assert!((log_sigmoid(-800.0) + 800.0).abs() < 1e-9);
        assert!(
            (pair_loss(0.3, 0.7) - (-(0.7 * sigmoid(0.3).ln() + 0.3 * sigmoid(-0.3).ln()))).abs()
                < 1e-12
        );
    }
}
