//! Comparison records -> tokenized pairs, and the seeded held-out split.
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
//! own as `sft` does.

use std::path::Path;

use anyhow::Context;

use alignflow_ops::data::read_jsonl;
use alignflow_ops::text::Tokenizer;

use crate::train::epoch_permutation;

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

/// The (response A, response B, p) comparisons of one record.
pub(crate) fn comparisons(record: &serde_json::Value) -> Result<Vec<(&str, &str, f64)>, String> {
    let text = |key: &str| -> Result<&str, String> {
        record[key]
            .as_str()
            .ok_or_else(|| format!("no string field `{key}`"))
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

/// How to turn text into token rows.
pub struct Encoder<'a> {
    pub tokenizer: &'a Tokenizer,
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
    let reader = read_jsonl::<serde_json::Value>(path)
        .with_context(|| format!("stage `{stage}`: reading {}", path.display()))?;
    for (line, record) in reader {
        let at = || format!("stage `{stage}`: {}:{line}", path.display());
        let record = record.map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        let prompt = record["prompt"]
            .as_str()
            .with_context(|| format!("{}: no string field `prompt`", at()))?;
        let pairs = comparisons(&record).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        let prompt = enc.tokenizer.encode(prompt)?;
        let mut rec = Vec::with_capacity(pairs.len());
        for (a, b, p) in pairs {
            let a = sequence(&prompt, &enc.tokenizer.encode(a)?, enc.eos, enc.max_len);
            let b = sequence(&prompt, &enc.tokenizer.encode(b)?, enc.eos, enc.max_len);
            anyhow::ensure!(
                !a.is_empty() && !b.is_empty(),
                "{}: an empty sequence (empty prompt and response, no EOS)",
                at()
            );
            rec.push(Pair { a, b, p, weight });
        }
        out.push(rec);
    }
    Ok(out)
}

/// Splits `records` into (train, held out): `round(fraction * n)` records
/// (at least one when `fraction > 0` and `n >= 2`, always leaving one for
/// training), chosen by a permutation seeded with `seed`; each side keeps
/// the source order.
pub fn split(records: Vec<Record>, fraction: f64, seed: u64) -> (Vec<Record>, Vec<Record>) {
    let n = records.len();
    let mut k = (fraction * n as f64).round() as usize;
    if fraction > 0.0 && n >= 2 {
        k = k.clamp(1, n - 1);
    } else if fraction <= 0.0 || n < 2 {
        k = 0;
    }
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
        let recs = |n: usize| -> Vec<Record> {
            (0..n)
                .map(|i| {
                    vec![Pair {
                        a: vec![i as i64],
                        b: vec![0],
                        p: 1.0,
                        weight: 1.0,
                    }]
                })
                .collect()
        };
        let (tr, te) = split(recs(20), 0.25, 7);
        assert_eq!((tr.len(), te.len()), (15, 5));
        let (tr2, te2) = split(recs(20), 0.25, 7);
        assert_eq!((tr, te.clone()), (tr2, te2));
        let (_, te3) = split(recs(20), 0.25, 8);
        assert_ne!(te, te3);
        assert_eq!(split(recs(3), 0.01, 1).1.len(), 1);
        assert_eq!(split(recs(3), 0.0, 1).1.len(), 0);
        assert_eq!(split(recs(1), 0.5, 1).1.len(), 0);
    }
}
