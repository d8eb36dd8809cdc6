//! Comparison records -> tokenized DPO pairs, and the `reference_logps`
//! artifact that `dpo.reference` writes and `dpo` reads.
//!
//! Records are read in every shape `pm.train` accepts (its
//! `comparisons`): the prompt is the record's `prompt` (for HH dialogues,
//! `dataset.import` already cut it at the last `Assistant:`, the prefix the
//! chosen and rejected dialogues share), each response is tokenized on its
//! own after it, and only response tokens (plus EOS) are scored; with a
//! chat template, the response is the assistant's turn of the rendered
//! conversation, its end-of-turn tokens included (`examples::TextFormat`).

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use alignflow_ops::data::read_jsonl;

use super::loss::scored_tokens;
use crate::ops::examples::{for_each_comparison_record, tokenize_pair, TextFormat};

/// One tokenized comparison: A ("chosen") and B ("rejected") sequences, each
/// prompt + response (+ EOS) with the response's first index.
#[derive(Debug, Clone, PartialEq)]
pub struct DpoPair {
    pub chosen: Vec<i64>,
    pub chosen_start: usize,
    pub rejected: Vec<i64>,
    pub rejected_start: usize,
    /// Probability that A is preferred (1 for a hard label).
    pub p: f64,
    /// 1-based line of the source record, for error messages.
    pub line: usize,
    /// Index of the pair within its record (rankings give several).
    pub pair: usize,
}

impl DpoPair {
    /// A digest of exactly what is scored (tokens and response starts), so
    /// `dpo` can tell reference log-probs of other comparisons, another
    /// tokenizer or other truncation from the right ones. FNV-1a 64: a
    /// consistency check, not a security boundary.
    pub fn digest(&self) -> String {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        let mut eat = |v: u64| {
            for b in v.to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        };
        for (seq, start) in [
            (&self.chosen, self.chosen_start),
            (&self.rejected, self.rejected_start),
        ] {
            eat(seq.len() as u64);
            eat(start as u64);
            for &t in seq {
                eat(t as u64);
            }
        }
        format!("{h:016x}")
    }
}

/// The settings `dpo.reference` tokenized with; `dpo` tokenizes the same way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Effective longest sequence (the param, capped at the model's positions).
    pub max_len: usize,
    /// The EOS appended to every response, if any.
    pub eos: Option<i64>,
    /// Pairs per set (`comparisons`, `eval`).
    pub pairs: std::collections::BTreeMap<String, usize>,
    /// What the numbers in `logps.jsonl` are.
    pub definition: String,
}

/// One line of `logps.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefLogps {
    /// The input the pair came from (`comparisons` or `eval`).
    pub set: String,
    /// 1-based line of the record in that input.
    pub line: usize,
    /// Index of the pair within the record.
    pub pair: usize,
    /// Sum of the reference's log-probs of A's response tokens.
    pub chosen: f64,
    /// Sum of the reference's log-probs of B's response tokens.
    pub rejected: f64,
    pub chosen_tokens: usize,
    pub rejected_tokens: usize,
    /// [`DpoPair::digest`] of the scored pair.
    pub digest: String,
}

/// The pairs of a comparisons file, grouped by record (a ranking's pairs
/// stay on one side of the held-out split). Errors name stage, file, line.
pub fn read_pairs(
    stage: &str,
    path: &Path,
    format: &TextFormat<'_>,
    eos: Option<i64>,
    max_len: usize,
) -> anyhow::Result<Vec<Vec<DpoPair>>> {
    let mut out = Vec::new();
    for_each_comparison_record(stage, path, |line, prompt, pairs, at| {
        let mut rec = Vec::with_capacity(pairs.len());
        for (pair, (a, b, p)) in pairs.into_iter().enumerate() {
            let (a, b) = tokenize_pair(format, prompt, (a, b), eos, max_len).with_context(at)?;
            let scored = |t: &[i64], s| scored_tokens(t.len(), s);
            anyhow::ensure!(
                scored(&a.tokens, a.response_start) > 0 && scored(&b.tokens, b.response_start) > 0,
                "{}: a response with no token to score (empty response and no EOS, or an empty prompt and a one-token response)",
                at()
            );
            rec.push(DpoPair {
                chosen: a.tokens,
                chosen_start: a.response_start,
                rejected: b.tokens,
                rejected_start: b.response_start,
                p,
                line,
                pair,
            });
        }
        out.push(rec);
        Ok(())
    })?;
    Ok(out)
}

