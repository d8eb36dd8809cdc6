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
//! response as the assistant's turn (`examples::TextFormat`). The prompt
//! may then also be a list of messages, and each response a list holding
//! one assistant message (TRL's conversational preference records).

use std::path::Path;

use anyhow::Context;

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

/// `prompt + response (+ eos)` cut to `max_len` tokens: the prompt's
/// beginning goes first, then the response's end; the EOS always stays.
pub fn sequence(prompt: &[i64], response: &[i64], eos: Option<i64>, max_len: usize) -> Vec<i64> {
    let room = max_len.saturating_sub(usize::from(eos.is_some()));
    let r_keep = response.len().min(room);
    let p_keep = prompt.len().min(room - r_keep);
    let mut out = Vec::with_capacity(p_keep + r_keep + 1);
    out.extend_from_slice(&prompt[prompt.len() - p_keep..]);
    out.extend_from_slice(&response[..r_keep]);
    out.extend(eos);
    out
}

/// How to turn text into token rows.
pub struct Encoder<'a> {
    pub format: TextFormat<'a>,
    pub eos: Option<i64>,
    pub max_len: usize,
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
        let eos = enc.format.response_eos(enc.eos);
        let mut rec = Vec::with_capacity(pairs.len());
        for (a, b, p) in pairs {
            let row = |response: &str| -> anyhow::Result<Vec<i64>> {
                let (prompt, response) = enc.format.pair(prompt, response).with_context(at)?;
                Ok(sequence(&prompt, &response, eos, enc.max_len))
            };
            let (a, b) = (row(a)?, row(b)?);
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

    #[test]
    fn truncation_drops_the_prompt_start_first_and_keeps_eos() {
        assert_eq!(
            sequence(&[1, 2, 3], &[4, 5], Some(9), 10),
            [1, 2, 3, 4, 5, 9]
        );
        assert_eq!(sequence(&[1, 2, 3], &[4, 5], Some(9), 4), [3, 4, 5, 9]);
        assert_eq!(sequence(&[1, 2, 3], &[4, 5, 6, 7], Some(9), 3), [4, 5, 9]);
        assert_eq!(sequence(&[1, 2, 3], &[4, 5], None, 3), [3, 4, 5]);
    }
}
