//! Training semantics on real (tiny) models: the SFT loss covers response
//! tokens only, LoRA trains adapters only, AdamW with accumulation equals
//! the large batch.

use alignflow_worker::model::{BuildOptions, Head, LoraConfig, LoraTargets, Model, ModelConfig};
use alignflow_worker::ops::training::{causal_lm_loss, right_pad};
use alignflow_worker::train::{AdamW, AdamWConfig};
use tch::{Device, Kind, Tensor};

fn tiny(head: Head, lora: Option<LoraConfig>) -> Model {
    tch::manual_seed(0);
    let cfg = ModelConfig::from_json(ModelConfig::gpt2_json(50, 32, 16, 2, 2, 0, 0.0)).unwrap();
    Model::init(
        &cfg,
        &BuildOptions {
            device: Device::Cpu,
            head,
            lora,
            kind: tch::Kind::Float,
        },
    )
}

/// The SFT loss of `rows` (tokens, response start) against a forward of
/// each row alone, by hand.
fn assert_sft_loss_by_hand(model: &Model, rows: &[(Vec<i64>, usize)]) {
    let refs: Vec<(&[i64], usize)> = rows.iter().map(|(r, s)| (r.as_slice(), *s)).collect();
    let (ids, mask, labels) = right_pad(&refs, 0, Device::Cpu);
    let (loss, counted) = tch::no_grad(|| causal_lm_loss(model, &ids, &mask, &labels, false));
    let mut total = 0.0;
    let mut n = 0;
    for (row, start) in rows {
        let ids = Tensor::from_slice(row).unsqueeze(0);
        let lp = tch::no_grad(|| model.lm.forward(&ids, &ids.ones_like(), false))
            .log_softmax(-1, Kind::Double);
        for (t, &token) in row.iter().enumerate().skip((*start).max(1)) {
            total -= lp.double_value(&[0, t as i64 - 1, token]);
            n += 1;
        }
    }
    assert_eq!(counted, n as u64);
    let expected = total / n as f64;
    assert!(
        (loss.double_value(&[]) - expected).abs() < 1e-5,
        "{} vs {expected}",
        loss.double_value(&[])
    );
}

#[test]
fn the_sft_loss_skips_a_prompt_prefix_every_row_masks() {
    let model = tiny(Head::Lm, None);
    // Responses from positions 4 and 3: the forward's last block and LM
    // head start at position 2, the loss is the same.
    assert_sft_loss_by_hand(
        &model,
        &[(vec![5, 6, 7, 1, 8, 9], 4), (vec![3, 4, 2, 1, 11], 3)],
    );
    // Pretraining rows (every token a target) lose nothing either.
    assert_sft_loss_by_hand(&model, &[(vec![5, 6, 7, 8], 0), (vec![3, 4, 2], 0)]);
}

#[test]
fn the_sft_loss_covers_response_tokens_only() {
    let model = tiny(Head::Lm, None);
    // Row 0: prompt [5, 6, 7], response [8, 9]; row 1: prompt [3], response [4, 2, 1].
    let rows: Vec<(Vec<i64>, usize)> = vec![(vec![5, 6, 7, 8, 9], 3), (vec![3, 4, 2, 1], 1)];
    let refs: Vec<(&[i64], usize)> = rows.iter().map(|(r, s)| (r.as_slice(), *s)).collect();
    let (_, _, labels) = right_pad(&refs, 0, Device::Cpu);
    assert_eq!(
        Vec::<i64>::try_from(labels.get(0)).unwrap(),
        vec![-100, -100, -100, 8, 9]
    );
    assert_eq!(
        Vec::<i64>::try_from(labels.get(1)).unwrap(),
        vec![-100, 4, 2, 1, -100]
    );
    // Each response token's -log p under a forward of its own row; 5 tokens.
    assert_sft_loss_by_hand(&model, &rows);
}

