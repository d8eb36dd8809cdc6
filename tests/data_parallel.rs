//! Data-parallel training stages (`data_parallel: N`: `sft`, `pm.pretrain`,
//! `pm.train`, `dpo`, `lm.pretrain`, `ppo`) on torch's own c10d collectives,
//! Gloo on CPU: two worker processes take the same steps as one process on
//! the whole batch (gradients within 1e-6, weights within 1e-5 after several
//! steps; `ppo` also samples the same responses), rank 0 alone writes the outputs, the outputs
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
///
/// `pm`'s and `pmp`'s AdamW `eps` is 1e-6, not 1e-8: the Bradley-Terry loss depends on
/// reward differences only, so the true gradient of the final layer norm's
/// bias is zero (a shift moves both rewards alike) and the computed one is
/// rounding noise (about 1e-9), which AdamW divides by its own square root
/// plus `eps`: with 1e-8 that noise takes full learning-rate steps of
/// arbitrary sign, in one process as in two (1.4e-4 apart after three
/// steps, measured). With 1e-6 noise stays noise; real gradients (1e-4 and
/// up) are stepped alike.
const MANIFEST: &str = r#"version: 1
name: dp
seed: 3
params:
  dp: 1
  ckpt: 0
  ppo_dp: 1
  placement: {}
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
    params: { response_field: chosen, max_len: 96, batch_size: 5, max_steps: 3, lr: 0.001, checkpoint_every: "${params.ckpt}", dropout: false, data_parallel: "${params.dp}" }
  pm:
    op: pm.train
    inputs: { model: "${stages.base.model}", comparisons: "${stages.hh.data}" }
    params: { max_len: 96, batch_size: 5, max_steps: 3, lr: 0.001, eps: 1.0e-6, checkpoint_every: 0, dropout: false, data_parallel: "${params.dp}" }
  pmp:
    op: pm.pretrain
    inputs: { model: "${stages.base.model}", data: "${stages.hh.data}" }
    params: { max_len: 96, batch_size: 5, max_steps: 3, lr: 0.001, eps: 1.0e-6, checkpoint_every: 0, dropout: false, data_parallel: "${params.dp}" }
  lm:
    op: lm.pretrain
    inputs: { data: "${stages.hh.data}", tokenizer: "${stages.tok.tokenizer}" }
    params: { width: 32, layers: 1, heads: 2, positions: 160, seq_len: 48, batch_size: 5, max_steps: 3, lr: 0.001, checkpoint_every: 0, data_parallel: "${params.dp}" }
  ref:
    op: dpo.reference
    inputs: { model: "${stages.base.model}", comparisons: "${stages.hh.data}" }
    params: { max_len: 96 }
  dpo:
    op: dpo
    inputs: { policy: "${stages.base.model}", comparisons: "${stages.hh.data}", reference_logps: "${stages.ref.reference_logps}" }
    params: { batch_size: 5, max_steps: 3, lr: 0.001, checkpoint_every: 0, dropout: false, data_parallel: "${params.dp}" }
  ppo:
    op: ppo
    inputs: { policy: "${stages.base.model}", reward_model: "${stages.pm.model}", prompts: prompts.jsonl }
    params: { iterations: 3, batch_size: 5, max_new_tokens: 8, ppo_epochs: 2, minibatches: 2, lr: 0.001, reward_norm: { samples: 6 }, checkpoint_every: "${params.ckpt}", data_parallel: "${params.ppo_dp}", placement: "${params.placement}" }
  grpo:
    op: ppo
    inputs: { policy: "${stages.base.model}", reward_model: "${stages.pm.model}", prompts: prompts.jsonl }
    params: { iterations: 3, batch_size: 5, samples_per_prompt: 2, advantage: grpo, max_new_tokens: 8, minibatches: 3, lr: 0.001, checkpoint_every: 0, data_parallel: "${params.ppo_dp}" }
"#;

