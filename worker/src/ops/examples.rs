//! Records -> token examples, as the training ops share them: a
//! (prompt, response) pair tokenized and cut to fit (`sft`, `dpo`), the
//! comparisons of a preference record in every accepted shape (`pm.train`,
//! `pm.pretrain`, `dpo`; shapes: `pm::data`), and the seeded held-out split.

use std::path::Path;

use anyhow::Context;

use std::cell::Cell;

use alignflow_ops::data::read_jsonl;
use alignflow_ops::protocol::Metrics;
use alignflow_ops::text::Tokenizer;
use alignflow_ops::ChatFormat;

use crate::train::epoch_permutation;

/// One tokenized example: the tokens and where the response starts.
pub struct Example {
    pub tokens: Vec<i64>,
    pub response_start: usize,
    /// Which tokens the loss covers, when not every one from
    /// `response_start` on (every assistant turn of a conversation).
    pub labelled: Option<Vec<bool>>,
}

impl Example {
    /// Which tokens the loss covers.
    pub fn labelled(&self) -> Vec<bool> {
        match &self.labelled {
            Some(l) => l.clone(),
            None => (0..self.tokens.len())
                .map(|i| i >= self.response_start)
                .collect(),
        }
    }
}

/// How a training op turns a prompt and a response into tokens: plainly
/// (the prompt as the start of a sequence, with the tokenizer's BOS, and
/// the response tokenized on its own, + EOS) or through the stage's chat
/// template ([`ChatFormat::completion`]: the prompt as a conversation with
/// the generation prompt, the response as the assistant's turn, its
/// end-of-turn tokens included and no EOS appended).
pub struct TextFormat<'a> {
    pub tokenizer: &'a Tokenizer,
    pub chat: Option<&'a ChatFormat>,
    /// Examples whose conversation does not start with the prompt's tokens.
    mismatches: Cell<usize>,
    /// Whether the first rendered example has been logged.
    logged: Cell<bool>,
}

impl<'a> TextFormat<'a> {
    pub fn new(tokenizer: &'a Tokenizer, chat: Option<&'a ChatFormat>) -> Self {
        TextFormat {
            tokenizer,
            chat,
            mismatches: Cell::new(0),
            logged: Cell::new(false),
        }
    }

    /// The EOS appended to responses: `eos` for plain text, none with a
    /// chat template (its turn end is part of the response).
    pub fn response_eos(&self, eos: Option<i64>) -> Option<i64> {
        eos.filter(|_| self.chat.is_none())
    }

    /// The prompt's and the response's tokens. `prompt` is a string (with a
    /// chat template: one user turn) or, with a chat template only, a
    /// conversation (`[{role, content}, ...]` ending with a user turn).
    pub fn pair(
        &self,
        prompt: &serde_json::Value,
        response: &str,
    ) -> anyhow::Result<(Vec<i64>, Vec<i64>)> {
        let Some(chat) = self.chat else {
            let text = prompt.as_str().context(
                "a conversation as the prompt needs a chat template (the model has none: bind the stage's `chat_template` input)",
            )?;
            return Ok((
                self.tokenizer.encode_start(text)?,
                self.tokenizer.encode(response)?,
            ));
        };
        let messages = match prompt {
            serde_json::Value::String(text) => {
                serde_json::json!([{"role": "user", "content": text}])
            }
            turns => {
                check_prompt_turns(turns).map_err(anyhow::Error::msg)?;
                turns.clone()
            }
        };
        let completion = chat
            .completion(&messages, response)
            .map_err(|e| anyhow::anyhow!("{e} ({})", chat.source))?;
        if !self.logged.replace(true) {
            let mut conversation = messages.as_array().cloned().unwrap_or_default();
            conversation.push(serde_json::json!({"role": "assistant", "content": response}));
            super::rendered::log("example", &conversation.into(), &completion.full);
        }
        let (p, r, mismatch) = completion.token_ids(self.tokenizer)?;
        if mismatch {
            self.mismatches.set(self.mismatches.get() + 1);
        }
        Ok((p, r))
    }

    /// Adds `prompt_boundary_mismatches` (with a chat template) to
    /// `metrics`, and warns when there were any.
    pub fn report(&self, stage: &str, metrics: &mut Metrics) {
        if self.chat.is_none() {
            return;
        }
        let n = self.mismatches.get();
        if n > 0 {
            tracing::warn!(
                "stage `{stage}`: in {n} examples the conversation's tokens do not start with the prompt's (the template renders the history otherwise, or a token spans the boundary); the response starts after as many tokens as the prompt has, as TRL does"
            );
        }
        metrics.insert("prompt_boundary_mismatches".into(), n.into());
    }
}

