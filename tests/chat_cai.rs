//! `pipelines/cai.yaml` (Constitutional AI, steps 1 to 6) on instruct-shaped
//! checkpoints with their real chat templates: tiny random-init Qwen3 and
//! Llama 3.2 models (`tests/parity/make_chat_checkpoint.py`) with their
//! families' special tokens. Every op renders its requests with
//! `chat_template: auto`; each logs the first conversation it rendered
//! (`rendered for the model: {what, messages, text}`), and here each logged
//! text must equal what transformers' `apply_chat_template` renders from the
//! same messages, and the messages must be the conversation the op is meant
//! to build (the prompt as a user turn, the critique and revision requests
//! as follow-up user turns, the feedback question as one user turn, the
//! training examples ending with the assistant's answer).
mod common;
use common::*;

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

const MARKER: &str = "rendered for the model: ";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn python(args: &[&str]) -> String {
    let out = std::process::Command::new(repo().join(".venv/bin/python"))
        .arg(repo().join("tests/parity/make_chat_checkpoint.py"))
        .args(args)
        .output()
        .expect("the project venv's python runs (make setup)");
    assert!(
        out.status.success(),
        "make_chat_checkpoint.py {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The project: the shipped CAI pipelines, a few prompts and human
/// comparisons, and the checkpoint of `family` with its real `template`.
fn project(family: &str, template: &str) -> Project {
    let p = Project::new();
    for rel in [
        "pipelines/cai-sl.yaml",
        "pipelines/cai.yaml",
        "pipelines/constitutions/default.yaml",
    ] {
        p.write(rel, &std::fs::read_to_string(repo().join(rel)).unwrap());
    }
    let lines = |rel: &str, n: usize| {
        let text = std::fs::read_to_string(repo().join(rel)).unwrap();
        text.lines().take(n).collect::<Vec<_>>().join("\n") + "\n"
    };
    p.write(
        "data/prompts.jsonl",
        &lines("examples/red-team-prompts.jsonl", 10),
    );
    p.write("data/hh.jsonl", &lines("examples/hh-rlhf-sample.jsonl", 16));
    make_checkpoint(&p, family, template);
    p
}

/// `models/chat` in `p`: a tiny checkpoint of `family` with its real
/// `template`, its tokenizer trained on the shipped prompts, comparisons and
/// constitution.
fn make_checkpoint(p: &Project, family: &str, template: &str) {
    let model = p.path("models/chat");
    let file = |rel: &str| repo().join(rel).to_str().unwrap().to_string();
    python(&[
        model.to_str().unwrap(),
        family,
        &file(&format!("tests/data/chat-templates/{template}")),
        &file("examples/red-team-prompts.jsonl"),
        &file("examples/hh-rlhf-sample.jsonl"),
        &file("pipelines/constitutions/default.yaml"),
    ]);
}

/// The logged renderings, by stage: `(what, messages, text)`.
fn rendered(p: &Project) -> BTreeMap<String, Vec<(String, Value, String)>> {
    let mut out: BTreeMap<String, Vec<(String, Value, String)>> = BTreeMap::new();
    for log in walk(&p.path("cache/logs")) {
        for line in std::fs::read_to_string(&log).unwrap().lines() {
            let Some(at) = line.find(MARKER) else {
                continue;
            };
            // The run log writes `[  elapsed] STAGE: line` for a stage's lines.
            let after_clock = line.split_once("] ").unwrap().1;
            let stage = after_clock.split(": ").next().unwrap().trim().to_string();
            let record: Value = serde_json::from_str(&line[at + MARKER.len()..]).unwrap();
            out.entry(stage).or_default().push((
                record["what"].as_str().unwrap().to_string(),
                record["messages"].clone(),
                record["text"].as_str().unwrap().to_string(),
            ));
        }
    }
    out
}

fn roles(messages: &Value) -> Vec<&str> {
    messages
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap())
        .collect()
}

fn last_content(messages: &Value) -> &str {
    messages.as_array().unwrap().last().unwrap()["content"]
        .as_str()
        .unwrap()
}

fn runs_on(family: &str, template: &str) {
    let p = project(family, template);
    let model = p.path("models/chat");
    let sets = [
        format!("params.base_model={}", model.display()),
        "params.template=\"{prompt}\"".to_string(),
        "params.human_emit=messages".to_string(),
        format!("params.prompts={}", p.path("data/prompts.jsonl").display()),
        format!(
            "params.human_comparisons={}",
            p.path("data/hh.jsonl").display()
        ),
        "params.max_new_tokens=6".to_string(),
        "params.rounds=1".to_string(),
        "params.ppo_iterations=1".to_string(),
    ];
    let mut args = vec!["run", "pipelines/cai.yaml", "--quiet"];
    for s in &sets {
        args.extend(["--set", s.as_str()]);
    }
    let out = p.ok(&args);
    assert!(
        stages_with_status(&out, "ran").contains("evaluation"),
        "{out}"
    );

    // Outputs keep the conversation, the answer as its new assistant turn.
    let output = |stage: &str, name: &str| -> Vec<Value> {
        let mut show = vec!["show", "pipelines/cai.yaml", stage, "--json"];
        for s in &sets {
            show.extend(["--set", s.as_str()]);
        }
        let shown: Value = serde_json::from_str(&p.ok(&show)).unwrap();
        std::fs::read_to_string(shown[name]["path"].as_str().unwrap())
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let answered = |record: &Value, messages: &str, response: &str| {
        let m = &record[messages];
        assert_eq!(roles(m)[..2], ["user", "assistant"], "{family}: {record}");
        assert_eq!(roles(m).len(), 2, "{family}: {record}");
        assert_eq!(
            m[1]["content"], record[response],
            "{family}: {messages} ends with {response}"
        );
        assert_eq!(m[0]["content"], record["prompt"], "{family}: {record}");
    };
    for (stage, name) in [("answers", "responses"), ("rl_cai", "samples")] {
        let records = output(stage, name);
        assert!(!records.is_empty(), "{family}: {stage}");
        for record in &records {
            answered(record, "messages", "response");
        }
    }
    let evaluated = output("evaluation", "samples");
    assert!(!evaluated.is_empty());
    for record in &evaluated {
        answered(record, "policy_messages", "policy_response");
        answered(record, "reference_messages", "reference_response");
    }

    let logged = rendered(&p);
    // Every op that formats text for the model, with what it rendered.
    let expected: [(&str, &[&str]); 9] = [
        ("answers", &["prompt"]),
        ("revisions", &["critique request", "revision request"]),
        ("sl_cai", &["example"]),
        ("samples", &["prompt"]),
        ("labels", &["question"]),
        ("pmp", &["example"]),
        ("pm", &["example"]),
        ("rl_cai", &["prompt"]),
        ("evaluation", &["prompt", "question"]),
    ];
    let mut requests = Vec::new();
    for (stage, whats) in expected {
        let got: Vec<&str> = logged
            .get(stage)
            .map(|v| v.iter().map(|(w, _, _)| w.as_str()).collect())
            .unwrap_or_default();
        for what in whats {
            assert!(
                got.contains(what),
                "{family}: {stage} logged {got:?}, not {what}"
            );
        }
        for (what, messages, _) in logged.get(stage).into_iter().flatten() {
            requests.push(json!({
                "messages": messages,
                "add_generation_prompt": what != "example",
            }));
        }
    }

    // Each text is transformers' rendering of its messages.
    let file = p.write("requests.json", &serde_json::to_string(&requests).unwrap());
    let theirs: Vec<String> =
        python(&["--render", model.to_str().unwrap(), file.to_str().unwrap()])
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["text"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect();
    let ours: Vec<(&String, &String)> = expected
        .iter()
        .flat_map(|(stage, _)| logged.get(*stage).into_iter().flatten())
        .map(|(what, _, text)| (what, text))
        .collect();
    assert_eq!(ours.len(), theirs.len());
    for ((what, text), want) in ours.iter().zip(&theirs) {
        assert_eq!(
            *text, want,
            "{family}: {what} rendered otherwise than transformers"
        );
    }

    // And the messages are the conversations each op is meant to build.
    let first = |stage: &str, what: &str| -> &Value {
        &logged[stage].iter().find(|(w, _, _)| w == what).unwrap().1
    };
    for stage in ["answers", "samples"] {
        let m = first(stage, "prompt");
        assert_eq!(roles(m), ["user"], "{family}: {stage}");
    }
    let train_prompts: Vec<String> = p
        .read("data/prompts.jsonl")
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["prompt"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert!(train_prompts.contains(&last_content(first("answers", "prompt")).to_string()));
    let constitution = p.read("pipelines/constitutions/default.yaml");
    let critique = first("revisions", "critique request");
    let r = roles(critique);
    assert_eq!(
        r[r.len() - 3..],
        ["user", "assistant", "user"],
        "{family}: critique turns"
    );
    assert!(
        constitution.contains(last_content(critique).trim()),
        "{family}: a critique request of the constitution"
    );
    let revision = first("revisions", "revision request");
    let r = roles(revision);
    assert_eq!(
        r[r.len() - 5..],
        ["user", "assistant", "user", "assistant", "user"],
        "{family}: revision turns"
    );
    assert!(
        constitution.contains(last_content(revision).trim()),
        "{family}: a revision request of the constitution"
    );
    for stage in ["labels", "evaluation"] {
        let question = first(stage, "question");
        assert_eq!(roles(question).last(), Some(&"user"), "{family}: {stage}");
        let asked = last_content(question);
        assert!(
            asked.contains("(A)") && asked.contains("(B)"),
            "{family}: {stage}"
        );
        // The conversation asked about is its turns, not the policy's
        // rendered chat text: no markup of the family inside the turn.
        assert!(asked.contains("Human: "), "{family}: {stage}: {asked}");
        for markup in [
            "<|im_start|>",
            "<|im_end|>",
            "<|start_header_id|>",
            "<|eot_id|>",
        ] {
            assert!(!asked.contains(markup), "{family}: {stage}: {asked}");
        }
    }
    for stage in ["sl_cai", "pmp", "pm"] {
        let m = first(stage, "example");
        assert_eq!(roles(m).last(), Some(&"assistant"), "{family}: {stage}");
        assert_eq!(roles(m)[0], "user", "{family}: {stage}");
    }
    // The human dialogues arrive as conversations, not HH text in one turn.
    assert!(!last_content(first("pmp", "example")).contains("\n\nHuman:"));
    // No example's conversation started otherwise than its prompt.
    for stage in ["sl_cai", "pmp", "pm"] {
        let record = stage_record(&p, stage);
        let mismatches = &record["metrics"]["prompt_boundary_mismatches"];
        assert_eq!(mismatches, 0, "{family}: {stage}: {record}");
    }
    greedy_equals_transformers(&p, family);
}

/// Greedy `generate` on the chat checkpoint equals transformers' greedy
/// `generate` on `apply_chat_template(messages, add_generation_prompt=True)`
/// token for token.
fn greedy_equals_transformers(p: &Project, family: &str) {
    let model = p.path("models/chat");
    // Gemma's template refuses a system turn.
    let system = match family {
        "gemma" | "gemma2" => vec![],
        _ => vec![json!({"role": "system", "content": "Be brief."})],
    };
    let mut multi_turn = system;
    multi_turn.extend([
        json!({"role": "user", "content": "Name a colour."}),
        json!({"role": "assistant", "content": "Red."}),
        json!({"role": "user", "content": "Another, ¿por favor?"}),
    ]);
    let conversations = [
        json!([{"role": "user", "content": "How do I bake bread?"}]),
        Value::Array(multi_turn),
    ];
    let lines: String = conversations
        .iter()
        .map(|m| json!({ "messages": m }).to_string() + "\n")
        .collect();
    p.write("data/chats.jsonl", &lines);
    p.write(
        "greedy.yaml",
        &format!(
            "version: 1\nname: greedy\nstages:\n  greedy:\n    op: generate\n    inputs: {{ model: {}, prompts: data/chats.jsonl }}\n    params: {{ n: 1, max_new_tokens: 12, temperature: 0 }}\n",
            model.display()
        ),
    );
    p.ok(&["run", "greedy.yaml", "--quiet"]);
    let shown: Value =
        serde_json::from_str(&p.ok(&["show", "greedy.yaml", "greedy", "--json"])).unwrap();
    let ours: Vec<Vec<i64>> = std::fs::read_to_string(shown["responses"]["path"].as_str().unwrap())
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_value(
                serde_json::from_str::<Value>(l).unwrap()["response_ids"].clone(),
            )
            .unwrap()
        })
        .collect();
    let file = p.write(
        "conversations.json",
        &serde_json::to_string(&conversations).unwrap(),
    );
    let theirs: Vec<Vec<i64>> = python(&[
        "--generate",
        model.to_str().unwrap(),
        file.to_str().unwrap(),
        "12",
    ])
    .lines()
    .map(|l| {
        serde_json::from_value(serde_json::from_str::<Value>(l).unwrap()["ids"].clone()).unwrap()
    })
    .collect();
    assert_eq!(ours.len(), 2);
    for (o, t) in ours.iter().zip(&theirs) {
        // transformers keeps the stop token; alignflow's ids end before it.
        assert!(!o.is_empty(), "{family}: an empty greedy answer");
        assert_eq!(o[..], t[..o.len()], "{family}: greedy tokens");
        assert!(
            t.len() == o.len() || t.len() == o.len() + 1,
            "{family}: {o:?} vs {t:?}"
        );
    }
}

/// Every other family, on a chat checkpoint with a real template: greedy
/// answers equal transformers'. Gemma 2 has Gemma's template (the same
/// text); SmolLM3, OLMo 2 and Mistral, whose own templates are not in
/// `tests/data/chat-templates`, have Qwen2.5's ChatML one (SmolLM3's own is
/// ChatML too). One test per family, so that the test threads share them.
fn greedy_on(family: &str, template: &str) {
    let p = Project::new();
    make_checkpoint(&p, family, template);
    greedy_equals_transformers(&p, family);
}

#[test]
fn greedy_generation_on_a_qwen2_chat_checkpoint() {
    greedy_on("qwen2", "qwen2_5.jinja");
}

#[test]
fn greedy_generation_on_a_gemma_chat_checkpoint() {
    greedy_on("gemma", "gemma.jinja");
}

#[test]
fn greedy_generation_on_a_gemma2_chat_checkpoint() {
    greedy_on("gemma2", "gemma.jinja");
}

#[test]
fn greedy_generation_on_a_gemma3_chat_checkpoint() {
    greedy_on("gemma3", "gemma3.jinja");
}

#[test]
fn greedy_generation_on_a_phi3_chat_checkpoint() {
    greedy_on("phi3", "phi3.jinja");
}

#[test]
fn greedy_generation_on_a_smollm3_chat_checkpoint() {
    greedy_on("smollm3", "qwen2_5.jinja");
}

#[test]
fn greedy_generation_on_an_olmo2_chat_checkpoint() {
    greedy_on("olmo2", "qwen2_5.jinja");
}

#[test]
fn greedy_generation_on_a_mistral_chat_checkpoint() {
    greedy_on("mistral", "qwen2_5.jinja");
}

#[test]
fn cai_runs_on_a_qwen3_shaped_chat_checkpoint() {
    runs_on("qwen3", "qwen3.jinja");
}

#[test]
fn cai_runs_on_a_llama32_shaped_chat_checkpoint() {
    runs_on("llama32", "llama3_2.jinja");
}
