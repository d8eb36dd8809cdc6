//! The first optimizer step's loss of every training op against an
//! independent computation (`tests/parity/loss_reference.py`: Hugging Face
//! transformers + plain PyTorch, no alignflow code) on tiny random-init
//! checkpoints made by transformers, relative tolerance 1e-5.
//!
//! Each op runs with one batch covering the whole data set (`batch_size` =
//! examples, one step, no held-out split) and its step-1 `loss` is read from
//! `metrics.jsonl` (the loss of the first batch, before the update). The
//! Python side also prints the loss under other conventions (EOS not
//! counted, mean over sequences, reward read elsewhere, another smoothing
//! formula, ...); each must be farther than [`SEPARATION`] from the
//! reference, so a convention change fails the test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use alignflow_ops::protocol::{Metrics, StageSpec};
use alignflow_ops::RunFn;
use alignflow_ops::{CancelFlag, NullReporter, StageContext};
use serde_json::{json, Value};

/// Relative tolerance between alignflow's loss and the reference.
const TOL: f64 = 1e-5;
/// Smallest relative distance from the reference of a loss under another
/// convention (ten times the tolerance): a convention change fails the test.
const SEPARATION: f64 = 10.0 * TOL;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `loss_reference.py ARGS`; its one JSON line.
fn reference(args: &[&str]) -> Value {
    let out = Command::new(repo().join(".venv/bin/python"))
        .arg(repo().join("tests/parity/loss_reference.py"))
        .args(args)
        .output()
        .expect("the project venv's python runs (make setup)");
    assert!(
        out.status.success(),
        "loss_reference.py {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_json::from_str(text.lines().last().expect("one JSON line")).unwrap()
}

/// A fresh folder under cargo's target tmp dir (replaced on every run, so
/// nothing piles up in /tmp).
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("loss_parity")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ------------------------------------------------------------------ data

fn sft_records() -> Vec<Value> {
    vec![
        json!({"prompt": "how do I bake bread?", "response": " Mix flour, water and yeast, then bake it."}),
        json!({"prompt": "hi", "response": " Hello! How can I help?"}),
        json!({"prompt": "what is bread?", "response": " Food."}),
        json!({"prompt": "is the sky blue?", "response": " Yes, on a clear day it is blue."}),
    ]
}

/// HH-shaped comparisons; `labels` gives each record's `label`.
fn hh_records(labels: [f64; 4]) -> Vec<Value> {
    let base = [
        (
            "\n\nHuman: how do I bake bread?\n\nAssistant:",
            " Mix flour, water and yeast, then bake it.",
            " No.",
        ),
        (
            "\n\nHuman: hi\n\nAssistant:",
            " Hello! How can I help?",
            " Go away.",
        ),
        (
            "\n\nHuman: what is bread?\n\nAssistant:",
            " Bread is baked from flour.",
            " I will not say.",
        ),
        (
            "\n\nHuman: is the sky blue?\n\nAssistant:",
            " Yes, on a clear day.",
            " The sky is green.",
        ),
    ];
    base.iter()
        .zip(labels)
        .map(|((p, c, r), l)| json!({"prompt": p, "chosen": c, "rejected": r, "label": l}))
        .collect()
}

/// ai_feedback-shaped comparisons (the `extra` set of pm.train).
fn ai_records() -> Vec<Value> {
    vec![
        json!({"prompt": "\n\nHuman: tell me a joke\n\nAssistant:", "response_a": " Why did the bread rise? It was kneaded.", "response_b": " No jokes.", "p_a": 0.9}),
        json!({"prompt": "\n\nHuman: help me\n\nAssistant:", "response_a": " Go away.", "response_b": " Sure, what do you need?", "p_a": 0.2}),
    ]
}

/// Rankings, best first (pm.pretrain): each gives 3 pairs.
fn ranking_records() -> Vec<Value> {
    vec![
        json!({"prompt": "\n\nHuman: name a fruit\n\nAssistant:", "responses": [" An apple.", " A rock.", " No."]}),
        json!({"prompt": "\n\nHuman: what is two plus two?\n\nAssistant:", "responses": [" Four.", " Five.", " Bread."]}),
    ]
}

fn pretrain_records() -> Vec<Value> {
    [
        "The cat sat on the mat and looked at the bread.",
        "Mix flour, water and yeast, then bake it for an hour.",
        "On a clear day the sky is blue; at night it is dark.",
        "Hello! How can I help you today?",
        "Why did the bread rise? It was kneaded.",
    ]
    .iter()
    .map(|t| json!({"text": t}))
    .collect()
}

fn write_jsonl(path: &Path, records: &[Value]) -> PathBuf {
    let lines: Vec<String> = records.iter().map(Value::to_string).collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
    path.to_path_buf()
}

// ------------------------------------------------------------------ fixture

/// The tokenizer and the checkpoints every case shares.
struct Fixture {
    dir: PathBuf,
    tokenizer: PathBuf,
    /// GPT-2, seed 1, dropout 0.1 in its config.
    gpt2_dropout: PathBuf,
    /// The same weights (seed 1), dropout 0 in its config.
    gpt2: PathBuf,
    /// GPT-2, seed 2, dropout 0.1: DPO's reference.
    gpt2_ref: PathBuf,
    /// Llama (GQA, tied), seed 3, no dropout.
    llama: PathBuf,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = scratch("fixture");
        // A byte-level BPE trained (tokenizer.train) on all the texts.
        let mut corpus: Vec<Value> = sft_records();
        corpus.extend(hh_records([1.0; 4]));
        corpus.extend(ai_records().into_iter().map(|r| {
            json!({"prompt": r["prompt"], "chosen": r["response_a"], "rejected": r["response_b"]})
        }));
        corpus.extend(pretrain_records());
        let mut repeated = Vec::new();
        for _ in 0..10 {
            repeated.extend(corpus.iter().cloned());
        }
        let data = write_jsonl(&dir.join("corpus.jsonl"), &repeated);
        let out = dir.join("tok-out");
        let spec = spec(
            "tok",
            "tokenizer.train",
            json!({"vocab_size": 300}),
            [("data", data)],
            &out,
        );
        run_stage(&spec, alignflow_ops::tokenizer_train::run).unwrap();
        let tokenizer = out.join("tokenizer");

        // name:arch:seed:dropout (the dropout of config.json)
        reference(&[
            "make-models",
            s(&dir),
            "--tokenizer",
            s(&tokenizer),
            "gpt2_dropout:gpt2:1:0.1",
            "gpt2:gpt2:1:0.0",
            "gpt2_ref:gpt2:2:0.1",
            "llama:llama:3:0.0",
        ]);
        Fixture {
            tokenizer,
            gpt2_dropout: dir.join("gpt2_dropout"),
            gpt2: dir.join("gpt2"),
            gpt2_ref: dir.join("gpt2_ref"),
            llama: dir.join("llama"),
            dir,
        }
    })
}