/// Checks a prompt conversation: a non-empty list of `{role, content}`
/// turns (system, user, assistant or tool) that ends with a user turn.
pub(crate) fn check_prompt_turns(messages: &serde_json::Value) -> Result<(), String> {
    let turns = messages
        .as_array()
        .filter(|t| !t.is_empty())
        .ok_or("a prompt conversation must be a non-empty list of messages")?;
    for (i, turn) in turns.iter().enumerate() {
        let role = turn["role"].as_str().unwrap_or_default();
        if !["system", "user", "assistant", "tool"].contains(&role) {
            return Err(format!(
                "messages[{i}]: role {} is not system, user, assistant or tool",
                turn["role"]
            ));
        }
        if !turn["content"].is_string() {
            return Err(format!("messages[{i}]: no string `content`"));
        }
    }
    if turns[turns.len() - 1]["role"] == "assistant" {
        return Err("the last message is the assistant's: a prompt ends with a user turn".into());
    }
    Ok(())
}

/// Tokenizes `prompt` + `response` as `format` says (+ EOS for plain
/// text), truncated to `max_len` by dropping the prompt's beginning (after its BOS) first,
/// then the response's end.
pub fn tokenize_example(
    format: &TextFormat<'_>,
    prompt: &serde_json::Value,
    response: &str,
    eos: Option<i64>,
    max_len: usize,
) -> anyhow::Result<Example> {
    let (p, r) = cut_response(format, prompt, response, eos, max_len)?;
    let room = max_len.saturating_sub(r.len());
    Ok(join(format, p, r, room))
}

/// Both sides of a comparison tokenized as [`tokenize_example`] does one,
/// with one prompt cut, as TRL cuts a pair: the prompt keeps the room the
/// longer response leaves, so both responses follow the same prompt.
pub fn tokenize_pair(
    format: &TextFormat<'_>,
    prompt: &serde_json::Value,
    (a, b): (&str, &str),
    eos: Option<i64>,
    max_len: usize,
) -> anyhow::Result<(Example, Example)> {
    let (pa, ra) = cut_response(format, prompt, a, eos, max_len)?;
    let (pb, rb) = cut_response(format, prompt, b, eos, max_len)?;
    let room = max_len.saturating_sub(ra.len().max(rb.len()));
    Ok((join(format, pa, ra, room), join(format, pb, rb, room)))
}

/// The prompt's tokens and the response's (+ EOS for plain text), the
/// response cut to at least half the budget.
fn cut_response(
    format: &TextFormat<'_>,
    prompt: &serde_json::Value,
    response: &str,
    eos: Option<i64>,
    max_len: usize,
) -> anyhow::Result<(Vec<i64>, Vec<i64>)> {
    let (p, mut r) = format.pair(prompt, response)?;
    r.extend(format.response_eos(eos));
    // Keep at least half the budget for the response.
    let r_keep = r
        .len()
        .min(max_len.saturating_sub(p.len().min(max_len / 2)));
    r.truncate(r_keep.max(1).min(r.len()));
    Ok((p, r))
}

/// `prompt` cut from its start (after its BOS) to `room` tokens, then the
/// response.
fn join(format: &TextFormat<'_>, mut prompt: Vec<i64>, response: Vec<i64>, room: usize) -> Example {
    let cut = prompt.len() - room.min(prompt.len());
    format.tokenizer.cut_start(&mut prompt, cut);
    let response_start = prompt.len();
    prompt.extend(response);
    Example {
        tokens: prompt,
        response_start,
        labelled: None,
    }
}

