//! The training ops (`sft`, `pm.train`, `dpo.reference` + `dpo`),
//! `critique_revise` and `ai_feedback` on a checkpoint with a chat template: examples and
//! requests are rendered as conversations
//! by default (`chat_template: auto`), plainly with `chat_template: none`,
//! TRL's conversational records are read, and a reference computed one way
//! is refused by a `dpo` stage that formats the other way. The exact tokens
//! of a rendered example are checked against transformers in
//! `ops/tests/chat_templates.rs`.
mod common;
use common::*;

fn manifest() -> String {
    r#"version: 1
name: chat
seed: 5
stages:
  hh:
    op: dataset.import
    inputs: { source: hh.jsonl }
  tok:
    op: tokenizer.train
    inputs: { data: "${stages.hh.data}" }
    params: { vocab_size: 384 }
  base:
    op: lm.pretrain
    inputs: { data: "${stages.hh.data}", tokenizer: "${stages.tok.tokenizer}" }
    params: { width: 32, layers: 1, heads: 2, positions: 160, seq_len: 48, batch_size: 4, max_steps: 2 }
  chat_model:
    op: exec
    inputs: { m: "${stages.base.model}", t: qwen.jinja }
    outputs: [model]
    params: { cmd: "cp -r \"$ALIGNFLOW_IN_M\" \"$ALIGNFLOW_OUT/model\" && chmod -R u+w \"$ALIGNFLOW_OUT/model\" && cp \"$ALIGNFLOW_IN_T\" \"$ALIGNFLOW_OUT/model/chat_template.jinja\"" }
  sft_chat:
    op: sft
    inputs: { model: "${stages.chat_model.model}", data: "${stages.hh.data}" }
    params: { response_field: chosen, max_len: 128, batch_size: 4, max_steps: 2, checkpoint_every: 0 }
  sft_plain:
    op: sft
    inputs: { model: "${stages.chat_model.model}", data: "${stages.hh.data}" }
    params: { response_field: chosen, max_len: 128, batch_size: 4, max_steps: 2, checkpoint_every: 0, chat_template: none }
  sft_messages:
    op: sft
    inputs: { model: "${stages.chat_model.model}", data: conversations.jsonl }
    params: { max_len: 128, batch_size: 2, max_steps: 1, checkpoint_every: 0 }
  pm_trl:
    op: pm.train
    inputs: { model: "${stages.chat_model.model}", comparisons: trl_pairs.jsonl }
    params: { max_len: 128, batch_size: 2, max_steps: 1, checkpoint_every: 0, eval_fraction: 0.5 }
  ref_chat:
    op: dpo.reference
    inputs: { model: "${stages.chat_model.model}", comparisons: "${stages.hh.data}" }
    params: { max_len: 128 }
  dpo_chat:
    op: dpo
    inputs: { policy: "${stages.chat_model.model}", comparisons: "${stages.hh.data}", reference_logps: "${stages.ref_chat.reference_logps}" }
    params: { batch_size: 4, max_steps: 2, checkpoint_every: 0 }
  gen:
    op: generate
    inputs: { model: "${stages.chat_model.model}", prompts: prompts.jsonl }
    params: { n: 1, max_new_tokens: 4 }
  revise:
    op: critique_revise
    inputs: { model: "${stages.chat_model.model}", responses: "${stages.gen.responses}", constitution: constitution.yaml }
    params: { rounds: 2, max_new_tokens: 4, few_shot: false }
  sl:
    op: sft
    inputs: { model: "${stages.chat_model.model}", data: "${stages.revise.sft}" }
    params: { max_len: 128, batch_size: 2, max_steps: 1, checkpoint_every: 0 }
  gen2:
    op: generate
    inputs: { model: "${stages.chat_model.model}", prompts: prompts.jsonl }
    params: { n: 2, max_new_tokens: 4 }
  labels_chat:
    op: ai_feedback
    inputs: { model: "${stages.chat_model.model}", pairs: "${stages.gen2.responses}", constitution: constitution.yaml }
    params: { few_shot: true }
  labels_plain:
    op: ai_feedback
    inputs: { model: "${stages.chat_model.model}", pairs: "${stages.gen2.responses}", constitution: constitution.yaml }
    params: { few_shot: true, chat_template: none }
  dpo_mixed:
    op: dpo
    inputs: { policy: "${stages.chat_model.model}", comparisons: "${stages.hh.data}", reference_logps: "${stages.ref_chat.reference_logps}" }
    params: { batch_size: 4, max_steps: 2, checkpoint_every: 0, chat_template: none }
"#
    .to_string()
}

fn project() -> Project {
    let p = Project::new();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let sample = std::fs::read_to_string(root.join("examples/hh-rlhf-sample.jsonl")).unwrap();
    p.write(
        "hh.jsonl",
        &sample.lines().take(24).collect::<Vec<_>>().join("\n"),
    );
    p.write(
        "qwen.jinja",
        &std::fs::read_to_string(root.join("tests/data/chat-templates/qwen2_5.jinja")).unwrap(),
    );
    let line = |v: serde_json::Value| v.to_string() + "\n";
    p.write(
        "conversations.jsonl",
        &[
            line(serde_json::json!({"messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a color."},
                {"role": "assistant", "content": "Red."},
            ]})),
            line(serde_json::json!({"messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "and?"},
                {"role": "assistant", "content": "that is all"},
            ]})),
        ]
        .concat(),
    );
    // TRL's conversational preference records: the prompt as messages, each
    // response as a list holding one assistant message.
    let pair = |q: &str, good: &str, bad: &str| {
        line(serde_json::json!({
            "prompt": [{"role": "user", "content": q}],
            "chosen": [{"role": "assistant", "content": good}],
            "rejected": [{"role": "assistant", "content": bad}],
        }))
    };
    p.write(
        "trl_pairs.jsonl",
        &[
            pair("how do I bake bread?", "Mix flour, water and yeast.", "No."),
            pair("is the sky blue?", "Yes, on a clear day.", "Bread."),
            pair("say hi", "Hi!", "I will not."),
            pair("what is 2+2?", "4.", "5."),
        ]
        .concat(),
    );
    p.write(
        "prompts.jsonl",
        "{\"prompt\": \"\\n\\nHuman: hi\\n\\nAssistant:\"}\n{\"prompt\": \"\\n\\nHuman: why?\\n\\nAssistant:\"}\n",
    );
    p.write(
        "constitution.yaml",
        &std::fs::read_to_string(root.join("pipelines/constitutions/default.yaml")).unwrap(),
    );
    p.write("pipeline.yaml", &manifest());
    p
}

