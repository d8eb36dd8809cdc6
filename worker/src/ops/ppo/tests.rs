//! `ppo` on tiny random models, through its `run` entry: LoRA's reference
//! is the base model and only adapters train, the value model's start, the
//! learning-rate schedule, reward normalisation against reference samples,
//! the critic-free GRPO mode.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use alignflow_ops::protocol::{Metrics, StageSpec};
use alignflow_ops::text::Tokenizer;
use alignflow_ops::{CancelFlag, NullReporter, PpoValueInit, StageContext};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use super::reward_norm::reference_scores;
use super::reward_source::Rewards;
use super::setup::{value_model, Reference};
use super::*;
use crate::model::sample::SamplingConfig;
use crate::model::{BuildOptions, Head, LoraConfig, LoraTargets, Model, ModelConfig};

/// A tiny tokenizer, GPT-2 policy and preference model, and prompts.
struct Fixture {
    _dir: tempfile::TempDir,
    root: PathBuf,
    policy: PathBuf,
    /// The same weights as `policy`, with GPT-2's dropout of 0.1 in its config.
    policy_dropout: PathBuf,
    pm: PathBuf,
    prompts: PathBuf,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_path_buf();
    let corpus = root.join("corpus.txt");
    std::fs::write(
        &corpus,
        "Human: tell me about the sun\nAssistant: the sun is a big red star in the sky\n"
            .repeat(20),
    )
    .unwrap();
    let tok_out = root.join("tok");
    std::fs::create_dir_all(&tok_out).unwrap();
    let op = alignflow_ops::find("tokenizer.train").unwrap();
    let params = op.normalize_params(&json!({"vocab_size": 280})).unwrap();
    let spec = spec(
        "tok",
        "tokenizer.train",
        params,
        &[("data", corpus)],
        &tok_out,
    );
    alignflow_ops::tokenizer_train::run(&StageContext {
        spec: &spec,
        reporter: &NullReporter,
        cancel: &CancelFlag::default(),
    })
    .unwrap();
    let tok_dir = tok_out.join("tokenizer");
    let tokenizer = Tokenizer::from_dir(&tok_dir).unwrap();
    let vocab = tokenizer.vocab_size() as i64;
    let eos = tokenizer.eos_id.map(i64::from).unwrap_or(0);
    let config = |dropout| {
        ModelConfig::from_json(ModelConfig::gpt2_json(vocab, 48, 32, 2, 2, eos, dropout)).unwrap()
    };
    let save_with = |name: &str, head: Head, seed: i64, dropout: f64| {
        let cfg = config(dropout);
        tch::manual_seed(seed);
        let mut m = Model::init(
            &cfg,
            &BuildOptions {
                device: Device::Cpu,
                head,
                lora: None,
                kind: tch::Kind::Float,
            },
        );
        // Larger embeddings make the random policy far from uniform, so
        // LoRA and the PM have something to move.
        tch::no_grad(|| {
            for (name, mut v) in m.vs.variables() {
                if name.ends_with("wte.weight") {
                    let _ = v.g_mul_scalar_(10.0);
                }
            }
        });
        let out = root.join(name);
        m.save(&out).unwrap();
        for f in std::fs::read_dir(&tok_dir).unwrap() {
            let f = f.unwrap().path();
            std::fs::copy(&f, out.join(f.file_name().unwrap())).unwrap();
        }
        out
    };
    let save = |name: &str, head: Head, seed: i64| save_with(name, head, seed, 0.0);
    let policy = save("policy", Head::Lm, 1);
    let policy_dropout = save_with("policy_dropout", Head::Lm, 1, 0.1);
    let pm = save("pm", Head::Reward, 2);
    let prompts = root.join("prompts.jsonl");
    let lines: Vec<String> = ["sun", "sky", "star", "red", "moon", "tree"]
        .iter()
        .map(|w| json!({"prompt": format!("Human: tell me about the {w}\nAssistant:")}).to_string())
        .collect();
    std::fs::write(&prompts, lines.join("\n") + "\n").unwrap();
    Fixture {
        _dir: dir,
        root,
        policy,
        policy_dropout,
        pm,
        prompts,
    }
}

