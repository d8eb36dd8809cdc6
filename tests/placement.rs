//! `placement`: the models of `ppo`, `evaluate` and `best_of_n` placed by
//! role. On this CPU machine every role can only be `cpu`: with all of them
//! placed there, each op must give exactly the outputs of the same stage
//! without a placement (the cross-device moves are no-ops, and nothing else
//! may change). Bad placements fail naming the stage and the field, and a
//! placement that names more GPUs than the machine has fails before
//! anything runs.
mod common;
use common::a_world::{comparisons, corpus, manifest, prompt, prompts};
use common::*;

const ALL_CPU: &str = "placement: { policy: cpu, reference: cpu, reward: cpu, value: cpu }";

/// A project with the shared base stages and `stages` after them.
fn project(stages: &str) -> Project {
    let p = Project::new();
    p.write("hh.jsonl", &corpus(200));
    p.write("comparisons.jsonl", &comparisons(160));
    p.write("prompts.jsonl", &prompts(12, 5, prompt));
    p.write(
        "pipeline.yaml",
        &manifest("name: placement\nseed: 7\n", stages),
    );
    p
}

/// Stage `stage`'s outputs: name -> (artifact id, path).
fn outputs(p: &Project, stage: &str) -> serde_json::Map<String, serde_json::Value> {
    let shown: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "pipeline.yaml", stage, "--json"])).unwrap();
    shown.as_object().unwrap().clone()
}

/// The content id of output `name` of `stage`.
fn id(p: &Project, stage: &str, name: &str) -> String {
    outputs(p, stage)[name]["id"].as_str().unwrap().to_string()
}

/// An output's lines with the wall-clock figures removed.
fn without_timings(p: &Project, stage: &str, name: &str) -> Vec<String> {
    let path = outputs(p, stage)[name]["path"]
        .as_str()
        .unwrap()
        .to_string();
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            if let Some(m) = v.as_object_mut() {
                m.retain(|k, _| !k.contains("per_s") && k != "seconds");
            }
            v.to_string()
        })
        .collect()
}

/// The metrics lines of a stage that logs them (`ppo`), else nothing.
fn metrics_of(p: &Project, stage: &str) -> Vec<String> {
    match outputs(p, stage).contains_key("metrics") {
        true => without_timings(p, stage, "metrics"),
        false => Vec::new(),
    }
}