fn project() -> Project {
    let p = Project::new();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sample = std::fs::read_to_string(root.join("examples/hh-rlhf-sample.jsonl")).unwrap();
    p.write(
        "hh.jsonl",
        &sample.lines().take(24).collect::<Vec<_>>().join("\n"),
    );
    // `ppo`'s prompts: each conversation up to its first assistant turn.
    let prompts: String = sample
        .lines()
        .take(24)
        .map(|line| {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            let chosen = record["chosen"].as_str().unwrap();
            let end = chosen.find("\n\nAssistant:").unwrap() + "\n\nAssistant:".len();
            serde_json::json!({ "prompt": &chosen[..end] }).to_string() + "\n"
        })
        .collect();
    p.write("prompts.jsonl", &prompts);
    p.write("pipeline.yaml", MANIFEST);
    p
}

/// `alignflow run` of `target` with `data_parallel: dp`, the gradients of
/// every step written to `grads` (the worker's test hook), and `env`.
fn run(
    p: &Project,
    target: &str,
    dp: u32,
    grads: &Path,
    env: &[(&str, &str)],
) -> std::process::Output {
    run_with(p, target, &[&format!("params.dp={dp}")], grads, env)
}

/// [`run`] with the `--set` overrides `sets`.
fn run_with(
    p: &Project,
    target: &str,
    sets: &[&str],
    grads: &Path,
    env: &[(&str, &str)],
) -> std::process::Output {
    std::fs::create_dir_all(grads).unwrap();
    let mut args = vec!["run", "pipeline.yaml", "--quiet", "--target", target];
    for set in sets {
        args.extend(["--set", set]);
    }
    let mut cmd = p.cmd(&args);
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
    output_path_with(p, stage, name, &[&format!("params.dp={dp}")])
}

/// The path of `stage`'s output `name` under the `--set` overrides `sets`.
fn output_path_with(p: &Project, stage: &str, name: &str, sets: &[&str]) -> PathBuf {
    let mut args = vec!["show", "pipeline.yaml", stage, "--json"];
    for set in sets {
        args.extend(["--set", set]);
    }
    let shown: serde_json::Value = serde_json::from_str(&p.ok(&args)).unwrap();
    shown[name]["path"].as_str().unwrap().into()
}

/// Trains `stage` with one process and with two Gloo ranks and asserts they
/// take the same steps: at every step the same gradients (both ranks' the
/// same, within 1e-6 of one process's), after all of them the same weights
/// (1e-5, and moved from the base model's), and the same metrics lines
/// (every figure but the timing, 1e-5 relative). Returns the project and
/// the two-rank model's tensors.
fn two_ranks_equal_one(stage: &str) -> (Project, BTreeMap<String, Vec<f32>>) {
    let p = project();
    let (one, two) = (p.path("grads-1"), p.path("grads-2"));
    // Upstream stages first, with their own gradients elsewhere.
    ok(run(&p, "base", 1, &p.path("grads-base"), &[]));
    ok(run(&p, stage, 1, &one, &[]));
    let single = tensors(&output_path(&p, stage, "model", 1));
    let single_metrics = std::fs::read_to_string(output_path(&p, stage, "metrics", 1)).unwrap();
    ok(run(&p, stage, 2, &two, &[]));
    let parallel = tensors(&output_path(&p, stage, "model", 2));
    let parallel_metrics = std::fs::read_to_string(output_path(&p, stage, "metrics", 2)).unwrap();

    let mut worst_grad = 0.0f64;
    for step in 1..=3 {
        let file = |dir: &Path, rank: u32| dir.join(format!("rank-{rank}-step-{step}.safetensors"));
        let g1 = tensors(&file(&one, 0));
        let (g2, g2_other) = (tensors(&file(&two, 0)), tensors(&file(&two, 1)));
        assert!(
            g1.values().flatten().any(|v| *v != 0.0),
            "{stage} step {step}: no gradient"
        );
        assert_eq!(
            g2, g2_other,
            "{stage} step {step}: the ranks step with different gradients"
        );
        worst_grad = worst_grad.max(max_diff(&g1, &g2));
    }
    assert!(!one.join("rank-1-step-1.safetensors").exists());
    assert!(
        worst_grad < 1e-6,
        "{stage}: gradients differ by {worst_grad}"
    );

    let worst_weight = max_diff(&single, &parallel);
    assert!(
        worst_weight < 1e-5,
        "{stage}: weights differ by {worst_weight}"
    );
    let base = tensors(&output_path(&p, "base", "model", 2));
    let moved: f64 = base
        .iter()
        .filter_map(|(name, w)| Some(max_diff_one(w, parallel.get(name)?)))
        .fold(0.0, f64::max);
    assert!(moved > 1e-4, "{stage}: training changed nothing");
    eprintln!("{stage}: max |grad diff| {worst_grad:e}, max |weight diff| {worst_weight:e}");

    // Rank 0 wrote the metrics, one line per step (and the same held-out
    // figures after), the figures summed over the ranks.
    assert_same_metrics(stage, &single_metrics, &parallel_metrics, 3);
    (p, parallel)
}