fn spec(stage: &str, op: &str, params: Value, inputs: &[(&str, PathBuf)], out: &Path) -> StageSpec {
    let found = alignflow_ops::find(op).unwrap();
    StageSpec {
        pipeline: "test".into(),
        stage: stage.into(),
        op: op.into(),
        op_version: found.version,
        params,
        inputs: inputs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
        outputs: found
            .declared_outputs()
            .iter()
            .map(|p| p.name.to_string())
            .collect(),
        out_dir: out.to_path_buf(),
        work_dir: out.to_path_buf(),
        checkpoint_dir: out.join("ckpt"),
        device: "cpu".into(),
        seed: 5,
        threads: None,
    }
}

/// Runs `ppo` with `params` (over small defaults) into `ROOT/NAME`; returns
/// its summary, metrics lines and output folder.
fn run_ppo(f: &Fixture, name: &str, params: Value) -> (Metrics, Vec<Value>, PathBuf) {
    run_ppo_with(f, name, params, Passes::Auto)
}

fn run_ppo_with(
    f: &Fixture,
    name: &str,
    params: Value,
    passes: Passes,
) -> (Metrics, Vec<Value>, PathBuf) {
    run_ppo_on(f, &f.policy, name, params, passes)
}

fn run_ppo_on(
    f: &Fixture,
    policy: &Path,
    name: &str,
    params: Value,
    passes: Passes,
) -> (Metrics, Vec<Value>, PathBuf) {
    let mut all = json!({
        "iterations": 2, "batch_size": 3, "max_new_tokens": 5, "lr": 1e-3,
        "checkpoint_every": 0, "temperature": 1.0,
    });
    for (k, v) in params.as_object().unwrap() {
        all[k] = v.clone();
    }
    let op = alignflow_ops::find("ppo").unwrap();
    let out = f.root.join(name);
    std::fs::create_dir_all(&out).unwrap();
    let spec = spec(
        name,
        "ppo",
        op.normalize_params(&all).unwrap(),
        &[
            ("policy", policy.to_path_buf()),
            ("reward_model", f.pm.clone()),
            ("prompts", f.prompts.clone()),
        ],
        &out,
    );
    let ctx = StageContext {
        spec: &spec,
        reporter: &NullReporter,
        cancel: &CancelFlag::default(),
    };
    let metrics = run_with(&ctx, passes).unwrap();
    let lines = std::fs::read_to_string(out.join("metrics"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (metrics, lines, out.join("model"))
}

fn tensors(dir: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(dir.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

fn lora(targets: &[&str]) -> Option<LoraConfig> {
    Some(LoraConfig {
        rank: 2,
        alpha: 4.0,
        dropout: 0.0,
        targets: LoraTargets::Modules(targets.iter().map(|t| t.to_string()).collect()),
    })
}

#[test]
fn with_adapters_off_the_lora_policy_is_exactly_the_base_model() {
    let _rng = crate::testing::torch_rng();
    let f = fixture();
    let opts = |lora| BuildOptions {
        device: Device::Cpu,
        head: Head::Lm,
        lora,
        kind: tch::Kind::Float,
    };
    // The reference before LoRA: a frozen copy. (Frozen weights matter
    // bitwise: libtorch's CPU kernels differ in the last bit between
    // weights that require a gradient and weights that do not.)
    let mut base = Model::load(&f.policy, &opts(None)).unwrap();
    base.vs.freeze();
    tch::manual_seed(3);
    let policy = Model::load(&f.policy, &opts(lora(&["c_attn", "c_fc"]))).unwrap();
    // Trained adapters: B is zero at init, so give it weight.
    tch::no_grad(|| {
        for (name, mut v) in policy.vs.variables() {
            if name.contains("lora_B") {
                v.copy_(&(Tensor::randn(v.size(), (Kind::Float, Device::Cpu)) * 0.5));
            }
        }
    });
    let ids = Tensor::from_slice(&[5i64, 9, 14, 3, 7, 22, 8, 30, 2, 11, 4, 6]).view([2, 6]);
    let mask = Tensor::ones([2, 6], (Kind::Int64, Device::Cpu));
    let resp = ids.narrow(1, 3, 3);
    let lp = |m: &Model| {
        tch::no_grad(|| response_logprobs(m, &ids, &mask, &resp, 3, 1.0, false, false).logp)
    };
    let want = lp(&base);
    let off = Reference::AdaptersOff.with(&policy, lp);
    assert!(off.equal(&want), "{off} vs {want}");
    let on = lp(&policy);
    let moved = (&on - &want).abs().max().double_value(&[]);
    assert!(moved > 1e-3, "the adapters change the policy: {moved}");
    // The switch is scoped: adapters are back on after it.
    assert!(lp(&policy).equal(&on));
}

#[test]
fn lora_trains_only_the_adapters_and_saves_merged_weights() {
    let _rng = crate::testing::torch_rng();
    let f = fixture();
    let (_, lines, model) = run_ppo(
        &f,
        "lora",
        json!({"lora": {"rank": 2, "alpha": 4.0, "targets": ["c_attn"]}, "lr": 1e-2}),
    );
    assert_eq!(lines.len(), 2);
    // The reference is the starting policy: no KL at the first rollout.
    assert!(
        lines[0]["kl"].as_f64().unwrap().abs() < 1e-5,
        "{}",
        lines[0]
    );
    let before = tensors(&f.policy);
    let after = tensors(&model);
    assert_eq!(
        before.keys().collect::<Vec<_>>(),
        after.keys().collect::<Vec<_>>()
    );
    let mut adapted = 0;
    for (name, b) in &before {
        let a = &after[name];
        if name.ends_with("attn.c_attn.weight") {
            // Merged: W + alpha/r * (B A)^T, a rank-2 change.
            let delta = (a - b).to_kind(Kind::Double);
            let (_, sv, _) = delta.svd(true, false);
            let sv: Vec<f64> = Vec::try_from(&sv).unwrap();
            assert!(sv[0] > 1e-6, "{name} did not move: {sv:?}");
            assert!(sv[2] < 1e-5 * sv[0], "{name}: change of rank > 2: {sv:?}");
            adapted += 1;
        } else {
            assert!(a.equal(b), "{name} changed without an adapter");
        }
    }
    assert_eq!(adapted, 2, "one c_attn per layer");
}

#[test]
fn a_lora_target_that_matches_nothing_is_refused_naming_the_field() {
    let _rng = crate::testing::torch_rng();
    let f = fixture();
    let op = alignflow_ops::find("ppo").unwrap();
    let out = f.root.join("bad");
    std::fs::create_dir_all(&out).unwrap();
    let params = op
        .normalize_params(&json!({"lora": {"targets": ["q_proj"]}}))
        .unwrap();
    let spec = spec(
        "rl",
        "ppo",
        params,
        &[
            ("policy", f.policy.clone()),
            ("reward_model", f.pm.clone()),
            ("prompts", f.prompts.clone()),
        ],
        &out,
    );
    let err = run(&StageContext {
        spec: &spec,
        reporter: &NullReporter,
        cancel: &CancelFlag::default(),
    })
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("stage `rl`, field `params.lora.targets`"),
        "{err}"
    );
}

#[test]
fn the_value_model_starts_from_the_reward_model_with_a_fresh_head() {
    let _rng = crate::testing::torch_rng();
    let f = fixture();
    tch::manual_seed(0);
    let critic = value_model(
        PpoValueInit::RewardModel,
        &f.policy,
        Some(&f.pm),
        Device::Cpu,
    )
    .unwrap();
    let vars = critic.vs.variables();
    let pm = tensors(&f.pm);
    let policy = tensors(&f.policy);
    let name = "transformer.h.0.attn.c_attn.weight";
    assert!(vars[name].equal(&pm[name]), "backbone from the PM");
    assert!(!vars[name].equal(&policy[name]));
    assert!(pm.contains_key("score.weight"));
    assert!(
        !vars.keys().any(|k| k.starts_with("score.")),
        "no score head"
    );
    let head = &vars["v_head.summary.weight"];
    assert_eq!(head.size(), [1, 32]);
    assert!(head.requires_grad() && vars[name].requires_grad());
    let from_policy =
        value_model(PpoValueInit::Policy, &f.policy, Some(&f.pm), Device::Cpu).unwrap();
    assert!(from_policy.vs.variables()[name].equal(&policy[name]));
    // And the op runs with it.
    let (_, lines, _) = run_ppo(&f, "vinit", json!({"value_init": "reward_model"}));
    assert!(lines[1]["value_loss"].as_f64().unwrap().is_finite());
}

#[test]
fn linear_decay_and_warmup_set_each_iterations_rate() {
    let _rng = crate::testing::torch_rng();
    let f = fixture();
    // bf16 is ignored on CPU.
    let (_, lines, _) = run_ppo(
        &f,
        "linear",
        json!({"iterations": 4, "lr_schedule": "linear", "bf16": true}),
    );
    let lrs: Vec<f64> = lines.iter().map(|l| l["lr"].as_f64().unwrap()).collect();
    // TRL's anneal_lr: lr * (1 - (i - 1) / n) for iteration i of n = 4.
    assert_eq!(lrs, [1e-3, 7.5e-4, 5e-4, 2.5e-4]);
    for l in &lines {
        assert!(l["seconds"].as_f64().unwrap() > 0.0, "{l}");
    }
    let (_, lines, _) = run_ppo(
        &f,
        "warm",
        json!({"iterations": 4, "lr_schedule": "constant", "warmup_iterations": 2}),
    );
    let lrs: Vec<f64> = lines.iter().map(|l| l["lr"].as_f64().unwrap()).collect();
    // Warm-up: lr * (i - 1) / 2 for i = 1, 2; then constant.
    assert_eq!(lrs, [0.0, 5e-4, 1e-3, 1e-3]);
}

#[test]
fn reward_norm_maps_the_reference_scores_to_mean_0_std_1() {
    let _rng = crate::testing::torch_rng();
    let f = fixture();
    let (metrics, lines, _) = run_ppo(
        &f,
        "norm",
        json!({"reward_norm": {"samples": 10, "mean": 0.0, "std": 1.0}, "iterations": 1}),
    );
    let gain = metrics["reward_gain"].as_f64().unwrap();
    let bias = metrics["reward_bias"].as_f64().unwrap();
    assert_eq!(lines[0]["reward_gain"].as_f64(), Some(gain));
    assert_eq!(lines[0]["reward_bias"].as_f64(), Some(bias));
    // The same reference samples, drawn again: the op's seed, batch size
    // and sampling settings.
    tch::manual_seed(5);
    let opts = |head| BuildOptions {
        device: Device::Cpu,
        head,
        lora: None,
        kind: tch::Kind::Float,
    };
    let policy = Model::load(&f.policy, &opts(Head::Lm)).unwrap();
    let pm = Model::load(&f.pm, &opts(Head::Reward)).unwrap();
    let tokenizer = Tokenizer::from_dir(&f.policy).unwrap();
    let prompts: Vec<Vec<i64>> = std::fs::read_to_string(&f.prompts)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            tokenizer.encode(v["prompt"].as_str().unwrap()).unwrap()
        })
        .collect();
    let cfg = SamplingConfig {
        max_new_tokens: 5,
        temperature: 1.0,
        eos_token_ids: tokenizer.eos_id.map(i64::from).into_iter().collect(),
        pad_token_id: policy.lm.cfg.pad_id(),
        ..Default::default()
    };
    // Scored as the op scores them: through the stage-long oneDNN packs.
    let rewards = Rewards::from_pm(pm, Tokenizer::from_dir(&f.policy).unwrap());
    let _packed = rewards.packed();
    let raw = reference_scores(
        &policy,
        &Reference::AdaptersOff,
        &rewards,
        &prompts,
        10,
        3,
        &cfg,
        5,
        false,
    )
    .unwrap();
    assert_eq!(raw.len(), 10);
    let normed: Vec<f64> = raw.iter().map(|s| gain * s + bias).collect();
    let mean = normed.iter().sum::<f64>() / 10.0;
    let std = (normed.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 10.0).sqrt();
    assert!(mean.abs() < 1e-9, "mean {mean} of {normed:?}");
    assert!((std - 1.0).abs() < 1e-9, "std {std} of {normed:?}");
    // The scores the policy optimises are the raw ones through the same map.
    let (score, raw_score) = (
        lines[0]["score"].as_f64().unwrap(),
        lines[0]["raw_score"].as_f64().unwrap(),
    );
    let tol = 1e-4 * (1.0 + (gain * raw_score).abs() + bias.abs());
    assert!(
        (score - (gain * raw_score + bias)).abs() < tol,
        "{}",
        lines[0]
    );
}

#[test]
fn the_new_knobs_at_their_defaults_leave_the_normalised_params_unchanged() {
    // Existing `ppo` stages keep their cache keys.
    let op = alignflow_ops::find("ppo").unwrap();
    let plain = op.normalize_params(&json!({})).unwrap();
    let explicit = op
        .normalize_params(&json!({
            "advantage": "gae", "samples_per_prompt": 1, "scale_std": true, "kl_mode": "reward",
        }))
        .unwrap();
    assert_eq!(plain, explicit);
    for key in ["advantage", "samples_per_prompt", "scale_std", "kl_mode"] {
        assert!(plain.get(key).is_none(), "{key}: {plain}");
    }
    let err = op
        .normalize_params(&json!({"advantage": "rloo"}))
        .unwrap_err();
    assert_eq!(err.field, "samples_per_prompt");
    assert!(err.message.contains("at least 2"), "{}", err.message);
}

#[test]
fn grpo_trains_without_a_value_model_and_resumes_from_a_policy_only_checkpoint() {
    let _rng = crate::testing::torch_rng();
    let f = fixture();
    let params = json!({
        "advantage": "grpo", "samples_per_prompt": 3, "iterations": 3, "checkpoint_every": 1,
    });
    let (_, lines, model) = run_ppo(&f, "grpo", params.clone());
    assert_eq!(lines.len(), 3);
    for l in &lines {
        assert!(
            l["value_loss"].is_null() && l["explained_variance"].is_null(),
            "{l}"
        );
        assert!(l["policy_loss"].as_f64().unwrap().is_finite(), "{l}");
        assert!(l["group_reward_std"].as_f64().unwrap() >= 0.0, "{l}");
    }
    let ckpt = f.root.join("grpo").join("ckpt").join("ppo");
    let files: Vec<String> = std::fs::read_dir(&ckpt)
        .unwrap()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).unwrap().flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(files.iter().any(|n| n.starts_with("policy")), "{files:?}");
    assert!(!files.iter().any(|n| n.starts_with("value")), "{files:?}");

    // Rerun into the same folder: it resumes from iteration 2's checkpoint
    // and ends with the same weights as the uninterrupted run.
    let before = tensors(&model);
    let (_, again, model) = run_ppo(&f, "grpo", params);
    assert_eq!(again.len(), 3);
    let after = tensors(&model);
    for (name, t) in &before {
        assert!(t.equal(&after[name]), "{name}");
    }
    // The policy moved at all.
    let start = tensors(&f.policy);
    assert!(before
        .iter()
        .any(|(n, t)| start.get(n).is_some_and(|s| !t.equal(s))));
}

