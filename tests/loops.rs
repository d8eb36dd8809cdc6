//! `loops:` end to end: a loop unrolls into one stage per round that plan,
//! run, the cache, the lockfile, `--target`, `show`, `dag` and the report
//! treat as stages; each round has its own seed and reads the round before;
//! more rounds rerun only the new ones; a change inside the loop reruns
//! from the first round it reaches, and the plan says why in each.
mod common;
use common::*;

/// Three rounds of sample -> label -> train from `start`, each appending
/// to what the round before trained, plus a stage after the loop that
/// reads round 3. Every execution appends its id to `runs.txt`.
const LOOPED: &str = r#"version: 1
name: looped
params: { rounds: 3, bonus: 1 }
loops:
  online:
    rounds: ${params.rounds}
    carry:
      policy: { init: "${stages.start.model}", next: "${stages.train.model}" }
    stages: [sample, label, train]
stages:
  start:
    op: exec
    inputs: { src: input.txt }
    outputs: [model]
    params: { cmd: 'cp "$ALIGNFLOW_IN_SRC" "$ALIGNFLOW_OUT/model"; echo start >> runs.txt' }
  sample:
    op: exec
    description: "round ${loop.round}: samples from the current policy"
    inputs: { policy: "${loop.policy}" }
    outputs: [samples]
    params: { cmd: '(cat "$ALIGNFLOW_IN_POLICY"; echo "sampled in round ${loop.round} with seed $ALIGNFLOW_SEED") > "$ALIGNFLOW_OUT/samples"; echo "sample ${loop.round}" >> runs.txt' }
  label:
    op: exec
    inputs: { samples: "${stages.sample.samples}" }
    outputs: [labels]
    params: { cmd: 'b=${params.bonus}; (cat "$ALIGNFLOW_IN_SAMPLES"; echo "labelled +$b") > "$ALIGNFLOW_OUT/labels"' }
  train:
    op: exec
    inputs: { policy: "${loop.policy}", labels: "${stages.label.labels}" }
    outputs: [model]
    params: { cmd: '(cat "$ALIGNFLOW_IN_LABELS"; echo "trained in round ${loop.round}") > "$ALIGNFLOW_OUT/model"' }
  final:
    op: exec
    inputs: { model: "${stages.train[round=3].model}" }
    outputs: [out]
    params: { cmd: 'cp "$ALIGNFLOW_IN_MODEL" "$ALIGNFLOW_OUT/out"' }
"#;

fn looped() -> Project {
    let p = Project::new();
    p.write("looped.yaml", LOOPED);
    p.write("input.txt", "start\n");
    p
}

/// The ids of a round's stages.
fn round(n: u32) -> Vec<String> {
    ["sample", "label", "train"]
        .iter()
        .map(|s| format!("{s}[round={n}]"))
        .collect()
}

fn ids(items: &[Vec<String>], plain: &[&str]) -> std::collections::BTreeSet<String> {
    let mut out: std::collections::BTreeSet<String> = items.iter().flatten().cloned().collect();
    out.extend(plain.iter().map(|s| s.to_string()));
    out
}

/// The file behind output `output` of stage `id`.
fn output(p: &Project, id: &str, output: &str) -> String {
    let shown: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "looped.yaml", id, "--json"])).unwrap();
    std::fs::read_to_string(shown[output]["path"].as_str().unwrap()).unwrap()
}

/// `plan --json`'s (action, reason) of every stage.
fn plan(p: &Project) -> std::collections::BTreeMap<String, (String, String)> {
    let plan: serde_json::Value =
        serde_json::from_str(&p.ok(&["plan", "looped.yaml", "--json"])).unwrap();
    plan.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["stage"].as_str().unwrap().to_string(),
                (
                    r["action"].as_str().unwrap().to_string(),
                    r["reason"].as_str().unwrap().to_string(),
                ),
            )
        })
        .collect()
}

#[test]
fn rounds_are_stages_that_read_the_round_before_with_seeds_of_their_own() {
    let p = looped();
    let dag = p.ok(&["dag", "looped.yaml"]);
    assert!(
        dag.contains("sample[round=2] (exec)\n  # round 2: samples from the current policy\n  policy <- train[round=1].model\n"),
        "{dag}"
    );
    assert!(dag.contains("policy <- start.model"), "{dag}");
    assert!(dag.contains("model <- train[round=3].model"), "{dag}");

    // `--target` one round: it and what it needs.
    assert_eq!(
        p.run_stages("looped.yaml", &["--target", "train[round=2]"]),
        ids(&[round(1), round(2)], &["start"])
    );
    assert_eq!(
        p.run_stages("looped.yaml", &[]),
        ids(&[round(3)], &["final"])
    );
    assert!(p.read("looped.lock").contains("train[round=3]"));
    assert_eq!(p.run_stages("looped.yaml", &["--locked"]), set(&[]));

    // Round k trained on its own samples, drawn from round k-1's policy;
    // every round with its own seed.
    let trained = output(&p, "train[round=3]", "model");
    let lines: Vec<&str> = trained.lines().collect();
    assert_eq!(lines[0], "start");
    let mut seeds = Vec::new();
    for (k, chunk) in lines[1..].chunks(3).enumerate() {
        let k = k + 1;
        let sampled = chunk[0]
            .strip_prefix(&format!("sampled in round {k} with seed "))
            .unwrap_or_else(|| panic!("{trained}"));
        seeds.push(sampled.to_string());
        assert_eq!(
            chunk[1..],
            ["labelled +1".to_string(), format!("trained in round {k}")],
            "{trained}"
        );
    }
    assert_eq!(seeds.len(), 3, "{trained}");
    assert!(
        seeds[0] != seeds[1] && seeds[1] != seeds[2] && seeds[0] != seeds[2],
        "{seeds:?}"
    );
    assert_eq!(output(&p, "final", "out"), trained);

    // `show` on a loop stage's key lists every round.
    let shown = p.ok(&["show", "looped.yaml", "train"]);
    let rounds: Vec<&str> = shown
        .lines()
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    assert_eq!(
        rounds,
        ["train[round=1]", "train[round=2]", "train[round=3]"]
    );
}