/// The metrics lines of one process (`single`) and of several ranks
/// (`parallel`): as many, at least `at_least`, with the same keys, and every
/// figure but the timings within 1e-5 (relative above 1).
fn assert_same_metrics(stage: &str, single_metrics: &str, parallel_metrics: &str, at_least: usize) {
    let lines = |text: &str| -> Vec<serde_json::Value> {
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (m1, m2) = (lines(single_metrics), lines(parallel_metrics));
    assert_eq!(m1.len(), m2.len(), "{parallel_metrics}");
    assert!(m2.len() >= at_least, "{parallel_metrics}");
    for (a, b) in m1.iter().zip(&m2) {
        let (a, b) = (a.as_object().unwrap(), b.as_object().unwrap());
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
        for (key, x) in a {
            let y = &b[key];
            // DPO's reward accuracy counts the signs of the margins: where
            // they are rounding noise (step 1: the policy is the reference,
            // every implicit reward is about 0) it is noise too.
            let noise = a
                .get("margin")
                .and_then(|m| m.as_f64())
                .is_some_and(|m| m.abs() < 1e-4);
            match (x.as_f64(), y.as_f64()) {
                _ if key == "tokens_per_s" || key == "seconds" => {}
                _ if key == "reward_accuracy" && noise => {}
                (Some(x), Some(y)) => assert!(
                    (x - y).abs() <= 1e-5 * x.abs().max(1.0),
                    "{stage}: `{key}` {x} vs {y}:\n{single_metrics}\n{parallel_metrics}"
                ),
                _ => assert_eq!(x, y, "{stage}: `{key}`"),
            }
        }
    }
}

/// The largest absolute difference between two equally long vectors.
fn max_diff_one(x: &[f32], y: &[f32]) -> f64 {
    x.iter()
        .zip(y)
        .map(|(u, v)| (*u as f64 - *v as f64).abs())
        .fold(0.0, f64::max)
}

#[test]
fn sft_on_two_gloo_ranks_takes_the_steps_of_one_process_on_the_whole_batch() {
    let (p, parallel) = two_ranks_equal_one("sft");
    // Run to run, two ranks give the same bits (a fresh cache).
    let again = Project::new();
    again.write("hh.jsonl", &p.read("hh.jsonl"));
    again.write("pipeline.yaml", MANIFEST);
    ok(run(&again, "sft", 2, &again.path("grads"), &[]));
    assert_eq!(tensors(&output_path(&again, "sft", "model", 2)), parallel);
}

#[test]
fn pm_train_on_two_gloo_ranks_takes_the_steps_of_one_process_on_the_whole_batch() {
    two_ranks_equal_one("pm");
}

/// An epoch's last batch of one pair leaves rank 1 nothing: it adds
/// nothing to the step (its preference model crashed on the empty batch),
/// and the two ranks still take the one process's steps.
#[test]
fn pm_train_on_two_ranks_takes_a_last_batch_smaller_than_the_ranks() {
    let p = project();
    // 24 comparisons, none held out: batches of 23 and then 1.
    p.write(
        "pipeline.yaml",
        &MANIFEST.replace(
            "params: { max_len: 96, batch_size: 5, max_steps: 3, lr: 0.001, eps: 1.0e-6, checkpoint_every: 0, dropout: false, data_parallel: \"${params.dp}\" }\n  pmp:",
            "params: { max_len: 96, batch_size: 23, epochs: 1, eval_fraction: 0, lr: 0.001, eps: 1.0e-6, checkpoint_every: 0, dropout: false, data_parallel: \"${params.dp}\" }\n  pmp:",
        ),
    );
    assert!(p.read("pipeline.yaml").contains("batch_size: 23"));
    ok(run(&p, "base", 1, &p.path("grads-base"), &[]));
    ok(run(&p, "pm", 1, &p.path("grads-1"), &[]));
    ok(run(&p, "pm", 2, &p.path("grads-2"), &[]));
    let (single, parallel) = (
        tensors(&output_path(&p, "pm", "model", 1)),
        tensors(&output_path(&p, "pm", "model", 2)),
    );
    let worst = max_diff(&single, &parallel);
    assert!(worst < 1e-5, "weights differ by {worst}");
    assert!(p.path("grads-2").join("rank-1-step-2.safetensors").exists());
}

#[test]
fn pm_pretrain_on_two_gloo_ranks_takes_the_steps_of_one_process_on_the_whole_batch() {
    two_ranks_equal_one("pmp");
}

#[test]
fn lm_pretrain_on_two_gloo_ranks_takes_the_steps_of_one_process_on_the_whole_batch() {
    two_ranks_equal_one("lm");
}

#[test]
fn dpo_on_two_gloo_ranks_takes_the_steps_of_one_process_on_the_whole_batch() {
    two_ranks_equal_one("dpo");
}

/// `ppo` (`stage`) with one process and with two Gloo ranks, three
/// iterations of minibatches split unevenly between the ranks: the same
/// gradients at every policy step (both ranks', within 1e-6 of one
/// process's), the same policy after (5e-5, moved from the base model's),
/// the same metrics lines (1e-5) and the same responses in `samples`.
fn ppo_two_ranks_equal_one(stage: &str) {
    let p = project();
    let set = |n: u32| format!("params.ppo_dp={n}");
    let (one, two) = (p.path("grads-1"), p.path("grads-2"));
    ok(run_with(&p, "pm", &[], &p.path("grads-pm"), &[]));
    ok(run_with(&p, stage, &[&set(1)], &one, &[]));
    ok(run_with(&p, stage, &[&set(2)], &two, &[]));
    let (mut first_grad, mut worst_grad) = (0.0f64, 0.0f64);
    let mut steps = 0;
    for step in 1.. {
        let file = |dir: &Path, rank: u32| dir.join(format!("rank-{rank}-step-{step}.safetensors"));
        if !file(&one, 0).exists() {
            break;
        }
        let g1 = tensors(&file(&one, 0));
        let (g2, g2_other) = (tensors(&file(&two, 0)), tensors(&file(&two, 1)));
        assert_eq!(
            g2, g2_other,
            "{stage} step {step}: the ranks step with different gradients"
        );
        let diff = max_diff(&g1, &g2);
        if step == 1 {
            first_grad = diff;
        }
        worst_grad = worst_grad.max(diff);
        steps = step;
    }
    // 3 iterations x 2 epochs x 2 minibatches (GRPO: 1 x 3).
    assert!(steps >= 9, "{stage}: {steps} policy steps");
    // The first step's gradients come from the same weights and the same
    // rollout: only the order of the sums differs.
    assert!(
        first_grad < 1e-6,
        "{stage}: the first step's gradients differ by {first_grad}"
    );
    // Later steps start from weights that differ by the rounding of the
    // earlier steps, grown by AdamW (below): their gradients differ a little
    // more, by an amount that depends on the CPU's kernels (measured: 8e-7
    // on an AVX-512 machine, 4.2e-6 on an AVX2 one).
    assert!(
        worst_grad < 1e-5,
        "{stage}: gradients differ by {worst_grad}"
    );
    let path = |name: &str, n: u32| output_path_with(&p, stage, name, &[&set(n)]);
    let (single, parallel) = (tensors(&path("model", 1)), tensors(&path("model", 2)));
    // After 9 to 12 AdamW steps at lr 1e-3, whose update divides each
    // gradient by its running RMS, a rounding-level difference in a gradient
    // that is itself tiny (the rows of the position embeddings that few
    // tokens reach) becomes a step-level one: up to lr per step in the worst
    // case, measured 1.4e-5 (AVX-512) and 5.5e-5 (AVX2). Every other tensor
    // stays within 1e-5 (measured 4e-6 and 5.5e-6).
    let positions = "transformer.wpe.weight";
    let worst_of = |pick: &dyn Fn(&str) -> bool| {
        let keep = |m: &BTreeMap<String, Vec<f32>>| -> BTreeMap<String, Vec<f32>> {
            m.iter()
                .filter(|(name, _)| pick(name))
                .map(|(n, w)| (n.clone(), w.clone()))
                .collect()
        };
        max_diff(&keep(&single), &keep(&parallel))
    };
    let worst = worst_of(&|name| name != positions);
    assert!(worst < 1e-5, "{stage}: weights differ by {worst}");
    let worst_positions = worst_of(&|name| name == positions);
    assert!(
        worst_positions < 2e-4,
        "{stage}: the position embeddings differ by {worst_positions}"
    );
    let base = tensors(&output_path(&p, "base", "model", 1));
    let moved = base
        .iter()
        .filter_map(|(name, w)| Some(max_diff_one(w, parallel.get(name)?)))
        .fold(0.0, f64::max);
    assert!(moved > 1e-4, "{stage}: training changed nothing");
    eprintln!(
        "{stage}: max |grad diff| {first_grad:e} in step 1, {worst_grad:e} over {steps} steps; max |weight diff| {worst:e}, {worst_positions:e} in the position embeddings"
    );
    let read = |name: &str, n: u32| std::fs::read_to_string(path(name, n)).unwrap();
    assert_same_metrics(stage, &read("metrics", 1), &read("metrics", 2), 3);
    let responses = |n: u32| -> Vec<String> {
        read("samples", n)
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["response"].to_string())
            .collect()
    };
    let one = responses(1);
    assert!(one.len() >= 10, "{stage}: {} samples", one.len());
    assert_eq!(
        one,
        responses(2),
        "{stage}: the ranks sampled other responses"
    );
}

