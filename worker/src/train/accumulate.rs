//! Gradient accumulation: several forward/backward passes, one optimizer step.

use tch::Tensor;

/// What one micro-batch's closure returns.
pub struct MicroBatch {
    /// The micro-batch's loss: a mean (scalar, with a graph to
    /// backpropagate).
    pub loss: Tensor,
    /// Training tokens (or examples) in the micro-batch, for throughput.
    pub tokens: u64,
    /// The mean's denominator: labelled tokens for a token-level loss,
    /// pairs (or their summed weights) for a per-pair one.
    pub weight: f64,
}

/// The result of [`accumulate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accumulated {
    /// The micro-batch losses times their weights, summed.
    pub weighted_loss: f64,
    /// The micro-batches' weights, summed.
    pub weight: f64,
    /// The tokens of all micro-batches.
    pub tokens: u64,
}

impl Accumulated {
    /// The step's loss: the mean over every micro-batch's denominator.
    pub fn loss(&self) -> f64 {
        self.weighted_loss / self.weight
    }
}

/// Runs `micro_batches` passes of `f(i)` and backpropagates each loss
/// times its weight: the gradients add up to `weight` times those of the
/// mean over the whole step, and [`Accumulated::weight`] is what to divide
/// them by. So micro-batches count by their tokens (or pairs), not equally:
/// a step of `k` micro-batches equals one pass over them all together
/// whatever their sizes, as transformers' and TRL's gradient accumulation
/// normalise. A micro-batch with nothing to weigh (no labelled token) adds
/// no gradient. Gradients are added to whatever is there: zero them first.
///
/// # Shapes
/// `loss`: `[]` (0-dim).
pub fn accumulate<E>(
    micro_batches: usize,
    mut f: impl FnMut(usize) -> Result<MicroBatch, E>,
) -> Result<Accumulated, E> {
    let n = micro_batches.max(1);
    let mut total: Option<Tensor> = None;
    let (mut tokens, mut weight) = (0, 0.0);
    for i in 0..n {
        let mb = f(i)?;
        tokens += mb.tokens;
        if mb.weight <= 0.0 {
            continue;
        }
        weight += mb.weight;
        let weighted = &mb.loss * mb.weight;
        weighted.backward();
        // Summed on the device: one host sync per step, not per micro-batch.
        let l = weighted.detach();
        total = Some(match total {
            Some(t) => t + l,
            None => l,
        });
    }
    let weighted_loss = total.map_or(0.0, |t| t.double_value(&[]));
    Ok(Accumulated {
        weighted_loss,
        weight,
        tokens,
    })
}

/// Multiplies every defined gradient of `params` by `factor`.
pub fn scale_gradients(params: &[&Tensor], factor: f64) {
    tch::no_grad(|| {
        for p in params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.g_mul_scalar_(factor);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::optim::{AdamW, AdamWConfig};
    use tch::{Kind, Tensor};

    /// A fixed regression batch: 8 rows of 3 features, and targets.
    fn data() -> (Tensor, Tensor) {
        let x = (Tensor::arange(24, tch::kind::FLOAT_CPU) * 0.37)
            .sin()
            .reshape([8, 3]);
        let y = (Tensor::arange(8, tch::kind::FLOAT_CPU) * 0.5)
            .cos()
            .reshape([8, 1]);
        (x, y)
    }

    fn model() -> (Tensor, Tensor) {
        let w = Tensor::from_slice(&[0.2f32, -0.1, 0.4])
            .reshape([3, 1])
            .set_requires_grad(true);
        let b = Tensor::from_slice(&[0.05f32]).set_requires_grad(true);
        (w, b)
    }

    fn mse(w: &Tensor, b: &Tensor, x: &Tensor, y: &Tensor) -> Tensor {
        (x.matmul(w) + b - y).square().mean(Kind::Float)
    }

    /// The mean squared error over `rows` rows from `start`, weighted by
    /// its rows.
    fn micro_batch(w: &Tensor, b: &Tensor, start: i64, rows: i64) -> MicroBatch {
        let (x, y) = data();
        let (xs, ys) = (x.narrow(0, start, rows), y.narrow(0, start, rows));
        MicroBatch {
            loss: mse(w, b, &xs, &ys),
            tokens: rows as u64,
            weight: rows as f64,
        }
    }

    #[test]
    fn accumulated_step_equals_one_big_batch_step() {
        let run = |accum: usize| {
            let (w, b) = model();
            let named = vec![
                ("w".to_string(), w.shallow_clone()),
                ("b".to_string(), b.shallow_clone()),
            ];
            let mut opt = AdamW::new(
                named,
                AdamWConfig {
                    weight_decay: 0.1,
                    ..Default::default()
                },
            )
            .unwrap();
            let rows = 8 / accum as i64;
            let out = accumulate::<()>(accum, |i| Ok(micro_batch(&w, &b, i as i64 * rows, rows)))
                .unwrap();
            scale_gradients(&[&w, &b], 1.0 / out.weight);
            let grad = w.grad().copy();
            opt.step(1e-2).unwrap();
            (out, grad, w, b)
        };
        let (one, g1, w1, b1) = run(1);
        let (four, g4, w4, b4) = run(4);
        assert_eq!(one.tokens, 8);
        assert_eq!(four.tokens, 8);
        assert!((one.loss() - four.loss()).abs() < 1e-6);
        for (a, b) in [(&g1, &g4), (&w1, &w4), (&b1, &b4)] {
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "differ by {diff}");
        }
    }

    /// Micro-batches of 2 and 6 rows: the step is the mean over the 8 rows
    /// (each micro-batch counts by its rows), not the mean of two means.
    #[test]
    fn unequal_micro_batches_count_by_their_weight() {
        let (x, y) = data();
        let (w, b) = model();
        let sizes = [2i64, 6];
        let starts = [0i64, 2];
        let out = accumulate::<()>(2, |i| Ok(micro_batch(&w, &b, starts[i], sizes[i]))).unwrap();
        scale_gradients(&[&w, &b], 1.0 / out.weight);
        let accumulated = w.grad().copy();
        let (w1, b1) = model();
        let whole = mse(&w1, &b1, &x, &y);
        whole.backward();
        assert!((out.loss() - whole.double_value(&[])).abs() < 1e-6);
        let diff = (accumulated - w1.grad()).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "differ by {diff}");
    }
}
