//! Comparison records -> tokenized pairs.
//!
//! Accepted record shapes (one JSON object per line):
//! - `dataset.import` HH comparisons `{prompt, chosen, rejected, label}`:
//!   A = chosen, p = label (1.0 when absent);
//! - `ai_feedback` comparisons `{prompt, response_a, response_b, p_a}`:
//!   A = response_a, p = p_a;
//! - rankings `{prompt, responses: [best, ..., worst]}`: every ordered pair
//!   (i < j) with A = responses[i], p = 1.
//!
//! A sequence is `prompt + response` (+ EOS), each side tokenized on its
//! own as `sft` does; with a chat template, the conversation with the
//! response as the assistant's turn (`examples::TextFormat`), ending at the
//! turn's end token: the reward is read on the last token, and a sampled
//! answer ends there (Qwen's template writes `<|im_end|>` and a newline, the
//! answer stops at `<|im_end|>`). The prompt may then also be a list of
//! messages, and each response a list holding one assistant message (TRL's
//! conversational preference records).

use std::path::Path;

use anyhow::Context;

use alignflow_ops::text::Tokenizer;

use crate::ops::examples::{for_each_comparison_record, TextFormat};

/// One tokenized comparison.
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub a: Vec<i64>,
    pub b: Vec<i64>,
    /// Probability that A is preferred.
    pub p: f64,
    /// Loss weight (the `mix` weight of its set).
    pub weight: f64,
}

/// The comparisons of one source record (a ranking yields several; they
/// stay together on one side of the split).
pub type Record = Vec<Pair>;

/// One side of a comparison before truncation: the prompt's tokens, the
/// response's, and the token the sequence ends on (the reward's), kept
/// whatever is cut.
pub struct Side {
    pub prompt: Vec<i64>,
    pub response: Vec<i64>,
    pub end: Option<i64>,
}

/// Both sides of a comparison cut to `max_len` tokens each, as TRL cuts a
/// pair: the responses' ends go beyond the budget, then the prompt's
/// beginning (after its BOS) down to the room the longer response leaves,
/// the same for both, so that both responses follow the same prompt. The
/// end token always stays.
pub fn pair_sequences(
    tokenizer: &Tokenizer,
    a: Side,
    b: Side,
    max_len: usize,
) -> (Vec<i64>, Vec<i64>) {
    let room = |s: &Side| max_len.saturating_sub(usize::from(s.end.is_some()));
    let kept = |s: &Side| s.response.len().min(room(s));
    let prompt_room = (room(&a) - kept(&a)).min(room(&b) - kept(&b));
    let row = |mut s: Side| {
        let r_keep = kept(&s);
        let cut = s.prompt.len().saturating_sub(prompt_room);
        tokenizer.cut_start(&mut s.prompt, cut);
        s.prompt.extend_from_slice(&s.response[..r_keep]);
        s.prompt.extend(s.end);
        s.prompt
    };
    (row(a), row(b))
}

/// How to turn text into token rows.
pub struct Encoder<'a> {
    pub format: TextFormat<'a>,
    /// Appended to a plain-text response (`append_eos`).
    pub eos: Option<i64>,
    /// The ids a sampled answer stops on: with a chat template, the
    /// response ends at the last of them it holds.
    pub stop_ids: Vec<i64>,
    pub max_len: usize,
}

impl Encoder<'_> {
    /// One side of a comparison: `prompt` and `response` as the format
    /// renders them, ending on the EOS (plain text) or the turn's end.
    fn side(&self, prompt: &serde_json::Value, response: &str) -> anyhow::Result<Side> {
        let (prompt, mut response) = self.format.pair(prompt, response)?;
        let end = match self.format.chat {
            None => self.eos,
            Some(_) => match response.iter().rposition(|t| self.stop_ids.contains(t)) {
                Some(at) => {
                    response.truncate(at + 1);
                    response.pop()
                }
                None => None,
            },
        };
        Ok(Side {
            prompt,
            response,
            end,
        })
    }
}

