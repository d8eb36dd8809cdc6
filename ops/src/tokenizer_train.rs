//! `tokenizer.train`: a GPT-2 style byte-level BPE tokenizer from a corpus.
//!
//! The output folder is what Hugging Face `AutoTokenizer.from_pretrained`
//! loads: `tokenizer.json` (the `tokenizers` serialisation),
//! `tokenizer_config.json` and `special_tokens_map.json`. As in GPT-2 the
//! first special token serves as end of text, beginning of text, padding and
//! unknown token; the byte alphabet makes every string encodable.
use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerBuilder, TokenizerImpl,
};

use crate::protocol::Metrics;
use crate::{OpDecl, OpParams, Outputs, ParamError, ParamsDecl, Placement, Port, StageContext};

/// Size of the byte-level alphabet every vocabulary starts from.
const BYTE_ALPHABET: usize = 256;

type ByteLevelBpe = TokenizerImpl<
    BPE,
    NormalizerWrapper,
    PreTokenizerWrapper,
    PostProcessorWrapper,
    DecoderWrapper,
>;

/// Params of `tokenizer.train`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizerParams {
    /// Target vocabulary size, special tokens and the 256 byte tokens included.
    #[serde(default = "default_vocab_size")]
    pub vocab_size: usize,
    /// A pair must occur at least this many times to be merged.
    #[serde(default = "default_min_frequency")]
    pub min_frequency: u64,
    /// String fields of JSONL records to train on; missing ones are skipped.
    #[serde(default = "default_fields")]
    pub fields: Vec<String>,
    /// Special tokens, ids 0, 1, ...; the first is end of text, beginning of
    /// text, padding and unknown token.
    #[serde(default = "default_special_tokens")]
    pub special_tokens: Vec<String>,
    /// `model_max_length` written to `tokenizer_config.json`.
    #[serde(default = "default_model_max_length")]
    pub model_max_length: usize,
}

fn default_vocab_size() -> usize {
    4096
}
fn default_min_frequency() -> u64 {
    2
}
fn default_fields() -> Vec<String> {
    ["prompt", "chosen", "rejected", "response", "text"]
        .map(String::from)
        .to_vec()
}
fn default_special_tokens() -> Vec<String> {
    vec!["<|endoftext|>".into()]
}
fn default_model_max_length() -> usize {
    1024
}

impl OpParams for TokenizerParams {
    fn check(&self) -> Result<(), ParamError> {
        let err = |field: &str, message: String| {
            Err(ParamError {
                field: field.into(),
                message,
                suggestion: None,
            })
        };
        if self.special_tokens.is_empty() {
            return err(
                "special_tokens",
                "at least one special token (end of text) is needed".into(),
            );
        }
        let unique: HashSet<&String> = self.special_tokens.iter().collect();
        if unique.len() != self.special_tokens.len()
            || self.special_tokens.iter().any(String::is_empty)
        {
            return err(
                "special_tokens",
                "special tokens must be distinct and non-empty".into(),
            );
        }
        let floor = BYTE_ALPHABET + self.special_tokens.len();
        if self.vocab_size < floor {
            let message =
                format!("vocab_size must be at least {floor} (256 bytes + special tokens)");
            return err("vocab_size", message);
        }
        if self.fields.is_empty() {
            return err("fields", "name at least one field".into());
        }
        Ok(())
    }
}

impl TokenizerParams {
    fn eos(&self) -> &str {
        &self.special_tokens[0]
    }
}

/// Failures of `tokenizer.train`.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("stage `{stage}`: {}: {source}", path.display())]
    Io {
        stage: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("stage `{stage}`: {}:{line}: {reason}", path.display())]
    Line {
        stage: String,
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("stage `{stage}`: no .jsonl or .txt files in {}", path.display())]
    NoFiles { stage: String, path: PathBuf },
    #[error("stage `{stage}`: no training text in {} (fields: {fields})", path.display())]
    NoText {
        stage: String,
        path: PathBuf,
        fields: String,
    },
    #[error("stage `{stage}`: training the tokenizer: {message}")]
    Train { stage: String, message: String },
}