// ------------------------------------------------------------------ running ops

fn spec<const N: usize>(
    stage: &str,
    op: &str,
    params: Value,
    inputs: [(&str, PathBuf); N],
    out: &Path,
) -> StageSpec {
    let decl = alignflow_ops::find(op).unwrap();
    std::fs::create_dir_all(out.join("ckpt")).unwrap();
    StageSpec {
        pipeline: "loss-parity".into(),
        stage: stage.into(),
        op: op.into(),
        op_version: decl.version,
        params: decl.normalize_params(&params).unwrap(),
        inputs: inputs
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect::<BTreeMap<_, _>>(),
        outputs: decl
            .declared_outputs()
            .iter()
            .map(|p| p.name.to_string())
            .collect(),
        out_dir: out.to_path_buf(),
        work_dir: out.to_path_buf(),
        checkpoint_dir: out.join("ckpt"),
        device: "cpu".into(),
        seed: 11,
        threads: Some(1),
    }
}

/// Runs `f` (an op's run function) on `spec`.
fn run_stage(spec: &StageSpec, f: RunFn) -> anyhow::Result<Metrics> {
    let cancel = CancelFlag::default();
    f(&StageContext {
        spec,
        reporter: &NullReporter,
        cancel: &cancel,
    })
}

/// Runs worker op `op` in `dir/stage`; returns the output folder.
fn run_op<const N: usize>(
    stage: &str,
    op: &str,
    params: Value,
    inputs: [(&str, PathBuf); N],
) -> PathBuf {
    let out = fixture().dir.join(stage);
    let spec = spec(stage, op, params, inputs, &out);
    run_stage(&spec, alignflow_worker::ops::implementation(op).unwrap())
        .unwrap_or_else(|e| panic!("{stage}: {e:#}"));
    out
}