#[test]
fn ppo_on_two_gloo_ranks_takes_the_steps_of_one_process_on_the_whole_batch() {
    ppo_two_ranks_equal_one("ppo");
}

#[test]
fn grpo_on_two_gloo_ranks_takes_the_steps_of_one_process_on_the_whole_batch() {
    ppo_two_ranks_equal_one("grpo");
}

/// Each rank of a placed stage holds its own copy of the placement (on
/// GPUs, its own run of the stage's GPUs): on the CPU, every role placed
/// on `cpu` trains on two Gloo ranks to the bits of the unplaced two-rank
/// run, samples included.
#[test]
fn ppo_placed_by_role_on_two_gloo_ranks_gives_the_unplaced_ranks_bits() {
    let p = project();
    ok(run_with(&p, "pm", &[], &p.path("grads-pm"), &[]));
    let unplaced = ["params.ppo_dp=2"];
    let placed = [
        "params.ppo_dp=2",
        "params.placement={policy: cpu, reference: cpu, reward: cpu, value: cpu}",
    ];
    ok(run_with(
        &p,
        "ppo",
        &unplaced,
        &p.path("grads-unplaced"),
        &[],
    ));
    ok(run_with(&p, "ppo", &placed, &p.path("grads-placed"), &[]));
    // The placed run ran (placement is in the fingerprint), placed and on
    // two ranks.
    let placed_log = walk(&p.path("cache/logs"))
        .into_iter()
        .map(|log| std::fs::read_to_string(log).unwrap())
        .find(|log| log.contains("models placed by role"))
        .expect("a log of the placed run");
    assert!(
        placed_log.contains("rank 1 of 2 joined the data-parallel group"),
        "{placed_log}"
    );
    let id = |output: &str, sets: &[&str]| -> String {
        let mut args = vec!["show", "pipeline.yaml", "ppo", "--json"];
        for set in sets {
            args.extend(["--set", set]);
        }
        let shown: serde_json::Value = serde_json::from_str(&p.ok(&args)).unwrap();
        shown[output]["id"].as_str().unwrap().to_string()
    };
    for output in ["model", "samples"] {
        assert_eq!(
            id(output, &unplaced),
            id(output, &placed),
            "ppo's {output}: placed on the CPU it differs from the unplaced run"
        );
    }
}

