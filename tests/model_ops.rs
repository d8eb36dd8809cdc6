//! The tensor ops through the engine and the worker: determinism, resume
//! after a kill, the NaN guard, generation records.
mod common;
use common::*;

use std::time::{Duration, Instant};

/// Imports the shipped HH-RLHF sample, trains a tokenizer and a tiny LM.
fn tiny_pipeline(steps: u32, checkpoint_every: u32, lr: &str) -> String {
    format!(
        r#"version: 1
name: tiny
seed: 3
stages:
  hh:
    op: dataset.import
    inputs: {{ source: hh.jsonl }}
  tok:
    op: tokenizer.train
    inputs: {{ data: "${{stages.hh.data}}" }}
    params: {{ vocab_size: 384 }}
  base:
    op: lm.pretrain
    inputs: {{ data: "${{stages.hh.data}}", tokenizer: "${{stages.tok.tokenizer}}" }}
    params: {{ width: 64, layers: 2, heads: 2, positions: 96, seq_len: 48, batch_size: 4, max_steps: {steps}, lr: {lr}, checkpoint_every: {checkpoint_every}, dropout: 0.1 }}
  gen:
    op: generate
    inputs: {{ model: "${{stages.base.model}}", prompts: prompts.jsonl }}
    params: {{ n: 3, max_new_tokens: 8, batch_size: 4 }}
"#
    )
}

fn project(yaml: &str) -> Project {
    let p = Project::new();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let sample = std::fs::read_to_string(root.join("examples/hh-rlhf-sample.jsonl")).unwrap();
    p.write(
        "hh.jsonl",
        &sample.lines().take(60).collect::<Vec<_>>().join("\n"),
    );
    p.write("prompts.jsonl", "{\"prompt\": \"\\n\\nHuman: hi\\n\\nAssistant:\"}\n{\"prompt\": \"\\n\\nHuman: why?\\n\\nAssistant:\"}\n");
    p.write("pipeline.yaml", yaml);
    p
}

fn output(p: &Project, stage: &str, name: &str) -> (String, std::path::PathBuf) {
    let shown: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "pipeline.yaml", stage, "--json"])).unwrap();
    (
        shown[name]["id"].as_str().unwrap().to_string(),
        shown[name]["path"].as_str().unwrap().into(),
    )
}

/// (step, loss, lr, grad_norm) of each metrics line: everything but timing.
fn curve(path: &std::path::Path) -> Vec<(u64, String, String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0, "{l}");
            (
                v["step"].as_u64().unwrap(),
                v["loss"].to_string(),
                v["lr"].to_string(),
                v["grad_norm"].to_string(),
            )
        })
        .collect()
}

#[test]
fn training_and_generation_are_byte_identical_across_runs_on_cpu() {
    let a = project(&tiny_pipeline(12, 0, "1e-3"));
    let b = project(&tiny_pipeline(12, 0, "1e-3"));
    a.ok(&["run", "pipeline.yaml", "--quiet"]);
    b.ok(&["run", "pipeline.yaml", "--quiet"]);
    assert_eq!(
        output(&a, "base", "model").0,
        output(&b, "base", "model").0,
        "same weights, bytes and all"
    );
    assert_eq!(
        output(&a, "gen", "responses").0,
        output(&b, "gen", "responses").0
    );
    let model = output(&a, "base", "model").1;
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        assert!(model.join(file).exists(), "{file}");
    }
    let points = curve(&output(&a, "base", "metrics").1);
    assert_eq!(points.len(), 12);
    let responses = std::fs::read_to_string(output(&a, "gen", "responses").1).unwrap();
    let records: Vec<serde_json::Value> = responses
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 6, "n = 3 per prompt");
    for r in &records {
        let ids = r["response_ids"].as_array().unwrap();
        assert_eq!(ids.len(), r["token_logprobs"].as_array().unwrap().len());
        let sum: f64 = r["token_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap())
            .sum();
        assert!((sum - r["logprob"].as_f64().unwrap()).abs() < 1e-6);
    }
}

