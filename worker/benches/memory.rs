//! Memory benchmark (`make bench-memory`): the peak memory per parameter of
//! `sft`, `dpo`, `pm.train` and one `ppo` iteration, with full training and
//! with LoRA, at three Llama-shaped model sizes (random init, seed 0), and
//! on a GPU at a Qwen2.5-1.5B shape.
//!
//! Each (op, mode, size) runs in a fresh child process (this binary with
//! `--child`), through the op's worker entry on a `StageContext` built
//! here, so each peak is the op's alone: on the CPU the peak resident set
//! (VmHWM), on a GPU (`--device cuda`) the CUDA allocator's peak
//! (`torch.cuda.max_memory_allocated`, through `cuda_memory`), which
//! leaves out the CUDA context and the allocator's spare reserve. The
//! parent writes the inputs (a word-level tokenizer over the size's
//! vocabulary, the models, 8 records of 64 + 64 words) and prints a
//! markdown table.
//!
//! The workload: batch 4, sequences of 128 tokens, one optimizer step
//! (`sft`, `dpo`, `pm.train`); `ppo`: 4 prompts of 64 tokens, 32 new
//! tokens, one iteration (one epoch, one minibatch) with a full value
//! model and the reference and reward model in the op's default `dtype`
//! (`full`: float32 on the CPU, bf16 on a GPU that has it), or LoRA
//! (`all-linear`, rank 16) with `value_model: lora` and the frozen models
//! in `dtype: bfloat16` (`lora`), or the policy trained in full with the
//! critic's adapters on the reference's bf16 copy (`lora-critic`, `ppo`
//! only). Every other setting is the op's default for the device (on a
//! GPU: bf16 autocast, and activation checkpointing from about 300M
//! parameters). On the CPU a first child that loads no model measures the
//! fixed part every process holds.
//!
//!   cargo bench -p alignflow-worker --bench memory -- [--sizes 25m,110m,400m,1.5b]
//!       [--only sft,dpo,pm.train,ppo] [--modes full,lora,lora-critic] [--threads N]
//!       [--device cpu|cuda]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use alignflow_ops::protocol::StageSpec;
use alignflow_ops::{CancelFlag, NullReporter, StageContext};
use alignflow_worker::cuda_memory;
use alignflow_worker::model::{BuildOptions, Head, Model, ModelConfig};

mod workload;
use workload::{tokenizer_json, vm_hwm_mib};

const RECORDS: i64 = 8;
const WORDS: i64 = 64;

/// A model shape of the table.
struct Size {
    name: &'static str,
    /// `llama`, or `qwen2` (q/k/v biases).
    family: &'static str,
    vocab: i64,
    width: i64,
    layers: i64,
    heads: i64,
    kv_heads: i64,
    intermediate: i64,
    tied: bool,
}

#[rustfmt::skip]
const SIZES: &[Size] = &[
    Size { name: "25m", family: "llama", vocab: 4096, width: 512, layers: 8, heads: 8, kv_heads: 8, intermediate: 1376, tied: false },
    Size { name: "110m", family: "llama", vocab: 4096, width: 768, layers: 14, heads: 12, kv_heads: 12, intermediate: 2048, tied: false },
    Size { name: "400m", family: "llama", vocab: 4096, width: 1280, layers: 20, heads: 20, kv_heads: 20, intermediate: 3456, tied: false },
    // Qwen2.5-1.5B's config (1.54B parameters, its 151,936-token
    // vocabulary and tied embeddings), for a GPU.
    Size { name: "1.5b", family: "qwen2", vocab: 151_936, width: 1536, layers: 28, heads: 12, kv_heads: 2, intermediate: 8960, tied: true },
];

fn size(name: &str) -> anyhow::Result<&'static Size> {
    SIZES
        .iter()
        .find(|s| s.name == name)
        .with_context(|| format!("unknown size `{name}`"))
}

