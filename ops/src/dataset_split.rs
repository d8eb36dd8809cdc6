//! `dataset.split`: a seeded train/test split of a JSONL file.
//!
//! Lines are copied byte for byte, each side keeping the source order; only
//! the choice of the test records is random. With `group_by`, records that
//! share the field's value are one unit (a prompt with several comparisons
//! never leaks across the split).
use std::collections::HashMap;
use std::path::PathBuf;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::data::{read_lines, DataError, JsonlWriter};
use crate::protocol::Metrics;
use crate::{OpDecl, OpParams, Outputs, ParamError, ParamsDecl, Placement, Port, StageContext};

/// Params of `dataset.split`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SplitParams {
    /// Size of the test side: a fraction of the records when below 1
    /// (`0.1`), a number of records (an integer) from 1 up (`500`). With
    /// `group_by`, whole groups are taken until the test side reaches it.
    pub test: f64,
    /// Pick the test records at random (seeded by the stage seed); false
    /// takes the last records of the file.
    #[serde(default = "default_shuffle")]
    pub shuffle: bool,
    /// A top-level field: records with equal values land on the same side.
    #[serde(default)]
    pub group_by: Option<String>,
}

fn default_shuffle() -> bool {
    true
}

impl OpParams for SplitParams {
    fn check(&self) -> Result<(), ParamError> {
        let t = self.test;
        let message = if !t.is_finite() || t <= 0.0 {
            Some(format!(
                "`test` must be a positive fraction or count, got {t}"
            ))
        } else if t >= 1.0 && t.fract() != 0.0 {
            Some(format!(
                "`test` from 1 up is a count of records and must be an integer, got {t}"
            ))
        } else {
            None
        };
        match message {
            Some(message) => Err(ParamError {
                field: "test".into(),
                message,
                suggestion: None,
            }),
            None => Ok(()),
        }
    }
}

impl SplitParams {
    /// How many records the test side should hold, out of `n`.
    fn test_target(&self, n: usize) -> usize {
        if self.test < 1.0 {
            (n as f64 * self.test).round() as usize
        } else {
            self.test as usize
        }
    }
}

/// Failures of `dataset.split`.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    #[error("stage `{stage}`: {source}")]
    Data { stage: String, source: DataError },
    #[error("stage `{stage}`: {}:{line}: cannot read `group_by` field `{field}`: {reason}", path.display())]
    Group {
        stage: String,
        path: PathBuf,
        line: usize,
        field: String,
        reason: String,
    },
    #[error("stage `{stage}`: splitting {records} records ({groups} groups) with test = {test} leaves the {side} side empty")]
    EmptySide {
        stage: String,
        records: usize,
        groups: usize,
        test: f64,
        side: &'static str,
    },
}

/// The `dataset.split` op.
pub const OP: OpDecl = OpDecl {
    name: "dataset.split",
    version: 1,
    summary: "seeded train/test split of a JSONL file, optionally keeping groups together",
    inputs: &[Port {
        name: "data",
        doc: "JSONL records",
        required: true,
        volatile: false,
    }],
    outputs: Outputs::Declared(&[
        Port {
            name: "train",
            doc: "JSONL: the records not in `test`, in source order",
            required: true,
            volatile: false,
        },
        Port {
            name: "test",
            doc: "JSONL: the held-out records, in source order",
            required: true,
            volatile: false,
        },
    ]),
    params: ParamsDecl::of::<SplitParams>(),
    placement: Placement::Engine(run),
    conventions: &[],
};

