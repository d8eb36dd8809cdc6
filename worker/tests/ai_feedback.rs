//! `ai_feedback` on a tiny checkpoint: labels equal a hand computation from
//! the model's own log-probs, swapping the answers gives `1 - p_a`,
//! chain-of-thought labels stay in [0.4, 0.6].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use alignflow_ops::ai_feedback::{conversation_of, feedback_prompt};
use alignflow_ops::protocol::StageSpec;
use alignflow_ops::text::Tokenizer;
use alignflow_ops::{CancelFlag, NullReporter, StageContext};
use alignflow_worker::model::{BuildOptions, Head, Model, ModelConfig};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

const CONSTITUTION: &str = r#"version: 1
name: test
feedback:
  - id: harmless
    text: "\nPlease choose the assistant response that is as harmless and ethical as possible. Options:"
  - id: kinder
    text: Which of these assistant responses is kinder?
  - id: honest
    text: Which response is more honest?
few_shot:
  feedback: ["Consider the following conversation between a human and an assistant:\nHuman: hi\nWhich is kinder?\nOptions:\n(A) Hello!\n(B) Go away.\nThe answer is: (A)"]
"#;

/// A tiny GPT-2 with a byte-level BPE tokenizer trained on a few lines.
fn tiny_model(dir: &Path) -> PathBuf {
    let corpus = dir.join("corpus.txt");
    let text =
        "Human: how do I bake bread?\nAssistant: Mix flour, water and yeast, then bake it.\n\
                The answer is: (A)\nThe answer is: (B)\nWhich response is kinder? Options:\n"
            .repeat(20);
    std::fs::write(&corpus, text).unwrap();
    let out = dir.join("tok-out");
    std::fs::create_dir_all(&out).unwrap();
    let op = alignflow_ops::find("tokenizer.train").unwrap();
    let params = op.normalize_params(&json!({"vocab_size": 300})).unwrap();
    let spec = spec("tok", "tokenizer.train", params, [("data", corpus)], &out);
    alignflow_ops::tokenizer_train::run(&StageContext {
        spec: &spec,
        reporter: &NullReporter,
        cancel: &CancelFlag::default(),
    })
    .unwrap();
    let tokenizer = Tokenizer::from_dir(&out.join("tokenizer")).unwrap();
    tch::manual_seed(0);
    let cfg = ModelConfig::from_json(ModelConfig::gpt2_json(
        tokenizer.vocab_size() as i64,
        512,
        32,
        2,
        2,
        0,
        0.0,
    ))
    .unwrap();
    let mut model = Model::init(&cfg, &BuildOptions::new(Device::Cpu, Head::Lm));
    // Random init at std 0.02 gives near-uniform next-token distributions;
    // larger embeddings (tied to the output) make the labels move off 0.5.
    tch::no_grad(|| {
        for (name, mut v) in model.vs.variables() {
            if name.ends_with("wte.weight") {
                let _ = v.g_mul_scalar_(20.0);
            }
        }
    });
    let model_dir = dir.join("model");
    model.save(&model_dir).unwrap();
    for f in std::fs::read_dir(out.join("tokenizer")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, model_dir.join(f.file_name().unwrap())).unwrap();
    }
    model_dir
}

fn spec<const N: usize>(
    stage: &str,
    op: &str,
    params: Value,
    inputs: [(&str, PathBuf); N],
    out: &Path,
) -> StageSpec {
    StageSpec {
        pipeline: "test".into(),
        stage: stage.into(),
        op: op.into(),
        op_version: alignflow_ops::find(op).unwrap().version,
        params,
        inputs: inputs
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect::<BTreeMap<_, _>>(),
        outputs: alignflow_ops::find(op)
            .unwrap()
            .declared_outputs()
            .iter()
            .map(|p| p.name.to_string())
            .collect(),
        out_dir: out.to_path_buf(),
        work_dir: out.to_path_buf(),
        checkpoint_dir: out.join("ckpt"),
        device: "cpu".into(),
        seed: 11,
        threads: None,
    }
}

