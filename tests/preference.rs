//! `pm.pretrain` and `pm.train` through the engine and the worker: a tiny
//! preference model learns a synthetic preference, soft labels of 0.5 keep
//! its margins near zero, and the held-out figures land in `eval`.
mod common;
use common::*;

use std::sync::OnceLock;

/// The marker word the preferred response contains.
const MARKER: &str = "wonderful";
const WORDS: &[&str] = &[
    "the", "cat", "sat", "on", "a", "mat", "dog", "ran", "far", "away", "red", "blue", "green",
    "big", "small", "tree", "sky", "sun", "moon", "fish",
];

/// `n` (prompt, preferred, other) triples: both responses have 7 words, the
/// preferred one has the marker at a random place.
fn triples(n: usize, seed: u64) -> Vec<(String, String, String)> {
    let mut rng = Lcg(seed);
    (0..n)
        .map(|_| {
            let prompt = format!(
                "\n\nHuman: tell me about the {}\n\nAssistant:",
                rng.pick(WORDS)
            );
            let mut good = rng.picks(WORDS, 6);
            let at = rng.below(7);
            good.insert(at, MARKER);
            let bad = rng.picks(WORDS, 7);
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
name: pm-tiny
seed: 5
stages:
  hh:
    op: dataset.import
    inputs: { source: hh.jsonl }
  tok:
    op: tokenizer.train
    inputs: { data: "${stages.hh.data}" }
    params: { vocab_size: 320 }
  base:
    op: lm.pretrain
    inputs: { data: "${stages.hh.data}", tokenizer: "${stages.tok.tokenizer}" }
    params: { width: 48, layers: 2, heads: 2, positions: 64, seq_len: 32, batch_size: 8, max_steps: 10, lr: 3e-3, checkpoint_every: 0 }
  pmp:
    op: pm.pretrain
    inputs: { model: "${stages.base.model}", data: ranked.jsonl }
    params: { batch_size: 8, max_steps: 8, lr: 1e-3, checkpoint_every: 0, eval_fraction: 0.2 }
  hard:
    op: pm.train
    inputs: { model: "${stages.pmp.model}", comparisons: "${stages.hh.data}", extra: ai.jsonl, eval: heldout.jsonl }
    params: { batch_size: 8, max_steps: 30, lr: 2e-3, warmup_steps: 5, checkpoint_every: 0, mix: { extra: 0.5 } }
  soft:
    op: pm.train
    inputs: { model: "${stages.base.model}", comparisons: half.jsonl }
    params: { batch_size: 8, max_steps: 20, lr: 2e-3, warmup_steps: 5, checkpoint_every: 0, eval_fraction: 0.25 }
"#;

/// The project, run once and shared by the tests of this file.
fn project() -> &'static (Project, String) {
    static RUN: OnceLock<(Project, String)> = OnceLock::new();
    RUN.get_or_init(|| {
        let p = Project::new();
        // Human-format comparisons: `dataset.import` splits the dialogues.
        let train = triples(200, 1);
        p.write(
            "hh.jsonl",
            &jsonl(train.iter().map(|(q, g, b)| {
                serde_json::json!({"chosen": format!("{q}{g}"), "rejected": format!("{q}{b}")})
            })),
        );
        // AI-feedback shape, the preferred response second half the time.
        p.write(
            "ai.jsonl",
            &jsonl(triples(100, 2).into_iter().enumerate().map(|(i, (q, g, b))| {
                if i % 2 == 0 {
                    serde_json::json!({"prompt": q, "response_a": g, "response_b": b, "p_a": 1.0})
                } else {
                    serde_json::json!({"prompt": q, "response_a": b, "response_b": g, "p_a": 0.0})
                }
            })),
        );
        p.write(
            "heldout.jsonl",
            &jsonl(triples(100, 3).into_iter().map(|(q, g, b)| {
                serde_json::json!({"prompt": q, "chosen": g, "rejected": b, "label": 1.0})
            })),
        );
        // The same pairs as `hh`, labelled "no preference".
        p.write(
            "half.jsonl",
            &jsonl(train.iter().map(|(q, g, b)| {
                serde_json::json!({"prompt": q, "response_a": g, "response_b": b, "p_a": 0.5})
            })),
        );
        p.write(
            "ranked.jsonl",
            &jsonl(
                triples(40, 4)
                    .into_iter()
                    .map(|(q, g, b)| serde_json::json!({"prompt": q, "responses": [g, b, " "]})),
            ),
        );
        p.write("pipeline.yaml", PIPELINE);
        let out = p.ok(&["run", "pipeline.yaml", "--quiet"]);
        (p, out)
    })
}

fn output(p: &Project, stage: &str, name: &str) -> std::path::PathBuf {
    let shown: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "pipeline.yaml", stage, "--json"])).unwrap();
    shown[name]["path"].as_str().unwrap().into()
}

