//! A forward pass that keeps only some positions (`Transformer::hidden_kept`:
//! the last block computes only those) gives the full forward's values and
//! gradients there, on padded batches of both families.

use alignflow_worker::model::{positions_from_mask, BuildOptions, Head, Keep, Model, ModelConfig};
use tch::{Device, Kind, Tensor};

fn models() -> Vec<(&'static str, Model)> {
    let configs = [
        ("gpt2", ModelConfig::gpt2_json(40, 32, 16, 2, 2, 0, 0.0)),
        (
            "llama-gqa",
            ModelConfig::llama_json(40, 32, 16, 2, 4, 2, 24, 0, false),
        ),
    ];
    configs
        .into_iter()
        .map(|(name, json)| {
            tch::manual_seed(0);
            let cfg = ModelConfig::from_json(json).unwrap();
            let model = Model::init(
                &cfg,
                &BuildOptions {
                    device: Device::Cpu,
                    head: Head::Reward,
                    lora: None,
                    kind: tch::Kind::Float,
                },
            );
            (name, model)
        })
        .collect()
}

/// Left-padded prompts (widths 3 and 5) followed by right-padded responses
/// (lengths 4 and 2): the layout of PPO's rollouts.
fn batch() -> (Tensor, Tensor) {
    let ids = Tensor::from_slice(&[
        0i64, 0, 7, 8, 9, 11, 12, 13, 14, //
        3, 4, 5, 6, 7, 21, 22, 0, 0,
    ])
    .view([2, 9]);
    let mask = Tensor::from_slice(&[
        0i64, 0, 1, 1, 1, 1, 1, 1, 1, //
        1, 1, 1, 1, 1, 1, 1, 0, 0,
    ])
    .view([2, 9]);
    (ids, mask)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// Every defined gradient (the reward head takes no part here).
fn grads(model: &Model) -> Vec<(String, Tensor)> {
    model
        .trainable()
        .into_iter()
        .filter(|(_, t)| t.grad().defined())
        .map(|(name, t)| (name, t.grad().copy()))
        .collect()
}

fn clear_grads(model: &Model) {
    for (_, t) in model.trainable() {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

/// Backpropagates `full` and `kept` (the same loss through both paths) and
/// asserts every parameter gets the same gradient from each.
fn assert_same_gradients(name: &str, model: &Model, full: Tensor, kept: Tensor) {
    clear_grads(model);
    full.backward();
    let g_full = grads(model);
    clear_grads(model);
    kept.backward();
    let g_kept = grads(model);
    assert_eq!(g_full.len(), g_kept.len(), "{name}");
    assert!(g_full.len() > 10, "{name}: {} gradients", g_full.len());
    for ((n, a), (_, b)) in g_full.iter().zip(g_kept) {
        // Relative to the gradient's size: float32 sums in another order.
        let scale = a.abs().max().double_value(&[]).max(1.0);
        let d = max_diff(a, &b) / scale;
        assert!(
            d < 1e-5,
            "{name}: gradient of {n} differs by {d} (relative)"
        );
    }
}

#[test]
fn a_kept_span_equals_the_full_forward_there_values_and_gradients() {
    let (ids, mask) = batch();
    for (name, model) in models() {
        let positions = positions_from_mask(&mask);
        let full = model.lm.hidden(&ids, &positions, &mask, None, true);
        let want = full.narrow(1, 4, 4);
        let got = model
            .lm
            .hidden_kept(&ids, &mask, Keep::Span { start: 4, len: 4 }, true);
        assert_eq!(got.size(), [2, 4, 16], "{name}");
        let d = max_diff(&got, &want);
        assert!(d < 1e-5, "{name}: values differ by {d}");
        let weights = Tensor::randn([2, 4, 16], (Kind::Float, Device::Cpu));
        assert_same_gradients(
            name,
            &model,
            (want * &weights).sum(Kind::Float),
            (got * &weights).sum(Kind::Float),
        );
    }
}

#[test]
fn the_last_token_of_each_row_equals_the_full_forward_and_scores_it() {
    let (ids, mask) = batch();
    for (name, model) in models() {
        let positions = positions_from_mask(&mask);
        let full = model.lm.hidden(&ids, &positions, &mask, None, true);
        // Row 0 ends at 8 (no right padding), row 1 at 6.
        let want = Tensor::stack(&[full.get(0).get(8), full.get(1).get(6)], 0);
        let got = model.lm.hidden_kept(&ids, &mask, Keep::LastToken, true);
        assert_eq!(got.size(), [2, 1, 16], "{name}");
        let d = max_diff(&got.squeeze_dim(1), &want);
        assert!(d < 1e-5, "{name}: values differ by {d}");
        // The reward model's score and its gradient (PM training).
        let head = model.reward.as_ref().unwrap();
        let by_hand = head.forward(&want.unsqueeze(1));
        let scores = model.scores(&ids, &mask, true);
        assert!(max_diff(&scores, &by_hand) < 1e-5, "{name}");
        let weights = Tensor::from_slice(&[0.7f32, -1.3]);
        assert_same_gradients(
            name,
            &model,
            (by_hand * &weights).sum(Kind::Float),
            (scores * &weights).sum(Kind::Float),
        );
    }
}
