//! A sequence starts with the BOS its tokenizer's post-processor adds, as
//! transformers' `tokenizer(text)` adds it (`tests/parity/bos_reference.py`
//! builds the tokenizers and the reference ids), and with no trailing EOS.

use std::path::{Path, PathBuf};
use std::process::Command;

use alignflow_ops::text::Tokenizer;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn sequences_start_with_the_bos_transformers_adds() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(repo().join(".venv/bin/python"))
        .arg(repo().join("tests/parity/bos_reference.py"))
        .arg(dir.path())
        .output()
        .expect("the project venv's python runs (make setup)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("reference.json")).unwrap()).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_i64().unwrap())
            .collect()
    };
    let mut with_bos = 0;
    for (family, cases) in reference["results"].as_object().unwrap() {
        let tokenizer = Tokenizer::from_dir(&dir.path().join(family)).unwrap();
        for case in cases.as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            let mut expected = ids(&case["with_specials"]);
            // A prompt goes on: the EOS an add_eos_token tokenizer appends
            // is left out.
            if family == "llama_eos" {
                assert_eq!(expected.pop(), case["eos_id"].as_i64());
            }
            assert_eq!(
                tokenizer.encode_start(text).unwrap(),
                expected,
                "{family}: {text:?}"
            );
            assert_eq!(
                tokenizer.encode(text).unwrap(),
                ids(&case["without"]),
                "{family}"
            );
            if let Some(bos) = case["bos_id"].as_i64() {
                assert_eq!(expected[0], bos, "{family}");
                with_bos += 1;
                // Text that already starts with the BOS (a rendered chat
                // template) and is encoded as such gets exactly one.
                let bos_text = case["bos_token"].as_str().unwrap();
                let again = tokenizer.encode(&format!("{bos_text}{text}")).unwrap();
                assert_eq!(again.iter().filter(|&&i| i == bos).count(), 1, "{family}");
                // A prompt cut to fit keeps its BOS and its end.
                assert_eq!(tokenizer.bos_id, Some(bos as u32), "{family}");
                if expected.len() > 2 {
                    let mut cut = expected.clone();
                    tokenizer.cut_start(&mut cut, 1);
                    let mut want = vec![bos];
                    want.extend(&expected[2..]);
                    assert_eq!(cut, want, "{family}: cut after the BOS");
                }
            } else {
                // No BOS: a cut drops the first tokens.
                let mut cut = expected.clone();
                tokenizer.cut_start(&mut cut, 1.min(expected.len()));
                assert_eq!(cut, expected[1.min(expected.len())..], "{family}");
            }
        }
    }
    assert_eq!(with_bos, 9, "three families add a BOS to three texts");
}
