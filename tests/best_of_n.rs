//! `best_of_n` through the engine and the worker: a tiny policy samples four
//! answers per prompt, a tiny preference model that likes the word `a` keeps
//! the best; the kept answers score at least the mean of all samples, the
//! dataset has the documented fields, and an `sft` stage trains on it.
mod common;
use common::a_world::{comparisons, corpus, dialogue, manifest, prompts, topic};
use common::*;

/// The pipeline: the shared base stages, then the stages under test.
fn pipeline_text() -> String {
    manifest(
        r#"name: best-of-n-tiny
seed: 7
params:
  template: "\n\nHuman: {prompt}\n\nAssistant:"
"#,
        r#"  bon:
    op: best_of_n
    inputs: { policy: "${stages.base.model}", reward_model: "${stages.pm.model}", prompts: prompts.jsonl }
    params: { n: 4, max_new_tokens: 10, template: "${params.template}", batch_size: 16 }
  rft:
    op: sft
    inputs: { model: "${stages.base.model}", data: "${stages.bon.data}" }
    params: { template: "${params.template}", batch_size: 8, max_steps: 5, lr: 1e-3, max_len: 64, checkpoint_every: 0 }
"#,
    )
}

#[test]
fn best_of_n_keeps_the_best_answers_and_sft_trains_on_them() {
    let p = Project::new();
    p.write("hh.jsonl", &corpus(200));
    p.write("comparisons.jsonl", &comparisons(160));
    let given_prompts = prompts(12, 5, topic);
    p.write("prompts.jsonl", &given_prompts);
    p.write("pipeline.yaml", &pipeline_text());
    let out = p.ok(&["run", "pipeline.yaml", "--quiet"]);
    let ran = stages_with_status(&out, "ran");
    for stage in ["bon", "rft"] {
        assert!(ran.contains(stage), "{stage} did not run:\n{out}");
    }

    let shown: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "pipeline.yaml", "bon", "--json"])).unwrap();
    let data = std::fs::read_to_string(shown["data"]["path"].as_str().unwrap()).unwrap();
    let records: Vec<serde_json::Value> = data
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 12);
    let (mut best_sum, mut all_sum, mut all_n) = (0.0, 0.0, 0usize);
    for (r, line) in records.iter().zip(given_prompts.lines()) {
        let given: serde_json::Value = serde_json::from_str(line).unwrap();
        // The raw prompt, for sft's template; the templated text beside it.
        assert_eq!(r["prompt"], given["prompt"]);
        assert_eq!(
            r["prompt_text"].as_str().unwrap(),
            dialogue(given["prompt"].as_str().unwrap())
        );
        assert!(r["response"].is_string());
        let scores: Vec<f64> = r["rank_scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_f64().unwrap())
            .collect();
        assert_eq!(scores.len(), 4);
        let score = r["score"].as_f64().unwrap();
        let best = r["best_index"].as_u64().unwrap() as usize;
        assert_eq!(scores[best], score);
        assert!(scores.iter().all(|&s| s <= score));
        assert!(
            scores[..best].iter().all(|&s| s < score),
            "ties: lowest index"
        );
        best_sum += score;
        all_sum += scores.iter().sum::<f64>();
        all_n += scores.len();
    }
    let (best_mean, all_mean) = (best_sum / 12.0, all_sum / all_n as f64);
    eprintln!("mean best score {best_mean:.4}, mean of all samples {all_mean:.4}");
    assert!(best_mean >= all_mean);

    let report = std::fs::read_to_string(shown["report"]["path"].as_str().unwrap()).unwrap();
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["n"], 4);
    assert_eq!(report["prompts"], 12);
    assert!((report["mean_best_score"].as_f64().unwrap() - best_mean).abs() < 1e-9);
    assert!((report["mean_score"].as_f64().unwrap() - all_mean).abs() < 1e-9);
    assert!(report["mean_best_score"].as_f64() >= report["mean_score"].as_f64());

    let rft: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "pipeline.yaml", "rft", "--json"])).unwrap();
    let model: std::path::PathBuf = rft["model"]["path"].as_str().unwrap().into();
    assert!(model.join("model.safetensors").exists());
}
