//! `alignflow-worker`: runs one stage on libtorch, out of the engine's process.
//!
//! The engine starts it with a [`StageSpec`] as JSON and reads one
//! [`WorkerEvent`] per stdout line; logs go to stderr. One process per stage
//! isolates crashes and OOMs, frees GPU memory between stages and is the
//! command a cluster executor launches elsewhere.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::Context;
use clap::{Parser, Subcommand};

use alignflow_ops::protocol::{StageSpec, WorkerEvent};
use alignflow_ops::{CancelFlag, Placement, Reporter, StageContext};

use alignflow_worker::ops;

#[derive(Parser)]
#[command(
    name = "alignflow-worker",
    version,
    about = "Runs one alignflow stage (started by the engine)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the stage described by a JSON stage spec (a file, or `-` for stdin).
    Run { spec: PathBuf },
    /// Prints libtorch, CUDA and thread facts as one JSON event.
    Doctor {
        /// Also forms a one-rank NCCL group on cuda:0 and runs each
        /// collective data parallelism uses on it (`nccl_check`).
        #[arg(long)]
        nccl: bool,
    },
}

/// Writes events to stdout, one JSON object per line, flushed at once so the
/// engine sees progress as it happens.
struct StdoutReporter {
    out: Mutex<std::io::Stdout>,
}

impl StdoutReporter {
    fn emit(&self, event: &WorkerEvent) {
        let mut out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        // A closed pipe means the engine went away; nothing left to tell it.
        let _ = writeln!(out, "{}", event.to_line());
        let _ = out.flush();
    }
}

impl Reporter for StdoutReporter {
    fn progress(&self, pos: u64, len: Option<u64>, msg: &str) {
        self.emit(&WorkerEvent::Progress {
            pos,
            len,
            msg: msg.to_string(),
        });
    }
    fn metric(&self, values: &BTreeMap<String, f64>) {
        self.emit(&WorkerEvent::Metric {
            values: values.clone(),
        });
    }
}

fn main() {
    // First: SIGUSR1 (a checkpoint asked for) would otherwise kill the
    // worker; the engine started it with the signal blocked until now.
    let usr1 = alignflow_ops::checkpoint_request::install();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Stage logs and Slurm job outputs are files: no colour codes there.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    if let Err(e) = usr1 {
        tracing::warn!("SIGUSR1 handler: {e} (a checkpoint cannot be asked for)");
    }
    let cli = Cli::parse();
    let reporter = StdoutReporter {
        out: Mutex::new(std::io::stdout()),
    };
    let code = match cli.command {
        Command::Doctor { nccl } => {
            let mut info = doctor();
            if nccl {
                let check = alignflow_worker::dist::nccl_self_check();
                let text = check.unwrap_or_else(|e| format!("failed: {e:#}"));
                info.insert("nccl_check".into(), serde_json::json!(text));
            }
            reporter.emit(&WorkerEvent::Doctor { info });
            0
        }
        // Under srun, task 0's place is that of rank 0, the job's own
        // worker, which started the step (`dist::srun`).
        Command::Run { .. } if alignflow_worker::dist::holds_rank_0_place() => {
            tracing::info!("srun task 0: rank 0 is the job's own worker; nothing to run here");
            0
        }
        Command::Run { spec } => match run(&spec, &reporter) {
            Ok(metrics) => {
                reporter.emit(&WorkerEvent::Done { metrics });
                0
            }
            Err(err) => {
                reporter.emit(&WorkerEvent::Failed {
                    message: format!("{err:#}"),
                });
                1
            }
        },
    };
    alignflow_worker::dist::exit(code);
}

fn run(
    spec_path: &PathBuf,
    reporter: &StdoutReporter,
) -> anyhow::Result<alignflow_ops::protocol::Metrics> {
    let text = if spec_path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s)?;
        s
    } else {
        std::fs::read_to_string(spec_path)
            .with_context(|| format!("reading {}", spec_path.display()))?
    };
    let mut spec: StageSpec = serde_json::from_str(&text).context("parsing the stage spec")?;
    if let Some(threads) = spec.threads {
        tch::set_num_threads(threads as i32);
    }
    // `data_parallel: N`: this worker is rank 0 and starts the others, or
    // it is one of those others.
    let ranks = alignflow_worker::dist::start(&mut spec)?;
    let cancel = CancelFlag::default();
    let ctx = StageContext {
        spec: &spec,
        reporter,
        cancel: &cancel,
    };
    let _span = tracing::info_span!("stage", stage = %spec.stage, op = %spec.op).entered();
    let op = alignflow_ops::find(&spec.op).with_context(|| format!("unknown op `{}`", spec.op))?;
    anyhow::ensure!(
        op.version == spec.op_version,
        "op `{}` is version {} here but the engine planned version {}",
        spec.op,
        op.version,
        spec.op_version
    );
    let run = match op.placement {
        // Engine ops run here too, so any stage can be isolated or sent elsewhere.
        Placement::Engine(run) => run,
        Placement::Worker => ops::implementation(op.name)
            .with_context(|| format!("op `{}` has no implementation in this worker", op.name))?,
    };
    // A stage on the CPU asks no CUDA driver for its peaks.
    let on_gpus = spec.device != "cpu"
        || alignflow_ops::role_devices::gpus_named(spec.params.get("placement")) > 0;
    let result = run(&ctx).map(|mut metrics| {
        // What a stage on GPUs held at its peak, as torch users read it.
        let peaks = match on_gpus {
            true => alignflow_worker::cuda_memory::stage_peaks(),
            false => Default::default(),
        };
        if !peaks.is_empty() {
            tracing::info!(
                "peak GPU memory allocated (MiB): {}",
                serde_json::Value::from(peaks.clone())
            );
            metrics.insert(
                alignflow_worker::cuda_memory::PEAK_METRIC.into(),
                peaks.into(),
            );
        }
        metrics
    });
    match ranks {
        Some(ranks) => ranks.finish(result),
        None => result,
    }
}

fn doctor() -> BTreeMap<String, serde_json::Value> {
    use serde_json::json;
    let mut info = BTreeMap::new();
    info.insert("worker_version".into(), json!(env!("CARGO_PKG_VERSION")));
    info.insert("libtorch".into(), json!(libtorch_version()));
    let cuda = tch::Cuda::is_available();
    info.insert("cuda_available".into(), json!(cuda));
    let count = if cuda { tch::Cuda::device_count() } else { 0 };
    info.insert("cuda_devices".into(), json!(count));
    info.insert(
        "device_names".into(),
        json!(if cuda { gpu_names() } else { Vec::new() }),
    );
    info.insert(
        "cudnn_available".into(),
        json!(tch::Cuda::cudnn_is_available()),
    );
    info.insert("threads".into(), json!(tch::get_num_threads()));
    // `data_parallel` on CPU: torch's Gloo collectives through the shim.
    info.insert(
        "data_parallel_gloo".into(),
        json!(alignflow_worker::dist::available()),
    );
    // On GPUs: torch's NCCL group through the shim (`doctor --nccl` runs it).
    info.insert(
        "data_parallel_nccl".into(),
        json!(alignflow_worker::dist::nccl_available()),
    );
    info
}

/// The libtorch version the worker was built against (from torch's `version.py`).
fn libtorch_version() -> String {
    option_env!("ALIGNFLOW_LIBTORCH_VERSION")
        .unwrap_or("unknown")
        .to_string()
}

/// GPU names: tch exposes no device-properties call, so ask the driver tool.
fn gpu_names() -> Vec<String> {
    std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(|l| l.trim().to_string())
                .collect()
        })
        .unwrap_or_default()
}