pub fn run(ctx: &StageContext<'_>) -> anyhow::Result<Metrics> {
    let params: SplitParams = ctx.params()?;
    let stage = &ctx.spec.stage;
    let path = ctx.input("data")?;
    let data_err = |source| SplitError::Data {
        stage: stage.clone(),
        source,
    };

    // Every non-blank line, and for each the index of its group; groups
    // are numbered in order of first appearance.
    let mut lines: Vec<Vec<u8>> = Vec::new();
    let mut group_of: Vec<usize> = Vec::new();
    let mut group_ids: HashMap<String, usize> = HashMap::new();
    let mut group_sizes: Vec<usize> = Vec::new();
    for (line_no, bytes) in read_lines(path).map_err(data_err)? {
        ctx.cancel.check()?;
        let bytes = bytes.map_err(|err| {
            data_err(DataError::Read {
                path: path.to_path_buf(),
                line: line_no,
                source: err,
            })
        })?;
        let group = match &params.group_by {
            None => group_sizes.len(),
            Some(field) => {
                let group_err = |reason: String| SplitError::Group {
                    stage: stage.clone(),
                    path: path.to_path_buf(),
                    line: line_no,
                    field: field.clone(),
                    reason,
                };
                let value: serde_json::Value =
                    serde_json::from_slice(&bytes).map_err(|e| group_err(e.to_string()))?;
                let key = value
                    .get(field)
                    .ok_or_else(|| group_err("no such field".into()))?;
                // The value's JSON text is its identity (`"a"` and `1` differ).
                let next = group_sizes.len();
                *group_ids.entry(key.to_string()).or_insert(next)
            }
        };
        if group == group_sizes.len() {
            group_sizes.push(0);
        }
        group_sizes[group] += 1;
        group_of.push(group);
        lines.push(bytes);
    }

    let records = lines.len();
    let target = params.test_target(records);
    let mut order: Vec<usize> = (0..group_sizes.len()).collect();
    if params.shuffle {
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(ctx.spec.seed));
    }
    // Test groups are taken from the end of the order until the target
    // is reached (a group may overshoot it by less than its size).
    let mut in_test = vec![false; group_sizes.len()];
    let mut test_count = 0;
    for &group in order.iter().rev() {
        if test_count >= target {
            break;
        }
        in_test[group] = true;
        test_count += group_sizes[group];
    }
    let empty_side = if test_count == 0 {
        Some("test")
    } else if test_count == records {
        Some("train")
    } else {
        None
    };
    if let Some(side) = empty_side {
        return Err(SplitError::EmptySide {
            stage: stage.clone(),
            records,
            groups: group_sizes.len(),
            test: params.test,
            side,
        }
        .into());
    }

    let mut train = JsonlWriter::create(&ctx.output("train")).map_err(data_err)?;
    let mut test = JsonlWriter::create(&ctx.output("test")).map_err(data_err)?;
    for (i, (bytes, group)) in lines.iter().zip(&group_of).enumerate() {
        if i % 4096 == 0 {
            ctx.cancel.check()?;
            ctx.reporter
                .progress(i as u64, Some(records as u64), "writing");
        }
        let side = if in_test[*group] {
            &mut test
        } else {
            &mut train
        };
        side.write_raw(bytes).map_err(data_err)?;
    }
    let train = train.finish().map_err(data_err)?;
    let test = test.finish().map_err(data_err)?;

    let mut metrics = Metrics::new();
    metrics.insert("records".into(), records.into());
    metrics.insert("train".into(), train.into());
    metrics.insert("test".into(), test.into());
    if params.group_by.is_some() {
        let test_groups = in_test.iter().filter(|t| **t).count();
        metrics.insert("groups".into(), group_sizes.len().into());
        metrics.insert("test_groups".into(), test_groups.into());
    }
    Ok(metrics)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    use super::*;
    use crate::data::testing::{run, spec};
    use serde_json::json;

    /// `n` records `{"id": i, "prompt": "p<i / per_group>"}`.
    fn write_records(dir: &Path, n: usize, per_group: usize) -> PathBuf {
        let path = dir.join("data.jsonl");
        let text: String = (0..n)
            .map(|i| format!("{{\"id\": {i}, \"prompt\": \"p{}\"}}\n", i / per_group))
            .collect();
        std::fs::write(&path, text).unwrap();
        path
    }

    fn split(
        dir: &Path,
        params: serde_json::Value,
        seed: u64,
    ) -> anyhow::Result<(Metrics, String, String)> {
        let data = write_records(dir, 100, 4);
        let mut spec = spec(&OP, dir, params, &[("data", data)]);
        spec.seed = seed;
        let metrics = run(&OP, &spec)?;
        let read = |name| std::fs::read_to_string(dir.join("out").join(name)).unwrap();
        Ok((metrics, read("train"), read("test")))
    }

    #[test]
    fn ratio_and_count() {
        let dir = tempfile::tempdir().unwrap();
        let (m, train, test) = split(dir.path(), json!({"test": 0.1}), 0).unwrap();
        assert_eq!(
            (m["records"].clone(), m["train"].clone(), m["test"].clone()),
            (json!(100), json!(90), json!(10))
        );
        assert_eq!((train.lines().count(), test.lines().count()), (90, 10));
        // Lines are copied as they were, in source order.
        let source = std::fs::read_to_string(dir.path().join("data.jsonl")).unwrap();
        let mut all: Vec<&str> = train.lines().chain(test.lines()).collect();
        all.sort_by_key(|l| source.find(l).unwrap());
        assert_eq!(all.join("\n") + "\n", source);

        let (m, _, test) = split(dir.path(), json!({"test": 25}), 0).unwrap();
        assert_eq!(
            (m["train"].clone(), m["test"].clone()),
            (json!(75), json!(25))
        );
        assert_eq!(test.lines().count(), 25);

        // Without shuffling the test side is the end of the file.
        let (_, _, test) = split(dir.path(), json!({"test": 2, "shuffle": false}), 0).unwrap();
        assert_eq!(
            test,
            "{\"id\": 98, \"prompt\": \"p24\"}\n{\"id\": 99, \"prompt\": \"p24\"}\n"
        );
    }

    #[test]
    fn seeded() {
        let dir = tempfile::tempdir().unwrap();
        let a = split(dir.path(), json!({"test": 0.2}), 7).unwrap();
        let b = split(dir.path(), json!({"test": 0.2}), 7).unwrap();
        let c = split(dir.path(), json!({"test": 0.2}), 8).unwrap();
        assert_eq!((&a.1, &a.2), (&b.1, &b.2));
        assert_ne!(a.2, c.2);
    }

    #[test]
    fn group_by_keeps_groups_together() {
        let dir = tempfile::tempdir().unwrap();
        let (m, train, test) =
            split(dir.path(), json!({"test": 0.3, "group_by": "prompt"}), 3).unwrap();
        assert_eq!(m["groups"], 25);
        let prompts = |text: &str| -> BTreeSet<String> {
            text.lines()
                .map(|l| {
                    serde_json::from_str::<serde_json::Value>(l).unwrap()["prompt"]
                        .as_str()
                        .unwrap()
                        .to_string()
                })
                .collect()
        };
        let (train_p, test_p) = (prompts(&train), prompts(&test));
        assert!(train_p.is_disjoint(&test_p));
        assert_eq!(train_p.len() + test_p.len(), 25);
        // 30 records asked for, groups of 4: eight groups.
        assert_eq!(
            (m["test"].clone(), m["test_groups"].clone()),
            (json!(32), json!(8))
        );
    }

    #[test]
    fn empty_side_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let err = split(dir.path(), json!({"test": 100}), 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("leaves the train side empty"), "{err}");
        let err = split(dir.path(), json!({"test": 0.001}), 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("leaves the test side empty"), "{err}");
        let err = split(dir.path(), json!({"test": 0.1, "group_by": "nope"}), 0)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("data.jsonl:1: cannot read `group_by` field `nope`"),
            "{err}"
        );
    }

    #[test]
    fn params_checked() {
        assert!(OP
            .normalize_params(&json!({"test": 2.5}))
            .unwrap_err()
            .message
            .contains("integer"));
        assert_eq!(
            OP.normalize_params(&json!({"test": -1})).unwrap_err().field,
            "test"
        );
        assert!(OP.normalize_params(&json!({})).is_err());
        assert_eq!(
            OP.normalize_params(&json!({"test": 10})).unwrap(),
            json!({"test": 10.0, "shuffle": true, "group_by": null})
        );
    }
}
