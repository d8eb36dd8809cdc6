//! Data-parallel training stages (`data_parallel: N`) on torch's own c10d
//! collectives, Gloo on CPU: two worker processes take the same steps as
//! one process on the whole batch (gradients within 1e-6, weights within
//! 1e-5 after several steps), rank 0 alone writes the outputs, the outputs
//! are reproducible run to run, and a rank killed mid-step fails the stage
//! within a timeout with a message naming the stage and the rank, leaving
//! nothing in the cache.
mod common;
use common::*;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A tiny model pretrained from the sample data, then the training ops on
/// it with `data_parallel: ${params.dp}`. Batches of 5 split 3 + 2 between
/// two ranks, and the examples differ in length: the token-weighted SFT
/// loss must still come out as the whole batch's. No dropout: ranks would
/// draw other masks than one process does.
const MANIFEST: &str = r#"version: 1
name: dp
seed: 3
params:
  dp: 1
stages:
  hh:
    op: dataset.import
    inputs: { source: hh.jsonl }
  tok:
    op: tokenizer.train
    inputs: { data: "${stages.hh.data}" }
    params: { vocab_size: 384 }
  base:
    op: lm.pretrain
    inputs: { data: "${stages.hh.data}", tokenizer: "${stages.tok.tokenizer}" }
    params: { width: 32, layers: 1, heads: 2, positions: 160, seq_len: 48, batch_size: 4, max_steps: 2 }
  sft:
    op: sft
    inputs: { model: "${stages.base.model}", data: "${stages.hh.data}" }
    params: { response_field: chosen, max_len: 96, batch_size: 5, max_steps: 3, lr: 0.001, checkpoint_every: 0, dropout: false, data_parallel: "${params.dp}" }
"#;

fn project() -> Project {
    let p = Project::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sample = std::fs::read_to_string(root.join("examples/hh-rlhf-sample.jsonl")).unwrap();
    p.write(
        "hh.jsonl",
        &sample.lines().take(24).collect::<Vec<_>>().join("\n"),
    );
    p.write("pipeline.yaml", MANIFEST);
    p
}

/// `alignflow run` of `target` with `data_parallel: dp`, the gradients of
/// every step written to `grads` (the worker's test hook), and `env`.
fn run(p: &Project, target: &str, dp: u32, grads: &Path, env: &[(&str, &str)]) -> std::process::Output {
    std::fs::create_dir_all(grads).unwrap();
    let set = format!("params.dp={dp}");
    let mut cmd = p.cmd(&["run", "pipeline.yaml", "--quiet", "--target", target, "--set", &set]);
    cmd.env("ALIGNFLOW_DIST_TEST_GRADS", grads);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("alignflow runs")
}

fn ok(out: std::process::Output) {
    assert!(
        out.status.success(),
        "run failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every float32 tensor of the safetensors file(s) at `path` (a file, or
/// the folder of a saved model), by name.
fn tensors(path: &Path) -> BTreeMap<String, Vec<f32>> {
    let files: Vec<PathBuf> = if path.is_dir() {
        walk(path)
            .into_iter()
            .filter(|f| f.extension().is_some_and(|e| e == "safetensors"))
            .collect()
    } else {
        vec![path.to_path_buf()]
    };
    assert!(!files.is_empty(), "no safetensors under {}", path.display());
    let mut out = BTreeMap::new();
    for file in files {
        let bytes = std::fs::read(&file).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            if view.dtype() != safetensors::Dtype::F32 {
                continue;
            }
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            out.insert(name, values);
        }
    }
    out
}

/// The largest absolute difference between same-named tensors of `a` and
/// `b`, which must hold the same names and shapes.
fn max_diff(a: &BTreeMap<String, Vec<f32>>, b: &BTreeMap<String, Vec<f32>>) -> f64 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    let mut worst = 0.0f64;
    for (name, x) in a {
        let y = &b[name];
        assert_eq!(x.len(), y.len(), "{name}");
        for (u, v) in x.iter().zip(y) {
            worst = worst.max((*u as f64 - *v as f64).abs());
        }
    }
    worst
}

/// The path of `stage`'s output `name` with `data_parallel: dp`.
fn output_path(p: &Project, stage: &str, name: &str, dp: u32) -> PathBuf {
    let set = format!("params.dp={dp}");
    let args = ["show", "pipeline.yaml", stage, "--json", "--set", &set];
    let shown: serde_json::Value = serde_json::from_str(&p.ok(&args)).unwrap();
    shown[name]["path"].as_str().unwrap().into()
}