fn config(s: &Size) -> anyhow::Result<ModelConfig> {
    let mut raw = ModelConfig::llama_json(
        s.vocab,
        512,
        s.width,
        s.layers,
        s.heads,
        s.kv_heads,
        s.intermediate,
        0,
        s.tied,
    );
    raw["model_type"] = s.family.into();
    raw["architectures"] = json!([match s.family {
        "qwen2" => "Qwen2ForCausalLM",
        _ => "LlamaForCausalLM",
    }]);
    raw["bos_token_id"] = Value::Null;
    raw["eos_token_id"] = Value::Null;
    raw["pad_token_id"] = 0.into();
    ModelConfig::from_json(raw)
}

/// Random words `t<id>` below `vocab`, `n` of them per record, seed `seed`.
fn texts(seed: i64, n: i64, vocab: i64) -> Vec<String> {
    tch::manual_seed(seed);
    let t = Tensor::randint_low(1, vocab, [RECORDS, n], (Kind::Int64, Device::Cpu));
    (0..RECORDS)
        .map(|i| {
            let ids = Vec::<i64>::try_from(&t.get(i)).expect("ids");
            ids.iter()
                .map(|i| format!("t{i}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

fn write_jsonl(path: &Path, records: impl Iterator<Item = Value>) -> anyhow::Result<()> {
    let text: String = records.map(|r| r.to_string() + "\n").collect();
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Writes the size's models and the data under `root`; returns the
/// parameters of the language model.
fn write_inputs(root: &Path, size: &Size) -> anyhow::Result<i64> {
    let cfg = config(size)?;
    let tok = serde_json::to_string(&tokenizer_json(size.vocab))?;
    let mut params = 0;
    for (name, head) in [("policy", Head::Lm), ("reward", Head::Reward)] {
        tch::manual_seed(0);
        let mut m = Model::init(&cfg, &BuildOptions::new(Device::Cpu, head));
        if head == Head::Lm {
            params = m.vs.variables().values().map(|t| t.numel() as i64).sum();
        }
        let dir = root.join(name);
        m.save(&dir)?;
        std::fs::write(dir.join("tokenizer.json"), &tok)?;
    }
    let v = size.vocab;
    let (prompts, a, b) = (texts(1, WORDS, v), texts(2, WORDS, v), texts(3, WORDS, v));
    write_jsonl(
        &root.join("sft.jsonl"),
        prompts
            .iter()
            .zip(&a)
            .map(|(p, r)| json!({"prompt": p, "response": format!(" {r}")})),
    )?;
    write_jsonl(
        &root.join("pairs.jsonl"),
        (0..RECORDS as usize).map(|i| {
            json!({"prompt": prompts[i], "chosen": format!(" {}", a[i]), "rejected": format!(" {}", b[i]), "label": 1.0})
        }),
    )?;
    write_jsonl(
        &root.join("prompts.jsonl"),
        prompts.iter().map(|p| json!({"prompt": p})),
    )?;
    Ok(params)
}

/// The op's params and inputs for `mode`.
fn stage(op: &str, mode: &str, root: &Path) -> (Value, Vec<(&'static str, PathBuf)>) {
    let lora = json!({"rank": 16, "alpha": 32.0, "targets": "all-linear"});
    let train = json!({"max_steps": 1, "batch_size": 4, "max_len": 128, "append_eos": false});
    let with_lora = |mut p: Value| {
        if mode == "lora" {
            p["lora"] = lora.clone();
        }
        p
    };
    let pairs = root.join("pairs.jsonl");
    match op {
        "sft" => (
            with_lora(train),
            vec![
                ("model", root.join("policy")),
                ("data", root.join("sft.jsonl")),
            ],
        ),
        "dpo.reference" => (
            json!({"max_len": 128, "append_eos": false, "batch_size": 4}),
            vec![("model", root.join("policy")), ("comparisons", pairs)],
        ),
        "dpo" => {
            let mut p = with_lora(train);
            p["eval_fraction"] = 0.0.into();
            p.as_object_mut().expect("object").remove("max_len");
            p.as_object_mut().expect("object").remove("append_eos");
            (
                p,
                vec![
                    ("policy", root.join("policy")),
                    ("comparisons", pairs),
                    (
                        "reference_logps",
                        root.join("reference").join("out").join("reference_logps"),
                    ),
                ],
            )
        }
        "pm.train" => {
            let mut p = with_lora(train);
            p["eval_fraction"] = 0.0.into();
            (
                p,
                vec![("model", root.join("reward")), ("comparisons", pairs)],
            )
        }
        "ppo" => {
            let mut p = json!({
                "iterations": 1, "batch_size": 4, "max_new_tokens": 32,
                "ppo_epochs": 1, "minibatches": 1,
            });
            match mode {
                "lora" => {
                    p["lora"] = lora;
                    p["value_model"] = "lora".into();
                    p["dtype"] = "bfloat16".into();
                }
                // The policy trained in full, the critic's adapters on the
                // reference's frozen bf16 copy.
                "lora-critic" => {
                    p["critic_lora"] = lora;
                    p["value_model"] = "lora".into();
                    p["dtype"] = "bfloat16".into();
                }
                _ => {}
            }
            (
                p,
                vec![
                    ("policy", root.join("policy")),
                    ("reward_model", root.join("reward")),
                    ("prompts", root.join("prompts.jsonl")),
                ],
            )
        }
        other => panic!("no stage for `{other}`"),
    }
}

/// Runs one op in this process; returns its figures.
fn child(
    op_name: &str,
    mode: &str,
    root: &Path,
    out: &Path,
    device: &str,
    threads: usize,
) -> anyhow::Result<Value> {
    if op_name == "baseline" {
        // What every child holds before a weight: libtorch, oneDNN's
        // kernels and the allocator's arenas, warmed by a small matmul.
        let x = Tensor::randn([256, 256], (Kind::Float, Device::Cpu));
        let _ = x.matmul(&x).sum(Kind::Float).double_value(&[]);
        return Ok(json!({"peak_rss_mib": vm_hwm_mib(), "seconds": 0.0}));
    }
    let op = alignflow_ops::find(op_name).context("no such op")?;
    let (raw, inputs) = stage(op_name, mode, root);
    let params = op.normalize_params(&raw)?;
    let spec = StageSpec {
        pipeline: "bench-memory".into(),
        stage: op_name.into(),
        op: op_name.into(),
        op_version: op.version,
        params,
        inputs: inputs
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect::<BTreeMap<_, _>>(),
        outputs: Vec::new(),
        out_dir: out.join("out"),
        work_dir: root.to_path_buf(),
        checkpoint_dir: out.join("checkpoint"),
        device: device.into(),
        seed: 0,
        threads: Some(threads),
    };
    // The engine makes these for a stage.
    std::fs::create_dir_all(&spec.out_dir)?;
    std::fs::create_dir_all(&spec.checkpoint_dir)?;
    let run = alignflow_worker::ops::implementation(op_name).context("no worker op")?;
    let cancel = CancelFlag::default();
    let t0 = Instant::now();
    run(&StageContext {
        spec: &spec,
        reporter: &NullReporter,
        cancel: &cancel,
    })?;
    let seconds = t0.elapsed().as_secs_f64();
    let cuda_peak_mib = match alignflow_worker::model::device(device)? {
        Device::Cpu => None,
        gpu => Some(cuda_memory::peak_mib(gpu)?),
    };
    Ok(json!({"peak_rss_mib": vm_hwm_mib(), "cuda_peak_mib": cuda_peak_mib, "seconds": seconds}))
}

struct Args {
    sizes: Vec<String>,
    ops: Vec<String>,
    modes: Vec<String>,
    threads: usize,
    device: String,
}

fn list(v: Option<String>, default: &str) -> Vec<String> {
    v.unwrap_or_else(|| default.into())
        .split(',')
        .map(str::to_string)
        .collect()
}

fn main() -> anyhow::Result<()> {
    let argv: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let flag = |name: &str| {
        argv.iter()
            .position(|a| a == name)
            .and_then(|i| argv.get(i + 1).cloned())
    };
    let threads: usize = flag("--threads")
        .or_else(|| std::env::var("ALIGNFLOW_BENCH_THREADS").ok())
        .map_or(Ok(2), |t| t.parse())?;
    let device = flag("--device").unwrap_or_else(|| "cpu".into());
    let on_gpu = alignflow_worker::model::device(&device)? != Device::Cpu;
    tch::set_num_threads(threads as i32);
    if let Some(i) = argv.iter().position(|a| a == "--child") {
        let [op, mode, root, out] = &argv[i + 1..i + 5] else {
            anyhow::bail!("--child OP MODE ROOT OUT");
        };
        let figures = child(op, mode, Path::new(root), Path::new(out), &device, threads)?;
        println!("{figures}");
        return Ok(());
    }
    let a = Args {
        sizes: list(flag("--sizes"), "25m,110m,400m"),
        ops: list(flag("--only"), "sft,dpo,pm.train,ppo"),
        modes: list(flag("--modes"), "full,lora,lora-critic"),
        threads,
        device,
    };
    let sizes = a
        .sizes
        .iter()
        .map(|s| size(s))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let me = std::env::current_exe()?;
    let spawn = |op: &str, mode: &str, root: &Path, out: &Path| -> anyhow::Result<Value> {
        let output = Command::new(&me)
            .args(["--child", op, mode])
            .arg(root)
            .arg(out)
            .args(["--threads", &a.threads.to_string()])
            .args(["--device", &a.device])
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "{op} ({mode}): {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout.lines().last().context("no figures")?;
        Ok(serde_json::from_str(line)?)
    };
    let base = if on_gpu {
        println!("Peaks are the CUDA allocator's (`max_memory_allocated`, on `{}`): live tensors only, without the CUDA context or the allocator's spare reserve.\n", a.device);
        println!("| op | mode | size | parameters | peak allocated (MiB) | bytes / parameter | peak RSS (MiB) | seconds |");
        0.0
    } else {
        let base_dir = tempfile::tempdir()?;
        let base = spawn("baseline", "-", base_dir.path(), base_dir.path())?["peak_rss_mib"]
            .as_f64()
            .unwrap_or(0.0);
        println!("Every child holds {base:.0} MiB before any weight (libtorch, oneDNN, allocator); the last byte column leaves it out.\n");
        println!("| op | mode | size | parameters | peak RSS (MiB) | bytes / parameter | bytes / parameter above the fixed part | seconds |");
        base
    };
    println!("|---|---|---|---:|---:|---:|---:|---:|");
    for size in sizes {
        let tmp = tempfile::tempdir()?;
        let root = tmp.path();
        let params = write_inputs(root, size)?;
        if a.ops.iter().any(|o| o == "dpo") {
            spawn("dpo.reference", "full", root, &root.join("reference"))?;
        }
        for op in &a.ops {
            for mode in &a.modes {
                if mode == "lora-critic" && op != "ppo" {
                    continue;
                }
                let out = root.join(format!("{op}-{mode}"));
                let f = spawn(op, mode, root, &out)?;
                let rss = f["peak_rss_mib"].as_f64().unwrap_or(f64::NAN);
                let per_param = |mib: f64| mib * (1u64 << 20) as f64 / params as f64;
                let third = match f["cuda_peak_mib"].as_f64() {
                    Some(gpu) => format!("{gpu:.0} | {:.1} | {rss:.0}", per_param(gpu)),
                    None => format!(
                        "{rss:.0} | {:.1} | {:.1}",
                        per_param(rss),
                        per_param(rss - base)
                    ),
                };
                println!(
                    "| {op} | {mode} | {} | {:.1}M | {third} | {:.0} |",
                    size.name,
                    params as f64 / 1e6,
                    f["seconds"].as_f64().unwrap_or(f64::NAN)
                );
                // The next stage's inputs are the same; its outputs are not kept.
                let _ = std::fs::remove_dir_all(&out);
            }
        }
    }
    Ok(())
}
