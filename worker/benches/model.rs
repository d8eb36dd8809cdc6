//! Model-layer benchmark (docs/DESIGN.md section 6): the fixed GPT-2 workload
//! (vocab 4096, 256 positions, width 256, 4 layers, 4 heads, float32, random
//! init seed 0, dropout 0) on libtorch, section by section:
//!
//!   sft     batch 8 x seq 128 random tokens: forward + causal-LM loss
//!           (labels = ids) + backward + AdamW(lr 1e-4) step + zero_grad
//!   rm      reward head, 8 pairs = 16 sequences of 128 in ONE forward,
//!           -logsigmoid(r_chosen - r_rejected).mean(), backward, AdamW step
//!   sample  batch 8, prompt 32 random tokens, 96 new tokens, temperature 1,
//!           top_k 0, no EOS, KV cache (`model::sample::generate`)
//!   mixed   mixed response lengths: 16 prompts of 32 random tokens, 4
//!           samples each (64 rows), 8 rows decoding at once, temperature 1,
//!           top_k 0; row `j` ends after `mixed_length(j)` tokens (8 to 224)
//!           (`model::sample::sample_requests`, continuous batching)
//!
//! Each: 2 warm-ups, then `--repeats` timed; median and all samples. One JSON
//! line per section, shaped like `benches/peer_hf.py`'s. `peak_rss_mib` is
//! VmHWM of the whole process (cumulative over the sections run in it): use
//! `--only` to run each section in its own process for a clean figure.
//! `phases_s` holds the median time of each phase: forward + loss, backward,
//! optimizer step + zero_grad for the training sections; prefill + first
//! token, one decoding step (median) and all decoding steps for sampling.
//!
//!   cargo bench -p alignflow-worker --bench model -- [--only sft|rm|sample|mixed]
//!       [--repeats N] [--threads N] [--device cpu|cuda]
//!       [--preset design|gpt2-124m|llama-1b] [--batch N] [--bf16] [--peak-tflops T]
//!
//! For the GPU check: `--preset` swaps the model of every section for
//! GPT-2-124M or a Llama-3.2-1B shape (random init; SFT then on batch 8 x
//! 1024), `--batch` sets the sampling batch and the rows decoding at once
//! in `mixed` (64: the whole mixed workload at once), `--bf16` trains under
//! bf16 autocast and samples with bf16 weights (as `generate` with `dtype:
//! auto` on a GPU), and `--peak-tflops` turns the SFT step's FLOPs into model
//! FLOPs utilisation. `benches/peer_hf.py` takes the same flags.
//! `--threads` defaults to `ALIGNFLOW_BENCH_THREADS`, else 2.
//! The AdamW settings are torch.optim.AdamW's defaults, which is what the peer
//! uses: weight decay 0.01 on every tensor (`decay_min_dim: 0`).

use std::time::Instant;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

mod workload;
use workload::*;

use alignflow_worker::model::sample::{generate, sample_requests, Request, SamplingConfig};
use alignflow_worker::model::{BuildOptions, Head, Model, ModelConfig};
use alignflow_worker::ops::training::causal_lm_loss;
use alignflow_worker::train::{AdamW, AdamWConfig};

const SFT_BATCH: i64 = 8;
const SFT_SEQ: i64 = 128;
const RM_PAIRS: i64 = 8;
const RM_SEQ: i64 = 128;
const LR: f64 = 1e-4;
const WARMUP: usize = 2;