#[test]
fn one_epoch_of_one_minibatch_reuses_the_update_forwards_and_matches_separate_passes() {
    let _rng = crate::testing::torch_rng();
    // Passes::Auto takes the rollout's log-probs and values from the
    // update's own forwards; Passes::Separate computes them first with
    // no-grad forwards. Same numbers up to float summation order.
    let f = fixture();
    let params = json!({"iterations": 3, "ppo_epochs": 1, "minibatches": 1, "batch_size": 4});
    let (_, fused, fused_model) = run_ppo_with(&f, "fused", params.clone(), Passes::Auto);
    let (_, separate, separate_model) = run_ppo_with(&f, "separate", params, Passes::Separate);
    assert_eq!(fused.len(), 3);
    for (a, b) in fused.iter().zip(&separate) {
        for key in [
            "score",
            "kl",
            "entropy",
            "policy_loss",
            "value_loss",
            "approx_kl",
            "clip_frac",
            "explained_variance",
        ] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            assert!(
                (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                "{key}: {x} vs {y}\n{a}\n{b}"
            );
        }
        // The first minibatch of the first epoch: the ratio is 1, exactly
        // when fused; when separate, only if the rollout's log-probs are
        // the policy's as the update computes them (same temperature,
        // same positions).
        assert_eq!(a["clip_frac"].as_f64(), Some(0.0), "{a}");
        assert_eq!(b["clip_frac"].as_f64(), Some(0.0), "{b}");
    }
    let (a, b) = (tensors(&fused_model), tensors(&separate_model));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let diff = (t - &b[name]).abs().max().double_value(&[]);
        assert!(diff < 1e-5, "{name}: max difference {diff}");
    }
    // The weights did move: this compares two trainings, not two no-ops.
    let start = tensors(&f.policy);
    let moved = a
        .iter()
        .map(|(n, t)| (t - &start[n]).abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    assert!(moved > 1e-4, "the policy did not train: {moved}");
}