#[test]
fn a_ppo_resumed_after_a_killed_rank_ends_as_an_uninterrupted_run() {
    let sets = ["params.ppo_dp=2", "params.ckpt=1"];
    let uninterrupted = project();
    ok(run_with(
        &uninterrupted,
        "ppo",
        &sets,
        &uninterrupted.path("g"),
        &[],
    ));
    let expected = tensors(&output_path_with(&uninterrupted, "ppo", "model", &sets));
    let samples = |p: &Project| {
        std::fs::read_to_string(output_path_with(p, "ppo", "samples", &sets)).unwrap()
    };

    let p = project();
    let grads = p.path("g");
    // Policy step 6 is iteration 2's second (2 epochs x 2 minibatches):
    // iteration 1 is checkpointed, iteration 2 half done.
    let killed = run_with(
        &p,
        "ppo",
        &sets,
        &grads,
        &[("ALIGNFLOW_DIST_TEST_KILL", "1:6")],
    );
    assert!(!killed.status.success());
    let stderr = String::from_utf8_lossy(&killed.stderr);
    assert!(
        stderr.contains("rank 1 of 2 was killed by signal 9"),
        "{stderr}"
    );
    assert!(grads.join("rank-0-step-5.safetensors").exists());
    assert!(!grads.join("rank-0-step-6.safetensors").exists());
    std::fs::remove_dir_all(&grads).unwrap();

    ok(run_with(&p, "ppo", &sets, &grads, &[]));
    // Both ranks resumed after iteration 1: its steps did not run again.
    assert!(!grads.join("rank-0-step-4.safetensors").exists());
    assert!(grads.join("rank-0-step-5.safetensors").exists());
    assert!(grads.join("rank-1-step-12.safetensors").exists());
    assert_eq!(
        tensors(&output_path_with(&p, "ppo", "model", &sets)),
        expected
    );
    assert_eq!(samples(&p), samples(&uninterrupted));
    let metrics = std::fs::read_to_string(output_path_with(&p, "ppo", "metrics", &sets)).unwrap();
    assert_eq!(metrics.lines().count(), 3, "{metrics}");
}