#[test]
fn more_rounds_rerun_only_the_new_round() {
    let p = looped();
    p.run_stages("looped.yaml", &[]);
    p.write("looped.yaml", &LOOPED.replace("rounds: 3,", "rounds: 4,"));
    let planned = plan(&p);
    for (id, (action, reason)) in &planned {
        if id.ends_with("[round=4]") {
            assert_eq!(action, "run", "{id}: {reason}");
        } else {
            assert_eq!(
                (action.as_str(), reason.as_str()),
                ("cached", "up to date"),
                "{id}"
            );
        }
    }
    assert_eq!(planned.len(), 4 * 3 + 2);
    assert_eq!(p.run_stages("looped.yaml", &[]), ids(&[round(4)], &[]));
    let runs = p.read("runs.txt");
    assert_eq!(
        runs.lines().collect::<Vec<_>>(),
        ["start", "sample 1", "sample 2", "sample 3", "sample 4"]
    );
}

#[test]
fn a_change_inside_the_loop_reruns_from_the_first_round_it_reaches_and_says_why_in_each() {
    let p = looped();
    p.run_stages("looped.yaml", &[]);

    // `bonus` is read by `label`: round 1 reruns from its label on, every
    // later round whole, and each round's label names the change.
    p.write("looped.yaml", &LOOPED.replace("bonus: 1", "bonus: 2"));
    let planned = plan(&p);
    let change = "params.cmd changed \"b=1; (cat \\\"$ALIGNFLOW_IN_SAMPLES\\\"; ec...\" -> \"b=2; (cat \\\"$ALIGNFLOW_IN_SAMPLES\\\"; ec...\"";
    let expected = [
        ("start", "cached", "up to date".to_string()),
        ("sample[round=1]", "cached", "up to date".to_string()),
        ("label[round=1]", "run", change.to_string()),
        (
            "train[round=1]",
            "run",
            "upstream label[round=1] reruns".to_string(),
        ),
        (
            "sample[round=2]",
            "run",
            "upstream train[round=1] reruns".to_string(),
        ),
        (
            "label[round=2]",
            "run",
            format!("{change}; upstream sample[round=2] reruns"),
        ),
        (
            "train[round=2]",
            "run",
            "upstream label[round=2], train[round=1] reruns".to_string(),
        ),
        (
            "sample[round=3]",
            "run",
            "upstream train[round=2] reruns".to_string(),
        ),
        (
            "label[round=3]",
            "run",
            format!("{change}; upstream sample[round=3] reruns"),
        ),
        ("final", "run", "upstream train[round=3] reruns".to_string()),
    ];
    for (id, action, reason) in &expected {
        assert_eq!(planned[*id], (action.to_string(), reason.clone()), "{id}");
    }
    let mut reran = ids(
        &[round(2), round(3)],
        &["label[round=1]", "train[round=1]", "final"],
    );
    assert_eq!(p.run_stages("looped.yaml", &[]), reran);

    // A change that reaches round 2 first: `next` carries the labels
    // instead of the trained model. Round 1 stays cached.
    p.write(
        "looped.yaml",
        &LOOPED.replace("bonus: 1", "bonus: 2").replace(
            "next: \"${stages.train.model}\"",
            "next: \"${stages.label.labels}\"",
        ),
    );
    let planned = plan(&p);
    for id in round(1) {
        assert_eq!(planned[&id].0, "cached", "{id}: {:?}", planned[&id]);
    }
    assert_eq!(
        planned["sample[round=2]"],
        (
            "run".to_string(),
            "input policy changed (upstream label[round=1])".to_string()
        )
    );
    reran = ids(&[round(2), round(3)], &["final"]);
    assert_eq!(p.run_stages("looped.yaml", &[]), reran);
}

#[test]
fn the_report_shows_the_win_rate_of_each_round() {
    let p = Project::new();
    p.write(
        "judged.yaml",
        r#"version: 1
name: judged
loops:
  online:
    rounds: 3
    stages: [judge]
stages:
  judge:
    op: exec
    outputs: [report]
    params:
      cmd: >-
        echo '{"policy": "round ${loop.round}", "reference": "start", "n": 10,
        "judges": {"feedback_model": {"win_rate": 0.${loop.round}, "ci95": [0.0, 1.0]}}}'
        > "$ALIGNFLOW_OUT/report"
"#,
    );
    p.ok(&["run", "judged.yaml", "--quiet"]);
    p.ok(&["report", "judged.yaml", "--out", "report.html"]);
    let html = p.read("report.html");
    let (table, rows) = rounds_table(&html);
    assert_eq!(rows, 3, "{table}");
    for k in 1..=3 {
        let row = format!(
            "<tr class=\"round-row\" data-round=\"{k}\"><td>{k}</td><td>judge[round={k}]</td><td>round {k}</td><td>start</td><td>0.{k}00</td><td>[0.000, 1.000]</td><td>10</td></tr>"
        );
        assert!(table.contains(&row), "no {row} in {table}");
    }
    let series = "judge/win_rate/feedback_model";
    assert_eq!(curve_points(&html, series), 3, "a point per round");
}
