//! Gradient accumulation: several forward/backward passes, one optimizer step.

use tch::Tensor;

/// What one micro-batch's closure returns.
pub struct MicroBatch {
    /// The micro-batch's loss, a scalar with a graph to backpropagate.
    pub loss: Tensor,
    /// Training tokens (or examples) in the micro-batch, for throughput.
    pub tokens: u64,
}

/// The result of [`accumulate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accumulated {
    /// The mean of the micro-batch losses (unscaled).
    pub loss: f64,
    /// The tokens of all micro-batches.
    pub tokens: u64,
}

/// Runs `micro_batches` passes of `f(i)` and backpropagates each loss
/// divided by `micro_batches`, so the gradients add up to those of the mean
/// loss. For mean-reduced losses over equal-sized micro-batches this equals
/// one pass over the concatenated batch; with unequal sizes (token-level
/// losses), return `sum / tokens_in_whole_batch * micro_batches` instead.
/// Gradients are added to whatever is there: zero them first.
///
/// # Shapes
/// `loss`: `[]` (0-dim).
pub fn accumulate<E>(
    micro_batches: usize,
    mut f: impl FnMut(usize) -> Result<MicroBatch, E>,
) -> Result<Accumulated, E> {
    let n = micro_batches.max(1);
    let mut total: Option<Tensor> = None;
    let mut tokens = 0;
    for i in 0..n {
        let mb = f(i)?;
        (&mb.loss / n as f64).backward();
        tokens += mb.tokens;
        // Summed on the device: one host sync per step, not per micro-batch.
        let l = mb.loss.detach();
        total = Some(match total {
            Some(t) => t + l,
            None => l,
        });
    }
    let loss = total.map_or(0.0, |t| t.double_value(&[]) / n as f64);
    Ok(Accumulated { loss, tokens })
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

    #[test]
    fn accumulated_step_equals_one_big_batch_step() {
        let (x, y) = data();
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
            let out = accumulate::<()>(accum, |i| {
                let (xs, ys) = (
                    x.narrow(0, i as i64 * rows, rows),
                    y.narrow(0, i as i64 * rows, rows),
                );
                Ok(MicroBatch {
                    loss: mse(&w, &b, &xs, &ys),
                    tokens: rows as u64,
                })
            })
            .unwrap();
            let grad = w.grad().copy();
            opt.step(1e-2).unwrap();
            (out, grad, w, b)
        };
        let (one, g1, w1, b1) = run(1);
        let (four, g4, w4, b4) = run(4);
        assert_eq!(one.tokens, 8);
        assert_eq!(four.tokens, 8);
        assert!((one.loss - four.loss).abs() < 1e-6);
        for (a, b) in [(&g1, &g4), (&w1, &w4), (&b1, &b4)] {
            let diff = (a - b).abs().max().double_value(&[]);
            assert!(diff < 1e-6, "differ by {diff}");
        }
    }
}