/// The `tokenizer.train` op.
pub const OP: OpDecl = OpDecl {
    name: "tokenizer.train",
    version: 1,
    summary: "train a GPT-2 style byte-level BPE tokenizer (Hugging Face format) on JSONL or text",
    inputs: &[Port {
        name: "data",
        doc: "a JSONL or text file, or a folder of .jsonl / .txt files (read recursively, in name order)",
        required: true, volatile: false }],
    outputs: Outputs::Declared(&[Port {
        name: "tokenizer",
        doc: "folder: tokenizer.json, tokenizer_config.json, special_tokens_map.json",
        required: true,
        volatile: false,
    }]),
    params: ParamsDecl::of::<TokenizerParams>(),
    placement: Placement::Engine(run),
    conventions: &[],
};

pub fn run(ctx: &StageContext<'_>) -> anyhow::Result<Metrics> {
    let params: TokenizerParams = ctx.params()?;
    params.check()?;
    let stage = &ctx.spec.stage;
    let data = ctx.input("data")?;

    let files = corpus_files(stage, data)?;
    let mut texts = Vec::new();
    for (i, file) in files.iter().enumerate() {
        ctx.reporter
            .progress(i as u64, Some(files.len() as u64), "reading the corpus");
        read_texts(ctx, file, &params.fields, &mut texts)?;
    }
    if texts.is_empty() {
        let fields = params.fields.join(", ");
        return Err(TokenizerError::NoText {
            stage: stage.clone(),
            path: data.to_path_buf(),
            fields,
        }
        .into());
    }
    let chars: usize = texts.iter().map(String::len).sum();

    ctx.cancel.check()?;
    ctx.reporter.progress(0, None, "training");
    let tokenizer = train(&params, &texts).map_err(|err| TokenizerError::Train {
        stage: stage.clone(),
        message: err.to_string(),
    })?;
    ctx.cancel.check()?;

    let dir = ctx.output("tokenizer");
    let io_err = |path: PathBuf| {
        let stage = stage.clone();
        move |source| TokenizerError::Io {
            stage,
            path,
            source,
        }
    };
    std::fs::create_dir_all(&dir).map_err(io_err(dir.clone()))?;
    let tokenizer_json = dir.join("tokenizer.json");
    tokenizer
        .save(&tokenizer_json, true)
        .map_err(|err| TokenizerError::Train {
            stage: stage.clone(),
            message: err.to_string(),
        })?;
    for (name, value) in [
        (
            "tokenizer_config.json",
            tokenizer_config(&params, &tokenizer),
        ),
        ("special_tokens_map.json", special_tokens_map(&params)),
    ] {
        let path = dir.join(name);
        let mut bytes = serde_json::to_vec_pretty(&value)?;
        bytes.push(b'\n');
        std::fs::write(&path, bytes).map_err(io_err(path.clone()))?;
    }

    let mut metrics = Metrics::new();
    metrics.insert("vocab_size".into(), tokenizer.get_vocab_size(true).into());
    metrics.insert("files".into(), files.len().into());
    metrics.insert("texts".into(), texts.len().into());
    metrics.insert("bytes".into(), chars.into());
    Ok(metrics)
}

/// Trains the byte-level BPE. The `tokenizers` trainer breaks ties between
/// equally frequent pairs by the pair itself, so the result does not depend
/// on hash order or thread scheduling.
fn train(params: &TokenizerParams, texts: &[String]) -> tokenizers::Result<ByteLevelBpe> {
    let special: Vec<AddedToken> = params
        .special_tokens
        .iter()
        .map(|t| AddedToken::from(t.clone(), true))
        .collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(params.vocab_size)
        .min_frequency(params.min_frequency)
        .special_tokens(special)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .show_progress(false)
        .build();
    // GPT-2: no normaliser, no prefix space, the byte mapping undone on decode.
    let byte_level = ByteLevel::default().add_prefix_space(false);
    let mut tokenizer = TokenizerBuilder::default()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(PreTokenizerWrapper::ByteLevel(byte_level)))
        .with_post_processor(Some(PostProcessorWrapper::ByteLevel(byte_level)))
        .with_decoder(Some(DecoderWrapper::ByteLevel(byte_level)))
        .build()?;
    tokenizer.train(&mut trainer, texts.iter())?;
    Ok(tokenizer)
}

