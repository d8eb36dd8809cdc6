//! Test fixtures for the ops that read and write data: a [`StageSpec`] whose
//! folders live in a temporary directory.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::protocol::{Metrics, StageSpec};
use crate::{CancelFlag, NullReporter, OpDecl, Placement, StageContext};

/// A stage of `op` with `params` (normalised by the op) and `inputs`,
/// writing into `<dir>/out`.
pub(crate) fn spec(
    op: &OpDecl,
    dir: &Path,
    params: serde_json::Value,
    inputs: &[(&str, PathBuf)],
) -> StageSpec {
    let out_dir = dir.join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    StageSpec {
        pipeline: "test".into(),
        stage: "s".into(),
        op: op.name.into(),
        op_version: op.version,
        params: op.normalize_params(&params).expect("valid params"),
        inputs: inputs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect::<BTreeMap<_, _>>(),
        outputs: op
            .declared_outputs()
            .iter()
            .map(|p| p.name.to_string())
            .collect(),
        out_dir,
        work_dir: dir.to_path_buf(),
        checkpoint_dir: dir.join("ckpt"),
        device: "cpu".into(),
        seed: 0,
        threads: None,
    }
}

/// Runs `op` on `spec` with no progress output and no cancellation.
pub(crate) fn run(op: &OpDecl, spec: &StageSpec) -> anyhow::Result<Metrics> {
    let Placement::Engine(run) = op.placement else {
        panic!("{} runs in the worker", op.name);
    };
    let cancel = CancelFlag::default();
    run(&StageContext {
        spec,
        reporter: &NullReporter,
        cancel: &cancel,
    })
}

/// The file of the real HH-RLHF sample shared by the tests.
pub(crate) fn hh_rlhf_sample() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/hh-rlhf/harmless-base-test-1000.jsonl"
    ))
}
