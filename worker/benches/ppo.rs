//! PPO benchmark (docs/DESIGN.md section 6): one PPO iteration of the `ppo` op on the
//! fixed workload. GPT-2 architecture, vocab 4096, 256 positions, width 256,
//! 4 layers, 4 heads, float32, random init seed 0, dropout 0; 8 prompts of
//! exactly 32 tokens, 96 response tokens (no EOS anywhere, so every row runs
//! to the end), policy, reference, value model and reward model of that
//! config, one epoch, one minibatch.
//!
//! The op runs as the worker runs it, through its public entry
//! (`alignflow_worker::ops::implementation("ppo")`) on a `StageContext` built here, on
//! inputs written to a temporary folder:
//!
//!   policy/        random init (seed 0), LM head, saved as a checkpoint;
//!                  the op loads it three times: policy, frozen reference,
//!                  value model (with a fresh value head)
//!   reward/        random init (seed 0), reward head, saved as a checkpoint
//!   prompts.jsonl  8 prompts of 32 random token ids in [1, 4096) (seed 0),
//!                  written as words `t<id>` of a word-level tokenizer so
//!                  that each word is one token; no EOS in tokenizer or
//!                  config, so the op samples all 96 tokens
//!
//! One op call runs `--warmup` + `--repeats` iterations; the seconds of each
//! iteration come from the op's `metrics.jsonl` (`seconds` when present,
//! else `response tokens / tokens_per_s`, the same clock); the warm-up
//! iterations are dropped. `--runs` repeats the op call (fresh op, same
//! inputs); the figure is the median over all timed iterations of all runs.
//! `peak_rss_mib` is VmHWM of the whole process.
//!
//! `--breakdown` adds a second JSON line: the same iteration rebuilt from
//! the library's parts as the op runs it with one epoch of one minibatch
//! (sampling, the update's policy and value forwards, the reference and
//! reward forwards, advantages, policy backward + step, value backward +
//! step), each phase timed, to show where the time goes. It is not the op,
//! but the same calls on the same shapes.
//!
//!   cargo bench -p alignflow-worker --bench ppo -- [--repeats N] [--warmup N]
//!       [--runs N] [--threads N] [--device cpu|cuda] [--breakdown]
//!
//! `--threads` defaults to `ALIGNFLOW_BENCH_THREADS`, else 2.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use alignflow_ops::protocol::StageSpec;
use alignflow_ops::text::Tokenizer;
use alignflow_ops::{CancelFlag, NullReporter, StageContext};
mod workload;
use workload::*;

use alignflow_worker::model::sample::{generate, SamplingConfig};
use alignflow_worker::model::{BuildOptions, Head, Model, ModelConfig};
use alignflow_worker::ops::scoring::{pm_scores, response_logprobs, response_values};
use alignflow_worker::rl::{
    compute_gae, kl_per_token, masked_whiten, policy_loss, shape_rewards, value_loss, GaeConfig,
    KlEstimator,
};
use alignflow_worker::train::{clip_grad_norm, AdamW, AdamWConfig};

/// The op's defaults, written out so that the peer can match them.
const LR: f64 = 1e-5;
const KL_COEF: f64 = 0.05;
const CLIP: f64 = 0.2;
const GAMMA: f64 = 1.0;
const LAM: f64 = 0.95;
const GRAD_CLIP: f64 = 1.0;

struct Args {
    repeats: usize,
    warmup: usize,
    runs: usize,
    threads: i32,
    device_name: String,
    device: Device,
    breakdown: bool,
}