/// `tokenizer_config.json` for `AutoTokenizer`.
fn tokenizer_config(params: &TokenizerParams, tokenizer: &ByteLevelBpe) -> serde_json::Value {
    let added: BTreeMap<String, serde_json::Value> = params
        .special_tokens
        .iter()
        .map(|t| {
            let id = tokenizer
                .token_to_id(t)
                .expect("special tokens are in the vocabulary");
            let entry = json!({
                "content": t, "lstrip": false, "normalized": false, "rstrip": false,
                "single_word": false, "special": true,
            });
            (id.to_string(), entry)
        })
        .collect();
    let eos = params.eos();
    let mut config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos,
        "eos_token": eos,
        "pad_token": eos,
        "unk_token": eos,
        "model_max_length": params.model_max_length,
        "clean_up_tokenization_spaces": false,
        "added_tokens_decoder": added,
    });
    if params.special_tokens.len() > 1 {
        config["additional_special_tokens"] = json!(params.special_tokens[1..]);
    }
    config
}

/// `special_tokens_map.json`.
fn special_tokens_map(params: &TokenizerParams) -> serde_json::Value {
    let eos = params.eos();
    let mut map = json!({ "bos_token": eos, "eos_token": eos, "pad_token": eos, "unk_token": eos });
    if params.special_tokens.len() > 1 {
        map["additional_special_tokens"] = json!(params.special_tokens[1..]);
    }
    map
}

/// The files of the corpus: `data` itself, or the `.jsonl` / `.txt` files
/// under it in path order.
fn corpus_files(stage: &str, data: &Path) -> Result<Vec<PathBuf>, TokenizerError> {
    if !data.is_dir() {
        return Ok(vec![data.to_path_buf()]);
    }
    let mut files = Vec::new();
    let mut pending = vec![data.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let io_err = |source| TokenizerError::Io {
            stage: stage.to_string(),
            path: dir.clone(),
            source,
        };
        for entry in std::fs::read_dir(&dir).map_err(io_err)? {
            let path = entry.map_err(io_err)?.path();
            if path.is_dir() {
                pending.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("jsonl" | "txt")
            ) {
                files.push(path);
            }
        }
    }
    if files.is_empty() {
        return Err(TokenizerError::NoFiles {
            stage: stage.to_string(),
            path: data.to_path_buf(),
        });
    }
    files.sort();
    Ok(files)
}

