//! Masked whitening (TRL's `masked_whiten`).

use tch::Tensor;

/// Epsilon added to the variance before the square root.
pub const WHITEN_EPS: f64 = 1e-8;

/// Whitens `x` over the entries where `mask = 1`: `(x - mean) / sqrt(var + 1e-8)`
/// with the mean and the *unbiased* variance taken over masked entries only
/// (as TRL does). With `shift_mean = false` the mean is added back
/// (`(x - mean) / std + mean`: rescaled but not re-centred, as TRL does for
/// rewards). Entries with `mask = 0` are returned unchanged.
///
/// # Shapes
/// - `x`, `mask`: `[b, t]`; returns `[b, t]`.
pub fn masked_whiten(x: &Tensor, mask: &Tensor, shift_mean: bool) -> Tensor {
    let m = super::mask_like(x, mask);
    let mean = super::masked_mean(x, &m, None);
    let var = super::masked_var(x, &m, true);
    let mut w = (x - &mean) * (var + WHITEN_EPS).rsqrt();
    if !shift_mean {
        w = w + &mean;
    }
    w.where_self(&m.gt(0.5), x)
}

#[cfg(test)]
mod tests {
    use super::super::test_util::*;
    use super::super::{masked_mean, masked_var};
    use super::*;

    #[test]
    fn whiten_mean_zero_var_one_masked_untouched() {
        // masked entries 1, 2, 3, 4: mean 2.5, unbiased var (2.25+0.25+0.25+2.25)/3 = 5/3
        // 1/sqrt(5/3) = sqrt(0.6) = 0.7745966692414834
        // -> [-1.5, -0.5, 0.5, 1.5] * 0.7745966692414834
        let x = t2(2, 3, &[1.0, 2.0, 100.0, 3.0, 4.0, -7.0]);
        let m = t2(2, 3, &[1.0, 1.0, 0.0, 1.0, 1.0, 0.0]);
        let w = masked_whiten(&x, &m, true);
        let k = 0.7745966692414834;
        assert_vec_close(
            &v(&w),
            &[-1.5 * k, -0.5 * k, 100.0, 0.5 * k, 1.5 * k, -7.0],
            1e-7,
        );
        assert_close(s(&masked_mean(&w, &m, None)), 0.0, 1e-12);
        assert_close(s(&masked_var(&w, &m, true)), 1.0, 1e-7);

        // shift_mean = false: mean 2.5 added back, variance still 1
        let w2 = masked_whiten(&x, &m, false);
        assert_vec_close(
            &v(&w2),
            &[
                2.5 - 1.5 * k,
                2.5 - 0.5 * k,
                100.0,
                2.5 + 0.5 * k,
                2.5 + 1.5 * k,
                -7.0,
            ],
            1e-7,
        );
        assert_close(s(&masked_mean(&w2, &m, None)), 2.5, 1e-12);
        assert_close(s(&masked_var(&w2, &m, true)), 1.0, 1e-7);
    }
}