#[test]
fn two_gloo_ranks_take_the_steps_of_one_process_on_the_whole_batch() {
    let p = project();
    let (one, two) = (p.path("grads-1"), p.path("grads-2"));
    ok(run(&p, "sft", 1, &one, &[]));
    let single = tensors(&output_path(&p, "sft", "model", 1));
    let single_metrics = std::fs::read_to_string(output_path(&p, "sft", "metrics", 1)).unwrap();
    ok(run(&p, "sft", 2, &two, &[]));
    let parallel = tensors(&output_path(&p, "sft", "model", 2));

    // The same gradients at every step: rank 0's and rank 1's (the
    // all-reduce leaves both the same), and one process's on the batch.
    let mut worst_grad = 0.0f64;
    for step in 1..=3 {
        let file = |dir: &Path, rank: u32| dir.join(format!("rank-{rank}-step-{step}.safetensors"));
        let g1 = tensors(&file(&one, 0));
        let (g2, g2_other) = (tensors(&file(&two, 0)), tensors(&file(&two, 1)));
        assert!(g1.values().flatten().any(|v| *v != 0.0), "step {step}: no gradient");
        assert_eq!(g2, g2_other, "step {step}: the ranks step with different gradients");
        worst_grad = worst_grad.max(max_diff(&g1, &g2));
    }
    assert!(!one.join("rank-1-step-1.safetensors").exists());
    assert!(worst_grad < 1e-6, "gradients differ by {worst_grad}");

    // After three AdamW steps, the same weights; and they did move.
    let worst_weight = max_diff(&single, &parallel);
    assert!(worst_weight < 1e-5, "weights differ by {worst_weight}");
    let base = tensors(&output_path(&p, "base", "model", 2));
    assert!(max_diff(&base, &parallel) > 1e-4, "training changed nothing");
    eprintln!("max |grad diff| {worst_grad:e}, max |weight diff| {worst_weight:e}");

    // Rank 0 wrote the metrics, one line per step, losses as one process's.
    let parallel_metrics = std::fs::read_to_string(output_path(&p, "sft", "metrics", 2)).unwrap();
    let losses = |text: &str| -> Vec<f64> {
        text.lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
            .collect()
    };
    let (l1, l2) = (losses(&single_metrics), losses(&parallel_metrics));
    assert_eq!(l2.len(), 3, "{parallel_metrics}");
    for (a, b) in l1.iter().zip(&l2) {
        assert!((a - b).abs() < 1e-5, "losses {l1:?} vs {l2:?}");
    }

    // Run to run, two ranks give the same bits (a fresh cache).
    let again = Project::new();
    again.write("hh.jsonl", &p.read("hh.jsonl"));
    again.write("pipeline.yaml", MANIFEST);
    ok(run(&again, "sft", 2, &again.path("grads"), &[]));
    assert_eq!(tensors(&output_path(&again, "sft", "model", 2)), parallel);
}

#[test]
fn a_rank_killed_mid_step_fails_the_stage_naming_it_and_caches_nothing() {
    let p = project();
    let grads = p.path("grads");
    // Everything upstream first, so the timing below is the stage's.
    ok(run(&p, "base", 1, &p.path("grads-base"), &[]));
    let start = Instant::now();
    let out = run(
        &p,
        "sft",
        2,
        &grads,
        &[("ALIGNFLOW_DIST_TEST_KILL", "1:2"), ("ALIGNFLOW_DIST_TIMEOUT_S", "20")],
    );
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the run should fail:\n{stderr}");
    assert!(
        stderr.contains("stage `sft`") && stderr.contains("rank 1 of 2 was killed by signal 9"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(60), "the failure took {took:?}");
    // Step 1 finished on both ranks, step 2 on neither.
    assert!(grads.join("rank-1-step-1.safetensors").exists());
    assert!(!grads.join("rank-0-step-2.safetensors").exists());

    // Nothing of the failed stage is cached: the next run trains it.
    let ran = stages_with_status(
        &String::from_utf8(run(&p, "sft", 2, &grads, &[]).stdout).unwrap(),
        "ran",
    );
    assert_eq!(ran, set(&["sft"]));
}