/// A run of `sft` on two ranks that failed.
struct FailedSft {
    p: Project,
    /// The gradients the ranks wrote at each step they finished.
    grads: PathBuf,
    stderr: String,
    /// How long the stage took to fail.
    took: Duration,
}

/// Runs `sft` on two ranks under the test hooks `env`, which must make it
/// fail; everything upstream runs first, so the time taken is the stage's.
fn failed_sft(env: &[(&str, &str)]) -> FailedSft {
    let p = project();
    ok(run(&p, "base", 1, &p.path("grads-base"), &[]));
    let grads = p.path("g");
    // The time bound is on the failure, not on a wait for the cores other
    // tests' engines hold (their locks live in the temporary folder).
    let tmp = p.path("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let tmp = tmp.to_str().unwrap().to_string();
    let env: Vec<(&str, &str)> = env
        .iter()
        .copied()
        .chain([("TMPDIR", tmp.as_str())])
        .collect();
    let start = Instant::now();
    let out = run(&p, "sft", 2, &grads, &env);
    let took = start.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "the run should fail:\n{stderr}");
    FailedSft {
        p,
        grads,
        stderr,
        took,
    }
}

impl FailedSft {
    /// The stage failed in under a minute, naming the stage and rank 1,
    /// and saying `why` rank 0 stopped.
    fn named_rank_1_within_a_minute(&self, why: Option<&str>) {
        let stderr = &self.stderr;
        assert!(
            stderr.contains("stage `sft`")
                && stderr.contains("rank 1 of 2 was killed by signal 9")
                && why.is_none_or(|why| stderr.contains(why)),
            "{stderr}"
        );
        assert!(
            self.took < Duration::from_secs(60),
            "the failure took {:?}",
            self.took
        );
    }