#[test]
fn a_killed_training_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run() {
    // 290 steps after the checkpoint the kill waits for (a few seconds): with
    // 30, the stage could commit before a 10 ms poll on a loaded machine saw
    // the checkpoint, and the rerun found it cached instead of resuming.
    let whole = project(&tiny_pipeline(300, 5, "1e-3"));
    whole.ok(&["run", "pipeline.yaml", "--quiet", "--target", "base"]);

    let cut = project(&tiny_pipeline(300, 5, "1e-3"));
    let mut child = cut
        .cmd(&["run", "pipeline.yaml", "--quiet", "--target", "base"])
        .spawn()
        .unwrap();
    // Wait for a checkpoint past step 10, then SIGKILL the engine mid-training.
    let start = Instant::now();
    let past_ten = |dir: &std::path::Path| {
        walk(dir).iter().any(|p| {
            p.file_name().and_then(|n| n.to_str()) == Some("state.json")
                && std::fs::read_to_string(p).is_ok_and(|s| {
                    serde_json::from_str::<serde_json::Value>(&s)
                        .is_ok_and(|v| v["train"]["step"].as_u64() >= Some(10))
                })
        })
    };
    while !past_ten(&cut.path("cache/checkpoints")) {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "no checkpoint appeared"
        );
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the run ended before it could be killed: {status}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(cut.ok(&["cache", "verify"]).contains(": 0 problem(s)"));
    let out = cut.ok(&["run", "pipeline.yaml", "--quiet", "--target", "base"]);
    assert!(stages_with_status(&out, "ran").contains("base"), "{out}");
    let log = std::fs::read_dir(cut.path("cache/logs"))
        .unwrap()
        .flatten()
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .collect::<String>();
    assert!(
        log.contains("resuming from checkpoint"),
        "the rerun resumed:\n{log}"
    );
    assert_eq!(
        curve(&output(&cut, "base", "metrics").1),
        curve(&output(&whole, "base", "metrics").1)
    );
    assert_eq!(
        output(&cut, "base", "model").0,
        output(&whole, "base", "model").0
    );
}

