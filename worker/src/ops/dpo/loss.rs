//! The DPO / IPO losses and the response log-probs they compare.
//!
//! The soft-label forms and how `label_smoothing` enters are derived in the
//! engine-side op's documentation (`alignflow_ops::dpo`).

use tch::{Device, Kind, Tensor};

use alignflow_ops::DpoLoss;

use super::super::training::{labelled_logprobs, right_pad};
use crate::model::Model;

/// Per-pair losses from the policy's and the reference's response log-probs.
///
/// `d = (pi_a - ref_a) - (pi_b - ref_b)`; `q` is the (smoothed) probability
/// that A is preferred.
/// - `Sigmoid`: `-(q*logsig(beta*d) + (1-q)*logsig(-beta*d))`, gradient
///   `dL/dd = -beta*(q - sigmoid(beta*d))`;
/// - `Ipo`: `(d - (2q-1)/(2*beta))^2`, gradient `2*(d - (2q-1)/(2*beta))`.
///
/// Computed in the log-probs' kind (float32 from [`response_logps`]).
///
/// # Shapes
/// all `[b]` -> `[b]`.
pub fn dpo_losses(
    pi_a: &Tensor,
    pi_b: &Tensor,
    ref_a: &Tensor,
    ref_b: &Tensor,
    q: &Tensor,
    beta: f64,
    loss: DpoLoss,
) -> Tensor {
    let d = (pi_a - ref_a) - (pi_b - ref_b);
    match loss {
        DpoLoss::Sigmoid => {
            let z = &d * beta;
            // log_sigmoid is the stable `-softplus(-x)`: exact at large margins.
            let not_q: Tensor = q.neg() + 1.0;
            (z.log_sigmoid() * q + z.neg().log_sigmoid() * not_q).neg()
        }
        DpoLoss::Ipo => {
            let target = (q * 2.0 - 1.0) / (2.0 * beta);
            (d - target).square()
        }
    }
}

/// Sums of the log-probs of each row's response tokens (those at and after
/// its `start`; a row's first token has no prediction and never counts),
/// all rows in one right-padded forward. Also the count of real tokens.
///
/// # Shapes
/// `rows`: `n` (tokens, response start) -> `[n]` float32.
pub fn response_logps(
    model: &Model,
    rows: &[(&[i64], usize)],
    device: Device,
    train: bool,
) -> (Tensor, u64) {
    let (ids, mask, labels) = right_pad(rows, model.lm.cfg.pad_id(), device);
    let tokens = rows.iter().map(|(r, _)| r.len() as u64).sum();
    let Some((picked, targets)) = labelled_logprobs(model, &ids, &mask, &labels, train) else {
        // One-token rows: nothing is predicted.
        return (
            Tensor::zeros([rows.len() as i64], (Kind::Float, device)),
            tokens,
        );
    };
    let counted = targets.ne(-100);
    let zero = Tensor::zeros_like(&picked);
    (
        picked
            .where_self(&counted, &zero)
            .sum_dim_intlist(1, false, Kind::Float),
        tokens,
    )
}