fn eval(p: &Project, stage: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(output(p, stage, "eval")).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).unwrap()["figures"].clone()
}

#[test]
fn a_tiny_pm_learns_the_marker_preference_on_held_out_pairs() {
    let (p, out) = project();
    assert_eq!(
        stages_with_status(out, "ran"),
        set(&["hh", "tok", "base", "pmp", "hard", "soft"])
    );
    let f = eval(p, "hard");
    assert_eq!(f["pairs"], 100);
    let acc = f["accuracy"].as_f64().unwrap();
    assert!(acc >= 0.95, "held-out accuracy {acc}: {f}");
    assert!(f["mean_margin"].as_f64().unwrap() > 1.0, "{f}");
    let bins = f["bins"].as_array().unwrap();
    assert_eq!(bins.len(), 10);
    assert_eq!(
        bins.iter()
            .map(|b| b["points"].as_u64().unwrap())
            .sum::<u64>(),
        200,
        "each pair in both orientations"
    );
    let ece = f["ece"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&ece));

    // The model is a transformers sequence classifier with its tokenizer.
    let model = output(p, "hard", "model");
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["architectures"][0], "GPT2ForSequenceClassification");
    assert_eq!(config["num_labels"], 1);
    assert!(model.join("tokenizer.json").exists());

    // Training curve, then one line of held-out figures (also stage metrics).
    let metrics = std::fs::read_to_string(output(p, "hard", "metrics")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 31);
    assert!(lines[0]["loss"].as_f64().unwrap() > lines[29]["loss"].as_f64().unwrap());
    assert_eq!(lines[30]["step"], 30);
    assert_eq!(lines[30]["eval_accuracy"].as_f64(), Some(acc));
    // PMP held out 20% of its 40 rankings (3 pairs each) and wrote figures.
    assert_eq!(eval(p, "pmp")["pairs"], 24);
}

#[test]
fn labels_of_one_half_keep_the_margins_near_zero() {
    let (p, _) = project();
    let hard = eval(p, "hard");
    let soft = eval(p, "soft");
    assert_eq!(soft["pairs"], 50, "a quarter of 200 held out");
    assert_eq!(soft["decisive_pairs"], 0);
    assert!(soft["accuracy"].is_null(), "no decisive pairs: {soft}");
    let hard_margin = hard["mean_abs_margin"].as_f64().unwrap();
    let soft_margin = soft["mean_abs_margin"].as_f64().unwrap();
    assert!(
        soft_margin < 0.1 * hard_margin,
        "|margin| {soft_margin} with p = 0.5 vs {hard_margin} with p = 1"
    );
    assert!(soft["mean_margin"].as_f64().unwrap().abs() < 0.1 * hard_margin);
}

#[test]
fn eval_is_deterministic_and_params_are_checked() {
    let (p, _) = project();
    // A second project with the same inputs gets the same eval bytes.
    let again = Project::new();
    for f in [
        "hh.jsonl",
        "ai.jsonl",
        "heldout.jsonl",
        "half.jsonl",
        "ranked.jsonl",
        "pipeline.yaml",
    ] {
        again.write(f, &p.read(f));
    }
    again.ok(&["run", "pipeline.yaml", "--quiet", "--target", "pmp"]);
    assert_eq!(
        std::fs::read(output(p, "pmp", "eval")).unwrap(),
        std::fs::read(output(&again, "pmp", "eval")).unwrap()
    );
    again.write(
        "pipeline.yaml",
        &PIPELINE.replace("mix: { extra: 0.5 }", "mix: { extras: 0.5 }"),
    );
    let err = again.fails(&["validate", "pipeline.yaml"]);
    assert!(err.contains("extras") && err.contains("extra"), "{err}");
}