/// The metrics of `stage`'s record in the project's cache.
fn metrics(p: &Project, stage: &str) -> serde_json::Value {
    stage_record(p, stage)["metrics"].clone()
}

/// The id and path of `stage`'s output `name`.
fn output(p: &Project, stage: &str, name: &str) -> (String, std::path::PathBuf) {
    let shown: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "pipeline.yaml", stage, "--json"])).unwrap();
    (
        shown[name]["id"].as_str().unwrap().to_string(),
        shown[name]["path"].as_str().unwrap().into(),
    )
}

fn output_id(p: &Project, stage: &str, name: &str) -> String {
    output(p, stage, name).0
}

fn jsonl(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn training_ops_render_examples_with_the_models_chat_template() {
    let p = project();
    p.ok(&[
        "run",
        "pipeline.yaml",
        "--quiet",
        "--target",
        "sft_chat",
        "--target",
        "sft_plain",
        "--target",
        "sft_messages",
        "--target",
        "pm_trl",
        "--target",
        "dpo_chat",
        "--target",
        "sl",
        "--target",
        "labels_chat",
        "--target",
        "labels_plain",
    ]);
    // With the template the examples are conversations (and the count of
    // prompt/conversation boundary mismatches is reported); with `none`
    // they are plain text, so the two models differ.
    let chat = metrics(&p, "sft_chat");
    assert_eq!(chat["prompt_boundary_mismatches"], 0, "{chat}");
    let plain = metrics(&p, "sft_plain");
    assert!(plain.get("prompt_boundary_mismatches").is_none(), "{plain}");
    assert_ne!(
        output_id(&p, "sft_chat", "model"),
        output_id(&p, "sft_plain", "model")
    );
    assert_eq!(metrics(&p, "sft_messages")["examples"], 2);
    // TRL's conversational comparisons train a preference model.
    assert_eq!(metrics(&p, "pm_trl")["prompt_boundary_mismatches"], 0);
    assert_eq!(metrics(&p, "dpo_chat")["prompt_boundary_mismatches"], 0);

    // critique_revise holds its requests as turns of the conversation:
    // the revisions record the rendered prompt, and the SFT records carry
    // the conversation with the final revision as the assistant's turn,
    // which `sft` trains on.
    let (_, path) = output(&p, "revise", "revisions");
    let revisions = jsonl(&path);
    assert_eq!(revisions.len(), 2);
    assert_eq!(
        revisions[0]["prompt_text"],
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n<|im_start|>user\n\n\nHuman: hi\n\nAssistant:<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(revisions[0]["trail"].as_array().unwrap().len(), 2);
    let (_, path) = output(&p, "revise", "sft");
    let sft = jsonl(&path);
    let turns = sft[0]["messages"].as_array().unwrap();
    assert_eq!(turns.len(), 2, "{turns:?}");
    assert_eq!(turns[0]["content"], "\n\nHuman: hi\n\nAssistant:");
    assert_eq!(turns[1]["role"], "assistant");
    assert_eq!(turns[1]["content"], revisions[0]["revision"]);
    assert_eq!(metrics(&p, "sl")["examples"], 2);

    // ai_feedback asks its question as a user turn and scores the options
    // at the start of the assistant's: other text, so other labels than
    // the plain question's.
    let p_a = |stage: &str| -> Vec<f64> {
        jsonl(&output(&p, stage, "comparisons").1)
            .iter()
            .map(|c| c["p_a"].as_f64().unwrap())
            .collect()
    };
    let (chat_labels, plain_labels) = (p_a("labels_chat"), p_a("labels_plain"));
    assert_eq!(chat_labels.len(), 2);
    assert!(
        chat_labels.iter().all(|x| *x > 0.0 && *x < 1.0),
        "{chat_labels:?}"
    );
    assert_ne!(chat_labels, plain_labels);

    // A reference computed on conversations does not fit a `dpo` stage
    // that reads the comparisons as plain text.
    let err = p.fails(&["run", "pipeline.yaml", "--quiet", "--target", "dpo_mixed"]);
    assert!(err.contains("stage `dpo_mixed`"), "{err}");
    assert!(err.contains("reference"), "{err}");

    // A conversation that does not end with the assistant is no SFT example:
    // refused, naming the stage, file and line.
    p.write(
        "conversations.jsonl",
        &(serde_json::json!({"messages": [{"role": "user", "content": "hi"}]}).to_string() + "\n"),
    );
    let err = p.fails(&[
        "run",
        "pipeline.yaml",
        "--quiet",
        "--target",
        "sft_messages",
    ]);
    assert!(
        err.contains("stage `sft_messages`") && err.contains("conversations.jsonl:1"),
        "{err}"
    );
    assert!(err.contains("must be the assistant's"), "{err}");
}
