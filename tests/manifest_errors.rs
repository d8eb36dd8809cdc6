//! Bad manifests: exact error text with file, line, column, stage and field.
mod common;
use common::*;

fn error_of(p: &Project, yaml: &str) -> String {
    p.write("pipeline.yaml", yaml);
    let err = p.fails(&["validate", "pipeline.yaml"]);
    err.trim()
        .strip_prefix("error: ")
        .unwrap_or(err.trim())
        .to_string()
}

#[test]
fn cycle_lists_the_stages_in_order() {
    let p = Project::new();
    let err = error_of(
        &p,
        r#"version: 1
name: cyc
stages:
  a:
    op: exec
    inputs: { x: "${stages.c.out}" }
    outputs: [out]
    params: { cmd: "true" }
  b:
    op: exec
    inputs: { x: "${stages.a.out}" }
    outputs: [out]
    params: { cmd: "true" }
  c:
    op: exec
    inputs: { x: "${stages.b.out}" }
    outputs: [out]
    params: { cmd: "true" }
"#,
    );
    assert_eq!(
        err,
        "pipeline.yaml:4:3: cycle in the pipeline: a -> b -> c -> a"
    );
}

#[test]
fn missing_stage_reference_names_both_ends() {
    let p = Project::new();
    let err = error_of(
        &p,
        r#"version: 1
name: missing
stages:
  prepare:
    op: exec
    outputs: [out]
    params: { cmd: "true" }
  train:
    op: exec
    inputs:
      data: ${stages.prepair.out}
    outputs: [out]
    params: { cmd: "true" }
"#,
    );
    assert_eq!(
        err,
        "pipeline.yaml:11:13: stage `train`, field `inputs.data`: unknown stage `prepair` in `${stages.prepair.out}` (did you mean `prepare`?)"
    );
}

#[test]
fn missing_output_reference_names_both_ends() {
    let p = Project::new();
    let err = error_of(
        &p,
        r#"version: 1
name: missing
stages:
  prepare:
    op: exec
    outputs: [data]
    params: { cmd: "true" }
  train:
    op: exec
    inputs:
      data: ${stages.prepare.dta}
    outputs: [out]
    params: { cmd: "true" }
"#,
    );
    assert_eq!(
        err,
        "pipeline.yaml:11:13: stage `train`, field `inputs.data`: stage `prepare` has no output `dta` (referenced as `${stages.prepare.dta}`) (did you mean `data`?)"
    );
}

#[test]
fn unknown_op_suggests_the_nearest() {
    let p = Project::new();
    let err = error_of(
        &p,
        r#"version: 1
name: op
stages:
  run:
    op: exce
    outputs: [out]
    params: { cmd: "true" }
"#,
    );
    assert_eq!(
        err,
        "pipeline.yaml:5:9: stage `run`, field `op`: unknown op `exce` (did you mean `exec`?)"
    );
}

#[test]
fn misspelt_keys_suggest_the_nearest() {
    let p = Project::new();
    let err = error_of(
        &p,
        r#"version: 1
name: keys
stages:
  run:
    op: exec
    outputs: [out]
    parmas: { cmd: "true" }
"#,
    );
    assert_eq!(
        err,
        "pipeline.yaml:7:5: stage `run`, field `parmas`: unknown field (did you mean `params`?)"
    );
    let err = error_of(&p, "version: 1\nname: keys\nstagse: {}\n");
    assert!(err.starts_with("pipeline.yaml:3:1: "), "{err}");
    assert!(err.ends_with("(did you mean `stages`?)"), "{err}");
    let err = error_of(
        &p,
        r#"version: 1
name: keys
stages:
  run:
    op: exec
    outputs: [out]
    params: { cdm: "true" }
"#,
    );
    assert!(
        err.starts_with("pipeline.yaml:7:15: stage `run`, field `params.cdm`: unknown field"),
        "{err}"
    );
    assert!(err.ends_with("(did you mean `cmd`?)"), "{err}");
}

#[test]
fn other_interpolations_are_errors_and_double_dollar_is_literal() {
    let p = Project::new();
    let err = error_of(
        &p,
        r#"version: 1
name: interp
stages:
  run:
    op: exec
    outputs: [out]
    params: { cmd: "echo ${env.HOME}" }
"#,
    );
    assert!(
        err.contains("stage `run`, field `params.cmd`: unknown reference `${env.HOME}`"),
        "{err}"
    );
    p.write(
        "pipeline.yaml",
        r#"version: 1
name: interp
stages:
  run:
    op: exec
    outputs: [out]
    params: { cmd: 'echo "$${HOME}" > $ALIGNFLOW_OUT/out' }
"#,
    );
    p.ok(&["run", "pipeline.yaml", "--quiet"]);
    let shown = p.ok(&["show", "pipeline.yaml", "run"]);
    let path = shown.trim().split_once('\t').unwrap().1;
    let home = std::env::var("HOME").unwrap_or_default();
    assert_eq!(std::fs::read_to_string(path).unwrap().trim(), home);
}

