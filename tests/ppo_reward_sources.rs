//! `ppo`'s reward sources through the engine and the worker, on a tiny
//! model: contrastive rewards (a `baseline_scores` stage, then `ppo` with a
//! `baseline`: `score` is the PM score minus the prompt's mean baseline) and
//! direct RLAIF (a `feedback_model` that rates each response from 1 to 10
//! instead of a preference model: scores in `[-1, 1]`); exactly one reward
//! source per stage.
mod common;
use common::*;

const WORDS: &[&str] = &[
    "the", "sun", "moon", "fish", "red", "blue", "green", "sky", "tree", "dog", "a",
];

fn prompt(i: usize) -> String {
    format!(
        "\n\nHuman: tell me about the {}\n\nAssistant:",
        WORDS[i % WORDS.len()]
    )
}

/// Dialogues for the tokenizer and the base LM (digits included, so the
/// ratings are in the tokenizer's data).
fn corpus(n: usize) -> String {
    (0..n)
        .map(|i| {
            let words: Vec<&str> = (0..8).map(|k| WORDS[(i * 7 + k * 3) % WORDS.len()]).collect();
            serde_json::json!({
                "chosen": format!("{} {} Rating (1 to 10): {}", prompt(i), words.join(" "), i % 10 + 1),
                "rejected": format!("{} {}", prompt(i), words[..4].join(" ")),
            })
            .to_string()
                + "\n"
        })
        .collect()
}

/// Comparisons: the chosen response has more `a`.
fn comparisons(n: usize) -> String {
    (0..n)
        .map(|i| {
            serde_json::json!({
                "prompt": prompt(i),
                "chosen": " a a sun a a",
                "rejected": format!(" the {} tree", WORDS[i % 5]),
                "label": 1.0,
            })
            .to_string()
                + "\n"
        })
        .collect()
}

/// A prompt `baseline_scores` never saw.
const EXTRA: &str = "\n\nHuman: tell me about the ocean\n\nAssistant:";

fn prompts(n: usize) -> String {
    (0..n)
        .map(|i| serde_json::json!({ "prompt": prompt(i) }).to_string() + "\n")
        .collect()
}

const BASE: &str = r#"version: 1
name: ppo-reward-sources
seed: 7
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
    params: { width: 32, layers: 1, heads: 2, positions: 64, seq_len: 32, batch_size: 16, max_steps: 20, lr: 3e-3, checkpoint_every: 0 }
"#;

const PM: &str = r#"  pm:
    op: pm.train
    inputs: { model: "${stages.base.model}", comparisons: comparisons.jsonl }
    params: { batch_size: 16, max_steps: 20, lr: 3e-3, warmup_steps: 3, checkpoint_every: 0, append_eos: false, eval_fraction: 0.1 }
"#;

const RL_PARAMS: &str =
    "iterations: 3, batch_size: 8, max_new_tokens: 6, lr: 1e-3, checkpoint_every: 0";

fn project(extra: &str) -> Project {
    let p = Project::new();
    p.write("hh.jsonl", &corpus(120));
    p.write("comparisons.jsonl", &comparisons(64));
    p.write("prompts.jsonl", &prompts(WORDS.len()));
    let unseen = serde_json::json!({ "prompt": EXTRA }).to_string();
    p.write(
        "more_prompts.jsonl",
        &format!("{}{unseen}\n", prompts(WORDS.len())),
    );
    p.write("pipeline.yaml", &format!("{BASE}{extra}"));
    p
}

fn path_of(p: &Project, file: &str, stage: &str, output: &str) -> std::path::PathBuf {
    let shown: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", file, stage, "--json"])).unwrap();
    shown[output]["path"].as_str().unwrap().into()
}