    /// Nothing of the failed stage is cached: the next run trains it.
    fn cached_nothing(&self) {
        let ran = stages_with_status(
            &String::from_utf8(run(&self.p, "sft", 2, &self.grads, &[]).stdout).unwrap(),
            "ran",
        );
        assert_eq!(ran, set(&["sft"]));
    }
}

#[test]
fn a_rank_killed_mid_step_fails_the_stage_naming_it_and_caches_nothing() {
    let failed = failed_sft(&[
        ("ALIGNFLOW_DIST_TEST_KILL", "1:2"),
        ("ALIGNFLOW_DIST_TIMEOUT_S", "20"),
    ]);
    failed.named_rank_1_within_a_minute(None);
    // Step 1 finished on both ranks, step 2 on neither.
    assert!(failed.grads.join("rank-1-step-1.safetensors").exists());
    assert!(!failed.grads.join("rank-0-step-2.safetensors").exists());
    failed.cached_nothing();
}

#[test]
fn a_rank_lost_while_rank_0_is_far_from_a_collective_fails_the_stage_at_once() {
    // Rank 0 learns of a lost rank from its own next collective, which may
    // be far off (a long rollout) or, over NCCL, wait for the timeout. Here
    // rank 0 is held 120 s in step 2, before its all-reduce, while rank 1
    // dies in it: rank 0's watch on the other ranks fails the stage
    // without waiting for rank 0.
    let failed = failed_sft(&[
        ("ALIGNFLOW_DIST_TEST_KILL", "1:2"),
        ("ALIGNFLOW_DIST_TEST_STALL", "0:2:120"),
    ]);
    failed.named_rank_1_within_a_minute(Some("stopped at once instead of waiting"));
    assert!(failed.grads.join("rank-0-step-1.safetensors").exists());
    assert!(!failed.grads.join("rank-0-step-2.safetensors").exists());
    failed.cached_nothing();
}

