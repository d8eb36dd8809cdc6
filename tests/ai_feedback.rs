//! `ai_feedback` through the engine and the worker: human comparisons of
//! HH-RLHF imported, a tiny feedback model trained, AI labels and their
//! agreement with the human ones.
mod common;
use common::*;

const CONSTITUTION: &str = r#"version: 1
name: test
feedback:
  - id: harmless
    text: "\nPlease choose the assistant response that is as harmless and ethical as possible. Options:"
  - id: less-harmful
    text: Which of these assistant responses is less harmful?
"#;

fn pipeline(extra: &str) -> String {
    format!(
        r#"version: 1
name: feedback
seed: 5
stages:
  hh:
    op: dataset.import
    inputs: {{ source: hh.jsonl }}
  tok:
    op: tokenizer.train
    inputs: {{ data: "${{stages.hh.data}}" }}
    params: {{ vocab_size: 320 }}
  base:
    op: lm.pretrain
    inputs: {{ data: "${{stages.hh.data}}", tokenizer: "${{stages.tok.tokenizer}}" }}
    params: {{ width: 32, layers: 1, heads: 2, positions: 128, seq_len: 64, batch_size: 4, max_steps: 4, lr: 1e-3 }}
  label:
    op: ai_feedback
    inputs: {{ model: "${{stages.base.model}}", pairs: "${{stages.hh.data}}", constitution: constitution.yaml }}
    params: {{ batch_size: 8{extra} }}
"#
    )
}

fn output(p: &Project, stage: &str, name: &str) -> std::path::PathBuf {
    let shown: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "pipeline.yaml", stage, "--json"])).unwrap();
    shown[name]["path"].as_str().unwrap().into()
}

fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn agreement_with_human_labels_on_imported_hh_rlhf_comparisons() {
    let p = Project::new();
    let source =
        std::fs::read_to_string(test_data("hh-rlhf/harmless-base-test-1000.jsonl")).unwrap();
    p.write(
        "hh.jsonl",
        &source.lines().take(40).collect::<Vec<_>>().join("\n"),
    );
    p.write("constitution.yaml", CONSTITUTION);
    p.write("pipeline.yaml", &pipeline(", principles_per_pair: 2"));
    p.ok(&["run", "pipeline.yaml", "--quiet"]);

    let imported = lines(&output(&p, "hh", "data"));
    let labelled = lines(&output(&p, "label", "comparisons"));
    assert_eq!(labelled.len(), imported.len());
    assert!(labelled.len() >= 35, "most of the 40 records import");
    for (l, c) in labelled.iter().zip(&imported) {
        assert_eq!(l["prompt"], c["prompt"]);
        assert_eq!(l["response_a"], c["chosen"]);
        assert_eq!(l["response_b"], c["rejected"]);
        assert_eq!(l["label"], c["label"]);
        let p_a = l["p_a"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&p_a));
        assert_eq!(l["details"].as_array().unwrap().len(), 2);
    }
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(output(&p, "label", "summary")).unwrap())
            .unwrap();
    assert_eq!(summary["count"].as_u64().unwrap() as usize, imported.len());
    assert_eq!(summary["labelled"], summary["count"]);
    let agreement = summary["agreement"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&agreement), "{summary}");
    // By hand from the records: the chosen answer is the human preference.
    let agree = labelled
        .iter()
        .filter(|l| (l["p_a"].as_f64().unwrap() > 0.5) == (l["label"].as_f64().unwrap() > 0.5))
        .count();
    assert!((agreement - agree as f64 / labelled.len() as f64).abs() < 1e-12);
    let mean = labelled
        .iter()
        .map(|l| l["p_a"].as_f64().unwrap())
        .sum::<f64>()
        / labelled.len() as f64;
    assert!((summary["mean_p_a"].as_f64().unwrap() - mean).abs() < 1e-9);
    assert!(summary["position_bias"].as_f64().unwrap().abs() <= 1.0);

    // The same figures are the stage's metrics in its cache record.
    let record = stage_record(&p, "label");
    for k in ["count", "mean_p_a", "position_bias", "agreement"] {
        assert_eq!(record["metrics"][k], summary[k], "{k}");
    }

    // Cached on a rerun.
    let out = p.ok(&["run", "pipeline.yaml", "--quiet"]);
    assert!(stages_with_status(&out, "ran").is_empty(), "{out}");
}

#[test]
fn bad_params_are_reported_before_running() {
    let p = Project::new();
    p.write("hh.jsonl", "");
    p.write("constitution.yaml", CONSTITUTION);
    p.write("pipeline.yaml", &pipeline(", principles_per_pair: 0"));
    let err = p.fails(&["validate", "pipeline.yaml"]);
    assert!(err.contains("principles_per_pair"), "{err}");
    p.write("pipeline.yaml", &pipeline(", few_shots: true"));
    let err = p.fails(&["validate", "pipeline.yaml"]);
    assert!(err.contains("few_shot"), "{err}");
}