/// Step 1's metrics line (`ckpt/metrics.jsonl`, first line).
fn step1(out: &Path) -> Value {
    let text = std::fs::read_to_string(out.join("ckpt/metrics.jsonl")).unwrap();
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["step"], 1);
    first
}

/// Asserts alignflow's `got` equals the reference's loss within [`TOL`]
/// and that every other convention's loss is farther than [`SEPARATION`].
fn check(case: &str, got: f64, reference: &Value) -> f64 {
    let want = reference["loss"].as_f64().unwrap();
    let rel = (got - want).abs() / want.abs();
    eprintln!("{case}: alignflow {got:.9}, reference {want:.9}, rel diff {rel:.3e}");
    for (name, alt) in reference["alternatives"].as_object().unwrap() {
        let alt = alt.as_f64().unwrap();
        let sep = (alt - want).abs() / want.abs();
        eprintln!("  {case}: under `{name}` it would be {alt:.9} (rel {sep:.3e})");
        assert!(
            sep > SEPARATION,
            "{case}: convention `{name}` gives {alt}, too close to {want} to be told apart"
        );
    }
    assert!(
        rel < TOL,
        "{case}: alignflow's step-1 loss {got} != reference {want} (rel {rel:.3e})"
    );
    rel
}

// ------------------------------------------------------------------ sft

/// sft on `model`: loss = sum of -log p over response tokens + appended EOS
/// of all examples / their count (token mean over the batch; prompt =
/// template applied, tokenized apart from the response).
fn sft_case(case: &str, model: &Path, extra: Value, max_len: Option<i64>) {
    let f = fixture();
    let data = write_jsonl(&f.dir.join(format!("{case}.jsonl")), &sft_records());
    let template = "Question: {prompt}\nAnswer:";
    let mut params = json!({
        "template": template, "batch_size": 4, "max_steps": 1, "lr": 1e-3,
    });
    params
        .as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    if let Some(n) = max_len {
        params["max_len"] = json!(n);
    }
    let out = run_op(
        case,
        "sft",
        params,
        [("model", model.into()), ("data", data.clone())],
    );
    let m = step1(&out);
    let max_len = max_len.unwrap_or(0).to_string();
    let r = reference(&[
        "sft",
        "--model",
        s(model),
        "--data",
        s(&data),
        "--template",
        template,
        "--max-len",
        &max_len,
    ]);
    if max_len != "0" {
        assert!(
            r["truncated"].as_u64().unwrap() >= 2,
            "{case}: rows were cut"
        );
    }
    assert_eq!(
        m["tokens"], r["tokens"],
        "{case}: counted tokens (response + EOS)"
    );
    check(case, m["loss"].as_f64().unwrap(), &r);
}

#[test]
fn sft_gpt2() {
    let f = fixture();
    // `dropout: false`: train without the checkpoint's dropout (0.1), as
    // the reference's eval-mode forward does.
    sft_case("sft_gpt2", &f.gpt2_dropout, json!({"dropout": false}), None);
}

#[test]
fn sft_llama() {
    sft_case("sft_llama", &fixture().llama, json!({}), None);
}

