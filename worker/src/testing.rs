//! Test support shared by the crate's unit tests.

use std::sync::{Mutex, MutexGuard};

static TORCH_RNG: Mutex<()> = Mutex::new(());

/// Holds torch's process-global random generator for one test. Tests run
/// on parallel threads of one process, and a test that seeds the generator
/// (or draws from it: random init, `randn`, shuffles) and expects its
/// draws to repeat fails at random when another test reseeds or draws in
/// between. Every unit test that touches the generator takes this first.
/// (A stage worker runs one stage per process: no such race there.)
pub(crate) fn torch_rng() -> MutexGuard<'static, ()> {
    // A failed test poisons the lock; the generator is fine.
    TORCH_RNG
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A tokenizer folder of whole words: `words[i]` is id `i` (`<unk>` first),
/// split at whitespace (each whitespace character a token of its own when
/// `words` has it); `specials` are added tokens; `config` is its
/// tokenizer_config.json (BOS and EOS names).
pub(crate) fn word_tokenizer(
    words: &[&str],
    specials: &[&str],
    config: serde_json::Value,
) -> (tempfile::TempDir, alignflow_ops::text::Tokenizer) {
    let dir = tempfile::tempdir().unwrap();
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, t)| (t.to_string(), i.into()))
        .collect();
    let added: Vec<serde_json::Value> = specials
        .iter()
        .map(|t| {
            let id = words
                .iter()
                .position(|w| w == t)
                .expect("a special is a word");
            serde_json::json!({"id": id, "content": t, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "\\s"},
                          "behavior": "Isolated", "invert": false},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "unk_token": "<unk>", "vocab": vocab}
    });
    std::fs::write(dir.path().join("tokenizer.json"), json.to_string()).unwrap();
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let tokenizer = alignflow_ops::text::Tokenizer::from_dir(dir.path()).unwrap();
    (dir, tokenizer)
}
