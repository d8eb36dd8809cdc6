//! Verifiable rewards through the engine and the worker, on a tiny model
//! pretrained on single-digit sums (the data of `pipelines/grpo-arith.yaml`):
//! several weighed reward sources logged one by one (GAE and RLOO), the
//! Python example program as the reward of `best_of_n`, a failing program
//! that fails the stage with its stderr in the run log, the protocol in
//! `alignflow ops ppo`, and the shipped pipeline, whose GRPO raises the
//! held-out accuracy.
mod common;
use common::*;

/// The shipped pipeline and its data, in a fresh project.
fn arith_project() -> Project {
    let p = Project::new();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for rel in [
        "pipelines/grpo-arith.yaml",
        "examples/arith/facts.txt",
        "examples/arith/train.jsonl",
        "examples/arith/heldout.jsonl",
        "examples/reward_exact_match.py",
    ] {
        p.write(rel, &std::fs::read_to_string(root.join(rel)).unwrap());
    }
    p
}

fn output_path(p: &Project, file: &str, stage: &str, output: &str) -> std::path::PathBuf {
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

/// Every run log of the project, concatenated.
fn run_logs(p: &Project) -> String {
    walk(&p.path("cache/logs"))
        .into_iter()
        .map(|f| std::fs::read_to_string(f).unwrap_or_default())
        .collect()
}

/// The arith base model, small and quick, and a stage to append.
fn arith_manifest(stages: &str) -> String {
    format!(
        r#"version: 1
name: rewards
seed: 5
stages:
  facts:
    op: dataset.import
    inputs: {{ source: examples/arith/facts.txt }}
    params: {{ format: text }}
  prompts:
    op: dataset.import
    inputs: {{ source: examples/arith/train.jsonl }}
    params: {{ format: prompts }}
  tok:
    op: tokenizer.train
    inputs: {{ data: "${{stages.facts.data}}" }}
    params: {{ vocab_size: 257 }}
  base:
    op: lm.pretrain
    inputs: {{ data: "${{stages.facts.data}}", tokenizer: "${{stages.tok.tokenizer}}" }}
    params: {{ width: 32, layers: 1, heads: 2, positions: 16, seq_len: 16, batch_size: 16, max_steps: 30, lr: 3.0e-3, checkpoint_every: 0 }}
{stages}"#
    )
}

const PYTHON_PROGRAM: &str = "{ program: { interpreter: [python3], batch_size: 5 }, weight: 0.5 }";

#[test]
fn several_weighed_reward_sources_are_logged_one_by_one() {
    let p = arith_project();
    // An executable program run directly (no interpreter): the shorthand,
    // bound alone, with RLOO.
    p.write(
        "always_one.sh",
        "#!/bin/sh\nwhile read -r line; do\n  id=$(printf '%s' \"$line\" | sed 's/.*\"id\":\\([0-9]*\\).*/\\1/')\n  echo \"{\\\"id\\\": $id, \\\"score\\\": 1}\"\ndone\n",
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        p.path("always_one.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let stages = format!(
        r#"  gae:
    op: ppo
    inputs: {{ policy: "${{stages.base.model}}", prompts: "${{stages.prompts.data}}", reward_program: examples/reward_exact_match.py }}
    params:
      iterations: 2
      batch_size: 6
      max_new_tokens: 3
      checkpoint_every: 0
      rewards: [{{ exact_match: {{}}, weight: 1.0 }}, {PYTHON_PROGRAM}, {{ length: {{ free_chars: 1 }}, weight: 0.1 }}]
  rloo:
    op: ppo
    inputs: {{ policy: "${{stages.base.model}}", prompts: "${{stages.prompts.data}}", reward_program: always_one.sh }}
    params: {{ advantage: rloo, samples_per_prompt: 2, iterations: 2, batch_size: 3, max_new_tokens: 3, checkpoint_every: 0 }}
"#
    );
    p.write("rewards.yaml", &arith_manifest(&stages));
    p.ok(&["run", "rewards.yaml", "--quiet"]);

    let lines = jsonl(&output_path(&p, "rewards.yaml", "gae", "metrics"));
    assert_eq!(lines.len(), 2);
    for l in &lines {
        let get = |k: &str| {
            l[k].as_f64()
                .unwrap_or_else(|| panic!("no metric `{k}` in {l}"))
        };
        let (exact, program, length) = (
            get("reward_exact_match"),
            get("reward_program"),
            get("reward_length"),
        );
        // The program's named scores, each logged; its score is their sum.
        let (correct, numeric) = (get("reward_program_correct"), get("reward_program_numeric"));
        assert!((program - (correct + numeric)).abs() < 1e-9, "{l}");
        // The example program and the built-in rule agree on correctness.
        assert!((correct - exact).abs() < 1e-9, "{l}");
        assert!(length <= 0.0, "{l}");
        let total = exact + 0.5 * program + 0.1 * length;
        assert!((get("raw_score") - total).abs() < 1e-5, "{l}");
    }
    // The program's stderr went to the run log, under the stage.
    let log = run_logs(&p);
    assert!(
        log.contains("gae: ") && log.contains("scored 12 responses"),
        "{log}"
    );

    let lines = jsonl(&output_path(&p, "rewards.yaml", "rloo", "metrics"));
    for l in &lines {
        assert_eq!(l["reward_program"].as_f64(), Some(1.0), "{l}");
        assert_eq!(l["raw_score"].as_f64(), Some(1.0), "{l}");
    }
}

#[test]
fn best_of_n_keeps_the_answer_the_program_prefers() {
    let p = arith_project();
    let stages = r#"  best:
    op: best_of_n
    inputs: { policy: "${stages.base.model}", prompts: "${stages.prompts.data}", reward_program: examples/reward_exact_match.py }
    params: { n: 4, max_new_tokens: 3, limit: 12, rewards: [{ program: { interpreter: [python3] } }] }
"#;
    p.write("best.yaml", &arith_manifest(stages));
    p.ok(&["run", "best.yaml", "--quiet"]);
    let records = jsonl(&output_path(&p, "best.yaml", "best", "data"));
    assert_eq!(records.len(), 12);
    for r in &records {
        let ranks: Vec<f64> = r["rank_scores"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .collect();
        let best = ranks.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        assert_eq!(r["score"].as_f64(), Some(best), "{r}");
        assert_eq!(r["reward_sources"]["program"].as_f64(), Some(best), "{r}");
        // A perfect answer scores 2 (correct and numeric): the sum.
        if best == 2.0 {
            let prompt = r["prompt"].as_str().unwrap();
            let (a, b) = prompt.trim_end_matches('=').split_once('+').unwrap();
            let sum = a.parse::<u32>().unwrap() + b.parse::<u32>().unwrap();
            assert_eq!(
                r["response"].as_str().unwrap().trim(),
                sum.to_string(),
                "{r}"
            );
        }
    }
}

#[test]
fn a_reward_program_that_fails_fails_the_stage_and_commits_nothing() {
    let p = arith_project();
    // Answers the first batch, then NaN.
    p.write(
        "nan.py",
        r#"import json, sys
for n, line in enumerate(sys.stdin):
    r = json.loads(line)
    print("checking", r["id"], file=sys.stderr, flush=True)
    print(json.dumps({"id": r["id"], "score": 1.0}) if n < 2 else '{"id": %d, "score": NaN}' % r["id"], flush=True)
"#,
    );
    let stages = r#"  rl:
    op: ppo
    inputs: { policy: "${stages.base.model}", prompts: "${stages.prompts.data}", reward_program: nan.py }
    params: { advantage: grpo, samples_per_prompt: 2, iterations: 2, batch_size: 2, max_new_tokens: 3, checkpoint_every: 0, rewards: [{ program: { interpreter: [python3], batch_size: 2 } }] }
"#;
    p.write("nan.yaml", &arith_manifest(stages));
    let err = p.fails(&["run", "nan.yaml", "--quiet"]);
    assert!(err.contains("stage `rl`"), "{err}");
    assert!(
        err.contains("reward program `") && err.contains("nan.py"),
        "{err}"
    );
    // The third answer line, the record it answered (by the input's name,
    // whose path is a cache object's) and the text.
    assert!(err.contains("answer line 3: not a JSON object"), "{err}");
    assert!(err.contains("NaN"), "{err}");
    assert!(
        err.contains("for record input `prompts` line ") && err.contains("(id 2)"),
        "{err}"
    );
    assert!(
        run_logs(&p).contains("checking 2"),
        "the program's stderr is in the run log"
    );
    // Nothing was committed for the failed stage.
    let committed = walk(&p.path("cache/records"))
        .into_iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .any(|r| r.contains("\"stage\":\"rl\"") || r.contains("\"stage\": \"rl\""));
    assert!(!committed, "a record of the failed stage");
}

#[test]
fn ops_ppo_documents_the_reward_sources_and_the_protocol() {
    let out = Project::new().ok(&["ops", "ppo"]);
    for needle in [
        "reward_program",
        "rewards",
        "exact_match",
        "regex",
        "length",
        "{id, score}",
        "{id, scores: {name: value}}",
        "timeout_s",
        "stderr goes to the stage log",
    ] {
        assert!(
            out.contains(needle),
            "`alignflow ops ppo` lacks {needle:?}:\n{out}"
        );
    }
}

/// `pipelines/grpo-arith.yaml` as shipped: GRPO with `exact_match` raises
/// the accuracy on the 30 held-out sums (each asked four times) clearly:
/// measured 0.258 -> 0.392 (29 wins, 13 losses), and with seeds 4 and 5
/// 0.108 -> 0.267 and 0.383 -> 0.558.
#[test]
fn grpo_on_exact_match_raises_held_out_accuracy() {
    let p = arith_project();
    p.ok(&["run", "pipelines/grpo-arith.yaml", "--quiet"]);
    let file = "pipelines/grpo-arith.yaml";
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(output_path(&p, file, "accuracy", "report")).unwrap(),
    )
    .unwrap();
    let judge = &report["judges"]["exact_match"];
    let mean = |who: &str| judge["mean_score"][who].as_f64().unwrap();
    let (grpo, base) = (mean("policy"), mean("reference"));
    eprintln!("held-out accuracy: base {base:.3}, grpo {grpo:.3}; {judge}");
    assert_eq!(report["n"], 120, "{report}");
    assert!(grpo >= base + 0.1, "base {base}, grpo {grpo}");
    // Above the base's accuracy with 95% confidence, and more wins than losses.
    let low = judge["mean_score_ci95"]["policy"][0].as_f64().unwrap();
    assert!(
        low > base,
        "the GRPO interval's low end {low} vs the base's {base}"
    );
    let (wins, losses) = (
        judge["wins"].as_u64().unwrap(),
        judge["losses"].as_u64().unwrap(),
    );
    assert!(wins > 2 * losses, "{wins} wins, {losses} losses");
    // The training reward rose too.
    let metrics = jsonl(&output_path(&p, file, "grpo", "metrics"));
    let score = |lines: &[serde_json::Value]| {
        lines
            .iter()
            .map(|l| l["score"].as_f64().unwrap())
            .sum::<f64>()
            / lines.len() as f64
    };
    let (first, last) = (score(&metrics[..10]), score(&metrics[metrics.len() - 10..]));
    assert!(last > first + 0.05, "training score {first} -> {last}");
}

/// Two records with the same prompt and different fields: each row's
/// request carries its own record, found by the prompt's place in the
/// input, not by its tokens (which found the first record for both).
#[test]
fn records_that_share_a_prompt_keep_their_own_fields() {
    let p = arith_project();
    p.write(
        "twins.jsonl",
        "{\"prompt\": \"3+4=\", \"reference\": \"7\", \"tag\": \"A\"}\n{\"prompt\": \"3+4=\", \"reference\": \"7\", \"tag\": \"B\"}\n",
    );
    p.write(
        "likes_b.sh",
        "#!/bin/sh\nwhile read -r line; do\n  id=$(printf '%s' \"$line\" | sed 's/.*\"id\":\\([0-9]*\\).*/\\1/')\n  case \"$line\" in *'\"tag\":\"B\"'*) s=1 ;; *) s=0 ;; esac\n  echo \"{\\\"id\\\": $id, \\\"score\\\": $s}\"\ndone\n",
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(p.path("likes_b.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let stages = r#"  twins:
    op: dataset.import
    inputs: { source: twins.jsonl }
    params: { format: prompts }
  ppo:
    op: ppo
    inputs: { policy: "${stages.base.model}", prompts: "${stages.twins.data}", reward_program: likes_b.sh }
    params: { iterations: 1, batch_size: 2, max_new_tokens: 2, checkpoint_every: 0 }
"#;
    p.write("rewards.yaml", &arith_manifest(stages));
    p.ok(&["run", "rewards.yaml", "--quiet"]);
    let lines = jsonl(&output_path(&p, "rewards.yaml", "ppo", "metrics"));
    assert_eq!(
        lines[0]["reward_program"].as_f64(),
        Some(0.5),
        "{}",
        lines[0]
    );
}