struct Args {
    only: Option<String>,
    repeats: usize,
    threads: i32,
    device: Device,
    device_name: String,
    /// `--preset`: the model of every section (default: the docs/DESIGN.md
    /// workload's).
    preset: Preset,
    /// `--batch`: sampling's batch, and the rows `mixed` decodes at once.
    batch: i64,
    /// `--bf16`: training under bf16 autocast, sampling with bf16 weights.
    bf16: bool,
    /// `--peak-tflops`: the device's dense peak, to report model FLOPs utilisation.
    peak_tflops: Option<f64>,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        only: None,
        repeats: 5,
        threads: match std::env::var("ALIGNFLOW_BENCH_THREADS") {
            Ok(v) => v.parse().context("ALIGNFLOW_BENCH_THREADS")?,
            Err(_) => 2,
        },
        device: Device::Cpu,
        device_name: "cpu".into(),
        preset: Preset::Design,
        batch: BATCH,
        bf16: false,
        peak_tflops: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut value = |name: &str| it.next().with_context(|| format!("{name} needs a value"));
        match a.as_str() {
            // `cargo bench` passes `--bench` to harness-less benches.
            "--bench" => {}
            "--only" => {
                let v = value("--only")?;
                if !["sft", "rm", "sample", "mixed"].contains(&v.as_str()) {
                    bail!("--only sft|rm|sample|mixed, not {v}");
                }
                args.only = Some(v);
            }
            "--repeats" => args.repeats = value("--repeats")?.parse()?,
            "--threads" => args.threads = value("--threads")?.parse()?,
            "--device" => {
                let v = value("--device")?;
                args.device = alignflow_worker::model::device(&v)?;
                args.device_name = v;
            }
            "--preset" => {
                let v = value("--preset")?;
                args.preset = Preset::ALL
                    .into_iter()
                    .find(|p| p.name() == v)
                    .with_context(|| format!("--preset design|gpt2-124m|llama-1b, not {v}"))?;
            }
            "--batch" => args.batch = value("--batch")?.parse()?,
            "--bf16" => args.bf16 = true,
            "--peak-tflops" => args.peak_tflops = Some(value("--peak-tflops")?.parse()?),
            "-h" | "--help" => {
                println!(
                    "model bench: [--only sft|rm|sample|mixed] [--repeats N] [--threads N] [--device cpu|cuda] [--preset design|gpt2-124m|llama-1b] [--batch N] [--bf16] [--peak-tflops T]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    anyhow::ensure!(args.repeats > 0, "--repeats must be positive");
    anyhow::ensure!(args.batch > 0, "--batch must be positive");
    Ok(args)
}

/// Timings of one call: total seconds plus named phases.
type Timed = (f64, Vec<(&'static str, f64)>);

/// Runs `f` WARMUP times, then `repeats` times; returns the per-call totals
/// and the median of each phase.
fn timed(
    repeats: usize,
    device: Device,
    mut f: impl FnMut() -> anyhow::Result<Timed>,
) -> anyhow::Result<(f64, Vec<f64>, Value)> {
    for _ in 0..WARMUP {
        f()?;
    }
    sync(device);
    let mut samples = Vec::with_capacity(repeats);
    let mut phases: Vec<(&'static str, Vec<f64>)> = Vec::new();
    for _ in 0..repeats {
        let t0 = Instant::now();
        let (_, ph) = f()?;
        sync(device);
        samples.push(t0.elapsed().as_secs_f64());
        for (name, s) in ph {
            match phases.iter_mut().find(|(n, _)| *n == name) {
                Some((_, v)) => v.push(s),
                None => phases.push((name, vec![s])),
            }
        }
    }
    let phase_json: serde_json::Map<String, Value> = phases
        .iter()
        .map(|(n, v)| (n.to_string(), json!(median(v))))
        .collect();
    Ok((median(&samples), samples, Value::Object(phase_json)))
}

/// The model every section runs.
#[derive(Clone, Copy, PartialEq)]
enum Preset {
    /// docs/DESIGN.md section 6's GPT-2 (vocab 4096, width 256, 4 layers).
    Design,
    /// GPT-2-124M: vocab 50257, 1024 positions, width 768, 12 layers, 12 heads.
    Gpt2_124m,
    /// Llama-3.2-1B's shape (1.24B parameters): vocab 128256, width 2048,
    /// 16 layers, 32 heads (8 for keys and values), MLP 8192, tied embeddings.
    Llama1b,
}

impl Preset {
    const ALL: [Preset; 3] = [Preset::Design, Preset::Gpt2_124m, Preset::Llama1b];

    fn name(self) -> &'static str {
        match self {
            Preset::Design => "design",
            Preset::Gpt2_124m => "gpt2-124m",
            Preset::Llama1b => "llama-1b",
        }
    }

    fn config(self) -> anyhow::Result<ModelConfig> {
        ModelConfig::from_json(match self {
            Preset::Design => {
                ModelConfig::gpt2_json(VOCAB, POSITIONS, WIDTH, LAYERS, HEADS, 0, 0.0)
            }
            Preset::Gpt2_124m => ModelConfig::gpt2_json(50257, 1024, 768, 12, 12, 0, 0.0),
            Preset::Llama1b => {
                ModelConfig::llama_json(128_256, 2048, 2048, 16, 32, 8, 8192, 0, true)
            }
        })
    }

    /// The SFT step's batch x sequence length.
    fn sft_shape(self) -> (i64, i64) {
        match self {
            Preset::Design => (SFT_BATCH, SFT_SEQ),
            Preset::Gpt2_124m | Preset::Llama1b => (8, 1024),
        }
    }
}

/// The preset's model with `head`, float32 (trained under autocast with
/// `--bf16`).
fn model(head: Head, a: &Args) -> anyhow::Result<Model> {
    let cfg = a.preset.config()?;
    tch::manual_seed(0);
    Ok(Model::init(&cfg, &BuildOptions::new(a.device, head)))
}

/// The preset's model for sampling: in bf16 with `--bf16`, as `generate`
/// holds it with `dtype: auto` on a GPU.
fn sampling_model(a: &Args) -> anyhow::Result<Model> {
    let cfg = a.preset.config()?;
    tch::manual_seed(0);
    let mut options = BuildOptions::new(a.device, Head::Lm);
    if a.bf16 {
        options.kind = Kind::BFloat16;
    }
    Ok(Model::init(&cfg, &options))
}

/// Random tokens in [1, VOCAB), seed 0 (bos = eos = pad = 0 never appears).
fn tokens(shape: &[i64], device: Device) -> Tensor {
    tch::manual_seed(0);
    Tensor::randint_low(1, VOCAB, shape, (Kind::Int64, Device::Cpu)).to_device(device)
}

fn optimizer(m: &Model) -> anyhow::Result<AdamW> {
    Ok(AdamW::from_var_store(
        &m.vs,
        AdamWConfig {
            // torch.optim.AdamW's default, as the peer: decay every tensor.
            weight_decay: 0.01,
            decay_min_dim: 0,
            ..Default::default()
        },
    )?)
}

/// Forward + loss, backward, step + zero_grad, each timed.
fn train_step(
    device: Device,
    opt: &mut AdamW,
    loss: impl FnOnce() -> Tensor,
) -> anyhow::Result<Timed> {
    let t0 = Instant::now();
    let loss = loss();
    sync(device);
    let t1 = Instant::now();
    loss.backward();
    sync(device);
    let t2 = Instant::now();
    opt.step(LR)?;
    opt.zero_grad();
    sync(device);
    let t3 = Instant::now();
    Ok((
        (t3 - t0).as_secs_f64(),
        vec![
            ("forward_loss", (t1 - t0).as_secs_f64()),
            ("backward", (t2 - t1).as_secs_f64()),
            ("optimizer", (t3 - t2).as_secs_f64()),
        ],
    ))
}

fn bench_sft(a: &Args) -> anyhow::Result<(Value, Vec<f64>, Value)> {
    let m = model(Head::Lm, a)?;
    let (batch, seq) = a.preset.sft_shape();
    let mut opt = optimizer(&m)?;
    let ids = tokens(&[batch, seq], a.device);
    let mask = ids.ones_like();
    let (med, samples, phases) = timed(a.repeats, a.device, || {
        train_step(a.device, &mut opt, || {
            tch::autocast(a.bf16, || causal_lm_loss(&m, &ids, &mask, &ids, true).0)
        })
    })?;
    let tokens_per_s = (batch * seq) as f64 / med;
    // Training FLOPs per token: 6 N for the weights plus 12 L H T for attention.
    let params: i64 = m.vs.variables().values().map(|t| t.numel() as i64).sum();
    let cfg = &m.lm.cfg;
    let flops_per_token =
        6.0 * params as f64 + 12.0 * (cfg.num_layers * cfg.hidden_size * seq) as f64;
    let mfu = a
        .peak_tflops
        .map(|peak| tokens_per_s * flops_per_token / (peak * 1e12));
    Ok((
        json!({"bench": "sft_step", "tokens_per_s": tokens_per_s,
               "s_per_step": med, "batch": batch, "seq": seq, "params": params,
               "preset": a.preset.name(), "bf16": a.bf16,
               "model_tflops": tokens_per_s * flops_per_token / 1e12, "mfu": mfu,
               "fused_adamw": opt.is_fused()}),
        samples,
        phases,
    ))
}

fn bench_rm(a: &Args) -> anyhow::Result<(Value, Vec<f64>, Value)> {
    let m = model(Head::Reward, a)?;
    let mut opt = optimizer(&m)?;
    // Rows [0, 8) chosen, [8, 16) rejected.
    let ids = tokens(&[2 * RM_PAIRS, RM_SEQ], a.device);
    let mask = ids.ones_like();
    let (med, samples, phases) = timed(a.repeats, a.device, || {
        train_step(a.device, &mut opt, || {
            let r = m.scores(&ids, &mask, true);
            let margin = r.narrow(0, 0, RM_PAIRS) - r.narrow(0, RM_PAIRS, RM_PAIRS);
            -margin.log_sigmoid().mean(Kind::Float)
        })
    })?;
    Ok((
        json!({"bench": "rm_step", "pairs_per_s": RM_PAIRS as f64 / med, "s_per_step": med,
               "pairs": RM_PAIRS, "seq": RM_SEQ, "fused_adamw": opt.is_fused()}),
        samples,
        phases,
    ))
}

fn bench_sample(a: &Args) -> anyhow::Result<(Value, Vec<f64>, Value)> {
    let m = sampling_model(a)?;
    let prompt = tokens(&[a.batch, PROMPT], Device::Cpu);
    let prompts: Vec<Vec<i64>> = (0..a.batch)
        .map(|i| Vec::<i64>::try_from(&prompt.get(i)).expect("prompt ids"))
        .collect();
    let cfg = SamplingConfig {
        max_new_tokens: NEW_TOKENS,
        min_new_tokens: NEW_TOKENS,
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        eos_token_ids: Vec::new(),
        pad_token_id: 0,
        seed: 0,
        max_rows: 0,
    };
    tch::manual_seed(0);
    let (med, samples, phases) = timed(a.repeats, a.device, || {
        // The stop callback runs once per row after each token: row 0's
        // calls time-stamp the steps (prefill + first token, then decoding).
        let mut stamps = Vec::with_capacity(NEW_TOKENS as usize);
        let t0 = Instant::now();
        let out = generate(&m.lm, &prompts, &cfg, a.device, |row, _| {
            if row == 0 {
                stamps.push(Instant::now());
            }
            false
        });
        let total = t0.elapsed().as_secs_f64();
        anyhow::ensure!(
            out.len() == a.batch as usize
                && out.iter().all(|s| s.tokens.len() == NEW_TOKENS as usize),
            "generate returned the wrong number of tokens"
        );
        let steps: Vec<f64> = stamps
            .windows(2)
            .map(|w| (w[1] - w[0]).as_secs_f64())
            .collect();
        Ok((
            total,
            vec![
                ("prefill_and_first_token", (stamps[0] - t0).as_secs_f64()),
                ("decode_step_median", median(&steps)),
                ("decode_steps_total", steps.iter().sum()),
            ],
        ))
    })?;
    Ok((
        json!({"bench": "sampling", "new_tokens_per_s": (a.batch * NEW_TOKENS) as f64 / med,
               "s_per_call": med, "batch": a.batch, "prompt": PROMPT, "preset": a.preset.name(),
               "new_tokens": NEW_TOKENS}),
        samples,
        phases,
    ))
}

/// Mixed lengths: continuous batching against a static batch's idle rows.
fn bench_mixed(a: &Args) -> anyhow::Result<(Value, Vec<f64>, Value)> {
    let m = sampling_model(a)?;
    let prompt = tokens(&[MIXED_PROMPTS, PROMPT], Device::Cpu);
    let prompts: Vec<Vec<i64>> = (0..MIXED_PROMPTS)
        .map(|i| Vec::<i64>::try_from(&prompt.get(i)).expect("prompt ids"))
        .collect();
    let requests: Vec<Request<'_>> = prompts
        .iter()
        .enumerate()
        .flat_map(|(i, p)| {
            (0..MIXED_SAMPLES).map(move |s| Request {
                prompt: p,
                prompt_index: i as u64,
                sample_index: s as u64,
            })
        })
        .collect();
    let cfg = SamplingConfig {
        max_new_tokens: MIXED_MAX_NEW,
        temperature: 1.0,
        max_rows: a.batch as usize,
        ..Default::default()
    };
    let lengths: Vec<usize> = (0..requests.len()).map(mixed_length).collect();
    let new_tokens: usize = lengths.iter().sum();
    let mut stats = None;
    let (med, samples, phases) = timed(a.repeats, a.device, || {
        let t0 = Instant::now();
        let out = sample_requests(
            &m.lm,
            &requests,
            &cfg,
            a.device,
            |r, toks| toks.len() >= lengths[r],
            |_| Ok(()),
        )?;
        let total = t0.elapsed().as_secs_f64();
        anyhow::ensure!(
            out.samples.iter().map(|s| s.tokens.len()).sum::<usize>() == new_tokens,
            "rows did not end at their lengths"
        );
        stats = Some(out.stats);
        Ok((total, vec![]))
    })?;
    let stats = stats.expect("timed ran");
    Ok((
        json!({"bench": "mixed", "new_tokens_per_s": new_tokens as f64 / med,
               "s_per_call": med, "rows": requests.len(), "max_rows": a.batch, "preset": a.preset.name(),
               "prompt": PROMPT, "samples_per_prompt": MIXED_SAMPLES,
               "max_new_tokens": MIXED_MAX_NEW, "new_tokens": new_tokens,
               "prefills": stats.prefills, "steps": stats.steps,
               "row_steps": stats.row_steps,
               "idle_row_fraction": 1.0 - new_tokens as f64 / stats.row_steps as f64,
               "static_idle_row_fraction": static_idle_fraction(&lengths, a.batch as usize)}),
        samples,
        phases,
    ))
}

fn main() -> anyhow::Result<()> {
    let a = parse_args()?;
    tch::set_num_threads(a.threads);
    let _ = Tensor::zeros([1], (Kind::Float, Device::Cpu)); // libtorch initialised
    let rss_after_init = vm_hwm_mib();
    type Section = fn(&Args) -> anyhow::Result<(Value, Vec<f64>, Value)>;
    let sections: [(&str, Section); 4] = [
        ("sft", bench_sft),
        ("rm", bench_rm),
        ("sample", bench_sample),
        ("mixed", bench_mixed),
    ];
    for (name, f) in sections {
        if a.only.as_deref().is_some_and(|o| o != name) {
            continue;
        }
        let (res, samples, phases) = f(&a)?;
        let mut out = serde_json::Map::new();
        out.insert("bench".into(), res["bench"].clone());
        out.insert("impl".into(), json!("alignflow"));
        for (k, v) in res.as_object().unwrap() {
            if k != "bench" {
                out.insert(k.clone(), v.clone());
            }
        }
        out.insert("samples".into(), json!(samples));
        if phases.as_object().is_some_and(|p| !p.is_empty()) {
            out.insert("phases_s".into(), phases);
        }
        out.insert("repeats".into(), json!(a.repeats));
        out.insert("warmup".into(), json!(WARMUP));
        out.insert("peak_rss_mib".into(), json!(vm_hwm_mib()));
        out.insert(
            "peak_rss_note".into(),
            json!("VmHWM of the whole process, cumulative over sections run in it"),
        );
        out.insert("rss_after_init_mib".into(), json!(rss_after_init));
        out.insert("threads".into(), json!(a.threads));
        out.insert("device".into(), json!(a.device_name));
        out.insert(
            "dtype".into(),
            json!(match (a.bf16, name) {
                (true, "sft") => "float32, bf16 autocast",
                (true, "sample" | "mixed") => "bfloat16",
                _ => "float32",
            }),
        );
        if let Device::Cuda(_) = a.device {
            out.insert(
                "cuda_peak_allocated_mib".into(),
                json!(alignflow_worker::cuda_memory::peak_mib(a.device)?),
            );
        }
        out.insert(
            "torch".into(),
            json!(option_env!("ALIGNFLOW_LIBTORCH_VERSION")),
        );
        println!("{}", Value::Object(out));
    }
    Ok(())
}