/// Runs `ai_feedback` on `pairs` (JSONL lines); returns the records and the summary.
fn feedback(
    dir: &Path,
    model: &Path,
    name: &str,
    pairs: &[Value],
    params: Value,
) -> (Vec<Value>, Value) {
    let pairs_path = dir.join(format!("{name}.jsonl"));
    let lines: Vec<String> = pairs.iter().map(|p| p.to_string()).collect();
    std::fs::write(&pairs_path, lines.join("\n") + "\n").unwrap();
    let constitution = dir.join("constitution.yaml");
    std::fs::write(&constitution, CONSTITUTION).unwrap();
    let out = dir.join(format!("out-{name}"));
    std::fs::create_dir_all(&out).unwrap();
    let op = alignflow_ops::find("ai_feedback").unwrap();
    let params = op.normalize_params(&params).unwrap();
    let spec = spec(
        name,
        "ai_feedback",
        params,
        [
            ("model", model.to_path_buf()),
            ("pairs", pairs_path),
            ("constitution", constitution),
        ],
        &out,
    );
    let run = alignflow_worker::ops::implementation("ai_feedback").unwrap();
    let metrics = run(&StageContext {
        spec: &spec,
        reporter: &NullReporter,
        cancel: &CancelFlag::default(),
    })
    .unwrap();
    let records: Vec<Value> = std::fs::read_to_string(out.join("comparisons"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary")).unwrap()).unwrap();
    assert_eq!(metrics["count"], summary["count"]);
    (records, summary)
}

fn comparisons() -> Vec<Value> {
    vec![
        json!({"prompt": "\n\nHuman: how do I bake bread?\n\nAssistant:", "chosen": " Mix flour, water and yeast, then bake it.", "rejected": " No.", "label": 1.0}),
        json!({"prompt": "\n\nHuman: hi\n\nAssistant:", "chosen": " Hello! How can I help?", "rejected": " Go away.", "label": 1.0}),
        json!({"prompt": "\n\nHuman: what is bread?\n\nAssistant: Food.\n\nHuman: really?\n\nAssistant:", "chosen": " Yes, it is baked from flour.", "rejected": " I will not say.", "label": 0.0}),
    ]
}

/// log p(A) - log p(B) by hand: each full sequence in its own forward pass,
/// the options being the tokens after the common token prefix.
fn hand_p_a(model: &Model, tokenizer: &Tokenizer, prompt: &str) -> f64 {
    let a = tokenizer.encode(&format!("{prompt} (A)")).unwrap();
    let b = tokenizer.encode(&format!("{prompt} (B)")).unwrap();
    let start = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let logp = |ids: &[i64]| -> f64 {
        let t = Tensor::from_slice(ids).unsqueeze(0);
        let lp = tch::no_grad(|| model.lm.forward(&t, &t.ones_like(), false))
            .log_softmax(-1, Kind::Double);
        (start..ids.len())
            .map(|i| lp.double_value(&[0, i as i64 - 1, ids[i]]))
            .sum()
    };
    let (la, lb) = (logp(&a), logp(&b));
    la.exp() / (la.exp() + lb.exp())
}

#[test]
fn labels_equal_a_hand_computation_from_the_models_log_probs() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = tiny_model(dir.path());
    let (records, summary) = feedback(
        dir.path(),
        &model_dir,
        "hand",
        &comparisons(),
        json!({"batch_size": 3, "principles_per_pair": 2}),
    );
    let model = Model::load(&model_dir, &BuildOptions::new(Device::Cpu, Head::Lm)).unwrap();
    let tokenizer = Tokenizer::from_dir(&model_dir).unwrap();
    let constitution: Value = serde_yaml_like(CONSTITUTION);
    assert_eq!(records.len(), 3);
    for (r, c) in records.iter().zip(comparisons()) {
        let (a, b) = (
            c["chosen"].as_str().unwrap(),
            c["rejected"].as_str().unwrap(),
        );
        assert_eq!(r["response_a"], c["chosen"]);
        assert_eq!(r["label"], c["label"]);
        let details = r["details"].as_array().unwrap();
        assert_eq!(details.len(), 2);
        assert_ne!(details[0]["principle"], details[1]["principle"]);
        let mut sum = 0.0;
        for d in details {
            let text = constitution[d["principle"].as_str().unwrap()]
                .as_str()
                .unwrap();
            let conv = conversation_of(c["prompt"].as_str().unwrap());
            let fwd = hand_p_a(&model, &tokenizer, &feedback_prompt(&conv, text, a, b));
            let swp = hand_p_a(&model, &tokenizer, &feedback_prompt(&conv, text, b, a));
            let (got_f, got_s) = (
                d["p_a_forward"].as_f64().unwrap(),
                d["p_a_swapped"].as_f64().unwrap(),
            );
            assert!((got_f - fwd).abs() < 1e-5, "{got_f} vs {fwd}");
            assert!((got_s - swp).abs() < 1e-5, "{got_s} vs {swp}");
            sum += (got_f + 1.0 - got_s) / 2.0;
        }
        assert!((r["p_a"].as_f64().unwrap() - sum / 2.0).abs() < 1e-12);
    }
    assert_eq!(summary["count"], 3);
    assert_eq!(summary["labelled"], 3);
    let agreement = summary["agreement"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&agreement));
}

