//! The shipped pipelines, end to end: the tiny Constitutional AI pipeline
//! (steps 1 to 6) runs from nothing on CPU, a rerun is fully cached, a run
//! from an empty cache under `--locked` reproduces every locked artifact byte
//! for byte, `cai.yaml`, `rlhf.yaml` and `hybrid.yaml` run on a local model
//! folder, and the online pipeline's rounds each train on their own samples.
mod common;
use common::*;

fn copy_shipped(p: &Project) {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for rel in [
        "pipelines/cai-sl.yaml",
        "pipelines/cai.yaml",
        "pipelines/tiny-sl.yaml",
        "pipelines/tiny.yaml",
        "pipelines/cai-dpo.yaml",
        "pipelines/tiny-dpo.yaml",
        "pipelines/cai-online.yaml",
        "pipelines/tiny-online.yaml",
        "pipelines/hybrid.yaml",
        "pipelines/compare.yaml",
        "pipelines/rlhf.yaml",
        "pipelines/constitutions/default.yaml",
        "examples/hh-rlhf-sample.jsonl",
        "examples/red-team-prompts.jsonl",
    ] {
        p.write(rel, &std::fs::read_to_string(root.join(rel)).unwrap());
    }
}

#[test]
fn the_tiny_cai_pipeline_runs_caches_and_reproduces_under_locked() {
    let p = Project::new();
    copy_shipped(&p);
    let m = "pipelines/tiny.yaml";
    let sets = [
        "--set",
        "params.max_new_tokens=12",
        "--set",
        "params.rounds=1",
        "--set",
        "params.ppo_iterations=3",
    ];
    let mut args = vec!["run", m, "--quiet"];
    args.extend(sets);
    // A `--set` run records the lockfile only when asked; the `--locked`
    // rerun below holds to it.
    let mut first = args.clone();
    first.push("--update-lock");
    let out = p.ok(&first);
    let ran = stages_with_status(&out, "ran");
    for stage in [
        "base",
        "answers",
        "revisions",
        "sl_cai",
        "samples",
        "labels",
        "pmp",
        "pm",
        "prompt_split",
        "rl_cai",
        "evaluation",
    ] {
        assert!(ran.contains(stage), "{stage} did not run:\n{out}");
    }
    assert_eq!(
        stages_with_status(&p.ok(&args), "ran"),
        set(&[]),
        "a rerun is fully cached"
    );

    let shown: serde_json::Value = serde_json::from_str(&p.ok(&[
        "show", m, "labels", "--json", sets[0], sets[1], sets[2], sets[3], sets[4], sets[5],
    ]))
    .unwrap();
    let labels = std::fs::read_to_string(shown["comparisons"]["path"].as_str().unwrap()).unwrap();
    for line in labels.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let p_a = v["p_a"].as_f64().unwrap();
        assert!(p_a > 0.0 && p_a < 1.0, "soft label {p_a}");
    }

    // cai.yaml itself, on a local Hugging Face folder given as a param: the
    // tiny run's pretrained base model.
    let base: serde_json::Value = serde_json::from_str(&p.ok(&[
        "show", m, "base", "--json", sets[0], sets[1], sets[2], sets[3], sets[4], sets[5],
    ]))
    .unwrap();
    let folder = format!(
        "params.base_model={}",
        base["model"]["path"].as_str().unwrap()
    );
    let out = p.ok(&[
        "run",
        "pipelines/cai.yaml",
        "--quiet",
        "--set",
        &folder,
        sets[0],
        sets[1],
        sets[2],
        sets[3],
        sets[4],
        sets[5],
    ]);
    assert!(
        stages_with_status(&out, "ran").contains("evaluation"),
        "{out}"
    );

    // The evaluation of RL-CAI against SL-CAI on the held-out prompts: both
    // judges, 20% of the 300 shipped prompts.
    let shown: serde_json::Value = serde_json::from_str(&p.ok(&[
        "show",
        m,
        "evaluation",
        "--json",
        sets[0],
        sets[1],
        sets[2],
        sets[3],
        sets[4],
        sets[5],
    ]))
    .unwrap();
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(shown["report"]["path"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(report["n"], 60, "{report}");
    assert_eq!(report["policy"], "rl_cai", "{report}");
    for judge in ["reward_model", "feedback_model"] {
        let w = report["judges"][judge]["win_rate"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&w), "{judge}: {report}");
    }

    // rlhf.yaml on the same folder: human comparisons, SFT, reward model,
    // PPO, evaluation.
    let out = p.ok(&[
        "run",
        "pipelines/rlhf.yaml",
        "--quiet",
        "--set",
        &folder,
        "--set",
        "params.max_new_tokens=12",
        "--set",
        "params.ppo_iterations=2",
    ]);
    for stage in ["sft", "reward_model", "ppo", "evaluation"] {
        assert!(
            stages_with_status(&out, "ran").contains(stage),
            "{stage}:\n{out}"
        );
    }

    // hybrid.yaml on the same folder with another human weight: steps 1 to
    // 3 and PMP are cai.yaml's (cached), the PM and what follows rerun.
    let out = p.ok(&[
        "run",
        "pipelines/hybrid.yaml",
        "--quiet",
        "--set",
        &folder,
        "--set",
        "params.human_weight=1.0",
        sets[0],
        sets[1],
        sets[2],
        sets[3],
        sets[4],
        sets[5],
    ]);
    assert_eq!(
        stages_with_status(&out, "ran"),
        set(&["pm", "rl_cai", "evaluation"]),
        "{out}"
    );

    std::fs::remove_dir_all(p.path("cache")).unwrap();
    let mut locked = args.clone();
    locked.push("--locked");
    let out = p.ok(&locked);
    assert!(!out.contains("FAILED"), "{out}");
    assert_eq!(stages_with_status(&out, "ran").len(), 14, "{out}");
}