#[test]
fn dropout_is_on_in_the_update_forwards_and_never_in_the_rollouts() {
    let _rng = crate::testing::torch_rng();
    let f = fixture();
    let params = json!({"iterations": 2, "ppo_epochs": 1, "minibatches": 1, "batch_size": 4});
    let mut on_params = params.clone();
    on_params["dropout"] = json!(true);
    let policy = &f.policy_dropout;
    let (_, on, on_model) = run_ppo_on(&f, policy, "on", on_params.clone(), Passes::Auto);
    let (_, _, sep_model) = run_ppo_on(&f, policy, "sep", on_params, Passes::Separate);
    let (_, off, off_model) = run_ppo_on(&f, policy, "off", params.clone(), Passes::Auto);
    let first = |lines: &[Value], key: &str| lines[0][key].as_f64().unwrap();

    // The rollout's log-probs are dropout-free: in the first iteration the
    // policy is still the reference, so their KL is 0.
    assert!(first(&on, "kl").abs() < 1e-6, "{}", on[0]);
    // The update's forward has dropout: the ratio to the rollout's
    // log-probs is no longer 1 in the very first step.
    assert!(first(&on, "approx_kl") > 1e-6, "{}", on[0]);
    // Off (the default), the same checkpoint trains dropout-free, its
    // update forwards standing in for the rollout's: a ratio of exactly 1.
    assert_eq!(first(&off, "approx_kl"), 0.0, "{}", off[0]);
    assert!(first(&off, "kl").abs() < 1e-6, "{}", off[0]);
    // With dropout on, Passes::Auto took separate rollout passes: the same
    // training as Passes::Separate, bit for bit.
    assert_eq!(tensors(&on_model), tensors(&sep_model));
    // And the switch changed the training.
    assert_ne!(tensors(&on_model), tensors(&off_model));
    // Off, the dropout in the config is ignored: the same training as the
    // dropout-free checkpoint with the same weights.
    let (_, _, plain_model) = run_ppo_with(&f, "plain", params, Passes::Auto);
    assert_eq!(tensors(&off_model), tensors(&plain_model));
}