/// The feedback principles' texts by id (the few lines of the test constitution).
fn serde_yaml_like(yaml: &str) -> Value {
    let mut texts = serde_json::Map::new();
    let mut id = None;
    for line in yaml.lines() {
        if let Some(rest) = line.trim().strip_prefix("- id: ") {
            id = Some(rest.to_string());
        } else if let (Some(rest), Some(i)) = (line.trim().strip_prefix("text: "), id.take()) {
            let text: String = if rest.starts_with('"') {
                serde_json::from_str(rest).unwrap()
            } else {
                rest.to_string()
            };
            texts.insert(i, text.into());
        }
    }
    Value::Object(texts)
}

#[test]
fn swapping_the_answers_gives_one_minus_p_a() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = tiny_model(dir.path());
    // `generate` output (n = 2) one way, and the same pairs the other way.
    let gen = |swap: bool| -> Vec<Value> {
        comparisons()
            .iter()
            .enumerate()
            .flat_map(|(i, c)| {
                let (first, second) = if swap {
                    ("rejected", "chosen")
                } else {
                    ("chosen", "rejected")
                };
                [(0, first), (1, second)].map(|(s, f)| {
                    json!({"prompt": c["prompt"], "prompt_text": c["prompt"], "prompt_index": i,
                           "sample_index": s, "response": c[f]})
                })
            })
            .collect()
    };
    let params = json!({"batch_size": 4, "principles_per_pair": 2, "few_shot": true});
    let (ab, s_ab) = feedback(dir.path(), &model_dir, "ab", &gen(false), params.clone());
    let (ba, _) = feedback(dir.path(), &model_dir, "ba", &gen(true), params);
    assert_eq!(ab.len(), 3);
    assert!(s_ab.get("agreement").is_none(), "no human labels");
    for (x, y) in ab.iter().zip(&ba) {
        assert!(x.get("label").is_none());
        assert_eq!(x["response_a"], y["response_b"]);
        let (p, q) = (x["p_a"].as_f64().unwrap(), y["p_a"].as_f64().unwrap());
        assert!((p - (1.0 - q)).abs() < 1e-6, "{p} vs 1 - {q}");
    }
}

#[test]
fn chain_of_thought_labels_lie_in_the_clamp_range() {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = tiny_model(dir.path());
    let (records, summary) = feedback(
        dir.path(),
        &model_dir,
        "cot",
        &comparisons(),
        json!({"chain_of_thought": true, "max_new_tokens": 6, "batch_size": 4}),
    );
    assert_eq!(records.len(), 3);
    for r in &records {
        let p = r["p_a"].as_f64().unwrap();
        assert!((0.4..=0.6).contains(&p), "{p}");
        for d in r["details"].as_array().unwrap() {
            assert!(d["reasoning_forward"].is_string());
            for k in ["p_a_forward", "p_a_swapped"] {
                assert!((0.4..=0.6).contains(&d[k].as_f64().unwrap()));
            }
        }
    }
    assert_eq!(summary["count"], 3);
    // Without chain of thought the same model leaves the range somewhere.
    let (direct, _) = feedback(dir.path(), &model_dir, "direct", &comparisons(), json!({}));
    let outside = direct
        .iter()
        .flat_map(|r| r["details"].as_array().unwrap().clone())
        .any(|d| {
            ["p_a_forward", "p_a_swapped"]
                .iter()
                .any(|k| !(0.4..=0.6).contains(&d[*k].as_f64().unwrap()))
        });
    assert!(outside, "the clamp is not exercised");
}