#[test]
fn validate_names_every_missing_input_file() {
    let p = Project::new();
    p.write("here.txt", "x\n");
    p.write(
        "pipeline.yaml",
        r#"version: 1
name: missing
stages:
  a:
    op: exec
    inputs: { x: here.txt, y: nowhere.txt }
    outputs: [out]
    params: { cmd: "true" }
  b:
    op: exec
    inputs: { x: "${stages.a.out}", z: data/absent.jsonl }
    outputs: [out]
    params: { cmd: "true" }
"#,
    );
    let err = p.fails(&["validate", "pipeline.yaml"]);
    assert!(
        err.contains(
            "pipeline.yaml:6:31: stage `a`, field `inputs.y`: `nowhere.txt` does not exist"
        ),
        "{err}"
    );
    assert!(
        err.contains("stage `b`, field `inputs.z`: `data/absent.jsonl` does not exist"),
        "{err}"
    );
    assert!(err.contains("2 input(s) do not exist"), "{err}");
    // A matrix stage's instances read one input as written: named once.
    p.write(
        "sweep.yaml",
        "version: 1\nname: sweep\nstages:\n  s:\n    op: exec\n    inputs: { x: gone.txt }\n    outputs: [out]\n    matrix: { cmd: [\"true\", \"false\", \"exit 0\"] }\n",
    );
    let err = p.fails(&["validate", "sweep.yaml"]);
    assert!(
        err.contains("`gone.txt` does not exist")
            && err.contains("(read by 3 instances of stage `s`)"),
        "{err}"
    );
    assert!(err.contains("1 input(s) do not exist"), "{err}");
    p.write("nowhere.txt", "");
    std::fs::create_dir_all(p.path("data")).unwrap();
    p.write("data/absent.jsonl", "");
    assert!(p
        .ok(&["validate", "pipeline.yaml"])
        .contains("ok (2 stages)"));
}

#[test]
fn bad_resources_name_the_stage_and_field() {
    let p = Project::new();
    let stage = |resources: &str| {
        format!(
            "version: 1\nname: res\nstages:\n  train:\n    op: exec\n    outputs: [out]\n    resources: {resources}\n    params: {{ cmd: \"true\" }}\n"
        )
    };
    let err = error_of(&p, &stage("{ gpus: 1, mem: 16GB }"));
    assert!(
        err.starts_with("pipeline.yaml:7:16:")
            && err.contains("train")
            && err.contains("resources.mem"),
        "{err}"
    );
    assert!(err.contains("`16GB` is not a memory size"), "{err}");
    let err = error_of(&p, &stage("{ time: 2h }"));
    assert!(
        err.contains("resources.time") && err.contains("`2h`"),
        "{err}"
    );
    let err = error_of(&p, &stage("{ gpu: 1 }"));
    assert!(err.contains("gpu"), "{err}");
    p.write(
        "pipeline.yaml",
        &stage("{ gpus: 2, cpus: 8, mem: 32G, time: \"1-12:00:00\" }"),
    );
    p.ok(&["validate", "pipeline.yaml"]);
}

/// A bad value of a param shared through a flattened struct (generate's
/// decoding params) names its param, and one inside a list item is located
/// at the item's value, its path written as the manifest's.
#[test]
fn bad_values_of_shared_and_listed_params_are_located_at_the_value() {
    let p = Project::new();
    let stages = r#"version: 1
name: g
stages:
  gen:
    op: generate
    inputs: {model: m, prompts: p.jsonl}
    params: {max_new_tokens: 8, temperature: hot}
"#;
    assert_eq!(
        error_of(&p, stages),
        "pipeline.yaml:7:46: stage `gen`, field `params.temperature`: invalid type: string \"hot\", expected f64"
    );
    let listed = r#"version: 1
name: g
stages:
  rl:
    op: ppo
    inputs: {policy: m, prompts: p.jsonl, reward_model: m}
    params:
      iterations: 2
      rewards:
        - pm: {}
          weight: heavy
"#;
    assert_eq!(
        error_of(&p, listed),
        "pipeline.yaml:11:19: stage `rl`, field `params.rewards.0.weight`: invalid type: string \"heavy\", expected f64"
    );
}

/// A temperature that overflows the logits (1e-40 drew the last token id
/// every step) and an empty stop string (it ended every answer after one
/// token) are refused, naming the field.
#[test]
fn a_vanishing_temperature_and_an_empty_stop_string_are_refused() {
    let p = Project::new();
    let gen = |params: &str| {
        format!(
            "version: 1\nname: g\nstages:\n  gen:\n    op: generate\n    inputs: {{model: m, prompts: p.jsonl}}\n    params: {{{params}}}\n"
        )
    };
    let e = error_of(&p, &gen("temperature: 1.0e-40"));
    assert!(
        e.contains("field `params.temperature`") && e.contains("0 (greedy) or at least 1e-4"),
        "{e}"
    );
    let e = error_of(&p, &gen("stop: [\"\\n\\n\", \"\"]"));
    assert!(
        e.contains("field `params.stop`") && e.contains("empty string"),
        "{e}"
    );
    let best = "version: 1\nname: g\nstages:\n  best:\n    op: best_of_n\n    inputs: {policy: m, prompts: p.jsonl, reward_model: m}\n    params: {stop: [\"\"]}\n";
    let e = error_of(&p, best);
    assert!(e.contains("field `params.stop`"), "{e}");
}

/// LoRA settings that cannot train: rank 0 (a NaN loss at step 1), a
/// dropout of 1, a non-positive alpha; each names its field.
#[test]
fn lora_settings_that_cannot_train_are_refused() {
    let p = Project::new();
    for (lora, field) in [
        ("{rank: 0}", "params.lora.rank"),
        ("{dropout: 1.0}", "params.lora.dropout"),
        ("{alpha: 0}", "params.lora.alpha"),
    ] {
        let yaml = format!(
            "version: 1\nname: l\nstages:\n  sft:\n    op: sft\n    inputs: {{model: m, data: d.jsonl}}\n    params: {{lora: {lora}}}\n"
        );
        let e = error_of(&p, &yaml);
        assert!(e.contains(&format!("field `{field}`")), "{lora}: {e}");
    }
    let ppo = "version: 1\nname: l\nstages:\n  rl:\n    op: ppo\n    inputs: {policy: m, prompts: p.jsonl, reward_model: m}\n    params: {critic_lora: {rank: 0}}\n";
    assert!(error_of(&p, ppo).contains("field `params.critic_lora.rank`"));
}