#[test]
fn lora_training_changes_adapters_only_and_base_weights_stay_bit_identical() {
    let dir = tempfile::tempdir().unwrap();
    tiny(Head::Lm, None).save(dir.path()).unwrap();
    let lora = LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: LoraTargets::Modules(vec!["c_attn".into(), "c_fc".into()]),
    };
    let model = Model::load(
        dir.path(),
        &BuildOptions {
            device: Device::Cpu,
            head: Head::Lm,
            lora: Some(lora),
            kind: tch::Kind::Float,
        },
    )
    .unwrap();
    let before: Vec<(String, Tensor)> = model
        .vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.copy()))
        .collect();
    let mut opt = AdamW::from_var_store(
        &model.vs,
        AdamWConfig {
            weight_decay: 0.1,
            ..Default::default()
        },
    )
    .unwrap();
    let ids = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6, 7, 8]).view([2, 4]);
    let mask = ids.ones_like();
    for _ in 0..3 {
        opt.zero_grad();
        let (loss, _) = causal_lm_loss(&model, &ids, &mask, &ids, true);
        loss.backward();
        opt.step(1e-2).unwrap();
    }
    let after = model.vs.variables();
    let mut adapters_moved = 0;
    for (name, old) in before {
        let new = &after[&name];
        let same = old.equal(new);
        if name.contains("lora_") {
            adapters_moved += usize::from(!same);
        } else {
            assert!(same, "base weight {name} changed");
        }
    }
    assert!(adapters_moved > 0, "the adapters trained");
}

/// Gradients, not post-Adam weights, are compared: Adam's first step moves
/// each weight by about `lr * sign(g)`, so float noise in a near-zero
/// gradient would flip a whole `lr` and say nothing about accumulation.
/// One model serves both computations (torch's global generator is shared
/// with tests running in parallel, so two inits could differ).
#[test]
fn accumulated_micro_batches_equal_one_large_batch_step() {
    let ids = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16])
        .view([4, 4]);
    let model = tiny(Head::Lm, None);
    let mut opt = AdamW::from_var_store(&model.vs, AdamWConfig::default()).unwrap();
    let mut vars: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    let grads = |opt: &mut AdamW, accumulate: bool| -> Vec<Tensor> {
        opt.zero_grad();
        if accumulate {
            // Equal-size micro-batches of equal token counts: the mean of means is the mean.
            for half in [ids.narrow(0, 0, 2), ids.narrow(0, 2, 2)] {
                let (loss, _) = causal_lm_loss(&model, &half, &half.ones_like(), &half, true);
                (loss / 2.0).backward();
            }
        } else {
            let (loss, _) = causal_lm_loss(&model, &ids, &ids.ones_like(), &ids, true);
            loss.backward();
        }
        vars.iter().map(|(_, t)| t.grad().copy()).collect()
    };
    let (a, b) = (grads(&mut opt, true), grads(&mut opt, false));
    for (x, y) in a.iter().zip(&b) {
        let diff = (x - y).abs().max().double_value(&[]);
        let scale = y.abs().max().double_value(&[]).max(1e-12);
        assert!(
            diff <= 1e-5 * scale + 1e-8,
            "gradient differs by {diff} (scale {scale})"
        );
    }
}

/// The modules a LoRA config with `targets` adapts in a tiny model of each
/// family (last path component of every `lora_A` variable).
fn adapted(config: serde_json::Value, targets: LoraTargets) -> std::collections::BTreeSet<String> {
    let cfg = ModelConfig::from_json(config).unwrap();
    let lora = LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets,
    };
    let model = Model::init(
        &cfg,
        &BuildOptions {
            device: Device::Cpu,
            head: Head::Lm,
            lora: Some(lora),
            kind: tch::Kind::Float,
        },
    );
    model
        .vs
        .variables()
        .into_keys()
        .filter_map(|n| {
            let module = n
                .split(".lora_A")
                .next()
                .filter(|_| n.contains(".lora_A"))?;
            Some(module.rsplit('.').next().unwrap().to_string())
        })
        .collect()
}

/// `lora.targets` left out adapts what PEFT adapts by default for the
/// family (GPT-2 `c_attn`; Llama `q_proj`, `v_proj`); `all-linear` every
/// linear layer of the blocks, never the LM head.
#[test]
fn lora_targets_default_per_family_and_all_linear() {
    let gpt2 = || ModelConfig::gpt2_json(64, 32, 16, 2, 2, 0, 0.0);
    let llama = || ModelConfig::llama_json(64, 32, 16, 2, 2, 1, 32, 0, true);
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
    assert_eq!(adapted(gpt2(), LoraTargets::Default), names(&["c_attn"]));
    assert_eq!(
        adapted(gpt2(), LoraTargets::AllLinear),
        names(&["c_attn", "c_proj", "c_fc"])
    );
    assert_eq!(
        adapted(llama(), LoraTargets::Default),
        names(&["q_proj", "v_proj"])
    );
    assert_eq!(
        adapted(llama(), LoraTargets::AllLinear),
        names(&[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj"
        ])
    );
}