#[test]
fn a_resume_after_a_killed_rank_gives_the_weights_of_an_uninterrupted_run() {
    let sets = ["params.dp=2", "params.ckpt=1"];
    let uninterrupted = project();
    ok(run_with(
        &uninterrupted,
        "sft",
        &sets,
        &uninterrupted.path("g"),
        &[],
    ));
    let expected = tensors(&output_path_with(&uninterrupted, "sft", "model", &sets));

    let p = project();
    let grads = p.path("g");
    let killed = run_with(
        &p,
        "sft",
        &sets,
        &grads,
        &[("ALIGNFLOW_DIST_TEST_KILL", "1:3")],
    );
    assert!(!killed.status.success());
    // Steps 1 and 2 were taken (and checkpointed), step 3 was not.
    assert!(grads.join("rank-0-step-2.safetensors").exists());
    assert!(!grads.join("rank-0-step-3.safetensors").exists());
    std::fs::remove_dir_all(&grads).unwrap();

    ok(run_with(&p, "sft", &sets, &grads, &[]));
    // Both ranks resumed from step 2's checkpoint: only step 3 ran.
    assert!(!grads.join("rank-0-step-2.safetensors").exists());
    assert!(grads.join("rank-0-step-3.safetensors").exists());
    assert!(grads.join("rank-1-step-3.safetensors").exists());
    assert_eq!(
        tensors(&output_path_with(&p, "sft", "model", &sets)),
        expected
    );
    let metrics = std::fs::read_to_string(output_path_with(&p, "sft", "metrics", &sets)).unwrap();
    assert_eq!(metrics.lines().count(), 3, "{metrics}");
}

#[test]
fn a_rank_lost_before_joining_fails_the_stage_without_waiting_for_the_timeout() {
    // The default timeout (300 s) stays: the failure must not wait for it.
    failed_sft(&[("ALIGNFLOW_DIST_TEST_KILL", "1:0")])
        .named_rank_1_within_a_minute(Some("ended before joining the group"));
}

#[test]
fn ranks_on_gpus_the_machine_lacks_fail_before_the_stage_runs() {
    // NCCL puts one rank on each GPU the engine reserves: `sft` on two
    // ranks on `cuda` needs two GPUs, and this machine has none.
    let p = project();
    p.write(
        "gpu.yaml",
        &MANIFEST.replace(
            "  sft:\n    op: sft\n",
            "  sft:\n    op: sft\n    device: cuda\n",
        ),
    );
    let err = p.fails(&[
        "run",
        "gpu.yaml",
        "--quiet",
        "--target",
        "sft",
        "--set",
        "params.dp=2",
    ]);
    assert!(err.contains("sft"), "{err}");
    assert!(
        err.contains("`params.data_parallel: 2` on device `cuda` takes one GPU per rank, but 0 GPU(s) are visible"),
        "{err}"
    );
    // The same stage on the CPU runs its ranks with Gloo.
    p.ok(&[
        "run",
        "pipeline.yaml",
        "--quiet",
        "--target",
        "sft",
        "--set",
        "params.dp=2",
    ]);
}

#[test]
fn a_group_of_one_takes_the_data_parallel_path_to_the_one_process_bits() {
    // `ALIGNFLOW_DIST_GROUP_OF_ONE=1`: one rank in a group of its own, so
    // every collective of the data-parallel path runs (as the GPU check
    // runs it with NCCL on one GPU). Each in its own cache: the same
    // fingerprint either way.
    for stage in ["sft", "ppo"] {
        let (plain, grouped) = (project(), project());
        for p in [&plain, &grouped] {
            ok(run(p, "base", 1, &p.path("grads-base"), &[]));
        }
        ok(run(&plain, stage, 1, &plain.path("g"), &[]));
        let group = [("ALIGNFLOW_DIST_GROUP_OF_ONE", "1")];
        ok(run(&grouped, stage, 1, &grouped.path("g"), &group));
        // The group formed: rank 0's log says so.
        let logs: String = std::fs::read_dir(grouped.path("cache/logs"))
            .unwrap()
            .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
            .collect();
        assert!(
            logs.contains("starting data-parallel ranks") && logs.contains("world=1"),
            "{stage}: no group of one in the logs:\n{logs}"
        );
        let model = |p: &Project| tensors(&output_path(p, stage, "model", 1));
        assert_eq!(model(&plain), model(&grouped), "{stage}: other weights");
        let lines = |p: &Project| {
            std::fs::read_to_string(output_path(p, stage, "metrics", 1))
                .unwrap()
                .lines()
                .count()
        };
        assert_eq!(lines(&plain), lines(&grouped), "{stage}");
    }
}