/// Number of scored tokens of a row of `len` tokens whose response starts at `start`.
pub fn scored_tokens(len: usize, start: usize) -> usize {
    len.saturating_sub(start.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{BuildOptions, Head, ModelConfig};

    fn logsig(x: f64) -> f64 {
        -(1.0 + (-x).exp()).ln()
    }
    fn sig(x: f64) -> f64 {
        1.0 / (1.0 + (-x).exp())
    }

    /// Two pairs of log-probs (policy A, policy B, ref A, ref B).
    const PAIRS: [[f64; 4]; 2] = [[-5.0, -7.5, -5.5, -7.0], [-12.0, -9.0, -11.0, -9.5]];

    /// Loss and gradients w.r.t. the policy log-probs, from the tensors.
    fn autograd(qs: [f64; 2], beta: f64, loss: DpoLoss) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let col = |i: usize, grad: bool| {
            let t = Tensor::from_slice(&[PAIRS[0][i], PAIRS[1][i]]);
            if grad {
                t.set_requires_grad(true)
            } else {
                t
            }
        };
        let (pi_a, pi_b) = (col(0, true), col(1, true));
        let l = dpo_losses(
            &pi_a,
            &pi_b,
            &col(2, false),
            &col(3, false),
            &Tensor::from_slice(&qs),
            beta,
            loss,
        );
        l.sum(Kind::Double).backward();
        let v = |t: &Tensor| Vec::<f64>::try_from(t).unwrap();
        (v(&l), v(&pi_a.grad()), v(&pi_b.grad()))
    }

    fn close(a: &[f64], b: &[f64]) {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-9, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn sigmoid_loss_and_gradient_match_a_hand_computation() {
        let beta = 0.5;
        for q in [1.0, 0.7, 0.5] {
            let (l, ga, gb) = autograd([q, q], beta, DpoLoss::Sigmoid);
            // Pair 0: d = (-5 + 5.5) - (-7.5 + 7) = 1; pair 1: d = -1 - 0.5 = -1.5.
            let d = [1.0, -1.5];
            let want: Vec<f64> = d
                .iter()
                .map(|d| -(q * logsig(beta * d) + (1.0 - q) * logsig(-beta * d)))
                .collect();
            close(&l, &want);
            let g: Vec<f64> = d.iter().map(|d| -beta * (q - sig(beta * d))).collect();
            close(&ga, &g);
            close(&gb, &g.iter().map(|x| -x).collect::<Vec<_>>());
        }
        // Spot value: p = 1, d = 1, beta = 0.5: -log sigmoid(0.5) = 0.474077...
        let (l, _, _) = autograd([1.0, 1.0], beta, DpoLoss::Sigmoid);
        assert!((l[0] - 0.474_076_984_180_107_5).abs() < 1e-12, "{}", l[0]);
        // p = 0.5 is minimised at d = 0: the gradient pushes d toward 0.
        let (_, ga, _) = autograd([0.5, 0.5], beta, DpoLoss::Sigmoid);
        assert!(ga[0] > 0.0 && ga[1] < 0.0);
    }

    #[test]
    fn ipo_loss_and_gradient_match_a_hand_computation() {
        let beta = 0.25;
        for q in [1.0, 0.7, 0.5, 0.0] {
            let (l, ga, gb) = autograd([q, q], beta, DpoLoss::Ipo);
            let d = [1.0, -1.5];
            let target = (2.0 * q - 1.0) / (2.0 * beta);
            close(
                &l,
                &d.iter().map(|d| (d - target).powi(2)).collect::<Vec<_>>(),
            );
            let g: Vec<f64> = d.iter().map(|d| 2.0 * (d - target)).collect();
            close(&ga, &g);
            close(&gb, &g.iter().map(|x| -x).collect::<Vec<_>>());
        }
        // Hard label: IPO's target margin 1/(2 beta) = 2; (1 - 2)^2 = 1.
        assert!((autograd([1.0, 1.0], beta, DpoLoss::Ipo).0[0] - 1.0).abs() < 1e-12);
        // A label of 0 is the hard loss of the swapped pair: (-d - 2)^2.
        assert!((autograd([0.0, 0.0], beta, DpoLoss::Ipo).0[1] - 0.25).abs() < 1e-12);
        // The soft form is the expected hard loss over I ~ Bernoulli(q) less
        // the constant q(1 - q)/beta^2.
        let q = 0.7;
        let (l, _, _) = autograd([q, q], beta, DpoLoss::Ipo);
        let hard = |d: f64, i: f64| (d - (2.0 * i - 1.0) / (2.0 * beta)).powi(2);
        let expected = q * hard(1.0, 1.0) + (1.0 - q) * hard(1.0, 0.0);
        assert!((l[0] - (expected - q * (1.0 - q) / beta.powi(2))).abs() < 1e-9);
    }

    #[test]
    fn label_smoothing_equals_a_constant_label() {
        use alignflow_ops::DpoParams;
        let eps = 0.2;
        let params: DpoParams =
            serde_json::from_value(serde_json::json!({"label_smoothing": eps})).unwrap();
        for loss in [DpoLoss::Sigmoid, DpoLoss::Ipo] {
            // Hard labels smoothed by eps train exactly as p = 1 - eps.
            let q = params.smoothed(1.0);
            assert!((q - 0.8).abs() < 1e-12);
            assert_eq!(autograd([q, q], 0.5, loss), autograd([0.8, 0.8], 0.5, loss));
            // cDPO's form: (1 - eps)*L(d) + eps*L(-d), for the sigmoid loss.
            if loss == DpoLoss::Sigmoid {
                let (l, _, _) = autograd([q, q], 0.5, loss);
                let d: f64 = 1.0;
                let want = -(1.0 - eps) * logsig(0.5 * d) - eps * logsig(-0.5 * d);
                assert!((l[0] - want).abs() < 1e-12);
            }
        }
    }

    /// A tiny random GPT-2.
    fn tiny() -> Model {
        tch::manual_seed(0);
        let cfg = ModelConfig::from_json(ModelConfig::gpt2_json(50, 16, 8, 2, 2, 0, 0.0)).unwrap();
        Model::init(
            &cfg,
            &BuildOptions {
                device: Device::Cpu,
                head: Head::Lm,
                lora: None,
                kind: tch::Kind::Float,
            },
        )
    }

    #[test]
    fn response_logps_sum_only_response_tokens_and_ignore_padding() {
        let _rng = crate::testing::torch_rng();
        let m = tiny();
        let long: Vec<i64> = vec![3, 9, 4, 11, 7, 2];
        let short: Vec<i64> = vec![5, 8, 1];
        let (lp, tokens) =
            tch::no_grad(|| response_logps(&m, &[(&long, 2), (&short, 1)], Device::Cpu, false));
        assert_eq!(tokens, 9);
        let lp = Vec::<f64>::try_from(&lp).unwrap();
        // By hand: full-sequence log-softmax, summed over response targets.
        let by_hand = |row: &[i64], start: usize| -> f64 {
            let ids = Tensor::from_slice(row).unsqueeze(0);
            let logp = tch::no_grad(|| m.lm.forward(&ids, &ids.ones_like(), false))
                .to_kind(Kind::Double)
                .log_softmax(-1, Kind::Double);
            (start.max(1)..row.len())
                .map(|i| logp.double_value(&[0, i as i64 - 1, row[i]]))
                .sum()
        };
        assert!((lp[0] - by_hand(&long, 2)).abs() < 1e-4, "{lp:?}");
        assert!((lp[1] - by_hand(&short, 1)).abs() < 1e-4, "{lp:?}");
        // The prompt is masked: a start past the prompt drops its tokens.
        let (only_last, _) = tch::no_grad(|| response_logps(&m, &[(&long, 5)], Device::Cpu, false));
        let only_last = only_last.double_value(&[0]);
        assert!((only_last - (by_hand(&long, 5))).abs() < 1e-4);
        assert!(only_last > lp[0], "fewer (negative) terms");
        // Both responses start after position 1: the forward skips the
        // shared prefix (its last block and LM head), the sums do not move.
        let (later, _) =
            tch::no_grad(|| response_logps(&m, &[(&long, 3), (&short, 2)], Device::Cpu, false));
        let later = Vec::<f64>::try_from(&later).unwrap();
        assert!((later[0] - by_hand(&long, 3)).abs() < 1e-4, "{later:?}");
        assert!((later[1] - by_hand(&short, 2)).abs() < 1e-4, "{later:?}");
        // One-token rows predict nothing.
        let (none, _) = tch::no_grad(|| response_logps(&m, &[(&[4], 0)], Device::Cpu, false));
        assert_eq!(Vec::<f64>::try_from(&none).unwrap(), vec![0.0]);
        assert_eq!(scored_tokens(long.len(), 2), 4);
        assert_eq!(scored_tokens(3, 0), 2);
    }
}
