//! Chat templates render byte for byte as transformers' `apply_chat_template`
//! renders them, tokenize to the same ids, and mark the same assistant
//! tokens: every real template in `tests/data/chat-templates/` on every
//! conversation of `conversations.json`, with and without the generation
//! prompt, plus `tests/parity/whitespace.jinja`, which pins Jinja's
//! whitespace rules. The reference is computed at test time by the project venv's
//! transformers (`tests/parity/chat_reference.py`).
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use alignflow_ops::chat_template::ChatTemplate;
use alignflow_ops::text::Tokenizer;
use alignflow_ops::ChatFormat;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// transformers' renderings, made once into a temporary folder.
fn reference(dir: &Path) -> Value {
    let out = Command::new(repo().join(".venv/bin/python"))
        .arg(repo().join("tests/parity/chat_reference.py"))
        .arg(dir)
        .output()
        .expect("the project venv's python runs (make setup)");
    assert!(
        out.status.success(),
        "chat_reference.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap()
}

#[test]
fn every_template_renders_tokenizes_and_masks_as_transformers_does() {
    let dir = tempfile::tempdir().unwrap();
    let reference = reference(dir.path());
    let tokenizer = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
    let data = repo().join("tests/data/chat-templates");
    let cases: Value =
        serde_json::from_str(&std::fs::read_to_string(data.join("conversations.json")).unwrap())
            .unwrap();
    let case = |name: &str| -> &Value {
        cases["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap()
    };
    let mut templates: BTreeMap<String, ChatTemplate> = BTreeMap::new();
    let results = reference["results"].as_array().unwrap();
    assert!(results.len() >= 15 * 20 * 2, "{} renderings", results.len());
    let (mut masks, mut errors) = (0, 0);
    for r in results {
        let name = r["template"].as_str().unwrap();
        let path = match name {
            "whitespace.jinja" => repo().join("tests/parity").join(name),
            _ => data.join(name),
        };
        let template = templates.entry(name.to_string()).or_insert_with(|| {
            ChatTemplate::new(&std::fs::read_to_string(&path).unwrap())
                .unwrap_or_else(|e| panic!("{name}: {e}"))
        });
        let c = case(r["case"].as_str().unwrap());
        let mut variables: BTreeMap<String, Value> =
            serde_json::from_value(reference["special_tokens"][name].clone()).unwrap();
        if let Some(kwargs) = c["kwargs"].as_object() {
            variables.extend(kwargs.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let gen = r["add_generation_prompt"].as_bool().unwrap();
        let what = format!("{name} / {} / generation prompt {gen}", c["name"]);
        let rendered = template.render(&c["messages"], gen, &variables);
        if let Some(message) = r["error"].as_str() {
            let err = rendered.expect_err(&what).to_string();
            assert!(err.contains(message), "{what}: {err} lacks {message}");
            errors += 1;
            continue;
        }
        let rendered = rendered.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(rendered.text, r["text"].as_str().unwrap(), "{what}");
        let ids: Vec<u64> = tokenizer
            .encode(rendered.text.as_str(), false)
            .unwrap()
            .get_ids()
            .iter()
            .map(|&i| i as u64)
            .collect();
        let expected: Vec<u64> = serde_json::from_value(r["ids"].clone()).unwrap();
        assert_eq!(ids, expected, "{what}: token ids");
        if let Some(mask) = r["assistant_mask"].as_array() {
            assert!(template.marks_generation, "{what}");
            let expected: Vec<bool> = mask.iter().map(|m| m.as_u64() == Some(1)).collect();
            assert_eq!(
                rendered.assistant_token_mask(&tokenizer).unwrap(),
                expected,
                "{what}: assistant tokens"
            );
            masks += 1;
        }
    }
    // The training templates mark assistant tokens, and Gemma refuses a
    // system turn, in every case that has one.
    assert!(masks >= 4 * 20 * 2, "{masks} masks compared");
    assert!(errors > 0, "no template refused anything");

    // Training examples: the prompt and the response tokens as TRL splits
    // transformers' tokens of the prompt (with the generation prompt) and of
    // the whole conversation.
    let ops_tokenizer = Tokenizer::from_dir(dir.path()).unwrap();
    let mut completions = 0;
    for r in reference["completions"].as_array().unwrap() {
        let name = r["template"].as_str().unwrap();
        let c = case(r["case"].as_str().unwrap());
        let what = format!("{name} / {} / completion", c["name"]);
        let mut variables: BTreeMap<String, Value> =
            serde_json::from_value(reference["special_tokens"][name].clone()).unwrap();
        if let Some(kwargs) = c["kwargs"].as_object() {
            variables.extend(kwargs.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        let path = match name {
            "whitespace.jinja" => repo().join("tests/parity").join(name),
            _ => data.join(name),
        };
        let format = ChatFormat::new(
            &std::fs::read_to_string(&path).unwrap(),
            variables,
            name.to_string(),
        )
        .unwrap();
        let turns = c["messages"].as_array().unwrap();
        let prompt = Value::Array(turns[..turns.len() - 1].to_vec());
        let response = turns[turns.len() - 1]["content"].as_str().unwrap();
        let rendered = format.completion(&prompt, response);
        if let Some(message) = r["error"].as_str() {
            let err = rendered.expect_err(&what).to_string();
            assert!(err.contains(message), "{what}: {err} lacks {message}");
            continue;
        }
        let (p, resp, mismatch) = rendered
            .unwrap_or_else(|e| panic!("{what}: {e}"))
            .token_ids(&ops_tokenizer)
            .unwrap();
        let ids = |key: &str| -> Vec<i64> { serde_json::from_value(r[key].clone()).unwrap() };
        let (prompt_ids, full_ids) = (ids("prompt_ids"), ids("full_ids"));
        assert_eq!(
            mismatch,
            !full_ids.starts_with(&prompt_ids),
            "{what}: prefix flag"
        );
        let split = prompt_ids.len().min(full_ids.len());
        assert_eq!(p, full_ids[..split], "{what}: prompt tokens");
        assert_eq!(resp, full_ids[split..], "{what}: response tokens");
        completions += 1;
    }
    assert!(completions >= 15 * 10, "{completions} completions compared");
}