/// sft with max_len 16 (every row over it): rows over it keep the response's start (EOS cut
/// with its end) in at least half the budget, the prompt's end in the rest.
#[test]
fn sft_truncated() {
    sft_case("sft_truncated", &fixture().gpt2, json!({}), Some(16));
}

/// sft on `messages` conversations whose chat template marks the assistant
/// with `{% generation %}`: the loss covers every assistant turn, exactly the
/// tokens transformers' `return_assistant_tokens_mask` marks (not only the
/// last turn, not the user's turns).
#[test]
fn sft_every_assistant_turn() {
    let f = fixture();
    let case = "sft_every_assistant_turn";
    let template = f.dir.join("marked.jinja");
    std::fs::write(
        &template,
        "{% for m in messages %}{{ m.role[0] }}:{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}\n{% endfor %}",
    )
    .unwrap();
    let turn = |role: &str, content: &str| json!({"role": role, "content": content});
    let records: Vec<Value> = sft_records()
        .chunks(2)
        .map(|pair| {
            let mut messages = Vec::new();
            for r in pair {
                messages.push(turn("user", r["prompt"].as_str().unwrap()));
                messages.push(turn("assistant", r["response"].as_str().unwrap().trim()));
            }
            json!({ "messages": messages })
        })
        .collect();
    let data = write_jsonl(&f.dir.join(format!("{case}.jsonl")), &records);
    let out = run_op(
        case,
        "sft",
        json!({"batch_size": 2, "max_steps": 1, "lr": 1e-3}),
        [
            ("model", f.llama.clone()),
            ("data", data.clone()),
            ("chat_template", template.clone()),
        ],
    );
    let m = step1(&out);
    let r = reference(&[
        "sft-chat",
        "--model",
        s(&f.llama),
        "--data",
        s(&data),
        "--chat-template",
        s(&template),
    ]);
    assert_eq!(m["tokens"], r["tokens"], "{case}: counted tokens");
    check(case, m["loss"].as_f64().unwrap(), &r);
}

// ------------------------------------------------------------------ lm.pretrain

/// lm.pretrain: texts + EOS each, concatenated, cut into seq_len blocks;
/// loss = mean -log p over every position of every block but the first.
/// lr 0 (and weight decay, decoupled, times lr): the saved model is the
/// one step 1 ran; the reference scores it.
fn pretrain_case(case: &str, arch: &str) {
    let f = fixture();
    let data = write_jsonl(&f.dir.join(format!("{case}.jsonl")), &pretrain_records());
    let out = run_op(
        case,
        "lm.pretrain",
        json!({
            "arch": arch, "width": 32, "layers": 2, "heads": 4, "kv_heads": 2,
            "positions": 64, "seq_len": 16, "dropout": 0.0, "lr": 0.0,
            "weight_decay": 0.1, "batch_size": 1000, "max_steps": 1,
        }),
        [("data", data.clone()), ("tokenizer", f.tokenizer.clone())],
    );
    let m = step1(&out);
    let r = reference(&[
        "pretrain",
        "--model",
        s(&out.join("model")),
        "--data",
        s(&data),
        "--seq-len",
        "16",
    ]);
    assert_eq!(m["tokens"], r["tokens"], "{case}: predicted tokens");
    check(case, m["loss"].as_f64().unwrap(), &r);
}

#[test]
fn lm_pretrain_gpt2() {
    pretrain_case("pretrain_gpt2", "gpt2");
}

#[test]
fn lm_pretrain_llama() {
    pretrain_case("pretrain_llama", "llama");
}

// ------------------------------------------------------------------ pm

