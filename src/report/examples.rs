//! What the models wrote: a few seeded-random records of the outputs that
//! hold text, as tables. Recognised by the records' shape, so an output
//! shows the same whichever stage wrote it:
//! - `critique_revise` revisions (`trail`): the original answer, then each
//!   principle, critique and revision;
//! - `ai_feedback` comparisons (`response_a`, `response_b`, `p_a`): the two
//!   responses, the principle and p_a with either response shown first;
//! - `evaluate` samples (`policy_response`, `reference_response`): the
//!   prompt, both responses and each judge's verdict;
//! - `ppo` samples (`iteration`, `response`, `score`, `kl`): a few of the
//!   first iteration's responses and a few of the last one's, each with its
//!   score and KL, so the page shows what training changed.

use rand::SeedableRng;
use serde_json::Value;

/// Records shown per output.
const SHOWN: usize = 3;

/// Output names whose JSONL records may be examples.
pub const EXAMPLE_OUTPUTS: &[&str] = &["revisions", "comparisons", "samples"];

/// Some records of one output, as a table.
#[derive(Debug, Clone)]
pub struct Examples {
    pub stage: String,
    pub output: String,
    /// Records in the output.
    pub total: usize,
    pub columns: Vec<String>,
    /// Cells are plain text (the page escapes and folds them).
    pub rows: Vec<Vec<String>>,
}

/// The examples of output `output` of stage `stage`, whose text is
/// `jsonl`; `None` when its records have no shape shown here. The records
/// are drawn with a seed from the stage and output names, so the page
/// shows the same ones each time.
pub fn read_examples(stage: &str, output: &str, jsonl: &str) -> Option<Examples> {
    let records: Vec<Value> = jsonl
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(Value::is_object)
        .collect();
    let shape = Shape::of(records.first()?)?;
    let seed = blake3::hash(format!("{stage}\u{0}{output}").as_bytes());
    let mut rng = rand_chacha::ChaCha8Rng::from_seed(*seed.as_bytes());
    let mut draw = |among: &[usize]| -> Vec<usize> {
        let at = rand::seq::index::sample(&mut rng, among.len(), SHOWN.min(among.len()));
        let mut picked: Vec<usize> = at.into_iter().map(|k| among[k]).collect();
        picked.sort_unstable();
        picked
    };
    let picked = match shape {
        // The same number from the first iteration and from the last.
        Shape::PpoSamples => {
            let iteration = |i: &usize| records[*i]["iteration"].as_u64();
            let all: Vec<usize> = (0..records.len()).collect();
            let first = all.iter().filter_map(iteration).min();
            let last = all.iter().filter_map(iteration).max();
            let of =
                |it| -> Vec<usize> { all.iter().copied().filter(|i| iteration(i) == it).collect() };
            let mut picked = draw(&of(first));
            if last != first {
                picked.extend(draw(&of(last)));
            }
            picked
        }
        _ => draw(&(0..records.len()).collect::<Vec<_>>()),
    };
    let rows: Vec<Vec<String>> = picked.iter().map(|&i| shape.row(&records[i])).collect();
    let width = rows.iter().map(Vec::len).max().unwrap_or(0);
    Some(Examples {
        stage: stage.to_string(),
        output: output.to_string(),
        total: records.len(),
        columns: shape.columns(width),
        rows: rows
            .into_iter()
            .map(|mut r| {
                r.resize(width, String::new());
                r
            })
            .collect(),
    })
}

#[derive(Debug, Clone, Copy)]
enum Shape {
    Revisions,
    Comparisons,
    EvaluateSamples,
    PpoSamples,
}

impl Shape {
    fn of(record: &Value) -> Option<Shape> {
        let has = |f: &str| record.get(f).is_some();
        if has("trail") && has("original") {
            Some(Shape::Revisions)
        } else if has("response_a") && has("response_b") && has("p_a") {
            Some(Shape::Comparisons)
        } else if has("policy_response") && has("reference_response") {
            Some(Shape::EvaluateSamples)
        } else if has("iteration") && has("response") && has("score") && has("kl") {
            Some(Shape::PpoSamples)
        } else {
            None
        }
    }

    /// The header of a table `width` cells wide (a revision trail adds
    /// three columns per step).
    fn columns(self, width: usize) -> Vec<String> {
        let fixed: &[&str] = match self {
            Shape::Revisions => &["prompt", "original answer"],
            Shape::Comparisons => &[
                "prompt",
                "response A",
                "response B",
                "p_a",
                "principle",
                "p_a, A shown first",
                "p_a, B shown first",
            ],
            Shape::EvaluateSamples => &["prompt", "policy response", "reference response"],
            Shape::PpoSamples => &["iteration", "prompt", "response", "score", "KL"],
        };
        let mut columns: Vec<String> = fixed.iter().map(|c| c.to_string()).collect();
        let mut step = 0;
        while columns.len() < width {
            match self {
                Shape::Revisions => {
                    step += 1;
                    columns.extend([
                        format!("principle {step}"),
                        format!("critique {step}"),
                        format!("revision {step}"),
                    ]);
                }
                Shape::EvaluateSamples => columns.push(format!("judge {}", columns.len() - 2)),
                Shape::Comparisons | Shape::PpoSamples => columns.push(String::new()),
            }
        }
        columns.truncate(width.max(fixed.len()));
        columns
    }