#[test]
fn a_lora_critic_on_the_shared_base_equals_a_separately_held_one() {
    let _rng = crate::testing::torch_rng();
    let f = fixture();
    let lora = alignflow_ops::training::LoraParams {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Some(alignflow_ops::training::LoraTargets::Modules(vec![
            "c_attn".into(),
            "c_fc".into(),
        ])),
    };
    tch::manual_seed(3);
    let policy = Model::load(
        &f.policy,
        &BuildOptions {
            lora: Some(LoraConfig::from(&lora)),
            ..BuildOptions::new(Device::Cpu, Head::Lm)
        },
    )
    .unwrap();
    let params: alignflow_ops::PpoParams =
        serde_json::from_value(json!({"lora": lora, "value_model": "lora"})).unwrap();
    let shared = super::setup::lora_critic(&params, &policy, &Reference::AdaptersOff).unwrap();
    // A critic of its own: the base loaded again, the same adapters and head.
    let separate = Model::load(
        &f.policy,
        &BuildOptions {
            lora: Some(LoraConfig::from(&lora)),
            ..BuildOptions::new(Device::Cpu, Head::Value)
        },
    )
    .unwrap();
    let theirs = separate.vs.variables();
    tch::no_grad(|| {
        for (name, t) in shared.vs.variables() {
            let mut dst = theirs[&name].shallow_clone();
            if name.contains("lora_") || name.starts_with("v_head.") {
                // Nonzero B: the adapters change the values.
                let _ = t.shallow_clone().copy_(&(Tensor::randn_like(&t) * 0.1));
                let _ = dst.set_requires_grad(true);
            }
            dst.copy_(&t);
        }
    });
    let trained =
        |m: &Model| -> Vec<String> { m.trainable().into_iter().map(|(n, _)| n).collect() };
    assert_eq!(trained(&shared), trained(&separate));
    assert!(trained(&shared)
        .iter()
        .all(|n| n.contains("lora_") || n.starts_with("v_head.")));
    // One copy of the base: every base weight of the shared critic is the
    // policy's own storage.
    let (own, base) = crate::model::storage_bytes(&shared, &policy);
    let (alone, _) = crate::model::storage_bytes(&separate, &policy);
    let adapters: i64 = shared
        .trainable()
        .iter()
        .map(|(_, t)| t.numel() as i64 * 4)
        .sum();
    assert_eq!(
        own, adapters,
        "the shared critic holds only adapters and head"
    );
    assert_eq!(alone, own + base, "a separate critic holds the base again");
    eprintln!("LoRA critic: {own} bytes of its own, {base} shared; a separate one holds {alone}");

    let ids = Tensor::randint(200, [3, 10], (Kind::Int64, Device::Cpu));
    let mask = ids.ones_like();
    let values = |m: &Model| {
        let v = response_values(m, &ids, &mask, 4, 6, false);
        v.square().sum(Kind::Float).backward();
        let grads: BTreeMap<String, Tensor> = m
            .trainable()
            .into_iter()
            .map(|(n, t)| (n, t.grad().copy()))
            .collect();
        (v.detach(), grads)
    };
    let (v1, g1) = values(&shared);
    let (v2, g2) = values(&separate);
    assert!(
        (&v1 - &v2).abs().max().double_value(&[]) < 1e-6,
        "{v1} vs {v2}"
    );
    for (name, g) in &g1 {
        let diff = (g - &g2[name]).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "`{name}`: {diff}");
    }
    // The policy's own adapters and the reference are untouched by the critic.
    assert!(policy
        .trainable()
        .iter()
        .all(|(_, t)| !t.grad().defined() || t.grad().abs().max().double_value(&[]) == 0.0));
    // And the op runs with it.
    let (_, lines, _) = run_ppo(
        &f,
        "lora-critic",
        json!({"lora": {"rank": 4, "targets": ["c_attn"]}, "value_model": "lora"}),
    );
    assert!(lines[1]["value_loss"].as_f64().unwrap().is_finite());
}

