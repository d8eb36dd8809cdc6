//! Records -> token examples, as the training ops share them: a
//! (prompt, response) pair tokenized and cut to fit (`sft`, `dpo`), the
//! comparisons of a preference record in every accepted shape (`pm.train`,
//! `pm.pretrain`, `dpo`; shapes: `pm::data`), and the seeded held-out split.

use std::path::Path;

use anyhow::Context;

use alignflow_ops::data::read_jsonl;
use alignflow_ops::text::Tokenizer;

use crate::train::epoch_permutation;

/// One tokenized example: the tokens and where the response starts.
pub struct Example {
    pub tokens: Vec<i64>,
    pub response_start: usize,
}

/// Tokenizes `prompt` + `response` (+ EOS), truncated to `max_len` by
/// dropping the prompt's beginning first, then the response's end.
pub fn tokenize_example(
    tokenizer: &Tokenizer,
    prompt: &str,
    response: &str,
    eos: Option<i64>,
    max_len: usize,
) -> anyhow::Result<Example> {
    let mut p = tokenizer.encode_start(prompt)?;
    let mut r = tokenizer.encode(response)?;
    if let Some(e) = eos {
        r.push(e);
    }
    // Keep at least half the budget for the response.
    let r_keep = r
        .len()
        .min(max_len.saturating_sub(p.len().min(max_len / 2)));
    r.truncate(r_keep.max(1).min(r.len()));
    let p_keep = max_len.saturating_sub(r.len()).min(p.len());
    p.drain(..p.len() - p_keep);
    let response_start = p.len();
    p.extend(r);
    Ok(Example {
        tokens: p,
        response_start,
    })
}

/// Reads a comparisons file record by record: `each(line, prompt,
/// comparisons, at)` gets a record's line, its `prompt` field and its
/// [`comparisons`]; `at()` names the stage, file and line for errors.
pub(crate) fn for_each_comparison_record(
    stage: &str,
    path: &Path,
    mut each: impl FnMut(usize, &str, Vec<(&str, &str, f64)>, &dyn Fn() -> String) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let reader = read_jsonl::<serde_json::Value>(path)
        .with_context(|| format!("stage `{stage}`: reading {}", path.display()))?;
    for (line, record) in reader {
        let at = || format!("stage `{stage}`: {}:{line}", path.display());
        let record = record.map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        let prompt = record["prompt"]
            .as_str()
            .with_context(|| format!("{}: no string field `prompt`", at()))?;
        let pairs = comparisons(&record).map_err(|e| anyhow::anyhow!("{}: {e}", at()))?;
        each(line, prompt, pairs, &at)?;
    }
    Ok(())
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
