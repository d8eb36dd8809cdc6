//! The preference-model loss against a hand computation, and the paired
//! reward forward against one forward per sequence.

use alignflow_worker::model::{BuildOptions, Head, Model, ModelConfig};
use alignflow_worker::ops::pm::{pair_rewards, soft_bt_loss};
use tch::{Device, Kind, Tensor};

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// `-(p ln s(d) + (1 - p) ln s(-d))` in f64, straight from the formula.
fn by_hand(d: f64, p: f64) -> f64 {
    -(p * sigmoid(d).ln() + (1.0 - p) * sigmoid(-d).ln())
}

fn scalar(x: f64) -> Tensor {
    Tensor::from_slice(&[x]).set_requires_grad(true)
}

#[test]
fn loss_and_gradient_equal_the_hand_computation_for_hard_and_soft_labels() {
    for p in [1.0, 0.7, 0.5] {
        for (ra, rb) in [(0.3, -0.5), (-1.25, 0.75), (4.0, -3.5), (0.0, 0.0)] {
            let (a, b) = (scalar(ra), scalar(rb));
            let loss = soft_bt_loss(&a, &b, &Tensor::from_slice(&[p]), None);
            loss.backward();
            let d = ra - rb;
            let got = loss.double_value(&[]);
            assert!(
                (got - by_hand(d, p)).abs() < 1e-6,
                "p {p}, d {d}: {got} vs {}",
                by_hand(d, p)
            );
            // d loss / d rA = -(p - sigmoid(rA - rB)) = -d loss / d rB.
            let grad_a = a.grad().double_value(&[0]);
            let grad_b = b.grad().double_value(&[0]);
            let expected = -(p - sigmoid(d));
            assert!(
                (grad_a - expected).abs() < 1e-6,
                "p {p}, d {d}: {grad_a} vs {expected}"
            );
            assert!((grad_b + expected).abs() < 1e-6, "p {p}, d {d}: {grad_b}");
        }
    }
    // p = 0.5 is minimised at equal rewards: zero gradient there.
    let (a, b) = (scalar(1.5), scalar(1.5));
    soft_bt_loss(&a, &b, &Tensor::from_slice(&[0.5]), None).backward();
    assert!(a.grad().double_value(&[0]).abs() < 1e-7);
}

#[test]
fn the_batch_loss_is_the_weighted_mean_of_the_pair_losses() {
    let ra = [0.3, -1.0, 2.0];
    let rb = [0.1, 0.5, -1.0];
    let p = [1.0, 0.7, 0.5];
    let w = [1.0, 0.5, 2.0];
    let a = Tensor::from_slice(&ra).set_requires_grad(true);
    let b = Tensor::from_slice(&rb);
    let loss = soft_bt_loss(
        &a,
        &b,
        &Tensor::from_slice(&p),
        Some(&Tensor::from_slice(&w)),
    );
    loss.backward();
    let sw: f64 = w.iter().sum();
    let expected: f64 = (0..3)
        .map(|i| w[i] * by_hand(ra[i] - rb[i], p[i]))
        .sum::<f64>()
        / sw;
    assert!((loss.double_value(&[]) - expected).abs() < 1e-6);
    for i in 0..3 {
        let g = -(p[i] - sigmoid(ra[i] - rb[i])) * w[i] / sw;
        assert!(
            (a.grad().double_value(&[i as i64]) - g).abs() < 1e-6,
            "pair {i}"
        );
    }
    // Unweighted: the plain mean.
    let plain = soft_bt_loss(&a, &b, &Tensor::from_slice(&p), None).double_value(&[]);
    let mean: f64 = (0..3).map(|i| by_hand(ra[i] - rb[i], p[i])).sum::<f64>() / 3.0;
    assert!((plain - mean).abs() < 1e-6);
}

#[test]
fn paired_rewards_in_one_padded_forward_equal_one_forward_per_sequence() {
    tch::manual_seed(0);
    let cfg = ModelConfig::from_json(ModelConfig::gpt2_json(50, 32, 16, 2, 2, 0, 0.0)).unwrap();
    let model = Model::init(&cfg, &BuildOptions::new(Device::Cpu, Head::Reward));
    let a: Vec<Vec<i64>> = vec![vec![5, 6, 7, 8, 9], vec![3, 4]];
    let b: Vec<Vec<i64>> = vec![vec![5, 6, 1], vec![3, 4, 2, 1, 7, 7, 9]];
    let ra_s: Vec<&[i64]> = a.iter().map(Vec::as_slice).collect();
    let rb_s: Vec<&[i64]> = b.iter().map(Vec::as_slice).collect();
    let (ra, rb, tokens) = tch::no_grad(|| pair_rewards(&model, &ra_s, &rb_s, Device::Cpu, false));
    assert_eq!(tokens, 17);
    assert_eq!(ra.size(), [2]);
    let alone = |row: &[i64]| -> f64 {
        let ids = Tensor::from_slice(row).unsqueeze(0);
        let mask = ids.ones_like();
        let pos = alignflow_worker::model::positions_from_mask(&mask);
        // The full forward's last position: independent of the batch's
        // padding and of the last-token-only path `pair_rewards` takes.
        tch::no_grad(|| {
            let h = model.lm.hidden(&ids, &pos, &mask, None, false);
            model
                .reward
                .as_ref()
                .unwrap()
                .forward(&h.narrow(1, row.len() as i64 - 1, 1))
                .to_kind(Kind::Double)
                .double_value(&[0])
        })
    };
    for i in 0..2 {
        assert!(
            (ra.double_value(&[i as i64]) - alone(&a[i])).abs() < 1e-5,
            "A {i}"
        );
        assert!(
            (rb.double_value(&[i as i64]) - alone(&b[i])).abs() < 1e-5,
            "B {i}"
        );
    }
}