    fn row(self, r: &Value) -> Vec<String> {
        let prompt = text(r.get("prompt_text").unwrap_or(&r["prompt"]));
        match self {
            Shape::Revisions => {
                let mut row = vec![prompt, text(&r["original"])];
                for step in r["trail"].as_array().into_iter().flatten() {
                    row.extend(["principle", "critique", "revision"].map(|f| text(&step[f])));
                }
                row
            }
            Shape::Comparisons => {
                let details = r["details"].as_array().cloned().unwrap_or_default();
                let column = |f: &str| -> String {
                    details
                        .iter()
                        .map(|d| text(&d[f]))
                        .collect::<Vec<_>>()
                        .join("\n")
                };
                vec![
                    prompt,
                    text(&r["response_a"]),
                    text(&r["response_b"]),
                    text(&r["p_a"]),
                    column("principle"),
                    column("p_a_forward"),
                    column("p_a_swapped"),
                ]
            }
            Shape::PpoSamples => vec![
                text(&r["iteration"]),
                prompt,
                text(&r["response"]),
                text(&r["score"]),
                text(&r["kl"]),
            ],
            Shape::EvaluateSamples => {
                let mut row = vec![
                    prompt,
                    text(&r["policy_response"]),
                    text(&r["reference_response"]),
                ];
                // Each judge's verdict: an object with the policy's outcome.
                for (judge, verdict) in r.as_object().into_iter().flatten() {
                    if let Some(fields) = verdict.as_object().filter(|v| v.contains_key("outcome"))
                    {
                        let figures: Vec<String> = fields
                            .iter()
                            .filter(|(k, v)| *k != "outcome" && v.is_number())
                            .map(|(k, v)| format!("{k} {}", text(v)))
                            .collect();
                        row.push(format!(
                            "{judge}: {} ({})",
                            text(&verdict["outcome"]),
                            figures.join(", ")
                        ));
                    }
                }
                row
            }
        }
    }
}

/// A value as a cell's text: strings as they are, numbers to 4 places.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.4}"),
            _ => n.to_string(),
        },
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn revisions_show_each_step_and_the_draw_is_seeded() {
        let line = |i: usize| {
            serde_json::json!({"prompt": format!("q{i}"), "original": "o",
                "trail": [{"principle": "p1", "critique": "c1", "revision": "r1"},
                          {"principle": "p2", "critique": "c2", "revision": "r2"}],
                "revision": "r2"})
            .to_string()
        };
        let jsonl: String = (0..10).map(|i| line(i) + "\n").collect();
        let a = read_examples("cr", "revisions", &jsonl).unwrap();
        assert_eq!(a.total, 10);
        assert_eq!(a.rows.len(), 3);
        assert_eq!(a.columns.len(), 8);
        assert_eq!(a.columns[6], "critique 2");
        assert_eq!(&a.rows[0][1..5], ["o", "p1", "c1", "r1"]);
        let b = read_examples("cr", "revisions", &jsonl).unwrap();
        assert_eq!(a.rows, b.rows);
        let other = read_examples("cr2", "revisions", &jsonl).unwrap();
        let prompts = |e: &Examples| e.rows.iter().map(|r| r[0].clone()).collect::<Vec<_>>();
        assert!(prompts(&a) != prompts(&other) || a.total <= SHOWN);
    }

    #[test]
    fn ppo_samples_show_the_first_and_the_last_iteration() {
        let line = |it: u64, row: usize| {
            serde_json::json!({"iteration": it, "row": row, "prompt": format!("q{row}"),
                "response": format!("answer {it}.{row}"), "score": 0.5, "kl": 0.25})
            .to_string()
        };
        let jsonl: String = (0..8)
            .map(|row| line(1, row) + "\n")
            .chain((0..8).map(|row| line(20, row) + "\n"))
            .collect();
        let e = read_examples("rl", "samples", &jsonl).unwrap();
        assert_eq!(e.total, 16);
        assert_eq!(
            e.columns,
            ["iteration", "prompt", "response", "score", "KL"]
        );
        let iterations: Vec<&str> = e.rows.iter().map(|r| r[0].as_str()).collect();
        assert_eq!(iterations, ["1", "1", "1", "20", "20", "20"]);
        assert!(e.rows[0][2].starts_with("answer 1."));
        assert!(e.rows[5][2].starts_with("answer 20."));
        assert_eq!(&e.rows[0][3..], ["0.5000", "0.2500"]);
        // One iteration only: shown once.
        let one: String = (0..8).map(|row| line(1, row) + "\n").collect();
        assert_eq!(
            read_examples("rl", "samples", &one).unwrap().rows.len(),
            SHOWN
        );
    }

    #[test]
    fn evaluate_samples_show_each_judges_verdict() {
        let line = r#"{"prompt": "p", "policy_response": "a", "reference_response": "b", "reward_model": {"policy": 0.5, "reference": 0.25, "outcome": "win"}, "kl": 0.1}"#;
        let e = read_examples("ev", "samples", line).unwrap();
        assert_eq!(
            e.rows[0][3],
            "reward_model: win (policy 0.5000, reference 0.2500)"
        );
        assert!(read_examples("x", "samples", r#"{"text": "t"}"#).is_none());
    }
}