/// `make demo`'s claim, at the shipped size: from nothing, the RL-CAI policy
/// beats the SL-CAI policy under the preference model on held-out prompts,
/// the Markdown report prints the interval, and `alignflow report` draws the
/// PPO curves.
#[test]
fn the_tiny_pipeline_at_full_size_beats_sl_cai_under_the_pm() {
    let p = Project::new();
    copy_shipped(&p);
    let m = "pipelines/tiny.yaml";
    let out = p.ok(&["run", m, "--quiet"]);
    assert_eq!(stages_with_status(&out, "ran").len(), 14, "{out}");

    let shown: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", m, "evaluation", "--json"])).unwrap();
    let read = |port: &str| std::fs::read_to_string(shown[port]["path"].as_str().unwrap()).unwrap();
    let report: serde_json::Value = serde_json::from_str(&read("report")).unwrap();
    let pm = &report["judges"]["reward_model"];
    let win = pm["win_rate"].as_f64().unwrap();
    let ci = pm["ci95"].as_array().unwrap();
    assert!(
        win > 0.5,
        "RL-CAI does not beat SL-CAI under the PM: {report}"
    );
    assert!(
        ci[0].as_f64().unwrap() < win && win < ci[1].as_f64().unwrap(),
        "{report}"
    );
    let md = read("report_md");
    assert!(md.contains("95% Wilson score interval"), "{md}");
    assert!(md.contains(&format!("{win:.4}")), "{md}");

    p.ok(&["report", m, "--out", "report.html"]);
    let html = p.read("report.html");
    for series in [
        "rl_cai/metrics/score",
        "rl_cai/metrics/kl",
        "sl_cai/metrics/loss",
    ] {
        assert!(
            html.contains(&format!("data-series=\"{series}\"")),
            "no {series} curve"
        );
    }
}