/// Benches are not linked with `--no-as-needed -ltorch_cuda` (build.rs gives
/// that to the worker binary and the tests only), so libtorch would report
/// CUDA unavailable: load `libtorch_cuda.so` by hand before the first CUDA
/// call (found through the rpath or `LD_LIBRARY_PATH`).
fn load_torch_cuda() -> anyhow::Result<()> {
    use std::ffi::{c_char, c_int, c_void, CStr};
    extern "C" {
        fn dlopen(name: *const c_char, flags: c_int) -> *mut c_void;
        fn dlerror() -> *const c_char;
    }
    const RTLD_NOW: c_int = 2;
    const RTLD_GLOBAL: c_int = 0x100;
    // SAFETY: a NUL-terminated name; dlerror's message is read before any
    // other dl call.
    unsafe {
        if dlopen(c"libtorch_cuda.so".as_ptr(), RTLD_NOW | RTLD_GLOBAL).is_null() {
            let err = dlerror();
            let msg = if err.is_null() {
                "unknown error".into()
            } else {
                CStr::from_ptr(err).to_string_lossy().into_owned()
            };
            bail!("loading libtorch_cuda.so: {msg}");
        }
    }
    Ok(())
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        repeats: 5,
        warmup: 2,
        runs: 1,
        threads: match std::env::var("ALIGNFLOW_BENCH_THREADS") {
            Ok(v) => v.parse().context("ALIGNFLOW_BENCH_THREADS")?,
            Err(_) => 2,
        },
        device_name: "cpu".into(),
        device: Device::Cpu,
        breakdown: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            // `cargo bench` passes `--bench` to harness-less benches.
            "--bench" => {}
            "--repeats" => args.repeats = value("--repeats")?.parse()?,
            "--warmup" => args.warmup = value("--warmup")?.parse()?,
            "--runs" => args.runs = value("--runs")?.parse()?,
            "--threads" => args.threads = value("--threads")?.parse()?,
            "--device" => {
                let v = value("--device")?;
                if v.starts_with("cuda") {
                    load_torch_cuda()?;
                }
                args.device = alignflow_worker::model::device(&v)?;
                args.device_name = v;
            }
            "--breakdown" => args.breakdown = true,
            "-h" | "--help" => {
                println!(
                    "ppo bench: [--repeats N] [--warmup N] [--runs N] [--threads N] [--device cpu|cuda] [--breakdown]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(
        args.repeats > 0 && args.runs > 0,
        "--repeats and --runs must be positive"
    );
    Ok(args)
}

/// The docs/DESIGN.md config with no EOS token (bos/eos null, pad 0): nothing can end
/// a response early.
fn config() -> anyhow::Result<ModelConfig> {
    let mut raw = ModelConfig::gpt2_json(VOCAB, POSITIONS, WIDTH, LAYERS, HEADS, 0, 0.0);
    raw["bos_token_id"] = Value::Null;
    raw["eos_token_id"] = Value::Null;
    raw["pad_token_id"] = 0.into();
    ModelConfig::from_json(raw)
}

fn model(head: Head, device: Device) -> anyhow::Result<Model> {
    tch::manual_seed(0);
    Ok(Model::init(&config()?, &BuildOptions::new(device, head)))
}

/// The 8 prompts: 32 random ids in [1, VOCAB), seed 0 (as the model bench).
fn prompt_ids() -> Vec<Vec<i64>> {
    tch::manual_seed(0);
    let t = Tensor::randint_low(1, VOCAB, [BATCH, PROMPT], (Kind::Int64, Device::Cpu));
    (0..BATCH)
        .map(|i| Vec::<i64>::try_from(&t.get(i)).expect("prompt ids"))
        .collect()
}

/// Writes the op's inputs under `root`; returns (policy, reward, prompts).
fn write_inputs(root: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let tok = serde_json::to_string(&tokenizer_json(VOCAB))?;
    let policy_dir = root.join("policy");
    let reward_dir = root.join("reward");
    model(Head::Lm, Device::Cpu)?.save(&policy_dir)?;
    model(Head::Reward, Device::Cpu)?.save(&reward_dir)?;
    for d in [&policy_dir, &reward_dir] {
        std::fs::write(d.join("tokenizer.json"), &tok)?;
    }
    let prompts = root.join("prompts.jsonl");
    let text: String = prompt_ids()
        .iter()
        .map(|ids| {
            let words: Vec<String> = ids.iter().map(|i| format!("t{i}")).collect();
            json!({"prompt": words.join(" ")}).to_string() + "\n"
        })
        .collect();
    std::fs::write(&prompts, text)?;
    // The op must see exactly 32 tokens per prompt and no EOS.
    let t = Tokenizer::from_dir(&policy_dir)?;
    anyhow::ensure!(t.eos_id.is_none(), "the bench tokenizer has an EOS token");
    for ids in prompt_ids() {
        let words: Vec<String> = ids.iter().map(|i| format!("t{i}")).collect();
        anyhow::ensure!(
            t.encode(&words.join(" "))? == ids,
            "the bench tokenizer does not round-trip the prompts"
        );
    }
    Ok((policy_dir, reward_dir, prompts))
}

/// One call of the op with `iterations` iterations: (wall seconds, the
/// metrics.jsonl lines).
fn run_op(
    a: &Args,
    root: &Path,
    inputs: &(PathBuf, PathBuf, PathBuf),
    run: usize,
    iterations: usize,
) -> anyhow::Result<(f64, Vec<Value>)> {
    let op = alignflow_ops::find("ppo").context("no `ppo` op")?;
    let params = op.normalize_params(&json!({
        "iterations": iterations,
        "batch_size": BATCH,
        "max_new_tokens": NEW_TOKENS,
        "temperature": 1.0,
        "lr": LR,
        "ppo_epochs": 1,
        "minibatches": 1,
        "clip": CLIP,
        "value_clip": CLIP,
        "gamma": GAMMA,
        "lam": LAM,
        "kl_coef": KL_COEF,
        "grad_clip": GRAD_CLIP,
    }))?;
    let dir = root.join(format!("run{run}"));
    let spec = StageSpec {
        pipeline: "bench".into(),
        stage: "ppo".into(),
        op: "ppo".into(),
        op_version: op.version,
        params,
        inputs: BTreeMap::from([
            ("policy".to_string(), inputs.0.clone()),
            ("reward_model".to_string(), inputs.1.clone()),
            ("prompts".to_string(), inputs.2.clone()),
        ]),
        outputs: vec!["model".into(), "metrics".into()],
        out_dir: dir.join("out"),
        work_dir: root.to_path_buf(),
        checkpoint_dir: dir.join("checkpoint"),
        device: a.device_name.clone(),
        seed: 0,
        threads: Some(a.threads as usize),
    };
    let run_fn = alignflow_worker::ops::implementation("ppo").context("no worker `ppo` op")?;
    let cancel = CancelFlag::default();
    let ctx = StageContext {
        spec: &spec,
        reporter: &NullReporter,
        cancel: &cancel,
    };
    let t0 = Instant::now();
    run_fn(&ctx)?;
    sync(a.device);
    let wall = t0.elapsed().as_secs_f64();
    let path = spec.checkpoint_dir.join("metrics.jsonl");
    let lines = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<Vec<Value>, _>>()?;
    anyhow::ensure!(
        lines.len() == iterations,
        "{} iterations in metrics.jsonl, wanted {iterations}",
        lines.len()
    );
    Ok((wall, lines))
}

/// Seconds of one iteration from its metrics line.
fn iteration_seconds(line: &Value) -> anyhow::Result<f64> {
    if let Some(s) = line["seconds"].as_f64() {
        return Ok(s);
    }
    let tps = line["tokens_per_s"]
        .as_f64()
        .context("no `seconds` or `tokens_per_s` in metrics.jsonl")?;
    Ok((BATCH * NEW_TOKENS) as f64 / tps)
}

fn bench_op(a: &Args) -> anyhow::Result<Value> {
    let tmp = tempfile::tempdir()?;
    let inputs = write_inputs(tmp.path())?;
    let iterations = a.warmup + a.repeats;
    let mut samples = Vec::new();
    let mut walls = Vec::new();
    let mut source = "seconds";
    for run in 0..a.runs {
        let (wall, lines) = run_op(a, tmp.path(), &inputs, run, iterations)?;
        for (i, line) in lines.iter().enumerate() {
            let len = line["response_len"].as_f64().unwrap_or(f64::NAN);
            anyhow::ensure!(
                len == NEW_TOKENS as f64,
                "iteration {}: mean response length {len}, wanted {NEW_TOKENS}",
                i + 1
            );
            if line["seconds"].is_null() {
                source = "tokens_per_s";
            }
            if i >= a.warmup {
                samples.push(iteration_seconds(line)?);
            }
        }
        walls.push(wall);
    }
    let med = median(&samples);
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    let sd = (samples.iter().map(|s| (s - mean).powi(2)).sum::<f64>()
        / (samples.len().max(2) - 1) as f64)
        .sqrt();
    Ok(json!({
        "bench": "ppo_iteration",
        "impl": "alignflow",
        "s_per_iteration": med,
        "iterations_per_s": 1.0 / med,
        "response_tokens_per_s": (BATCH * NEW_TOKENS) as f64 / med,
        "samples": samples,
        "min_s": samples.iter().cloned().fold(f64::INFINITY, f64::min),
        "max_s": samples.iter().cloned().fold(0.0, f64::max),
        "cv": sd / mean,
        "timing_source": format!("metrics.jsonl `{source}` per iteration"),
        "op_call_wall_s": walls,
        "iterations_per_call": iterations,
        "warmup": a.warmup,
        "repeats": a.repeats,
        "runs": a.runs,
        "batch": BATCH, "prompt": PROMPT, "response": NEW_TOKENS,
    }))
}

/// Runs `f`, synchronises, returns its seconds.
fn clock<T>(device: Device, f: impl FnOnce() -> T) -> (T, f64) {
    let t0 = Instant::now();
    let out = f();
    sync(device);
    (out, t0.elapsed().as_secs_f64())
}

/// The iteration rebuilt from the library's parts, each phase timed.
fn bench_breakdown(a: &Args) -> anyhow::Result<Value> {
    let d = a.device;
    let policy = model(Head::Lm, d)?;
    let mut reference = model(Head::Lm, d)?;
    reference.vs.freeze();
    let critic = model(Head::Value, d)?;
    let mut pm = model(Head::Reward, d)?;
    pm.vs.freeze();
    let mut policy_opt = AdamW::new(policy.trainable(), AdamWConfig::default())?;
    let mut critic_opt = AdamW::new(critic.trainable(), AdamWConfig::default())?;
    let prompts = prompt_ids();
    let mut phases: BTreeMap<&'static str, Vec<f64>> = BTreeMap::new();
    let mut totals = Vec::new();
    for it in 0..a.warmup + a.repeats {
        let mut ph: Vec<(&'static str, f64)> = Vec::new();
        let t_all = Instant::now();
        let cfg = SamplingConfig {
            max_new_tokens: NEW_TOKENS,
            temperature: 1.0,
            eos_token_ids: Vec::new(),
            pad_token_id: 0,
            seed: it as u64,
            ..Default::default()
        };
        let (samples, s) = clock(d, || generate(&policy.lm, &prompts, &cfg, d, |_, _| false));
        ph.push(("sampling", s));
        let resp_v: Vec<i64> = samples.iter().flat_map(|s| s.tokens.clone()).collect();
        anyhow::ensure!(resp_v.len() == (BATCH * NEW_TOKENS) as usize);
        let resp = Tensor::from_slice(&resp_v)
            .view([BATCH, NEW_TOKENS])
            .to_device(d);
        let prompt = Tensor::from_slice(&prompts.concat())
            .view([BATCH, PROMPT])
            .to_device(d);
        let ids = Tensor::cat(&[&prompt, &resp], 1);
        let mask = ids.ones_like();
        let rmask = Tensor::ones([BATCH, NEW_TOKENS], (Kind::Float, d));
        // As the op with one epoch of one minibatch: the update's forwards
        // (with grad) give the rollout's log-probs and values.
        let ((logp, values), s) = clock(d, || {
            (
                response_logprobs(&policy, &ids, &mask, &resp, PROMPT, 1.0, false, false).logp,
                response_values(&critic, &ids, &mask, PROMPT, NEW_TOKENS, false),
            )
        });
        ph.push(("update_forwards", s));
        let (old_logp, old_values) = (logp.detach(), values.detach());
        let ((ref_logp, scores), s) = clock(d, || {
            tch::no_grad(|| {
                let rf =
                    response_logprobs(&reference, &ids, &mask, &resp, PROMPT, 1.0, false, false)
                        .logp;
                (rf, pm_scores(&pm, &ids, &mask))
            })
        });
        ph.push(("scoring_forwards", s));
        let ((adv, returns), s) = clock(d, || {
            tch::no_grad(|| {
                let kl = kl_per_token(&old_logp, &ref_logp, KlEstimator::K1) * &rmask;
                let has_eos = Tensor::zeros([BATCH], (Kind::Bool, d));
                let shaped = shape_rewards(&scores, &kl, &rmask, &has_eos, KL_COEF, None);
                let (adv, returns) = compute_gae(
                    &old_values,
                    &shaped.rewards,
                    &rmask,
                    &GaeConfig {
                        gamma: GAMMA,
                        lam: LAM,
                    },
                );
                (masked_whiten(&adv, &rmask, true) * &rmask, returns)
            })
        });
        ph.push(("advantages", s));
        let (_, s) = clock(d, || -> anyhow::Result<()> {
            let pl = policy_loss(&logp, &old_logp, &adv, &rmask, CLIP);
            policy_opt.zero_grad();
            pl.loss.backward();
            clip_grad_norm(&policy_opt.params(), GRAD_CLIP);
            policy_opt.step(LR)?;
            Ok(())
        });
        ph.push(("policy_backward_step", s));
        let (_, s) = clock(d, || -> anyhow::Result<()> {
            let vl = value_loss(&values, &old_values, &returns, &rmask, CLIP);
            critic_opt.zero_grad();
            vl.loss.backward();
            clip_grad_norm(&critic_opt.params(), GRAD_CLIP);
            critic_opt.step(LR)?;
            Ok(())
        });
        ph.push(("value_backward_step", s));
        let total = t_all.elapsed().as_secs_f64();
        if it >= a.warmup {
            totals.push(total);
            for (n, s) in ph {
                phases.entry(n).or_default().push(s);
            }
        }
    }
    let phase_json: serde_json::Map<String, Value> = phases
        .iter()
        .map(|(n, v)| (n.to_string(), json!(median(v))))
        .collect();
    Ok(json!({
        "bench": "ppo_breakdown",
        "impl": "alignflow",
        "s_per_iteration": median(&totals),
        "samples": totals,
        "phases_s": phase_json,
        "note": "the iteration rebuilt from library parts (not the op), phases timed",
        "warmup": a.warmup,
        "repeats": a.repeats,
    }))
}

fn main() -> anyhow::Result<()> {
    let a = parse_args()?;
    tch::set_num_threads(a.threads);
    let _ = Tensor::zeros([1], (Kind::Float, Device::Cpu)); // libtorch initialised
    let rss_after_init = vm_hwm_mib();
    // Each line's peak is read right after its section: the op's figure
    // does not include the breakdown that runs after it.
    let mut results = vec![(bench_op(&a)?, vm_hwm_mib())];
    if a.breakdown {
        results.push((bench_breakdown(&a)?, vm_hwm_mib()));
    }
    for (mut res, peak) in results {
        let out = res.as_object_mut().expect("object");
        out.insert("peak_rss_mib".into(), json!(peak));
        out.insert(
            "peak_rss_note".into(),
            json!("VmHWM of the whole process, cumulative over the sections run in it"),
        );
        out.insert("rss_after_init_mib".into(), json!(rss_after_init));
        if a.device.is_cuda() {
            out.insert("cuda_mem_mib".into(), json!(cuda_mem_mib()));
            out.insert(
                "cuda_mem_note".into(),
                json!("nvidia-smi used_memory of this process: allocator reserve + CUDA context"),
            );
        }
        out.insert("threads".into(), json!(a.threads));
        out.insert("device".into(), json!(a.device_name));
        out.insert("dtype".into(), json!("float32"));
        out.insert(
            "torch".into(),
            json!(option_env!("ALIGNFLOW_LIBTORCH_VERSION")),
        );
        println!("{res}");
    }
    Ok(())
}
