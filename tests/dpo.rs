//! `dpo.reference` and `dpo` through the engine and the worker: a tiny
//! policy learns a synthetic preference (the chosen answer holds a marker
//! word) from the cached reference log-probs, its implicit reward accuracy
//! on held-out pairs rises above 0.9, and a new `beta` reruns only `dpo`.
mod common;
use common::*;

use std::sync::OnceLock;

/// The marker word the preferred response contains.
const MARKER: &str = "wonderful";
const WORDS: &[&str] = &[
    "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "red", "blue", "green",
    "big", "small", "tree", "sky", "sun", "moon", "fish",
];

/// `n` (prompt, preferred, other) triples: both responses have 6 words, the
/// preferred one holds the marker twice, at random places.
fn triples(n: usize, seed: u64) -> Vec<(String, String, String)> {
    let mut rng = Lcg(seed);
    (0..n)
        .map(|_| {
            let prompt = format!(
                "\n\nHuman: tell me about the {}\n\nAssistant:",
                rng.pick(WORDS)
            );
            let mut good = rng.picks(WORDS, 4);
            for slots in [5, 6] {
                let at = rng.below(slots);
                good.insert(at, MARKER);
            }
            let bad = rng.picks(WORDS, 6);
            (
                prompt,
                format!(" {}", good.join(" ")),
                format!(" {}", bad.join(" ")),
            )
        })
        .collect()
}

fn jsonl(records: impl IntoIterator<Item = serde_json::Value>) -> String {
    records.into_iter().map(|r| r.to_string() + "\n").collect()
}

const PIPELINE: &str = r#"version: 1
name: dpo-tiny
seed: 3
params:
  beta: 0.5
stages:
  hh:
    op: dataset.import
    inputs: { source: hh.jsonl }
  tok:
    op: tokenizer.train
    inputs: { data: "${stages.hh.data}" }
    params: { vocab_size: 300 }
  base:
    op: lm.pretrain
    inputs: { data: "${stages.hh.data}", tokenizer: "${stages.tok.tokenizer}" }
    params: { width: 32, layers: 2, heads: 2, positions: 48, seq_len: 32, batch_size: 8, max_steps: 10, lr: 3e-3, checkpoint_every: 0 }
  ref:
    op: dpo.reference
    inputs: { model: "${stages.base.model}", comparisons: "${stages.hh.data}", eval: heldout.jsonl }
    params: { max_len: 48, batch_size: 16 }
  dpo:
    op: dpo
    inputs: { policy: "${stages.base.model}", comparisons: "${stages.hh.data}", reference_logps: "${stages.ref.reference_logps}", eval: heldout.jsonl }
    params: { beta: "${params.beta}", batch_size: 8, max_steps: 40, lr: 3e-3, warmup_steps: 3, checkpoint_every: 0 }
  lora:
    op: dpo
    inputs: { policy: "${stages.base.model}", comparisons: "${stages.hh.data}", reference_logps: "${stages.ref.reference_logps}", eval: heldout.jsonl }
    params: { beta: 0.5, loss: ipo, label_smoothing: 0.1, batch_size: 8, max_steps: 15, lr: 1e-2, checkpoint_every: 0, lora: { rank: 4, alpha: 8, targets: [c_attn] } }
"#;

/// The project, run once and shared by the tests of this file.
fn project() -> &'static (Project, String) {
    static RUN: OnceLock<(Project, String)> = OnceLock::new();
    RUN.get_or_init(|| {
        let p = Project::new();
        // Human-format dialogues: `dataset.import` splits off the prompt.
        p.write(
            "hh.jsonl",
            &jsonl(triples(160, 1).iter().map(|(q, g, b)| {
                serde_json::json!({"chosen": format!("{q}{g}"), "rejected": format!("{q}{b}")})
            })),
        );
        // Held out, in the AI-feedback shape, the preferred response second
        // half the time (A is then the rejected one, p_a = 0).
        p.write(
            "heldout.jsonl",
            &jsonl(triples(60, 2).into_iter().enumerate().map(|(i, (q, g, b))| {
                if i % 2 == 0 {
                    serde_json::json!({"prompt": q, "response_a": g, "response_b": b, "p_a": 1.0})
                } else {
                    serde_json::json!({"prompt": q, "response_a": b, "response_b": g, "p_a": 0.0})
                }
            })),
        );
        p.write("pipeline.yaml", PIPELINE);
        let out = p.ok(&["run", "pipeline.yaml", "--quiet"]);
        (p, out)
    })
}

fn output(p: &Project, stage: &str, name: &str) -> std::path::PathBuf {
    output_with(p, stage, name, &[])
}

/// The path of a stage's output under extra CLI arguments (`--set ...`).
fn output_with(p: &Project, stage: &str, name: &str, extra: &[&str]) -> std::path::PathBuf {
    let mut args = vec!["show", "pipeline.yaml", stage, "--json"];
    args.extend_from_slice(extra);
    let shown: serde_json::Value = serde_json::from_str(&p.ok(&args)).unwrap();
    shown[name]["path"].as_str().unwrap().into()
}

fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_tiny_policy_learns_the_marker_preference_on_held_out_pairs() {
    let (p, out) = project();
    assert_eq!(
        stages_with_status(out, "ran"),
        set(&["hh", "tok", "base", "ref", "dpo", "lora"])
    );
    let eval = json(&output(p, "dpo", "eval"));
    assert_eq!(eval["pairs"], 60);
    assert_eq!(eval["decisive_pairs"], 60);
    let f = &eval["figures"];
    let acc = f["reward_accuracy"].as_f64().unwrap();
    assert!(acc > 0.9, "held-out implicit reward accuracy {acc}: {eval}");
    let margin = f["margin"].as_f64().unwrap();
    assert!(
        f["loss"].as_f64().unwrap() < 0.5 * std::f64::consts::LN_2,
        "{eval}"
    );
    let (chosen, rejected) = (
        f["chosen_reward"].as_f64().unwrap(),
        f["rejected_reward"].as_f64().unwrap(),
    );
    // Half the held-out pairs have A rejected (p_a = 0): the mean margin of
    // A over B is then near zero while the accuracy is high.
    assert!((margin - (chosen - rejected)).abs() < 1e-9, "{eval}");

    // The curve: the policy starts at the reference (implicit rewards 0,
    // loss log 2), and the training pairs' accuracy and margin rise.
    let curve = lines(&output(p, "dpo", "metrics"));
    assert_eq!(curve.len(), 41, "40 steps, then the held-out line");
    let first = &curve[0];
    assert!(
        (first["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-4,
        "{first}"
    );
    assert!(first["margin"].as_f64().unwrap().abs() < 1e-4, "{first}");
    for key in [
        "reward_accuracy",
        "chosen_reward",
        "rejected_reward",
        "grad_norm",
        "lr",
    ] {
        assert!(first.get(key).is_some(), "{key} missing: {first}");
    }
    let last = &curve[39];
    assert!(
        last["loss"].as_f64().unwrap() < 0.5 * std::f64::consts::LN_2,
        "{last}"
    );
    assert!(last["margin"].as_f64().unwrap() > 1.0, "{last}");
    assert!(last["reward_accuracy"].as_f64().unwrap() >= 0.9, "{last}");
    assert_eq!(curve[40]["step"], 40);
    assert_eq!(curve[40]["eval_reward_accuracy"].as_f64(), Some(acc));

    // The policy is a causal LM folder with its tokenizer.
    let model = output(p, "dpo", "model");
    let config = json(&model.join("config.json"));
    assert_eq!(config["architectures"][0], "GPT2LMHeadModel");
    assert!(model.join("tokenizer.json").exists());

    // The reference artifact: one line per pair, both sets.
    let refs = output(p, "ref", "reference_logps");
    let settings = json(&refs.join("settings.json"));
    assert_eq!(settings["pairs"]["comparisons"], 160);
    assert_eq!(settings["pairs"]["eval"], 60);
    assert_eq!(settings["max_len"], 48);
    let logps = lines(&refs.join("logps.jsonl"));
    assert_eq!(logps.len(), 220);
    // 6 words (each at least one token, the first after the prompt's
    // space-joined text) plus EOS are scored.
    for l in &logps {
        assert!(l["chosen"].as_f64().unwrap() < 0.0, "{l}");
        assert!(l["chosen_tokens"].as_u64().unwrap() >= 7, "{l}");
    }
}

#[test]
fn lora_ipo_with_label_smoothing_trains_and_merges() {
    let (p, _) = project();
    let curve = lines(&output(p, "lora", "metrics"));
    // IPO at the reference: d = 0, target (2q - 1)/(2 beta) with q = 0.9:
    // loss 0.8^2 = 0.64.
    assert!(
        (curve[0]["loss"].as_f64().unwrap() - 0.64).abs() < 1e-4,
        "{}",
        curve[0]
    );
    let eval = json(&output(p, "lora", "eval"));
    assert!(eval["figures"]["loss"].as_f64().unwrap() < 0.64, "{eval}");
    assert!(
        eval["figures"]["reward_accuracy"].as_f64().unwrap() > 0.5,
        "{eval}"
    );
    // Exported merged: the same tensor names as the base, no adapters.
    let model = output(p, "lora", "model");
    let weights = std::fs::read(model.join("model.safetensors")).unwrap();
    let header = String::from_utf8_lossy(&weights[..4096.min(weights.len())]).to_string();
    assert!(!header.contains("lora_"), "{header}");
    assert_ne!(
        weights,
        std::fs::read(output(p, "base", "model").join("model.safetensors")).unwrap(),
        "the adapters changed the merged weights"
    );
}

#[test]
fn a_new_beta_reruns_only_the_dpo_stage() {
    let (p, _) = project();
    let before = json(&output(p, "dpo", "eval"));
    let plan = p.ok(&["plan", "pipeline.yaml", "--set", "params.beta=0.2"]);
    assert!(plan.contains("beta"), "{plan}");
    assert_eq!(
        p.run_stages("pipeline.yaml", &["--set", "params.beta=0.2"]),
        set(&["dpo"])
    );
    let after = json(&output_with(
        p,
        "dpo",
        "eval",
        &["--set", "params.beta=0.2"],
    ));
    assert_ne!(before["figures"], after["figures"]);
    // Back to the first beta: everything is cached.
    assert_eq!(p.run_stages("pipeline.yaml", &[]), set(&[]));
}

#[test]
fn reference_logps_of_other_comparisons_are_refused() {
    let (p, _) = project();
    // A manifest whose dpo stage trains on other comparisons than the
    // reference scored.
    // The same project and cache: every other stage is cached.
    p.write(
        "other.yaml",
        &PIPELINE.replace(
            "policy: \"${stages.base.model}\", comparisons: \"${stages.hh.data}\"",
            "policy: \"${stages.base.model}\", comparisons: heldout.jsonl",
        ),
    );
    let err = p.fails(&["run", "other.yaml", "--quiet"]);
    assert!(
        err.contains("dpo") && err.contains("reference_logps") && err.contains("60 pairs"),
        "{err}"
    );
}
