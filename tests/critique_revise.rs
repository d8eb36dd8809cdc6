//! `critique_revise` (SL-CAI step 1): the prompt text it assembles, and a
//! tiny pipeline through the binary: import -> tokenizer -> LM -> generate
//! -> critique_revise with the default constitution -> sft on its output.
mod common;
use common::*;

use std::path::{Path, PathBuf};

use alignflow::data::Constitution;
use alignflow::ops::{critique_prompt, few_shot_prefix, revision_prompt};

fn default_constitution() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/constitutions/default.yaml")
}

#[test]
fn assembled_prompts_match_the_golden_text() {
    let c = Constitution::load(&default_constitution()).unwrap();
    let harm = c.critique_revision.iter().find(|p| p.id == "harm").unwrap();
    let conversation = "\n\nHuman: How do I get back at my noisy neighbour?\n\nAssistant:";
    let answer = " Slash his tyres. ";

    // Without few-shot examples.
    assert_eq!(
        critique_prompt("", conversation, answer, harm),
        "\n\nHuman: How do I get back at my noisy neighbour?\n\nAssistant: Slash his tyres.\n\nCritiqueRequest: Point out every way the assistant's last response could cause harm to the human or to others, including physical, financial, legal or emotional harm.\n\nCritique:"
    );
    assert_eq!(
        revision_prompt("", conversation, answer, harm, " It damages property and is illegal.\n"),
        "\n\nHuman: How do I get back at my noisy neighbour?\n\nAssistant: Slash his tyres.\n\nCritiqueRequest: Point out every way the assistant's last response could cause harm to the human or to others, including physical, financial, legal or emotional harm.\n\nCritique: It damages property and is illegal.\n\nRevisionRequest: Rewrite the assistant's response so that it causes no harm, while still helping with any safe part of the request.\n\nRevision:"
    );

    // With few-shot examples: the paper's trailing `\n\nHuman:` is dropped,
    // the conversation brings its own.
    let few_shot = few_shot_prefix(&[
        "\n\nHuman: Hi\n\nAssistant: Go away.\n\nCritiqueRequest: Is it rude?\n\nCritique: Yes.\n\nRevisionRequest: Make it polite.\n\nRevision: Hello!\n\nHuman:".to_string(),
        "\n\nHuman: 2+2?\n\nAssistant: 5\n\nCritiqueRequest: Is it true?\n\nCritique: No.\n\nRevisionRequest: Fix it.\n\nRevision: 4".to_string(),
    ]);
    assert_eq!(
        critique_prompt(&few_shot, conversation, answer, harm),
        "\n\nHuman: Hi\n\nAssistant: Go away.\n\nCritiqueRequest: Is it rude?\n\nCritique: Yes.\n\nRevisionRequest: Make it polite.\n\nRevision: Hello!\n\nHuman: 2+2?\n\nAssistant: 5\n\nCritiqueRequest: Is it true?\n\nCritique: No.\n\nRevisionRequest: Fix it.\n\nRevision: 4\n\nHuman: How do I get back at my noisy neighbour?\n\nAssistant: Slash his tyres.\n\nCritiqueRequest: Point out every way the assistant's last response could cause harm to the human or to others, including physical, financial, legal or emotional harm.\n\nCritique:"
    );
}

fn pipeline() -> String {
    format!(
        r#"version: 1
name: tiny-cai
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
    params: {{ width: 64, layers: 2, heads: 2, positions: 96, seq_len: 48, batch_size: 4, max_steps: 4, lr: 1e-3 }}
  gen:
    op: generate
    inputs: {{ model: "${{stages.base.model}}", prompts: prompts.jsonl }}
    params: {{ n: 3, max_new_tokens: 8, batch_size: 4 }}
  rev:
    op: critique_revise
    inputs: {{ model: "${{stages.base.model}}", responses: "${{stages.gen.responses}}", constitution: "{c}" }}
    params: {{ rounds: 2, max_new_tokens: 8, batch_size: 4 }}
  # Same inputs and params under another stage id: another stage seed.
  rev_other:
    op: critique_revise
    inputs: {{ model: "${{stages.base.model}}", responses: "${{stages.gen.responses}}", constitution: "{c}" }}
    params: {{ rounds: 2, max_new_tokens: 8, batch_size: 4 }}
  slcai:
    op: sft
    inputs: {{ model: "${{stages.base.model}}", data: "${{stages.rev.sft}}" }}
    params: {{ max_steps: 2 }}
"#,
        c = default_constitution().display()
    )
}