/// PM: reward = score head on the last token's hidden state (the appended
/// EOS); soft Bradley-Terry per pair; batch loss = sum(w*l)/sum(w), w = mix
/// weight. lr 0: the saved head is the op's initial one. The checkpoint has
/// dropout 0.1 in its config: the PM ops train dropout-free by default (as
/// TRL's RewardTrainer), which the reference's eval-mode forward is.
fn pm_case(case: &str, op: &str, params: Value, sets: &[(&str, Vec<Value>, f64)]) {
    let f = fixture();
    let mut inputs: Vec<(String, PathBuf)> = vec![("model".into(), f.gpt2_dropout.clone())];
    let mut data_args = Vec::new();
    let mut pairs = 0;
    for (input, records, weight) in sets {
        let path = write_jsonl(&f.dir.join(format!("{case}-{input}.jsonl")), records);
        data_args.push(format!("{}={weight}", s(&path)));
        inputs.push((input.to_string(), path));
        pairs += records
            .iter()
            .map(|r| {
                r["responses"]
                    .as_array()
                    .map_or(1, |l| l.len() * (l.len() - 1) / 2)
            })
            .sum::<usize>();
    }
    let mut params = params;
    params.as_object_mut().unwrap().extend(
        json!({"lr": 0.0, "batch_size": pairs, "max_steps": 1, "eval_fraction": 0.0})
            .as_object()
            .unwrap()
            .clone(),
    );
    let out = fixture().dir.join(case);
    let mut spec = spec(case, op, params, [], &out);
    spec.inputs = inputs.into_iter().collect();
    run_stage(&spec, alignflow_worker::ops::implementation(op).unwrap())
        .unwrap_or_else(|e| panic!("{case}: {e:#}"));
    let m = step1(&out);
    let mut args = vec!["pm", "--model", s(&f.gpt2), "--head"];
    let head = out.join("model");
    args.push(s(&head));
    for d in &data_args {
        args.push("--data");
        args.push(d);
    }
    let r = reference(&args);
    assert_eq!(r["pairs"], pairs, "{case}: pairs");
    check(case, m["loss"].as_f64().unwrap(), &r);
}

#[test]
fn pm_train_hard_labels() {
    pm_case(
        "pm_hard",
        "pm.train",
        json!({}),
        &[("comparisons", hh_records([1.0, 0.0, 1.0, 1.0]), 1.0)],
    );
}

#[test]
fn pm_train_soft_labels() {
    pm_case(
        "pm_soft",
        "pm.train",
        json!({}),
        &[("comparisons", hh_records([0.8, 0.3, 0.5, 1.0]), 1.0)],
    );
}

#[test]
fn pm_train_mix_weights() {
    pm_case(
        "pm_mix",
        "pm.train",
        json!({"mix": {"comparisons": 1.0, "extra": 0.25}}),
        &[
            ("comparisons", hh_records([1.0, 0.7, 1.0, 0.0]), 1.0),
            ("extra", ai_records(), 0.25),
        ],
    );
}

#[test]
fn pm_pretrain_rankings() {
    pm_case(
        "pm_pretrain",
        "pm.pretrain",
        json!({}),
        &[("data", ranking_records(), 1.0)],
    );
}

// ------------------------------------------------------------------ dpo

