//! Tokenizers of model folders (`tokenizer.json`, Hugging Face format) and
//! the conversation text format of the HH-RLHF and Constitutional AI data.

use std::path::Path;

use anyhow::Context;

/// What transformers 5 makes of a `LlamaTokenizer` (Llama 2, TinyLlama,
/// Gemma folders that declare it; see [`loads_as_llama_tokenizer`]):
/// whatever tokenizer.json says, no normalizer and a
/// Metaspace pre-tokenizer that puts `▁` before the text's first word only
/// (`legacy: true` in tokenizer_config.json: before every word after a
/// special token too; `add_prefix_space: false`: never). The legacy files'
/// normalizer prepends `▁` to every piece between special tokens, so that
/// `[INST] hi` became `[INST]`, `▁`, `▁hi`, where transformers 5 (and
/// SentencePiece) read `[INST]`, `▁hi`.
fn as_transformers_llama_tokenizer(
    tokenizer: &mut tokenizers::Tokenizer,
    config: &serde_json::Value,
) -> tokenizers::Result<()> {
    use tokenizers::decoders::{
        byte_fallback::ByteFallback, fuse::Fuse, sequence::Sequence, strip::Strip, DecoderWrapper,
    };
    use tokenizers::normalizers::{NormalizerWrapper, Replace};
    use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
    let prefix_space = config["add_prefix_space"].as_bool().unwrap_or(true);
    let scheme = match (prefix_space, config["legacy"].as_bool().unwrap_or(false)) {
        (false, _) => PrependScheme::Never,
        (true, true) => PrependScheme::Always,
        (true, false) => PrependScheme::First,
    };
    let mut decoders: Vec<DecoderWrapper> = vec![
        Replace::new("▁", " ")?.into(),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if prefix_space {
        decoders.push(Strip::new(' ', 1, 0).into());
    }
    tokenizer
        .with_normalizer(None::<NormalizerWrapper>)
        .with_pre_tokenizer(Some(Metaspace::new('▁', scheme, false)))
        .with_decoder(Some(Sequence::new(decoders)));
    Ok(())
}

/// Whether transformers 5's `AutoTokenizer` loads a folder as its
/// `LlamaTokenizer` (see [`as_transformers_llama_tokenizer`]), from the
/// class `tokenizer_config.json` declares, `config.json`'s `model_type`
/// and whether `tokenizer.json` is byte-level. Otherwise it keeps the
/// file's own pipeline, as alignflow then does:
/// - a byte-level file declared `LlamaTokenizer` (DeepSeek-R1-Distill's
///   Llama 3 tokenizer): the Metaspace rebuild would drop every space;
/// - a model type whose registered tokenizer is the file's own (`mistral`,
///   `mixtral`, `phi3`, `olmo2`), or whose hub class transformers knows
///   to be wrong (`qwen2`, `phi3`).
///
/// Model types with a class of their own that trusts the hub's class
/// (`gemma`) and those with none (`llama`) load as `LlamaTokenizer`.
fn loads_as_llama_tokenizer(
    declared: Option<&str>,
    model_type: Option<&str>,
    byte_level: bool,
) -> bool {
    if !matches!(declared, Some("LlamaTokenizer" | "LlamaTokenizerFast")) {
        return false;
    }
    // transformers' TOKENIZER_MAPPING_NAMES and MODELS_WITH_INCORRECT_HUB_
    // TOKENIZER_CLASS, for the model types alignflow loads.
    let (registered, hub_class_wrong) = match model_type {
        Some("mistral" | "mixtral" | "olmo2") => (Some("TokenizersBackend"), false),
        Some("phi3") => (Some("TokenizersBackend"), true),
        Some("qwen2") => (Some("Qwen2Tokenizer"), true),
        Some("qwen3") => (Some("Qwen2Tokenizer"), false),
        Some("gemma" | "gemma2" | "gemma3" | "gemma3_text") => (Some("GemmaTokenizer"), false),
        Some("gpt2" | "phi") => (Some("GPT2Tokenizer"), false),
        _ => (None, false),
    };
    if byte_level && !hub_class_wrong {
        return false;
    }
    match registered {
        None => true,
        Some("TokenizersBackend") => false,
        // A class of the model type's own: the hub's (Llama) unless it is
        // known to be wrong.
        Some(_) => !hub_class_wrong,
    }
}

/// A model folder's tokenizer with the special ids the models need.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub eos_id: Option<u32>,
    pub pad_id: Option<u32>,
    /// The token a sequence starts with, which cutting a prompt's start
    /// keeps: `tokenizer_config.json`'s `bos_token`, else what the
    /// post-processor puts before a text (Llama's `<|begin_of_text|>`).
    pub bos_id: Option<u32>,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`; EOS and pad tokens come from
    /// `tokenizer_config.json` when present.
    pub fn from_dir(dir: &Path) -> anyhow::Result<Tokenizer> {
        let path = dir.join("tokenizer.json");
        let mut inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("{}: cannot load the tokenizer: {e}", path.display()))?;
        // A tokenizer.json saved after a truncating or padding call keeps
        // those settings, and the library applies them to every encode;
        // transformers turns both off for a plain call, and so do we
        // (prompts are cut where a stage decides, batches padded by it).
        inner
            .with_truncation(None)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        inner.with_padding(None);
        let config: serde_json::Value =
            match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
                Ok(text) => serde_json::from_str(&text)
                    .with_context(|| format!("{}/tokenizer_config.json", dir.display()))?,
                Err(_) => serde_json::Value::Null,
            };
        let model_type = std::fs::read_to_string(dir.join("config.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
            .and_then(|c| c["model_type"].as_str().map(str::to_string));
        let byte_level = std::fs::read_to_string(&path)
            .map(|text| text.contains("\"ByteLevel\""))
            .unwrap_or(false);
        if loads_as_llama_tokenizer(
            config["tokenizer_class"].as_str(),
            model_type.as_deref(),
            byte_level,
        ) {
            as_transformers_llama_tokenizer(&mut inner, &config)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        }
        let token_id = |key: &str| inner.token_to_id(token_text(&config[key])?);
        let eos_id = token_id("eos_token").or_else(|| inner.token_to_id("<|endoftext|>"));
        let pad_id = token_id("pad_token").or(eos_id);
        let added_bos = || {
            let empty = inner.encode("", true).ok()?;
            match empty.get_ids() {
                [bos] => Some(*bos),
                _ => None,
            }
        };
        let bos_id = token_id("bos_token").or_else(added_bos);
        Ok(Tokenizer {
            inner,
            eos_id,
            pad_id,
            bos_id,
        })
    }

    /// Drops `n` tokens from the start of the sequence `ids`, after its BOS
    /// when it starts with one: a prompt cut to fit keeps its end and the
    /// BOS the model was trained to see first.
    pub fn cut_start(&self, ids: &mut Vec<i64>, n: usize) {
        let keep = usize::from(ids.len() > n && ids.first().map(|&t| t as u32) == self.bos_id);
        ids.drain(keep..keep + n.min(ids.len()));
    }

    /// Token ids of `text` as the start of a sequence: with what the
    /// tokenizer's post-processor puts before it (Llama's and Gemma's BOS,
    /// none for GPT-2 or Qwen), as transformers' `tokenizer(text)` adds it,
    /// but never a trailing EOS (a prompt goes on).
    pub fn encode_start(&self, text: &str) -> anyhow::Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        // The text's own tokens belong to sequence 0, the added ones to
        // none: keep what precedes the text's last token, drop what follows.
        let end = enc
            .get_sequence_ids()
            .iter()
            .rposition(Option::is_some)
            .map_or(0, |last| last + 1);
        Ok(enc.get_ids()[..end].iter().map(|&i| i as i64).collect())
    }

    /// Token ids of `text`, without added special tokens (a continuation,
    /// or text a chat template rendered with its own BOS).
    pub fn encode(&self, text: &str) -> anyhow::Result<Vec<i64>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    /// Text of `ids`, keeping special tokens out.
    /// A rendered conversation's tokens (no special tokens added: the
    /// template writes its own) and which of them are the assistant's, as
    /// transformers' `return_assistant_tokens_mask` marks them.
    pub fn encode_with_assistant_mask(
        &self,
        rendered: &crate::chat_template::Rendered,
    ) -> anyhow::Result<(Vec<i64>, Vec<bool>)> {
        let mask = rendered
            .assistant_token_mask(&self.inner)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok((self.encode(&rendered.text)?, mask))
    }

    pub fn decode(&self, ids: &[i64]) -> anyhow::Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner
            .decode(&ids, true)
            .map_err(|e| anyhow::anyhow!("detokenizing: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}

/// A special token's text as `tokenizer_config.json` gives it: a string, or
/// an `AddedToken` object's `content`.
pub fn token_text(value: &serde_json::Value) -> Option<&str> {
    match value {
        serde_json::Value::String(s) => Some(s),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()),
        _ => None,
    }
}

/// Fills a prompt template: `{prompt}` is replaced by the prompt.
pub fn apply_template(template: &str, prompt: &str) -> String {
    template.replace("{prompt}", prompt)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A word-level tokenizer.json that says to truncate to 2 tokens and
    /// pad to 8, as one saved after such a call does.
    const TRUNCATING: &str = r#"{
      "version": "1.0",
      "truncation": {"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 0},
      "padding": {"strategy": {"Fixed": 8}, "direction": "Right", "pad_to_multiple_of": null,
                  "pad_id": 0, "pad_type_id": 0, "pad_token": "[PAD]"},
      "added_tokens": [], "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
      "post_processor": null, "decoder": null,
      "model": {"type": "WordLevel", "unk_token": "[UNK]",
                "vocab": {"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3, "c": 4, "d": 5}}
    }"#;

    /// A Llama 2-era tokenizer.json (SentencePiece converted with the
    /// legacy normalizer: `▁` prepended to each piece between special
    /// tokens), made with Python's tokenizers.
    const LEGACY_LLAMA: &str = r#"{"version": "1.0", "truncation": null, "padding": null, "added_tokens": [{"id": 0, "content": "<unk>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}, {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}, {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}, {"id": 3, "content": "[INST]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}, {"id": 4, "content": "[/INST]", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}], "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}, "pre_tokenizer": null, "post_processor": {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}], "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 0}}], "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}, "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}, "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null, "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false, "vocab": {"<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4, "▁": 5, "h": 6, "i": 7, "▁h": 8, "▁hi": 9, "▁t": 10, "t": 11, "e": 12, "r": 13, "▁the": 14, "he": 15, "▁th": 16, "re": 17, "▁there": 18, "▁ther": 19}, "merges": [["▁", "h"], ["▁h", "i"], ["▁", "t"], ["h", "e"], ["▁t", "h"], ["▁th", "e"], ["r", "e"], ["▁the", "r"], ["▁ther", "e"]]}}"#;

    fn llama_folder(config: serde_json::Value) -> (tempfile::TempDir, Tokenizer) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), LEGACY_LLAMA).unwrap();
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        (dir, tok)
    }

    /// The ids transformers 5.23's `AutoTokenizer` gives for this folder
    /// (`tokenizer(text, add_special_tokens=False)`).
    #[test]
    fn a_llama_tokenizer_reads_text_after_special_tokens_as_transformers_5_does() {
        let config = serde_json::json!({
            "tokenizer_class": "LlamaTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"
        });
        let (_dir, tok) = llama_folder(config.clone());
        // [INST] ▁hi [/INST] ▁t he re </s>, not [INST] ▁ ▁hi [/INST] ▁ ▁t ...
        let chat = "[INST] hi[/INST] there</s>";
        assert_eq!(tok.encode(chat).unwrap(), [3, 9, 4, 10, 15, 17, 2]);
        assert_eq!(tok.encode(" hi").unwrap(), [9]);
        assert_eq!(tok.encode("hi there").unwrap(), [9, 10, 15, 17]);
        assert_eq!(tok.encode_start("hi").unwrap(), [1, 9]);
        assert_eq!(tok.decode(&[9, 10, 15, 17]).unwrap(), "hi there");
        let mut legacy = config.clone();
        legacy["legacy"] = true.into();
        assert_eq!(
            llama_folder(legacy).1.encode(chat).unwrap(),
            [3, 9, 4, 10, 15, 17, 2]
        );
        // So does a model type whose tokenizer is the file's own (the ids
        // of transformers 5.23, which loads these as TokenizersBackend).
        for model_type in ["mistral", "phi3"] {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join("tokenizer.json"), LEGACY_LLAMA).unwrap();
            std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
            let model = serde_json::json!({ "model_type": model_type });
            std::fs::write(dir.path().join("config.json"), model.to_string()).unwrap();
            assert_eq!(
                Tokenizer::from_dir(dir.path())
                    .unwrap()
                    .encode(chat)
                    .unwrap(),
                [3, 5, 9, 4, 5, 10, 15, 17, 2],
                "{model_type}"
            );
        }
        // Another class keeps the file's own pipeline, as transformers does.
        let mut fast = config;
        fast["tokenizer_class"] = "PreTrainedTokenizerFast".into();
        assert_eq!(
            llama_folder(fast).1.encode(chat).unwrap(),
            [3, 5, 9, 4, 5, 10, 15, 17, 2]
        );
    }

    /// DeepSeek-R1-Distill-Llama declares `LlamaTokenizerFast` over Llama
    /// 3's byte-level BPE: transformers keeps the file's pipeline (a
    /// Metaspace rebuild would lose every space and newline).
    #[test]
    fn a_byte_level_file_declared_llama_keeps_its_own_pipeline() {
        use tokenizers::pre_tokenizers::byte_level::ByteLevel;
        let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        alphabet.sort();
        let vocab: serde_json::Map<String, serde_json::Value> = alphabet
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), i.into()))
            .collect();
        let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
        let file = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
            "normalizer": null, "pre_tokenizer": byte_level, "post_processor": null,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": null, "unk_token": null,
                      "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "vocab": vocab, "merges": []}
        });
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), file.to_string()).unwrap();
        let raw = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
        let config = serde_json::json!({ "tokenizer_class": "LlamaTokenizerFast" });
        std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
        std::fs::write(dir.path().join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        let text = "a b\nc";
        let ids = tok.encode(text).unwrap();
        let file_ids: Vec<i64> = raw
            .encode(text, false)
            .unwrap()
            .get_ids()
            .iter()
            .map(|&i| i as i64)
            .collect();
        assert_eq!(ids, file_ids);
        assert_eq!(ids.len(), 5);
        assert_eq!(tok.decode(&ids).unwrap(), text);
    }

    #[test]
    fn the_files_truncation_and_padding_are_not_applied() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), TRUNCATING).unwrap();
        let raw = tokenizers::Tokenizer::from_file(dir.path().join("tokenizer.json")).unwrap();
        assert_eq!(
            raw.encode("a b c d", false).unwrap().get_ids(),
            [2, 3, 0, 0, 0, 0, 0, 0]
        );
        let tok = Tokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(tok.encode("a b c d").unwrap(), [2, 3, 4, 5]);
        assert_eq!(tok.encode_start("a b c").unwrap(), [2, 3, 4]);
    }
}