/// A conversation that ends with the assistant, trained on every assistant
/// turn: the tokens the chat template's `{% generation %}` blocks mark, as
/// transformers' `return_assistant_tokens_mask` (TRL's
/// `assistant_only_loss`) has them. `None` without a template that marks
/// them. Longer than `max_len`, it keeps its start (TRL's truncation).
pub fn tokenize_conversation(
    format: &TextFormat<'_>,
    messages: &serde_json::Value,
    max_len: usize,
) -> anyhow::Result<Option<Example>> {
    let Some(chat) = format.chat.filter(|c| c.marks_generation()) else {
        return Ok(None);
    };
    let rendered = chat
        .conversation(messages)
        .map_err(|e| anyhow::anyhow!("{e} ({})", chat.source))?;
    if !format.logged.replace(true) {
        super::rendered::log("conversation", messages, &rendered.text);
    }
    let (mut tokens, mut labelled) = format.tokenizer.encode_with_assistant_mask(&rendered)?;
    tokens.truncate(max_len);
    labelled.truncate(max_len);
    anyhow::ensure!(
        labelled.iter().any(|&l| l),
        "no assistant token within the first {max_len} tokens of the conversation"
    );
    let response_start = labelled.iter().position(|&l| l).expect("checked");
    Ok(Some(Example {
        tokens,
        response_start,
        labelled: Some(labelled),
    }))
}

/// Reads a comparisons file record by record: `each(line, prompt,
/// comparisons, at)` gets a record's line, its `prompt` field (a string, or
/// a conversation as TRL's conversational preference records have it) and
/// its [`comparisons`]; `at()` names the stage, file and line for errors.
pub(crate) fn for_each_comparison_record(
    stage: &str,
    path: &Path,
    mut each: impl FnMut(
        usize,
        &serde_json::Value,
        Vec<(&str, &str, f64)>,
        &dyn Fn() -> String,
    ) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let reader = read_jsonl::<serde_json::Value>(path)
        .with_context(|| format!("stage `{stage}`: reading {}", path.display()))?;
    for (line, record) in reader {
        let at = || format!("stage `{stage}`: {}:{line}", path.display());
        let record = record.map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        let prompt = &record["prompt"];
        anyhow::ensure!(
            prompt.is_string() || prompt.is_array(),
            "{}: no field `prompt` (a string or a list of messages)",
            at()
        );
        let pairs = comparisons(&record).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        each(line, prompt, pairs, &at)?;
    }
    Ok(())
}

/// The (response A, response B, p) comparisons of one record.
pub(crate) fn comparisons(record: &serde_json::Value) -> Result<Vec<(&str, &str, f64)>, String> {
    // A response is a string, or (TRL's conversational records) a list
    // holding one assistant message.
    let text = |key: &str| -> Result<&str, String> {
        let value = &record[key];
        value
            .as_str()
            .or_else(|| match value.as_array().map(Vec::as_slice) {
                Some([turn]) if turn["role"] == "assistant" => turn["content"].as_str(),
                _ => None,
            })
            .ok_or_else(|| {
                format!("no field `{key}` (a string, or a list holding one assistant message)")
            })
    };
    let prob = |key: &str| -> Result<f64, String> {
        let p = record[key]
            .as_f64()
            .ok_or_else(|| format!("no number field `{key}`"))?;
        if (0.0..=1.0).contains(&p) {
            Ok(p)
        } else {
            Err(format!("`{key}` must be a probability in [0, 1], got {p}"))
        }
    };
    if record.get("chosen").is_some() {
        let p = if record.get("label").is_some() {
            prob("label")?
        } else {
            1.0
        };
        Ok(vec![(text("chosen")?, text("rejected")?, p)])
    } else if record.get("response_a").is_some() {
        Ok(vec![(
            text("response_a")?,
            text("response_b")?,
            prob("p_a")?,
        )])
    } else if let Some(list) = record.get("responses") {
        let list: Vec<&str> = list
            .as_array()
            .ok_or("`responses` must be a list of strings, best first")?
            .iter()
            .map(|r| {
                r.as_str()
                    .ok_or("`responses` must be a list of strings, best first")
            })
            .collect::<Result<_, _>>()?;
        let mut out = Vec::new();
        for i in 0..list.len() {
            for j in i + 1..list.len() {
                out.push((list[i], list[j], 1.0));
            }
        }
        Ok(out)
    } else {
        Err("not a comparison: expected `chosen`/`rejected`, `response_a`/`response_b`/`p_a` or `responses`".into())
    }
}