#[test]
fn the_tiny_dpo_pipeline_runs_dpo_on_ai_labels_compare_puts_three_methods_in_one_table_and_online_rounds_train_on_their_own_samples(
) {
    let p = Project::new();
    copy_shipped(&p);
    let m = "pipelines/tiny-dpo.yaml";
    let args = [
        "run",
        m,
        "--quiet",
        "--set",
        "params.max_new_tokens=12",
        "--set",
        "params.rounds=1",
    ];
    let out = p.ok(&args);
    let ran = stages_with_status(&out, "ran");
    for stage in [
        "base",
        "sl_cai",
        "labels",
        "dpo_reference",
        "dpo",
        "dpo_evaluation",
    ] {
        assert!(ran.contains(stage), "{stage} did not run:\n{out}");
    }
    // No PM, no PPO in the DPO pipeline.
    for stage in ["pmp", "pm", "rl_cai", "evaluation"] {
        let listed = out
            .lines()
            .any(|l| l.split_whitespace().next() == Some(stage));
        assert!(!listed, "{stage} is on the DPO branch:\n{out}");
    }
    let shown: serde_json::Value = serde_json::from_str(&p.ok(&[
        "show",
        m,
        "dpo_evaluation",
        "--json",
        "--set",
        "params.max_new_tokens=12",
        "--set",
        "params.rounds=1",
    ]))
    .unwrap();
    let report = std::fs::read_to_string(shown["report"]["path"].as_str().unwrap()).unwrap();
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(report["policy"], "dpo_cai");
    assert_eq!(report["reference"], "sl_cai");
    let w = report["judges"]["feedback_model"]["win_rate"]
        .as_f64()
        .unwrap();
    assert!((0.0..=1.0).contains(&w), "{report}");
    assert!(report["judges"].get("reward_model").is_none());

    // compare.yaml: PPO, GRPO and DPO from the same SL-CAI model, evaluated
    // by one stage with a matrix over the method (same judges, same
    // prompts); the report reads every win rate in one table.
    let out = p.ok(&[
        "run",
        "pipelines/compare.yaml",
        "--quiet",
        "--target",
        "compare",
        "--set",
        "params.max_new_tokens=12",
        "--set",
        "params.rounds=1",
        "--set",
        "params.ppo_iterations=3",
    ]);
    p.ok(&[
        "report",
        "pipelines/compare.yaml",
        "--out",
        "compare.html",
        "--set",
        "params.max_new_tokens=12",
        "--set",
        "params.rounds=1",
        "--set",
        "params.ppo_iterations=3",
    ]);
    let html = p.read("compare.html");
    let start = html
        .find("<table class=\"win-rates\">")
        .expect("a win-rate table");
    let table = &html[start..start + html[start..].find("</table>").unwrap()];
    // Header, dpo_evaluation (run above, feedback model only), then the
    // matrix: three methods by two judges.
    assert_eq!(table.matches("<tr>").count(), 1 + 1 + 6, "{table}");
    let ran = stages_with_status(&out, "ran");
    for stage in ["rl_cai", "rl_grpo", "pm"] {
        assert!(ran.contains(stage), "{stage} did not run:\n{out}");
    }
    for policy in ["rl_cai", "rl_grpo", "dpo"] {
        let stage = format!("compare[method={policy}]");
        for judge in ["reward_model", "feedback_model"] {
            let row = format!("<td>{stage}</td><td>{policy}</td><td>sl_cai</td><td>{judge}</td>");
            assert!(table.contains(&row), "no {row} in {table}");
        }
    }

    the_tiny_online_pipeline_trains_each_round_on_its_own_samples_and_reports_every_round(&p);
}

/// The lines `alignflow dag` prints for stage `id`: its header and what it
/// reads.
fn dag_block<'a>(dag: &'a str, id: &str) -> Vec<&'a str> {
    let mut lines = dag
        .lines()
        .skip_while(|l| !l.starts_with(&format!("{id} (")));
    let header = lines.next().unwrap_or_else(|| panic!("no {id} in {dag}"));
    std::iter::once(header)
        .chain(lines.take_while(|l| l.starts_with("  ")))
        .collect()
}