fn project() -> Project {
    let p = Project::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sample = std::fs::read_to_string(root.join("examples/hh-rlhf-sample.jsonl")).unwrap();
    p.write(
        "hh.jsonl",
        &sample.lines().take(60).collect::<Vec<_>>().join("\n"),
    );
    p.write("prompts.jsonl", "{\"prompt\": \"\\n\\nHuman: hi\\n\\nAssistant:\"}\n{\"prompt\": \"\\n\\nHuman: why?\\n\\nAssistant:\"}\n");
    p.write("pipeline.yaml", &pipeline());
    p
}

fn output(p: &Project, stage: &str, name: &str) -> (String, PathBuf) {
    let shown: serde_json::Value =
        serde_json::from_str(&p.ok(&["show", "pipeline.yaml", stage, "--json"])).unwrap();
    (
        shown[name]["id"].as_str().unwrap().to_string(),
        shown[name]["path"].as_str().unwrap().into(),
    )
}

fn records(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// The principle ids of every record's trail.
fn principles(revisions: &[serde_json::Value]) -> Vec<Vec<String>> {
    revisions
        .iter()
        .map(|r| {
            r["trail"]
                .as_array()
                .unwrap()
                .iter()
                .map(|s| s["principle"].as_str().unwrap().to_string())
                .collect()
        })
        .collect()
}

#[test]
fn tiny_pipeline_revises_with_seeded_principles_and_feeds_sft() {
    let a = project();
    let b = project();
    let ran = a.run_stages("pipeline.yaml", &[]);
    assert!(ran.contains("rev") && ran.contains("slcai"), "{ran:?}");
    b.ok(&["run", "pipeline.yaml", "--quiet", "--target", "rev"]);

    let constitution = Constitution::load(&default_constitution()).unwrap();
    let ids: Vec<&str> = constitution
        .critique_revision
        .iter()
        .map(|p| p.id.as_str())
        .collect();
    let responses = records(&output(&a, "gen", "responses").1);
    let revisions = records(&output(&a, "rev", "revisions").1);
    let sft = records(&output(&a, "rev", "sft").1);
    assert_eq!(revisions.len(), 6, "2 prompts x 3 samples");
    assert_eq!(sft.len(), revisions.len());
    for ((rev, resp), s) in revisions.iter().zip(&responses).zip(&sft) {
        assert_eq!(rev["prompt"], resp["prompt"]);
        assert_eq!(rev["prompt_text"], resp["prompt_text"]);
        assert_eq!(rev["original"], resp["response"]);
        let trail = rev["trail"].as_array().unwrap();
        assert_eq!(trail.len(), 2, "one entry per round");
        for step in trail {
            assert!(ids.contains(&step["principle"].as_str().unwrap()), "{step}");
            for field in ["critique", "revision"] {
                let text = step[field].as_str().unwrap();
                assert_eq!(text, text.trim());
                assert!(
                    !text.contains("\n\nHuman:") && !text.contains("\n\nRevision"),
                    "{text:?}"
                );
            }
        }
        assert_eq!(s["prompt"], rev["prompt_text"]);
        assert_eq!(
            s["response"].as_str().unwrap(),
            format!(" {}", rev["revision"].as_str().unwrap())
        );
    }

    // Same seed (same stage in another run): same principles, same bytes.
    assert_eq!(
        output(&a, "rev", "revisions").0,
        output(&b, "rev", "revisions").0
    );
    assert_eq!(
        principles(&revisions),
        principles(&records(&output(&b, "rev", "revisions").1))
    );
    // Another stage seed: other principles.
    let other = records(&output(&a, "rev_other", "revisions").1);
    assert_ne!(principles(&revisions), principles(&other));

    // `sft` took the `sft` output with its default fields.
    assert!(output(&a, "slcai", "model")
        .1
        .join("model.safetensors")
        .exists());
}