fn jsonl(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn contrastive_ppo_trains_on_the_pm_score_minus_the_prompt_baseline() {
    let stages = format!(
        r#"{PM}  baseline:
    op: baseline_scores
    inputs: {{ policy: "${{stages.base.model}}", reward_model: "${{stages.pm.model}}", prompts: prompts.jsonl }}
    params: {{ samples: 3, max_new_tokens: 6, temperature: 1.0 }}
  rl:
    op: ppo
    inputs: {{ policy: "${{stages.base.model}}", reward_model: "${{stages.pm.model}}", prompts: prompts.jsonl, baseline: "${{stages.baseline.scores}}" }}
    params: {{ {RL_PARAMS} }}
"#
    );
    let p = project(&stages);
    p.ok(&["run", "pipeline.yaml", "--quiet"]);

    // One record per distinct templated prompt, k scores and their mean.
    let records = jsonl(&path_of(&p, "pipeline.yaml", "baseline", "scores"));
    assert_eq!(records.len(), WORDS.len());
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["prompt"].as_str(), Some(prompt(i).as_str()));
        let s: Vec<f64> = r["scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        assert_eq!(s.len(), 3);
        let mean = s.iter().sum::<f64>() / 3.0;
        assert!((r["mean"].as_f64().unwrap() - mean).abs() < 1e-9, "{r}");
    }

    // score = raw_score - baseline_score (batch means), raw kept.
    let lines = jsonl(&path_of(&p, "pipeline.yaml", "rl", "metrics"));
    assert_eq!(lines.len(), 3);
    for l in &lines {
        let (score, raw, base) = (
            l["score"].as_f64().unwrap(),
            l["raw_score"].as_f64().unwrap(),
            l["baseline_score"].as_f64().unwrap(),
        );
        assert!(
            score.is_finite() && raw.is_finite() && base.is_finite(),
            "{l}"
        );
        let tol = 1e-4 * (1.0 + raw.abs() + base.abs());
        assert!((score - (raw - base)).abs() < tol, "{l}");
    }

    // A prompt without a baseline stops the stage, naming it and the prompt.
    let more = format!(
        "{}{}",
        BASE,
        stages.replace(
            "prompts: prompts.jsonl, baseline",
            "prompts: more_prompts.jsonl, baseline"
        )
    );
    p.write("more.yaml", &more);
    let err = p.fails(&["run", "more.yaml", "--quiet"]);
    assert!(err.contains("stage `rl`"), "{err}");
    assert!(err.contains("has no baseline score"), "{err}");
    assert!(err.contains(&format!("{EXTRA:?}")), "{err}");
}

#[test]
fn direct_rlaif_ppo_rates_responses_with_a_feedback_model() {
    let p = project(&format!(
        r#"  rl:
    op: ppo
    inputs: {{ policy: "${{stages.base.model}}", feedback_model: "${{stages.base.model}}", prompts: prompts.jsonl }}
    params: {{ {RL_PARAMS}, principle: "The response is helpful and harmless." }}
"#
    ));
    p.ok(&["run", "pipeline.yaml", "--quiet"]);
    let lines = jsonl(&path_of(&p, "pipeline.yaml", "rl", "metrics"));
    assert_eq!(lines.len(), 3);
    for l in &lines {
        for key in ["score", "raw_score"] {
            let v = l[key].as_f64().unwrap_or(f64::NAN);
            assert!(v.is_finite() && (-1.0..=1.0).contains(&v), "{key}: {l}");
        }
        assert!(l.get("baseline_score").is_none(), "{l}");
    }

    // Exactly one reward source, and a principle for the feedback model.
    let bad = |name: &str, inputs: &str, params: &str| {
        let yaml = format!(
            "{BASE}  rl:\n    op: ppo\n    inputs: {{ policy: \"${{stages.base.model}}\", prompts: prompts.jsonl{inputs} }}\n    params: {{ {RL_PARAMS}{params} }}\n"
        );
        p.write(name, &yaml);
        // Checked when the manifest loads: `validate` reports it.
        p.fails(&["validate", name])
    };
    let both = bad(
        "both.yaml",
        ", reward_model: \"${stages.base.model}\", feedback_model: \"${stages.base.model}\"",
        "",
    );
    assert!(both.contains("exactly one reward source"), "{both}");
    assert!(
        both.contains("stage `rl`, field `inputs.feedback_model`"),
        "{both}"
    );
    let none = bad("none.yaml", "", "");
    assert!(none.contains("no reward source"), "{none}");
    assert!(none.contains("stage `rl`, field `inputs`"), "{none}");
    let no_principle = bad(
        "no_principle.yaml",
        ", feedback_model: \"${stages.base.model}\"",
        "",
    );
    assert!(no_principle.contains("principle"), "{no_principle}");
    assert!(
        no_principle.contains("field `inputs.constitution`"),
        "{no_principle}"
    );
    let contrastive_rlaif = bad(
        "contrastive_rlaif.yaml",
        ", feedback_model: \"${stages.base.model}\", baseline: prompts.jsonl",
        ", principle: \"be kind\"",
    );
    assert!(
        contrastive_rlaif.contains("field `inputs.baseline`")
            && contrastive_rlaif.contains("needs `reward_model`"),
        "{contrastive_rlaif}"
    );
}