/// DPO/IPO: d = (logpi(A) - logref(A)) - (logpi(B) - logref(B)), each a SUM (IPO: a MEAN)
/// of log-probs over response tokens + EOS (prompt masked); label q =
/// (1-eps) p + eps (1-p); batch loss = mean over pairs. The reference
/// log-probs come from dpo.reference on a different checkpoint; the policy
/// trains without dropout (`dropout: false`, the default) though its
/// config has 0.1.
fn dpo_case(case: &str, loss: &str, beta: f64, eps: f64) {
    let f = fixture();
    let data = write_jsonl(
        &f.dir.join(format!("{case}.jsonl")),
        &hh_records([1.0, 0.0, 0.7, 0.5]),
    );
    let reference_out = run_op(
        &format!("{case}-ref"),
        "dpo.reference",
        json!({"batch_size": 3}),
        [("model", f.gpt2_ref.clone()), ("comparisons", data.clone())],
    );
    let out = run_op(
        case,
        "dpo",
        json!({
            "loss": loss, "beta": beta, "label_smoothing": eps, "lr": 1e-3,
            "batch_size": 4, "max_steps": 1, "eval_fraction": 0.0,
        }),
        [
            ("policy", f.gpt2_dropout.clone()),
            ("comparisons", data.clone()),
            ("reference_logps", reference_out.join("reference_logps")),
        ],
    );
    let m = step1(&out);
    let logps = std::fs::read_to_string(reference_out.join("reference_logps/logps.jsonl")).unwrap();
    assert_eq!(logps.lines().count(), 4, "{case}: one line per pair");
    let r = reference(&[
        "dpo",
        "--policy",
        s(&f.gpt2_dropout),
        "--reference",
        s(&f.gpt2_ref),
        "--data",
        s(&data),
        "--beta",
        &beta.to_string(),
        "--loss",
        loss,
        "--label-smoothing",
        &eps.to_string(),
    ]);
    // dpo.reference's sums (response tokens + EOS) against the reference's.
    for (line, want) in logps.lines().zip(r["ref_logps"].as_array().unwrap()) {
        let got: Value = serde_json::from_str(line).unwrap();
        for (k, key) in ["chosen", "rejected"].iter().enumerate() {
            let (g, w) = (got[key].as_f64().unwrap(), want[k].as_f64().unwrap());
            assert!(
                (g - w).abs() <= TOL * w.abs(),
                "{case}: dpo.reference {key} log-prob {g} != {w} ({line})"
            );
        }
    }
    check(case, m["loss"].as_f64().unwrap(), &r);
}

#[test]
fn dpo_sigmoid_label_smoothing() {
    dpo_case("dpo_sigmoid", "sigmoid", 0.1, 0.2);
}

#[test]
fn dpo_ipo_label_smoothing() {
    dpo_case("dpo_ipo", "ipo", 0.1, 0.2);
}

// ------------------------------------------------------------------ ppo

/// A fixed rollout: 4 rows of 6 response tokens (EOS = 0): EOS mid-row
/// with junk after it, no EOS (truncated), EOS first, EOS last.
struct Rollout {
    tokens: Vec<i64>,
    old_logp: Vec<f64>,
    ref_logp: Vec<f64>,
    logp: Vec<f64>,
    old_values: Vec<f64>,
    values: Vec<f64>,
    scores: Vec<f64>,
}

const B: i64 = 4;
const T: i64 = 6;

fn rollout() -> Rollout {
    // A small LCG: the same numbers on every machine, no torch generator.
    let mut state: u64 = 12345;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    };
    let n = (B * T) as usize;
    let old_logp: Vec<f64> = (0..n).map(|_| -1.5 + next()).collect();
    let ref_logp: Vec<f64> = old_logp.iter().map(|o| o + 0.4 * next()).collect();
    // Ratios up to e^0.4: some outside [0.8, 1.2], so clipping is active.
    let logp: Vec<f64> = old_logp.iter().map(|o| o + 0.4 * next()).collect();
    let old_values: Vec<f64> = (0..n).map(|_| next()).collect();
    let values: Vec<f64> = old_values.iter().map(|v| v + 0.5 * next()).collect();
    Rollout {
        tokens: vec![
            5, 7, 9, 0, 3, 4, //
            8, 6, 4, 2, 9, 7, //
            0, 5, 5, 5, 5, 5, //
            3, 3, 3, 3, 3, 0,
        ],
        old_logp,
        ref_logp,
        logp,
        old_values,
        values,
        scores: vec![1.5, -0.5, 0.8, 2.0],
    }
}