/// Appends the training texts of `file`: the named string fields of each
/// JSONL record, or each line of a text file (with its newline, so that
/// line breaks are learnt). Cache artifacts have no extension: a file that
/// is neither `.jsonl` nor `.txt` is JSONL when its first line is an object.
fn read_texts(
    ctx: &StageContext<'_>,
    file: &Path,
    fields: &[String],
    texts: &mut Vec<String>,
) -> anyhow::Result<()> {
    let stage = &ctx.spec.stage;
    let io_err = |source| TokenizerError::Io {
        stage: stage.clone(),
        path: file.to_path_buf(),
        source,
    };
    let line_err = |line, reason: String| TokenizerError::Line {
        stage: stage.clone(),
        path: file.to_path_buf(),
        line,
        reason,
    };
    let mut reader = BufReader::new(std::fs::File::open(file).map_err(io_err)?);
    let jsonl = match file.extension().and_then(|e| e.to_str()) {
        Some("jsonl") => true,
        Some("txt") => false,
        _ => {
            reader
                .fill_buf()
                .map_err(io_err)?
                .trim_ascii_start()
                .first()
                == Some(&b'{')
        }
    };
    let mut buf = Vec::new();
    for line in 1.. {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).map_err(io_err)? == 0 {
            break;
        }
        if line % 1024 == 0 {
            ctx.cancel.check()?;
        }
        let text =
            std::str::from_utf8(&buf).map_err(|_| line_err(line, "not valid UTF-8".into()))?;
        if !jsonl {
            if !text.trim().is_empty() {
                texts.push(text.to_string());
            }
            continue;
        }
        if text.trim().is_empty() {
            continue;
        }
        let record: serde_json::Value =
            serde_json::from_str(text).map_err(|e| line_err(line, e.to_string()))?;
        for field in fields {
            if let Some(serde_json::Value::String(s)) = record.get(field) {
                texts.push(s.clone());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::testing::{hh_rlhf_sample, run, spec};
    use tokenizers::Tokenizer;

    fn train_on(dir: &Path, params: serde_json::Value, data: PathBuf) -> (Metrics, PathBuf) {
        let spec = spec(&OP, dir, params, &[("data", data)]);
        let metrics = run(&OP, &spec).unwrap();
        (metrics, dir.join("out/tokenizer"))
    }

    fn folder_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
        [
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
        ]
        .map(|name| (name.to_string(), std::fs::read(dir.join(name)).unwrap()))
        .to_vec()
    }

    #[test]
    fn trains_a_usable_deterministic_tokenizer() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let params = json!({"vocab_size": 600, "special_tokens": ["<|endoftext|>", "<|pad|>"]});
        let (metrics, out) = train_on(a.path(), params.clone(), hh_rlhf_sample());
        let (_, out_b) = train_on(b.path(), params, hh_rlhf_sample());
        assert_eq!(folder_bytes(&out), folder_bytes(&out_b));
        // The raw file has two dialogue fields per record, `chosen` and `rejected`.
        assert_eq!(metrics["texts"], 2000);
        assert_eq!(metrics["vocab_size"], 600);

        let tok = Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
        assert_eq!(tok.get_vocab_size(true), 600);
        assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
        assert_eq!(tok.token_to_id("<|pad|>"), Some(1));
        let text = "\n\nHuman: Grüße, naïve café? 日本語 🦀\tdone<|endoftext|>";
        let enc = tok.encode(text, false).unwrap();
        assert_eq!(enc.get_ids().last(), Some(&0));
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text);
        // Frequent words were merged into single tokens.
        assert_eq!(tok.encode("Human", false).unwrap().get_ids().len(), 1);

        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("tokenizer_config.json")).unwrap())
                .unwrap();
        assert_eq!(config["tokenizer_class"], "PreTrainedTokenizerFast");
        assert_eq!(config["eos_token"], "<|endoftext|>");
        assert_eq!(config["model_max_length"], 1024);
        assert_eq!(config["added_tokens_decoder"]["1"]["content"], "<|pad|>");
        let map: serde_json::Value =
            serde_json::from_slice(&std::fs::read(out.join("special_tokens_map.json")).unwrap())
                .unwrap();
        assert_eq!(map["additional_special_tokens"], json!(["<|pad|>"]));
    }

    #[test]
    fn reads_folders_of_text_and_jsonl() {
        let dir = tempfile::tempdir().unwrap();
        let corpus = dir.path().join("corpus");
        std::fs::create_dir_all(corpus.join("sub")).unwrap();
        std::fs::write(corpus.join("a.txt"), "hello world\nhello there\n\n").unwrap();
        std::fs::write(
            corpus.join("sub/b.jsonl"),
            "{\"text\": \"hello again\", \"id\": 1}\n{\"other\": \"x\"}\n",
        )
        .unwrap();
        std::fs::write(corpus.join("ignored.csv"), "a,b\n").unwrap();
        let (metrics, out) = train_on(
            dir.path(),
            json!({"vocab_size": 300, "min_frequency": 1}),
            corpus,
        );
        assert_eq!(
            (metrics["files"].clone(), metrics["texts"].clone()),
            (json!(2), json!(3))
        );
        let tok = Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
        assert!(tok.get_vocab_size(true) <= 300);
        assert_eq!(
            tok.decode(tok.encode("hello ✓", false).unwrap().get_ids(), false)
                .unwrap(),
            "hello ✓"
        );
    }

    #[test]
    fn bad_input_and_params() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("d.jsonl");
        std::fs::write(&data, "{\"text\": \"a\"}\n{oops\n").unwrap();
        let spec = spec(&OP, dir.path(), json!({}), &[("data", data)]);
        let err = run(&OP, &spec).unwrap_err().to_string();
        assert!(
            err.starts_with("stage `s`: ") && err.contains("d.jsonl:2: "),
            "{err}"
        );
        assert_eq!(
            OP.normalize_params(&json!({"vocab_size": 100}))
                .unwrap_err()
                .field,
            "vocab_size"
        );
        assert!(OP.normalize_params(&json!({"special_tokens": []})).is_err());
    }
}

/// The texts of a corpus (a file, or a folder of `.jsonl` / `.txt` files):
/// the named string fields of JSONL records, or the lines of text files.
/// Shared with the ops that train language models on the same corpora.
pub fn corpus_texts(
    ctx: &StageContext<'_>,
    data: &Path,
    fields: &[String],
) -> anyhow::Result<Vec<String>> {
    let mut texts = Vec::new();
    for file in corpus_files(&ctx.spec.stage, data)? {
        read_texts(ctx, &file, fields, &mut texts)?;
    }
    Ok(texts)
}