/// Writes the `reference_logps` folder.
pub fn write_reference(dir: &Path, settings: &Settings, lines: &[RefLogps]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        dir.join("settings.json"),
        serde_json::to_string_pretty(settings)? + "\n",
    )?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join("logps.jsonl"))?);
    for l in lines {
        writeln!(f, "{}", serde_json::to_string(l)?)?;
    }
    f.flush()?;
    Ok(())
}

/// Reads the `reference_logps` folder.
pub fn read_reference(stage: &str, dir: &Path) -> anyhow::Result<(Settings, Vec<RefLogps>)> {
    let at = |name: &str| {
        format!(
            "stage `{stage}`: input `reference_logps`: {}",
            dir.join(name).display()
        )
    };
    let text = std::fs::read_to_string(dir.join("settings.json"))
        .with_context(|| format!("{} (is it dpo.reference's output?)", at("settings.json")))?;
    let settings: Settings = serde_json::from_str(&text).with_context(|| at("settings.json"))?;
    let path = dir.join("logps.jsonl");
    let mut lines = Vec::new();
    for (line, rec) in read_jsonl::<RefLogps>(&path).with_context(|| at("logps.jsonl"))? {
        lines.push(rec.map_err(|e| anyhow::anyhow!("{}:{line}: {e}", at("logps.jsonl")))?);
    }
    Ok((settings, lines))
}

/// Pairs `records` of input `set` with their reference log-probs (in file
/// order), checking each digest: a mismatch means the reference was computed
/// on other comparisons, with another tokenizer or other truncation.
pub fn attach_reference(
    stage: &str,
    set: &str,
    path: &Path,
    records: Vec<Vec<DpoPair>>,
    reference: &[RefLogps],
) -> anyhow::Result<Vec<Vec<(DpoPair, f64, f64)>>> {
    let mine: Vec<&RefLogps> = reference.iter().filter(|r| r.set == set).collect();
    let n: usize = records.iter().map(Vec::len).sum();
    anyhow::ensure!(
        mine.len() == n,
        "stage `{stage}`: input `{set}` ({}) has {n} pairs but `reference_logps` holds {} for `{set}`: give dpo.reference the same `{set}` input",
        path.display(),
        mine.len()
    );
    let mut it = mine.into_iter();
    let mut out = Vec::with_capacity(records.len());
    for rec in records {
        let mut with = Vec::with_capacity(rec.len());
        for pair in rec {
            let r = it.next().expect("counts checked");
            anyhow::ensure!(
                r.line == pair.line && r.pair == pair.pair && r.digest == pair.digest(),
                "stage `{stage}`: {}:{} (pair {}) does not match `reference_logps` ({set} line {}, pair {}): the reference log-probs were computed on other comparisons, with another tokenizer or other truncation; run dpo.reference on the same `{set}` with a model sharing the policy's tokenizer",
                path.display(),
                pair.line,
                pair.pair,
                r.line,
                r.pair
            );
            with.push((pair, r.chosen, r.rejected));
        }
        out.push(with);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(tokens: Vec<i64>, start: usize) -> DpoPair {
        DpoPair {
            chosen: tokens.clone(),
            chosen_start: start,
            rejected: tokens,
            rejected_start: start,
            p: 1.0,
            line: 1,
            pair: 0,
        }
    }

    #[test]
    fn the_digest_sees_tokens_and_starts() {
        let a = pair(vec![1, 2, 3], 1);
        assert_eq!(a.digest(), pair(vec![1, 2, 3], 1).digest());
        assert_ne!(a.digest(), pair(vec![1, 2, 3], 2).digest());
        assert_ne!(a.digest(), pair(vec![1, 2, 4], 1).digest());
        assert_eq!(a.digest().len(), 16);
    }
}