/// Splits records into (train, held out): `round(fraction * n)` records (at least one when `fraction > 0` and
/// `n >= 2`, always leaving one for training), by a permutation seeded with
/// `seed`; each side keeps the source order.
pub fn split<T>(records: Vec<T>, fraction: f64, seed: u64) -> (Vec<T>, Vec<T>) {
    let n = records.len();
    let k = if fraction > 0.0 && n >= 2 {
        ((fraction * n as f64).round() as usize).clamp(1, n - 1)
    } else {
        0
    };
    // A stream apart from the training order's (streams are epochs there).
    let mut held = vec![false; n];
    for &i in &epoch_permutation(n, seed, u64::MAX)[..k] {
        held[i] = true;
    }
    let (mut train, mut test) = (Vec::new(), Vec::new());
    for (r, h) in records.into_iter().zip(held) {
        if h {
            test.push(r);
        } else {
            train.push(r);
        }
    }
    (train, test)
}

/// Training and held-out records, and where the held-out ones came from
/// (for the eval figures): the `eval` input's records when it is bound,
/// else [`split`] of `records`, which are `what` (e.g. "comparison records").
pub fn held_out<T>(
    records: Vec<T>,
    eval: Option<Vec<T>>,
    fraction: f64,
    seed: u64,
    what: &str,
) -> (Vec<T>, Vec<T>, String) {
    match eval {
        Some(eval) => (records, eval, "the `eval` input".to_string()),
        None => {
            let (train, test) = split(records, fraction, seed);
            let source = format!(
                "{} of the {what} held out (eval_fraction {fraction})",
                test.len()
            );
            (train, test, source)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_sides_of_a_pair_follow_the_same_prompt() {
        let words = ["<unk>", "<s>", "p1", "p2", "p3", "a", "b", " "];
        let (_dir, tok) = crate::testing::word_tokenizer(
            &words,
            &["<s>"],
            serde_json::json!({"bos_token": "<s>"}),
        );
        let format = TextFormat::new(&tok, None);
        let prompt = serde_json::json!("p1 p2 p3");
        // Prompt: p1 ␠ p2 ␠ p3 (5 tokens); A: ␠ a ␠ a ␠ a + EOS (7), B: ␠ b + EOS (3).
        let (a, b) = tokenize_pair(&format, &prompt, (" a a a", " b"), Some(1), 8).unwrap();
        // A keeps half the budget and what the prompt leaves: 4 tokens; the
        // prompt gets the 4 left, for B too, which alone would keep it whole.
        assert_eq!(a.tokens, [7, 3, 7, 4, 7, 5, 7, 5]);
        assert_eq!(b.tokens, [7, 3, 7, 4, 7, 6, 1]);
        assert_eq!((a.response_start, b.response_start), (4, 4));
        let alone = tokenize_example(&format, &prompt, " b", Some(1), 8).unwrap();
        assert_eq!(alone.tokens, [2, 7, 3, 7, 4, 7, 6, 1]);
    }

    #[test]
    fn record_shapes() {
        let hh = serde_json::json!({"prompt": "q", "chosen": "x", "rejected": "y", "label": 0.8});
        assert_eq!(comparisons(&hh).unwrap(), [("x", "y", 0.8)]);
        let ai =
            serde_json::json!({"prompt": "q", "response_a": "x", "response_b": "y", "p_a": 0.3});
        assert_eq!(comparisons(&ai).unwrap(), [("x", "y", 0.3)]);
        let ranked = serde_json::json!({"prompt": "q", "responses": ["a", "b", "c"]});
        assert_eq!(
            comparisons(&ranked).unwrap(),
            [("a", "b", 1.0), ("a", "c", 1.0), ("b", "c", 1.0)]
        );
        let bad =
            serde_json::json!({"prompt": "q", "response_a": "x", "response_b": "y", "p_a": 1.5});
        assert!(comparisons(&bad).unwrap_err().contains("[0, 1]"));
        assert!(comparisons(&serde_json::json!({"prompt": "q"})).is_err());
    }

    #[test]
    fn the_split_is_seeded_and_disjoint() {
        let (tr, te) = split((0..20).collect(), 0.25, 7);
        assert_eq!((tr.len(), te.len()), (15, 5));
        assert_eq!(split((0..20).collect::<Vec<_>>(), 0.25, 7).1, te);
        assert_ne!(split((0..20).collect::<Vec<_>>(), 0.25, 8).1, te);
        let mut all: Vec<i32> = tr.into_iter().chain(te).collect();
        all.sort();
        assert_eq!(all, (0..20).collect::<Vec<_>>());
        assert_eq!(split(vec![1, 2, 3], 0.01, 1).1.len(), 1);
        assert_eq!(split(vec![1, 2], 0.0, 1).1.len(), 0);
        assert_eq!(split(vec![1], 0.5, 1).1.len(), 0);
    }
}