/// Reads the comparison records of `path`, each pair weighted `weight`.
/// Errors name the stage, file and line.
pub fn read_records(
    stage: &str,
    path: &Path,
    enc: &Encoder<'_>,
    weight: f64,
) -> anyhow::Result<Vec<Record>> {
    let mut out = Vec::new();
    for_each_comparison_record(stage, path, |_, prompt, pairs, at| {
        let mut rec = Vec::with_capacity(pairs.len());
        for (a, b, p) in pairs {
            let (a, b) = pair_sequences(
                enc.format.tokenizer,
                enc.side(prompt, a).with_context(at)?,
                enc.side(prompt, b).with_context(at)?,
                enc.max_len,
            );
            anyhow::ensure!(
                !a.is_empty() && !b.is_empty(),
                "{}: an empty sequence (empty prompt and response, no EOS)",
                at()
            );
            rec.push(Pair { a, b, p, weight });
        }
        out.push(rec);
        Ok(())
    })?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tokenizer whose BOS is `<s>` (id 1).
    fn tokenizer() -> (tempfile::TempDir, Tokenizer) {
        crate::testing::word_tokenizer(
            &["<unk>", "<s>"],
            &[],
            serde_json::json!({"bos_token": "<s>"}),
        )
    }

    fn side(prompt: &[i64], response: &[i64], end: Option<i64>) -> Side {
        Side {
            prompt: prompt.to_vec(),
            response: response.to_vec(),
            end,
        }
    }

    #[test]
    fn truncation_drops_the_responses_ends_then_one_prompt_start_and_keeps_the_end() {
        let (_dir, tok) = tokenizer();
        let cut = |a: Side, b: Side, max| pair_sequences(&tok, a, b, max);
        // Room for everything.
        assert_eq!(
            cut(
                side(&[2, 3, 4], &[5, 6], Some(9)),
                side(&[2, 3, 4], &[7], Some(9)),
                10
            ),
            (vec![2, 3, 4, 5, 6, 9], vec![2, 3, 4, 7, 9])
        );
        // The longer response sets the prompt's room for both sides: B sees
        // the prompt A sees, though it alone would fit it whole.
        assert_eq!(
            cut(
                side(&[2, 3, 4], &[5, 6], Some(9)),
                side(&[2, 3, 4], &[7], Some(9)),
                4
            ),
            (vec![4, 5, 6, 9], vec![4, 7, 9])
        );
        // Responses past the budget lose their ends; the end token stays.
        assert_eq!(
            cut(
                side(&[2, 3, 4], &[5, 6, 7, 8], Some(9)),
                side(&[2], &[7], None),
                3
            ),
            (vec![5, 6, 9], vec![7])
        );
        // A BOS stays first when the prompt is cut.
        assert_eq!(
            cut(
                side(&[1, 2, 3, 4], &[5, 6], Some(9)),
                side(&[1, 2, 3, 4], &[7], Some(9)),
                5
            ),
            (vec![1, 4, 5, 6, 9], vec![1, 4, 7, 9])
        );
        // No room for the prompt: none of it, BOS included.
        assert_eq!(
            cut(
                side(&[1, 2], &[5, 6, 7], Some(9)),
                side(&[1, 2], &[7], Some(9)),
                3
            ),
            (vec![5, 6, 9], vec![7, 9])
        );
    }

    /// ChatML as Qwen writes it: each turn ends with `<|im_end|>` and a
    /// newline.
    #[test]
    fn with_a_chat_template_a_response_ends_on_its_turn_end() {
        let words = [
            "<unk>",
            "<|im_start|>",
            "<|im_end|>",
            "\n",
            "user",
            "assistant",
            "hi",
            "yes",
        ];
        let (_dir, tok) = crate::testing::word_tokenizer(
            &words,
            &["<|im_start|>", "<|im_end|>"],
            serde_json::json!({}),
        );
        let template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";
        let chat =
            alignflow_ops::ChatFormat::new(template, Default::default(), "test".into()).unwrap();
        let enc = Encoder {
            format: TextFormat::new(&tok, Some(&chat)),
            eos: Some(7),
            stop_ids: vec![2],
            max_len: 64,
        };
        let side = enc.side(&serde_json::json!("hi"), "yes").unwrap();
        // <|im_start|> user \n hi <|im_end|> \n <|im_start|> assistant \n
        assert_eq!(side.prompt, [1, 4, 3, 6, 2, 3, 1, 5, 3]);
        // yes <|im_end|>, not yes <|im_end|> \n: a sampled answer stops at
        // <|im_end|>, and the reward is read there.
        assert_eq!((side.response, side.end), (vec![7], Some(2)));
        // Plain text ends on the EOS appended.
        let plain = Encoder {
            format: TextFormat::new(&tok, None),
            ..enc
        };
        assert_eq!(
            plain.side(&serde_json::json!("hi"), "yes").unwrap().end,
            Some(7)
        );
    }
}