#[test]
fn a_diverging_loss_stops_the_stage_naming_the_step() {
    let p = project(
        &tiny_pipeline(30, 0, "1e12").replace("dropout: 0.1 }", "dropout: 0.1, grad_clip: null }"),
    );
    let out = p.run(&["run", "pipeline.yaml", "--quiet", "--target", "base"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("stage `base`: step "), "{stderr}");
    assert!(
        stderr.contains("(NaN or inf); stopped, keeping the last good checkpoint"),
        "{stderr}"
    );
}

#[test]
fn bad_training_params_are_refused_before_anything_runs() {
    let p = project(&tiny_pipeline(30, 0, "1e-3").replace("max_steps: 30", "max_stesp: 30"));
    let err = p.fails(&["plan", "pipeline.yaml"]);
    assert!(
        err.contains(
            "stage `base`, field `params.max_stesp`: unknown field (did you mean `max_steps`?)"
        ),
        "{err}"
    );
}

/// The metrics of `stage`'s record in the project's cache.
fn stage_metrics(p: &Project, stage: &str) -> serde_json::Value {
    stage_record(p, stage)["metrics"].clone()
}

#[test]
fn generating_past_the_context_is_refused_before_sampling_and_cut_prompts_are_counted() {
    // The model has 96 positions: 96 new tokens leave none for a prompt.
    let p =
        project(&tiny_pipeline(2, 0, "1e-3").replace("max_new_tokens: 8", "max_new_tokens: 96"));
    let out = p.run(&["run", "pipeline.yaml", "--quiet"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("stage `gen`, field `params.max_new_tokens`: 96 new tokens leave no room for a prompt in the model's 96 positions (at most 95)"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");

    // 92 new tokens leave 4 for the prompt: both prompts keep their last 4
    // tokens, and the stage says so.
    p.write(
        "pipeline.yaml",
        &tiny_pipeline(2, 0, "1e-3").replace("max_new_tokens: 8", "max_new_tokens: 92"),
    );
    p.ok(&["run", "pipeline.yaml", "--quiet"]);
    assert_eq!(stage_metrics(&p, "gen")["truncated_prompts"], 2);
    let (_, responses) = output(&p, "gen", "responses");
    for line in std::fs::read_to_string(responses).unwrap().lines() {
        let r: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(r["response_ids"].as_array().unwrap().len() <= 92);
    }
}

/// The records of `stage`'s `responses`.
fn responses(p: &Project, stage: &str) -> Vec<serde_json::Value> {
    let (_, path) = output(p, stage, "responses");
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn generate_formats_prompts_with_the_models_chat_template_a_bound_file_or_none() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let qwen =
        std::fs::read_to_string(root.join("tests/data/chat-templates/qwen2_5.jinja")).unwrap();
    let stages = r#"  chat_model:
    op: exec
    inputs: { m: "${stages.base.model}", t: qwen.jinja }
    outputs: [model]
    params: { cmd: "cp -r \"$ALIGNFLOW_IN_M\" \"$ALIGNFLOW_OUT/model\" && chmod -R u+w \"$ALIGNFLOW_OUT/model\" && cp \"$ALIGNFLOW_IN_T\" \"$ALIGNFLOW_OUT/model/chat_template.jinja\"" }
  gen_chat:
    op: generate
    inputs: { model: "${stages.chat_model.model}", prompts: prompts.jsonl }
    params: { n: 1, max_new_tokens: 4 }
  gen_plain:
    op: generate
    inputs: { model: "${stages.chat_model.model}", prompts: prompts.jsonl }
    params: { n: 1, max_new_tokens: 4, chat_template: none }
  gen_file:
    op: generate
    inputs: { model: "${stages.base.model}", prompts: messages.jsonl, chat_template: mine.jinja }
    params: { n: 1, max_new_tokens: 4 }
"#;
    let p = project(&(tiny_pipeline(2, 0, "1e-3") + stages));
    p.write("qwen.jinja", &qwen);
    p.write(
        "mine.jinja",
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}",
    );
    p.write(
        "messages.jsonl",
        &(serde_json::json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a color."},
            {"role": "assistant", "content": "Red."},
            {"role": "user", "content": "Another?"},
        ]})
        .to_string()
            + "\n"),
    );
    p.ok(&["run", "pipeline.yaml", "--quiet"]);

    // The model's own template (chat_template.jinja in its folder), each
    // prompt as one user turn: the text transformers' apply_chat_template
    // renders for Qwen2.5 (golden, from the reference Jinja).
    let chat = responses(&p, "gen_chat");
    assert_eq!(
        chat[0]["prompt_text"],
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\n\n\nHuman: hi\n\nAssistant:<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(chat[0]["prompt"], "\n\nHuman: hi\n\nAssistant:");
    let messages = chat[0]["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[1]["role"], "assistant");
    assert_eq!(messages[1]["content"], chat[0]["response"]);
    // `none`: the plain template, no conversation.
    let plain = responses(&p, "gen_plain");
    assert_eq!(plain[0]["prompt_text"], "\n\nHuman: hi\n\nAssistant:");
    assert!(plain[0].get("messages").is_none());
    // A bound file over a model without a template, on `messages` records.
    let file = responses(&p, "gen_file");
    assert_eq!(
        file[0]["prompt_text"],
        "[system] Be brief.\n[user] Name a color.\n[assistant] Red.\n[user] Another?\n[assistant] "
    );
    assert_eq!(file[0]["prompt"], "Another?");
    assert_eq!(file[0]["messages"].as_array().unwrap().len(), 5);

    // A conversation that ends with the assistant is no prompt: refused,
    // naming the stage, file and line.
    p.write(
        "messages.jsonl",
        &(serde_json::json!({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}).to_string() + "\n"),
    );
    let err = p.fails(&["run", "pipeline.yaml", "--quiet", "--target", "gen_file"]);
    assert!(err.contains("stage `gen_file`"), "{err}");
    assert!(
        err.contains("messages.jsonl:1: the last message is the assistant's"),
        "{err}"
    );
}