#[test]
fn every_role_on_the_cpu_gives_the_outputs_of_the_unplaced_stage() {
    let ppo = r#"    op: ppo
    inputs: { policy: "${stages.base.model}", reward_model: "${stages.pm.model}", prompts: prompts.jsonl }
"#;
    let evaluate = r#"    op: evaluate
    inputs: { policy: "${stages.base.model}", reference: "${stages.base.model}", prompts: prompts.jsonl, reward_model: "${stages.pm.model}" }
"#;
    let best_of_n = r#"    op: best_of_n
    inputs: { policy: "${stages.base.model}", reward_model: "${stages.pm.model}", prompts: prompts.jsonl }
"#;
    let full = "iterations: 3, batch_size: 8, max_new_tokens: 6, lr: 1e-3, minibatches: 2, checkpoint_every: 0";
    let lora = "iterations: 3, batch_size: 8, max_new_tokens: 6, lr: 1e-3, checkpoint_every: 0, lora: { rank: 4 }, value_model: lora";
    let eval = "limit: 6, max_new_tokens: 6, batch_size: 4";
    let bon = "n: 3, max_new_tokens: 6, batch_size: 4, limit: 6";
    // A stage's seed comes from its name: the placed stages keep the
    // names, in a second run of the manifest with the placements added.
    let stages = |placed: bool| -> String {
        let mut text = String::new();
        for (name, body, params) in [
            ("rl", ppo, full),
            ("rl_lora", ppo, lora),
            ("eval", evaluate, eval),
            ("bon", best_of_n, bon),
        ] {
            let placement = match (placed, name) {
                (false, _) => String::new(),
                (true, "rl" | "rl_lora") => format!(", {ALL_CPU}"),
                (true, "eval") => {
                    ", placement: { policy: cpu, reference: cpu, reward: cpu }".into()
                }
                (true, _) => ", placement: { policy: cpu, reward: cpu }".into(),
            };
            text += &format!("  {name}:\n{body}    params: {{ {params}{placement} }}\n");
        }
        text
    };
    let compared = [
        ("rl", &["model", "samples"][..]),
        ("rl_lora", &["model", "samples"][..]),
        ("eval", &["samples", "report"][..]),
        ("bon", &["data", "report"][..]),
    ];
    let p = project(&stages(false));
    p.ok(&["run", "pipeline.yaml", "--quiet"]);
    let unplaced: Vec<(Vec<String>, Vec<String>)> = compared
        .iter()
        .map(|(stage, names)| {
            let ids = names.iter().map(|n| id(&p, stage, n)).collect();
            (ids, metrics_of(&p, stage))
        })
        .collect();
    p.write(
        "pipeline.yaml",
        &manifest("name: placement\nseed: 7\n", &stages(true)),
    );
    let out = p.ok(&["run", "pipeline.yaml", "--quiet"]);
    assert_eq!(
        stages_with_status(&out, "ran"),
        set(&["rl", "rl_lora", "eval", "bon"]),
        "{out}"
    );
    for ((stage, names), (ids, metrics)) in compared.iter().zip(unplaced) {
        for (name, before) in names.iter().zip(ids) {
            assert_eq!(
                id(&p, stage, name),
                before,
                "`{stage}`'s {name} differs when every role is placed on the CPU"
            );
        }
        assert_eq!(metrics_of(&p, stage), metrics, "`{stage}`'s metrics");
    }
}

/// A one-stage `ppo` pipeline with `params`, checked without running.
fn ppo_with(params: &str) -> Project {
    project(&format!(
        r#"  rl:
    op: ppo
    inputs: {{ policy: "${{stages.base.model}}", reward_model: "${{stages.pm.model}}", prompts: prompts.jsonl }}
    params: {{ iterations: 1, batch_size: 4, max_new_tokens: 4, {params} }}
"#
    ))
}

#[test]
fn bad_placements_are_refused_naming_the_stage_and_the_field() {
    let err = ppo_with("placement: { value: gpu1 }").fails(&["validate", "pipeline.yaml"]);
    assert!(err.contains("stage `rl`"), "{err}");
    assert!(err.contains("placement.value"), "{err}");
    assert!(err.contains("`gpu1` is not a device"), "{err}");

    let err = ppo_with("placement: { critic: cpu }").fails(&["validate", "pipeline.yaml"]);
    assert!(err.contains("stage `rl`"), "{err}");
    assert!(err.contains("critic"), "{err}");

    let p = project(
        r#"  bon:
    op: best_of_n
    inputs: { policy: "${stages.base.model}", reward_model: "${stages.pm.model}", prompts: prompts.jsonl }
    params: { n: 2, placement: { reference: cpu } }
"#,
    );
    let err = p.fails(&["validate", "pipeline.yaml"]);
    assert!(err.contains("stage `bon`"), "{err}");
    assert!(err.contains("placement.reference"), "{err}");
    assert!(err.contains("no `reference` model"), "{err}");
}

#[test]
fn a_placement_on_gpus_the_machine_lacks_fails_before_the_stage_runs() {
    // The base stages run; `rl` needs two GPUs and this machine has none.
    let p = ppo_with("placement: { policy: cuda:0, reference: cuda:1 }");
    let err = p.fails(&["run", "pipeline.yaml", "--quiet"]);
    assert!(err.contains("rl"), "{err}");
    assert!(
        err.contains("`params.placement` names 2 GPU(s) but 0 GPU(s) are visible"),
        "{err}"
    );
}