/// cai-online.yaml, tiny: three rounds of on-policy samples, AI labels and
/// DPO from SL-CAI, each round's policy evaluated against SL-CAI. Round k
/// samples with round k-1's policy and trains on its own labels (checked
/// on the unrolled graph and on the content ids the lockfile records), and
/// the report has one row and one point per round. Run in the project of
/// the tiny DPO pipeline, whose base model and SL-CAI it finds cached.
fn the_tiny_online_pipeline_trains_each_round_on_its_own_samples_and_reports_every_round(
    p: &Project,
) {
    // The shipped manifest unrolls into its three rounds.
    let dag = p.ok(&["dag", "pipelines/cai-online.yaml"]);
    for k in 1..=3 {
        for (stage, op) in [
            ("samples", "generate"),
            ("labels", "ai_feedback"),
            ("dpo_reference", "dpo.reference"),
            ("dpo", "dpo"),
            ("evaluation", "evaluate"),
        ] {
            let header = format!("{stage}[round={k}] ({op})");
            assert!(dag.contains(&header), "no {header} in {dag}");
        }
    }
    assert!(!dag.contains("[round=4]"), "{dag}");

    let m = "pipelines/tiny-online.yaml";
    let sets = [
        "--set",
        "params.max_new_tokens=12",
        "--set",
        "params.rounds=1",
    ];
    let dag = p.ok(&[&["dag", m][..], &sets].concat());
    for k in 1..=3 {
        let policy = match k {
            1 => "sl_cai.model".to_string(),
            k => format!("dpo[round={}].model", k - 1),
        };
        let round = |stage: &str| format!("{stage}[round={k}]");
        let reads = |stage: &str, line: String| {
            let block = dag_block(&dag, &round(stage));
            assert!(block.contains(&line.as_str()), "{line} not in {block:?}");
        };
        reads("samples", format!("  model <- {policy}"));
        reads(
            "labels",
            format!("  pairs <- {}.responses", round("samples")),
        );
        reads("labels", "  model <- base.model".into());
        reads("dpo_reference", format!("  model <- {policy}"));
        reads("dpo", format!("  policy <- {policy}"));
        reads(
            "dpo",
            format!("  comparisons <- {}.comparisons", round("labels")),
        );
        reads("evaluation", format!("  policy <- {}.model", round("dpo")));
        reads("evaluation", "  reference <- sl_cai.model".into());
        reads("evaluation", "  feedback_model <- base.model".into());
    }

    let out = p.ok(&[&["run", m, "--quiet", "--update-lock"][..], &sets].concat());
    assert!(!out.contains("FAILED"), "{out}");
    let ran = stages_with_status(&out, "ran");
    let rounds: Vec<&String> = ran.iter().filter(|s| s.contains("[round=")).collect();
    assert_eq!(rounds.len(), 15, "{out}");
    assert_eq!(ran.len(), 15, "SL-CAI and what it needs are cached:\n{out}");

    // The same flow, by content: what each round read is what the round
    // before (or SL-CAI) and its own stages wrote.
    let lock: serde_yaml::Value =
        serde_yaml::from_str(&p.read("pipelines/tiny-online.lock")).unwrap();
    let stages = &lock["stages"];
    let read = |id: &str, input: &str| stages[id]["inputs"][input]["id"].clone();
    let wrote = |id: &str, output: &str| stages[id]["outputs"][output].clone();
    let mut samples = Vec::new();
    for k in 1..=3 {
        let id = |stage: &str| format!("{stage}[round={k}]");
        let policy = match k {
            1 => wrote("sl_cai", "model"),
            k => wrote(&format!("dpo[round={}]", k - 1), "model"),
        };
        assert!(!policy.is_null(), "{lock:?}");
        assert_eq!(read(&id("samples"), "model"), policy, "round {k}");
        assert_eq!(read(&id("dpo"), "policy"), policy, "round {k}");
        assert_eq!(
            read(&id("labels"), "pairs"),
            wrote(&id("samples"), "responses")
        );
        assert_eq!(
            read(&id("dpo"), "comparisons"),
            wrote(&id("labels"), "comparisons")
        );
        assert_eq!(
            read(&id("evaluation"), "policy"),
            wrote(&id("dpo"), "model")
        );
        samples.push(wrote(&id("samples"), "responses"));
    }
    assert!(
        samples[0] != samples[1] && samples[1] != samples[2],
        "{samples:?}"
    );

    p.ok(&[&["report", m, "--out", "online.html"][..], &sets].concat());
    let html = p.read("online.html");
    let (table, rows) = rounds_table(&html);
    assert_eq!(rows, 3, "{table}");
    for k in 1..=3 {
        let row = format!(
            "<tr class=\"round-row\" data-round=\"{k}\"><td>{k}</td><td>evaluation[round={k}]</td><td>online_dpo_round_{k}</td><td>sl_cai</td>"
        );
        assert!(table.contains(&row), "no {row} in {table}");
    }
    let series = "evaluation/win_rate/feedback_model";
    assert_eq!(curve_points(&html, series), 3, "a point per round");
}