/// With a fully trained policy, `value_model: lora` puts the critic's
/// adapters on the reference's frozen copy: no weight of the policy, no
/// second full model, and the op trains with it.
#[test]
fn a_lora_critic_of_a_fully_trained_policy_sits_on_the_reference() {
    let _rng = crate::testing::torch_rng();
    let f = fixture();
    let policy = Model::load(&f.policy, &BuildOptions::new(Device::Cpu, Head::Lm)).unwrap();
    let reference = Reference::Copy(
        crate::ops::load::frozen(
            &f.policy,
            Device::Cpu,
            Head::Lm,
            alignflow_ops::Dtype::Float32,
        )
        .unwrap(),
    );
    let params: alignflow_ops::PpoParams = serde_json::from_value(
        json!({"value_model": "lora", "critic_lora": {"rank": 4, "targets": ["c_attn", "c_fc"]}}),
    )
    .unwrap();
    let critic = super::setup::lora_critic(&params, &policy, &reference).unwrap();
    let Reference::Copy(copy) = &reference else {
        unreachable!()
    };
    let (own, on_reference) = crate::model::storage_bytes(&critic, copy);
    let (_, on_policy) = crate::model::storage_bytes(&critic, &policy);
    let trained: i64 = critic
        .trainable()
        .iter()
        .map(|(_, t)| t.numel() as i64 * 4)
        .sum();
    assert_eq!(own, trained, "the critic holds only its adapters and head");
    assert!(
        on_reference > 0 && on_policy == 0,
        "{on_reference} {on_policy}"
    );
    assert!(critic
        .trainable()
        .iter()
        .all(|(n, _)| n.contains("lora_") || n.starts_with("v_head.")));
    // The op trains the whole policy beside it.
    let (_, lines, model) = run_ppo(&f, "full-lora-critic", json!({"value_model": "lora"}));
    assert!(lines[1]["value_loss"].as_f64().unwrap().is_finite());
    let before = tensors(&f.policy);
    let after = tensors(&model);
    let changed = before.iter().filter(|(n, t)| after[*n] != **t).count();
    assert!(
        changed * 2 > before.len(),
        "{changed} of {} tensors trained",
        before.len()
    );
}

#[test]
fn critic_lora_needs_value_model_lora() {
    let op = alignflow_ops::find("ppo").unwrap();
    let err = op
        .normalize_params(&json!({"critic_lora": {"rank": 4}}))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("critic_lora") && err.contains("needs `value_model: lora`"),
        "{err}"
    );
}