/// The losses of one PPO update on `r`, composed from `alignflow_worker::rl`
/// in the order the `ppo` op uses them: (policy loss, value loss, KL metric).
fn ppo_losses(
    r: &Rollout,
    est: alignflow_worker::rl::KlEstimator,
    kl_coef: f64,
    whiten_rewards: bool,
    no_eos_penalty: Option<f64>,
    (gamma, lam, clip, value_clip): (f64, f64, f64, f64),
) -> (f64, f64, f64) {
    use alignflow_worker::rl::*;
    use tch::{Kind, Tensor};
    let t = |v: &[f64]| Tensor::from_slice(v).view([B, T]);
    let tokens = Tensor::from_slice(&r.tokens).view([B, T]);
    let rmask = response_mask(&tokens, &[0], None).to_kind(Kind::Double);
    let has_eos = contains_eos(&tokens, &[0]);
    let (old, reference) = (t(&r.old_logp), t(&r.ref_logp));
    let old_values = t(&r.old_values);
    let kl = kl_per_token(&old, &reference, est) * &rmask;
    let mean_kl = mean_sequence_kl(&kl, &rmask).double_value(&[]);
    let shaped = shape_rewards(
        &Tensor::from_slice(&r.scores),
        &kl,
        &rmask,
        &has_eos,
        kl_coef,
        no_eos_penalty,
    );
    let rewards = if whiten_rewards {
        masked_whiten(&shaped.rewards, &rmask, false) * &rmask
    } else {
        shaped.rewards.shallow_clone()
    };
    let (adv, returns) = compute_gae(&old_values, &rewards, &rmask, &GaeConfig { gamma, lam });
    let adv = masked_whiten(&adv, &rmask, true) * &rmask;
    let pl = policy_loss(&t(&r.logp), &old, &adv, &rmask, clip);
    let vl = value_loss(&t(&r.values), &old_values, &returns, &rmask, value_clip);
    (
        pl.loss.double_value(&[]),
        vl.loss.double_value(&[]),
        mean_kl,
    )
}

fn ppo_case(case: &str, kl: &str, whiten_rewards: bool, no_eos_penalty: Option<f64>) {
    let est = match kl {
        "k1" => alignflow_worker::rl::KlEstimator::K1,
        _ => alignflow_worker::rl::KlEstimator::K3,
    };
    let (kl_coef, gamma, lam, clip, value_clip) = (0.05, 1.0, 0.95, 0.2, 0.2);
    let r = rollout();
    let (pl, vl, mean_kl) = ppo_losses(
        &r,
        est,
        kl_coef,
        whiten_rewards,
        no_eos_penalty,
        (gamma, lam, clip, value_clip),
    );
    let input = fixture_free_dir().join(format!("{case}.json"));
    let shape =
        |v: &[f64]| -> Vec<Vec<f64>> { v.chunks(T as usize).map(<[f64]>::to_vec).collect() };
    std::fs::write(
        &input,
        json!({
            "tokens": r.tokens.chunks(T as usize).collect::<Vec<_>>(), "eos": 0,
            "old_logp": shape(&r.old_logp), "ref_logp": shape(&r.ref_logp),
            "logp": shape(&r.logp), "old_values": shape(&r.old_values),
            "values": shape(&r.values), "scores": r.scores,
            "kl": kl, "kl_coef": kl_coef, "whiten_rewards": whiten_rewards,
            "no_eos_penalty": no_eos_penalty, "gamma": gamma, "lam": lam,
            "clip": clip, "value_clip": value_clip,
        })
        .to_string(),
    )
    .unwrap();
    let want = reference(&["ppo", "--input", s(&input)]);
    for (name, got) in [("policy_loss", pl), ("value_loss", vl), ("kl", mean_kl)] {
        let sub = json!({"loss": want[name], "alternatives": want["alternatives"][name]});
        check(&format!("{case} {name}"), got, &sub);
    }
}

/// A temp folder for cases that need no checkpoint.
fn fixture_free_dir() -> &'static Path {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| scratch("ppo"))
}

/// PPO (GAE critic): k1 KL in the reward, no whitening of rewards, a
/// penalty for the row without EOS.
#[test]
fn ppo_k1_gae() {
    ppo_case("ppo_k1", "k1", false, Some(-1.0));
}

/// PPO with k3 KL and whitened rewards.
#[test]
fn ppo_k3_whitened_rewards() {
    ppo_case("ppo_k3_whiten", "k3", true, None);
}
