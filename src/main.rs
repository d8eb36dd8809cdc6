//! `alignflow`: the engine and CLI. It never links libtorch; tensor stages
//! run in `alignflow-worker` processes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use alignflow::cache::Cache;
use alignflow::engine::{self, Action, PlanContext, RunOptions};
use alignflow::graph::Dag;
use alignflow::manifest::{self, LoadOptions, Pipeline};
use alignflow::remote::{self, Remote};

#[derive(Parser)]
#[command(
    name = "alignflow",
    version,
    about = "Declarative RLHF / RLAIF pipelines with content-addressed caching"
)]
struct Cli {
    /// Cache folder.
    #[arg(
        long,
        global = true,
        env = "ALIGNFLOW_CACHE_DIR",
        default_value = "cache"
    )]
    cache_dir: PathBuf,
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

/// Arguments shared by the commands that load a manifest.
#[derive(clap::Args)]
struct ManifestArgs {
    /// The pipeline manifest (YAML).
    file: PathBuf,
    /// Override a pipeline param: `--set params.lr=1e-4` (typed as YAML).
    #[arg(long = "set", value_name = "params.NAME=VALUE")]
    sets: Vec<String>,
}

// The `run` flags, turned into the engine's `RunOptions`.
#[derive(clap::Args)]
struct RunArgs {
    /// Run only this stage and its ancestors (repeatable).
    #[arg(long = "target", short = 't')]
    targets: Vec<String>,
    /// Stages running at once.
    #[arg(long, short = 'j', default_value_t = default_jobs())]
    jobs: usize,
    /// Stop every stage at the first failure.
    #[arg(long)]
    fail_fast: bool,
    /// Refuse to run when the plan differs from the lockfile.
    #[arg(long)]
    locked: bool,
    /// Write the lockfile even after a `--target` or `--set` run.
    #[arg(long, conflicts_with = "locked")]
    update_lock: bool,
    /// Rehash every path input instead of trusting the hash cache.
    #[arg(long)]
    rehash: bool,
    /// CPU threads per tensor stage (at least 1).
    #[arg(long, env = "ALIGNFLOW_THREADS", value_parser = at_least_one)]
    threads: Option<usize>,
    /// No progress output (the summary table is still printed).
    #[arg(long, short = 'q')]
    quiet: bool,
    /// GPU stages that may share one device (default: one per GPU).
    #[arg(long, default_value_t = 1)]
    gpu_slots: usize,
    #[command(flatten)]
    remote: RemoteArgs,
    /// Where stages run: `local` (worker processes here, the default) or
    /// `slurm` (one Slurm job per stage; the cache on a shared filesystem).
    #[arg(long, value_name = "local|slurm")]
    executor: Option<engine::ExecutorKind>,
    /// Site settings (executor, partition, account, polling, extra sbatch
    /// flags) from `alignflow/profiles/NAME.yaml` beside the manifest or in
    /// the user's config folder.
    #[arg(long, env = "ALIGNFLOW_PROFILE", value_name = "NAME")]
    profile: Option<String>,
    /// Stream every training stage's metrics to TensorBoard event files
    /// under DIR (one run folder per stage), over the manifest's
    /// `tracking: { tensorboard: ... }`.
    #[arg(long, value_name = "DIR")]
    tensorboard: Option<PathBuf>,
}

/// Which remote cache `run` and `plan` read through.
#[derive(clap::Args)]
struct RemoteArgs {
    /// Read through this remote cache (a name from alignflow.config.yaml, or
    /// a URL); default: the config's `remote:`.
    #[arg(long, value_name = "REMOTE")]
    remote: Option<String>,
    /// Use no remote cache, even a configured default.
    #[arg(long, conflicts_with = "remote")]
    no_remote: bool,
}

impl RemoteArgs {
    fn open(&self) -> anyhow::Result<Option<Arc<Remote>>> {
        let here = std::env::current_dir()?;
        let spec = match (&self.remote, self.no_remote) {
            (_, true) => None,
            (Some(name), false) => Some(remote::resolve(name, &here)?),
            (None, false) => remote::default_remote(&here)?,
        };
        Ok(match spec {
            Some(spec) => Some(Arc::new(Remote::open(spec)?)),
            None => None,
        })
    }
}

/// `--remote REMOTE` of the `cache` subcommands.
fn open_remote(name: &str) -> anyhow::Result<Remote> {
    let spec = remote::resolve(name, &std::env::current_dir()?)?;
    Ok(Remote::open(spec)?)
}

impl RunArgs {
    /// The engine's options for the manifest in `project` with `sets`.
    fn into_options(
        self,
        project: &Path,
        sets: Vec<(String, String)>,
    ) -> anyhow::Result<RunOptions> {
        let profile = match &self.profile {
            Some(name) => engine::Profile::find(name, project)?.0,
            None => engine::Profile::default(),
        };
        let executor = match self.executor.unwrap_or(profile.executor) {
            engine::ExecutorKind::Local => engine::Executor::Local,
            engine::ExecutorKind::Slurm => engine::Executor::Slurm(profile.slurm),
        };
        let remote = self.remote.open()?;
        Ok(RunOptions {
            remote,
            executor,
            attach: None,
            params_overridden: !sets.is_empty(),
            sets,
            targets: self.targets,
            jobs: self.jobs,
            fail_fast: self.fail_fast,
            locked: self.locked,
            update_lock: self.update_lock,
            rehash: self.rehash,
            threads: self.threads,
            quiet: self.quiet,
            gpu_slots: self.gpu_slots,
            tracking: alignflow::manifest::Tracking {
                tensorboard: self.tensorboard.map(std::path::absolute).transpose()?,
                mlflow: None,
            },
        })
    }
}

/// `run`'s manifest: given, or the attached run's.
#[derive(clap::Args)]
struct RunManifestArgs {
    /// The pipeline manifest (YAML); not with `--attach`.
    #[arg(required_unless_present = "attach", conflicts_with = "attach")]
    file: Option<PathBuf>,
    /// Override a pipeline param: `--set params.lr=1e-4` (typed as YAML).
    #[arg(long = "set", value_name = "params.NAME=VALUE")]
    sets: Vec<String>,
    /// Follow the Slurm run RUN again (its login shell died): adopt its
    /// jobs, resubmit the lost ones, finish it.
    #[arg(long, value_name = "RUN")]
    attach: Option<String>,
    /// With `--attach`: adopt the run although its engine's lock stands.
    /// Only for an engine known dead whose lock outlived it (its login
    /// node lost, the cache on NFSv3); never while it may still run.
    #[arg(long, requires = "attach")]
    take_over: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Run what is out of date.
    Run {
        #[command(flatten)]
        manifest: RunManifestArgs,
        #[command(flatten)]
        options: RunArgs,
    },
    /// The jobs of a Slurm run (the latest one by default): stage,
    /// fingerprint, job id, state and reason, attempt, log.
    Jobs {
        /// The run id (`alignflow run` prints it).
        run: Option<String>,
    },
    /// What a cluster job runs.
    Stage {
        #[command(subcommand)]
        command: StageCommand,
    },
    /// Show, stage by stage, whether it would run or is cached, and why.
    Plan {
        #[command(flatten)]
        manifest: ManifestArgs,
        #[arg(long = "target", short = 't')]
        targets: Vec<String>,
        /// JSON array of {stage, action, reason, fingerprint}.
        #[arg(long)]
        json: bool,
        #[arg(long)]
        rehash: bool,
        #[command(flatten)]
        remote: RemoteArgs,
    },
    /// Print the stage graph.
    Dag {
        #[command(flatten)]
        manifest: ManifestArgs,
        #[arg(long, value_enum, default_value_t = DagFormat::Text)]
        format: DagFormat,
    },
    /// Check a manifest without running anything.
    Validate {
        #[command(flatten)]
        manifest: ManifestArgs,
    },
    /// Print a stage's output names and paths.
    Show {
        #[command(flatten)]
        manifest: ManifestArgs,
        stage: String,
        #[arg(long)]
        json: bool,
    },
    /// List the registered ops, or describe one.
    Ops { name: Option<String> },
    /// Inspect and maintain the cache.
    Cache {
        #[command(subcommand)]
        command: CacheCommand,
    },
    /// Engine, executor, Slurm partitions, libtorch and device facts, and
    /// whether each configured remote cache answers.
    Doctor {
        /// Report the executor this profile selects.
        #[arg(long, env = "ALIGNFLOW_PROFILE", value_name = "NAME")]
        profile: Option<String>,
    },
    /// Write an HTML page of the pipeline as of the cache: the DAG, each
    /// stage's status, training curves and evaluation tables.
    Report {
        #[command(flatten)]
        manifest: ManifestArgs,
        /// Output file (default: CACHE_DIR/reports/NAME.html).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write the `metrics.jsonl` of every cached training stage as
    /// TensorBoard runs (one folder per stage), as `run --tensorboard`
    /// streams them.
    ExportTb {
        #[command(flatten)]
        manifest: ManifestArgs,
        /// The TensorBoard folder (default: the manifest's
        /// `tracking: { tensorboard: ... }`).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
    },
    /// Write the JSON schemas of the manifest and of each op's params.
    Schema {
        /// Output folder.
        #[arg(long, default_value = "schemas")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum StageCommand {
    /// Run one stage from a job spec on this node and commit its record
    /// (the command of a Slurm job script).
    Exec {
        /// The job spec the engine wrote (`cache/tmp/slurm-RUN/FP/spec.json`).
        spec: PathBuf,
    },
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Rehash every object and check every record; name the trees and
    /// records (stages) that use each corrupt object.
    Verify {
        /// Move corrupt objects to quarantine/ and remove every record that
        /// produced one or was built on one (directly or downstream), so
        /// the next run recomputes exactly those stages.
        #[arg(long, conflicts_with = "remote")]
        repair: bool,
        /// Check this remote cache instead (rehashes every object on it).
        #[arg(long, value_name = "REMOTE")]
        remote: Option<String>,
    },
    /// Upload stage records and their outputs to a remote cache: those of
    /// MANIFEST (its --target stages and their ancestors), or every record
    /// in the local cache.
    Push {
        /// A name from alignflow.config.yaml, or a URL (s3://bucket/prefix,
        /// file:///folder).
        #[arg(long, value_name = "REMOTE")]
        remote: String,
        manifest: Option<PathBuf>,
        /// Push only this stage and its ancestors (repeatable).
        #[arg(long = "target", short = 't', requires = "manifest")]
        targets: Vec<String>,
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Download the records (and outputs) of the MANIFESTs' stages that the
    /// remote holds, or every record on the remote; each object is checked
    /// against its hash.
    Pull {
        #[arg(long, value_name = "REMOTE")]
        remote: String,
        manifests: Vec<PathBuf>,
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Make an ed25519 key pair for signing pushed records: writes the
    /// secret key to --out and prints the public key for `trusted_keys`.
    Keygen {
        /// The key's name (e.g. team-ci).
        name: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Remove objects that no record reaches, stale staging folders and
    /// checkpoints of committed stages.
    Gc {
        #[arg(long)]
        dry_run: bool,
        /// Keep unreachable objects younger than this (`2h`, `1day`): a job
        /// on another node may still commit them. Default: a day on a
        /// shared cache, none otherwise.
        #[arg(long, value_parser = humantime::parse_duration)]
        min_age: Option<std::time::Duration>,
    },
    /// Set the cache up; `--shared`: for a group on a shared filesystem
    /// (group-writable setgid folders, umask 002, `gc` keeps young garbage).
    Init {
        #[arg(long)]
        shared: bool,
        /// The group that shares it (default: the folder's group).
        #[arg(long, requires = "shared")]
        group: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum DagFormat {
    Text,
    Dot,
}

/// `--threads`: a worker asked for 0 threads would have none to run on.
fn at_least_one(text: &str) -> Result<usize, String> {
    match text.trim().parse::<usize>() {
        Ok(0) => Err("must be at least 1 (0 would leave a tensor stage no thread)".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(format!("expected a whole number of threads: {e}")),
    }
}

/// A command that only prints (`plan | head`, `doctor | head`) ends quietly
/// when its reader goes away, as other Unix tools do, instead of panicking
/// in `println!`. `run` keeps SIGPIPE ignored: it writes to its workers'
/// pipes and must see a worker's death as an error, not die of it.
fn die_quietly_on_a_closed_pipe(command: &Command) {
    if !matches!(command, Command::Run { .. } | Command::Stage { .. }) {
        // SAFETY: restores the default disposition before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
}

fn default_jobs() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    die_quietly_on_a_closed_pipe(&cli.command);
    // On a node, an exec stage's output lines (info on `alignflow::stage`)
    // belong in the job's log, where a failure's tail is read from.
    init_logging(cli.verbose, matches!(cli.command, Command::Stage { .. }));
    match try_main(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(verbose: u8, stage_output: bool) {
    let default = match (verbose, stage_output) {
        (0, true) => "warn,alignflow::stage=info",
        (0, false) => "warn",
        (1, _) => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // No colour codes in files (a job's log).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(filter)
        .with_target(false)
        .init();
}

fn parse_sets(given: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    let mut sets = Vec::new();
    for s in given {
        let (k, v) = s
            .split_once('=')
            .with_context(|| format!("--set `{s}`: expected params.NAME=VALUE"))?;
        sets.push((k.trim().to_string(), v.to_string()));
    }
    Ok(sets)
}

fn load(args: &ManifestArgs) -> anyhow::Result<(Arc<Pipeline>, Arc<Dag>)> {
    let sets = parse_sets(&args.sets)?;
    let pipeline = manifest::load(&args.file, &LoadOptions { sets })?;
    let dag = Dag::build(&pipeline)?;
    Ok((Arc::new(pipeline), Arc::new(dag)))
}

fn open_cache(dir: &Path) -> anyhow::Result<Arc<Cache>> {
    Ok(Arc::new(Cache::open(dir).with_context(|| {
        format!("opening the cache {}", dir.display())
    })?))
}

fn try_main(cli: Cli) -> anyhow::Result<ExitCode> {
    let cache_dir = &cli.cache_dir;
    match cli.command {
        Command::Run { manifest, options } => run(cache_dir, manifest, options),
        Command::Jobs { run } => jobs(cache_dir, run.as_deref()),
        Command::Stage {
            command: StageCommand::Exec { spec },
        } => stage_exec(&spec),
        Command::Plan {
            manifest,
            targets,
            json,
            rehash,
            remote,
        } => plan(cache_dir, &manifest, &targets, json, rehash, &remote),
        Command::Dag { manifest, format } => dag(&manifest, format),
        Command::Validate { manifest } => validate(&manifest),
        Command::Show {
            manifest,
            stage,
            json,
        } => show(cache_dir, &manifest, &stage, json),
        Command::Ops { name } => ops(name.as_deref()),
        Command::Cache { command } => cache(cache_dir, command),
        Command::Doctor { profile } => doctor(cache_dir, profile.as_deref()),
        Command::Report { manifest, out } => report(cache_dir, &manifest, out),
        Command::ExportTb { manifest, out } => export_tb(cache_dir, &manifest, out),
        Command::Schema { out } => schema(&out),
    }
}

fn run(cache_dir: &Path, args: RunManifestArgs, run_args: RunArgs) -> anyhow::Result<ExitCode> {
    let (manifest, options) = match (&args.attach, args.file) {
        (Some(run_id), _) => {
            let info = engine::RunInfo::load(open_cache(cache_dir)?.root(), run_id)?;
            let mut options = run_args.into_options(Path::new("."), info.sets.clone())?;
            options.executor = engine::Executor::Slurm(info.settings);
            options.attach = Some(engine::Attach {
                run_id: run_id.clone(),
                take_over: args.take_over,
            });
            options.targets = info.targets;
            let sets = info.sets.iter().map(|(k, v)| format!("{k}={v}")).collect();
            (
                ManifestArgs {
                    file: info.manifest,
                    sets,
                },
                options,
            )
        }
        (None, Some(file)) => {
            let manifest = ManifestArgs {
                file,
                sets: args.sets,
            };
            let project = manifest
                .file
                .parent()
                .unwrap_or(Path::new("."))
                .to_path_buf();
            let options = run_args.into_options(&project, parse_sets(&manifest.sets)?)?;
            (manifest, options)
        }
        (None, None) => anyhow::bail!("run: give a manifest, or --attach RUN"),
    };
    let (pipeline, dag) = load(&manifest)?;
    let cache = open_cache(cache_dir)?;
    let summary = engine::run(pipeline, dag, cache, options)?;
    print!("{}", summary.table());
    if let Some(log) = &summary.log {
        eprintln!("log: {}", log.display());
    }
    Ok(if summary.terminated {
        ExitCode::from(143)
    } else if summary.interrupted {
        ExitCode::from(130)
    } else if summary.success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `stage exec SPEC`: 0 once the record is committed, 143 when a signal
/// stopped the stage (the engine resubmits), 1 when it failed.
fn stage_exec(spec: &Path) -> anyhow::Result<ExitCode> {
    match engine::stage_exec(spec) {
        Ok(engine::NodeOutcome::Committed) => Ok(ExitCode::SUCCESS),
        Ok(engine::NodeOutcome::Stopped) => Ok(ExitCode::from(143)),
        Err(e) => {
            eprintln!("error: {e:#}");
            Ok(ExitCode::from(1))
        }
    }
}

/// `jobs [RUN]`: one line per job, with its live state from one `squeue`
/// call when it has not ended.
fn jobs(cache_dir: &Path, run: Option<&str>) -> anyhow::Result<ExitCode> {
    let cache = open_cache(cache_dir)?;
    let run_id = match run {
        Some(r) => r.to_string(),
        None => match engine::list_runs(cache.root())?.pop() {
            Some(latest) => latest.run_id,
            None => {
                println!("no Slurm runs in {}", cache.root().display());
                return Ok(ExitCode::SUCCESS);
            }
        },
    };
    let info = engine::RunInfo::load(cache.root(), &run_id)?;
    let jobs = engine::read_jobs(&engine::run_dir(cache.root(), &run_id))?;
    let live = if jobs.iter().any(|j| j.ended.is_none()) {
        let out = std::process::Command::new("squeue")
            .args([
                "--noheader",
                "--states=all",
                "--name",
                &run_id,
                "--format",
                "%i|%T|%r",
            ])
            .output();
        match out {
            Ok(o) if o.status.success() => {
                engine::parse_squeue(&String::from_utf8_lossy(&o.stdout))
            }
            _ => Default::default(),
        }
    } else {
        Default::default()
    };
    println!(
        "run {run_id} ({}, started {})",
        info.manifest.display(),
        info.started_at
    );
    let width = jobs.iter().map(|j| j.stage.len()).max().unwrap_or(5).max(5);
    println!(
        "{:<width$}  {:<12}  {:>8}  {:<13}  {:<12}  {:>7}  log",
        "stage", "fingerprint", "job", "state", "reason", "attempt"
    );
    for j in &jobs {
        let (state, reason) = match (&j.ended, live.get(&j.job_id)) {
            (Some((s, r)), _) => (s.clone(), r.clone()),
            (None, Some(l)) => (l.state.clone(), l.reason.clone()),
            (None, None) => ("UNKNOWN".into(), "not in squeue".into()),
        };
        println!(
            "{:<width$}  {:<12}  {:>8}  {:<13}  {:<12}  {:>7}  {}",
            j.stage,
            &j.fingerprint[..j.fingerprint.len().min(12)],
            j.job_id,
            state,
            reason,
            j.attempt,
            j.log.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn plan(
    cache_dir: &Path,
    args: &ManifestArgs,
    targets: &[String],
    json: bool,
    rehash: bool,
    remote: &RemoteArgs,
) -> anyhow::Result<ExitCode> {
    let (pipeline, dag) = load(args)?;
    let cache = open_cache(cache_dir)?;
    let remote = remote.open()?;
    let lockfile = engine::Lockfile::load(&engine::lockfile_path(&pipeline.file))?;
    let selected = dag.select(&pipeline, targets)?;
    let ctx = PlanContext {
        pipeline: &pipeline,
        dag: &dag,
        cache: &cache,
        lockfile: lockfile.as_ref(),
        rehash,
        locked: false,
        remote: remote.as_deref(),
        remote_must_answer: false,
    };
    let plan = engine::plan(&ctx, &selected)?;
    cache.flush_hash_cache()?;
    if json {
        println!("{}", serde_json::to_string_pretty(&plan.rows(&pipeline))?);
    } else {
        let rows = plan.rows(&pipeline);
        let width = rows.iter().map(|r| r.stage.len()).max().unwrap_or(5);
        for r in rows {
            let action = if r.action == Action::Run {
                "run"
            } else {
                "cached"
            };
            println!("{action:<7} {:<width$}  {}", r.stage, r.reason);
        }
        println!(
            "{} to run, {} cached",
            plan.to_run(),
            plan.stages.len() - plan.to_run()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn dag(args: &ManifestArgs, format: DagFormat) -> anyhow::Result<ExitCode> {
    let (pipeline, dag) = load(args)?;
    match format {
        DagFormat::Text => print!("{}", dag.to_text(&pipeline)),
        DagFormat::Dot => print!("{}", dag.to_dot(&pipeline)),
    }
    Ok(ExitCode::SUCCESS)
}

fn validate(args: &ManifestArgs) -> anyhow::Result<ExitCode> {
    let (pipeline, _) = load(args)?;
    // A missing input would only fail the run, after its upstream stages:
    // every one is named now.
    let missing = alignflow::engine::missing_path_inputs(&pipeline);
    if !missing.is_empty() {
        for m in &missing {
            eprintln!("error: {m}");
        }
        anyhow::bail!(
            "{}: {} input(s) do not exist",
            args.file.display(),
            missing.len()
        );
    }
    println!(
        "{}: ok ({} stages)",
        args.file.display(),
        pipeline.stages.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn ops(name: Option<&str>) -> anyhow::Result<ExitCode> {
    match name {
        None => {
            let width = alignflow::ops::REGISTRY
                .iter()
                .map(|op| op.name.len())
                .max()
                .unwrap_or(0);
            for op in alignflow::ops::REGISTRY {
                println!("{:<width$} {}", op.name, op.summary);
            }
        }
        Some(name) => print!("{}", alignflow::ops::describe(name)?),
    }
    Ok(ExitCode::SUCCESS)
}

fn cache(cache_dir: &Path, command: CacheCommand) -> anyhow::Result<ExitCode> {
    // Commands about a remote or a key only: no local cache is opened (it
    // would be created where the command runs).
    match &command {
        CacheCommand::Verify {
            remote: Some(name), ..
        } => return verify_remote(name),
        CacheCommand::Keygen { name, out } => {
            let key = remote::keygen(name, out)?;
            eprintln!("secret key written to {} (keep it private)", out.display());
            println!("{}", key.public_text());
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let cache = open_cache(cache_dir)?;
    match command {
        CacheCommand::Verify {
            remote: Some(_), ..
        }
        | CacheCommand::Keygen { .. } => unreachable!("answered above"),
        CacheCommand::Push {
            remote,
            manifest,
            targets,
            quiet,
        } => push(&cache, &remote, manifest, &targets, quiet),
        CacheCommand::Pull {
            remote,
            manifests,
            quiet,
        } => pull(&cache, &remote, &manifests, quiet),
        CacheCommand::Verify { repair, .. } => {
            let report = if repair {
                cache.verify_and_repair()?
            } else {
                cache.verify()?
            };
            for p in &report.problems {
                println!("{p}");
            }
            for u in &report.uses {
                println!("used: {u}");
            }
            for r in &report.repaired {
                println!("repair: {r}");
            }
            println!(
                "checked {} objects, {} trees, {} records: {} problem(s)",
                report.objects_checked,
                report.trees_checked,
                report.records_checked,
                report.problems.len()
            );
            Ok(if report.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        CacheCommand::Init { shared, group } => {
            if shared {
                let n = cache.share(group.as_deref())?;
                println!(
                    "{}: shared ({n} folder(s) group-writable and setgid; umask 002; gc keeps young garbage)",
                    cache.root().display()
                );
            } else {
                println!("{}: ready", cache.root().display());
            }
            Ok(ExitCode::SUCCESS)
        }
        CacheCommand::Gc { dry_run, min_age } => {
            let report = match min_age {
                Some(age) => cache.gc_min_age(dry_run, age)?,
                None => cache.gc(dry_run)?,
            };
            let verb = if dry_run { "would remove" } else { "removed" };
            for (p, bytes) in report.removed.iter().zip(&report.removed_bytes) {
                println!("{verb} {} ({bytes} bytes)", p.display());
            }
            println!(
                "{verb} {} item(s), {} bytes; kept {} object(s)",
                report.removed.len(),
                report.freed_bytes,
                report.kept_objects
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn doctor(cache_dir: &Path, profile: Option<&str>) -> anyhow::Result<ExitCode> {
    println!("alignflow {}", alignflow::ENGINE_VERSION);
    println!("cache      {}", std::path::absolute(cache_dir)?.display());
    let remotes_ok = doctor_remotes()?;
    match profile {
        Some(name) => {
            let (p, path) = engine::Profile::find(name, Path::new("."))?;
            let kind = match p.executor {
                engine::ExecutorKind::Local => "local",
                engine::ExecutorKind::Slurm => "slurm",
            };
            println!("executor   {kind} (profile {name}: {})", path.display());
        }
        None => {
            println!("executor   local (default; `run --executor slurm` or a profile for Slurm)")
        }
    }
    // What Slurm shows this machine, if its client is installed.
    match std::process::Command::new("sinfo")
        .args(["--noheader", "--format", "%P %a %l %D %c %m %G"])
        .output()
    {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout);
            if text.trim().is_empty() {
                println!("slurm      no partitions");
            }
            for line in text.lines() {
                let f: Vec<&str> = line.split_whitespace().collect();
                if let [part, avail, limit, nodes, cpus, mem, gres] = f[..] {
                    println!("slurm      partition {part} {avail}, time limit {limit}, {nodes} node(s), {cpus} CPUs, {mem} MB, gres {gres}");
                }
            }
        }
        Ok(out) => println!(
            "slurm      no cluster reachable (sinfo: {})",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("no answer")
                .trim()
        ),
        Err(_) => println!("slurm      no client (sinfo not on PATH)"),
    }
    println!("worker     {}", engine::worker_path().display());
    let worker_ok = match engine::doctor() {
        Ok(info) => {
            for (k, v) in info {
                println!("{k:<10} {v}");
            }
            true
        }
        Err(e) => {
            println!("worker     unavailable: {e:#}");
            false
        }
    };
    Ok(if worker_ok && remotes_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// One line per configured remote: its URL, whether it answers (one
/// request with the configured credentials), read-only or not, signatures.
fn doctor_remotes() -> anyhow::Result<bool> {
    let here = std::env::current_dir()?;
    let (default, remotes) = remote::load_remotes(&here)?;
    let files: Vec<String> = remote::config_files(&here)
        .iter()
        .filter(|f| f.is_file())
        .map(|f| f.display().to_string())
        .collect();
    if remotes.is_empty() {
        println!("remotes    none configured ({})", remote::PROJECT_CONFIG);
        return Ok(true);
    }
    println!("config     {}", files.join(", "));
    let mut all_ok = true;
    for (name, spec) in remotes {
        let mode = if spec.config.write {
            "read-write"
        } else {
            "read-only"
        };
        let default = if default.as_deref() == Some(name.as_str()) {
            ", default"
        } else {
            ""
        };
        let state = match Remote::open(spec) {
            Err(e) => {
                all_ok = false;
                format!("{e}")
            }
            Ok(r) => {
                let signed = if r.checks_signatures() {
                    ", signed records only"
                } else {
                    ""
                };
                match r.ping() {
                    Ok(t) => format!(
                        "{} ({mode}{default}{signed}): answers in {} ms",
                        r.url(),
                        t.as_millis()
                    ),
                    Err(e) => {
                        all_ok = false;
                        format!(
                            "{} ({mode}{default}{signed}): does not answer: {e}",
                            r.url()
                        )
                    }
                }
            }
        };
        println!("remote     {name}: {state}");
    }
    Ok(all_ok)
}

fn push(
    cache: &Cache,
    remote: &str,
    manifest: Option<PathBuf>,
    targets: &[String],
    quiet: bool,
) -> anyhow::Result<ExitCode> {
    let remote = open_remote(remote)?;
    let (records, missing) = match manifest {
        Some(file) => {
            let (pipeline, dag) = load(&ManifestArgs {
                file,
                sets: Vec::new(),
            })?;
            let found = engine::records_to_push(&pipeline, &dag, cache, targets)?;
            cache.flush_hash_cache()?;
            found
        }
        None => {
            let mut all = Vec::new();
            for record in cache.records()? {
                if cache.hit(&record.fingerprint)?.is_some() {
                    all.push(record);
                }
            }
            (all, Vec::new())
        }
    };
    for m in &missing {
        eprintln!("error: {m}");
    }
    let report = remote.push(cache, &records, quiet)?;
    for r in &report.created {
        println!("pushed  {} ({})", r.stage, r.fingerprint.short());
    }
    for r in &report.signed {
        println!(
            "signed  {} ({}): replaced an unsigned record",
            r.stage,
            r.fingerprint.short()
        );
    }
    for r in &report.existing {
        println!("present {} ({})", r.stage, r.fingerprint.short());
    }
    for (r, key) in &report.signed_by_others {
        println!(
            "present {} ({}), signed by `{key}`: consumers that trust only this machine's key miss it",
            r.stage,
            r.fingerprint.short()
        );
    }
    let signed = match report.signed.len() {
        0 => String::new(),
        n => format!(", {n} unsigned replaced by signed"),
    };
    println!(
        "{} record(s) pushed{signed}, {} already on {}; {} uploaded{}",
        report.created.len(),
        report.existing.len() + report.signed_by_others.len(),
        remote.name(),
        human_bytes(report.bytes),
        resumed(report.resumed_bytes)
    );
    Ok(if missing.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn pull(
    cache: &Cache,
    remote: &str,
    manifests: &[PathBuf],
    quiet: bool,
) -> anyhow::Result<ExitCode> {
    let remote = open_remote(remote)?;
    let fps = if manifests.is_empty() {
        remote.list_records()?
    } else {
        let mut fps = Vec::new();
        for file in manifests {
            let (pipeline, dag) = load(&ManifestArgs {
                file: file.clone(),
                sets: Vec::new(),
            })?;
            fps.extend(engine::fingerprints_to_pull(
                &pipeline, &dag, cache, &remote,
            )?);
        }
        cache.flush_hash_cache()?;
        fps
    };
    let report = remote.pull(cache, &fps, quiet)?;
    for r in &report.pulled {
        println!("pulled  {} ({})", r.stage, r.fingerprint.short());
    }
    for (fp, why) in &report.untrusted {
        println!("ignored {fp}: {why}");
    }
    println!(
        "{} record(s) pulled, {} already local, {} untrusted, {} failed; {} downloaded{}",
        report.pulled.len(),
        report.local,
        report.untrusted.len(),
        report.failed.len(),
        human_bytes(report.bytes),
        resumed(report.resumed_bytes)
    );
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn verify_remote(name: &str) -> anyhow::Result<ExitCode> {
    let remote = open_remote(name)?;
    let report = remote.verify(false)?;
    for p in &report.problems {
        println!("{p}");
    }
    println!(
        "checked {} objects, {} trees, {} records on {} ({} read): {} problem(s)",
        report.objects_checked,
        report.trees_checked,
        report.records_checked,
        remote.name(),
        human_bytes(report.bytes),
        report.problems.len()
    );
    Ok(if report.problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn human_bytes(n: u64) -> String {
    format!("{:.1} MB ({n} bytes)", n as f64 / 1e6)
}

fn resumed(n: u64) -> String {
    if n == 0 {
        String::new()
    } else {
        format!(", resumed {} of an interrupted transfer", human_bytes(n))
    }
}

fn report(cache_dir: &Path, args: &ManifestArgs, out: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let (pipeline, dag) = load(args)?;
    let cache = open_cache(cache_dir)?;
    let data = alignflow::report::collect(&pipeline, &dag, &cache)?;
    cache.flush_hash_cache()?;
    let html = alignflow::report::render(&data)?;
    let out = out.unwrap_or_else(|| alignflow::report::default_path(cache_dir, &pipeline.name));
    alignflow::report::write(&out, &html)?;
    println!("{}", out.display());
    Ok(ExitCode::SUCCESS)
}

/// `export-tb`: one line per stage exported.
fn export_tb(
    cache_dir: &Path,
    args: &ManifestArgs,
    out: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let (pipeline, dag) = load(args)?;
    let Some(root) = out.or_else(|| pipeline.tracking.tensorboard.clone()) else {
        anyhow::bail!(
            "export-tb: give --out DIR, or `tracking: {{ tensorboard: DIR }}` in {}",
            pipeline.file.display()
        );
    };
    let cache = open_cache(cache_dir)?;
    let exported = alignflow::tracking::export_tensorboard(&pipeline, &dag, &cache, &root)?;
    cache.flush_hash_cache()?;
    for e in &exported {
        println!("{}\t{} points\t{}", e.stage, e.points, e.dir.display());
    }
    if exported.is_empty() {
        println!("no cached stage of {} has a metrics output", pipeline.name);
    }
    Ok(ExitCode::SUCCESS)
}

fn schema(out: &Path) -> anyhow::Result<ExitCode> {
    alignflow::schemas::write_schemas(out)?;
    println!("wrote schemas to {}", out.display());
    Ok(ExitCode::SUCCESS)
}

fn show(
    cache_dir: &Path,
    args: &ManifestArgs,
    stage: &str,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let (pipeline, dag) = load(args)?;
    let cache = open_cache(cache_dir)?;
    // A matrix stage's key names all of its instances.
    let ids: Vec<&str> = match dag.index_of(stage) {
        Some(_) => vec![stage],
        None => pipeline
            .stages
            .iter()
            .filter(|s| s.key == stage)
            .map(|s| s.id.as_str())
            .collect(),
    };
    anyhow::ensure!(
        !ids.is_empty(),
        "no stage `{stage}` in {}",
        pipeline.file.display()
    );
    let selected = dag.select(
        &pipeline,
        &ids.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    )?;
    let ctx = PlanContext {
        pipeline: &pipeline,
        dag: &dag,
        cache: &cache,
        lockfile: None,
        rehash: false,
        locked: false,
        remote: None,
        remote_must_answer: false,
    };
    let plan = engine::plan(&ctx, &selected)?;
    let outputs_of = |id: &str| -> Result<Vec<(String, PathBuf, String)>, String> {
        let index = dag.index_of(id).expect("an id of the pipeline");
        let planned = plan
            .stages
            .iter()
            .find(|p| p.index == index)
            .expect("target is selected");
        let outputs = planned.outputs.as_ref().ok_or_else(|| {
            format!(
                "stage `{id}` has no cached outputs for its current inputs ({}); run it first",
                planned.reason
            )
        })?;
        Ok(outputs
            .iter()
            .map(|(name, id)| {
                let path = std::path::absolute(cache.artifact_path(id)).unwrap_or_default();
                (name.clone(), path, id.to_string())
            })
            .collect())
    };
    let as_json = |rows: &[(String, PathBuf, String)]| -> serde_json::Value {
        rows.iter()
            .map(|(n, p, id)| (n.clone(), serde_json::json!({"path": p, "id": id})))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    if ids == [stage] {
        let rows = outputs_of(stage).map_err(anyhow::Error::msg)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&as_json(&rows))?);
        } else {
            for (name, path, _) in rows {
                println!("{name}\t{}", path.display());
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    // Instances: each with its outputs, or why it has none; with none
    // shown at all the command fails, as for one stage (a script reading
    // the paths must know).
    let mut all = serde_json::Map::new();
    let mut lacking = 0;
    for id in &ids {
        let outputs = outputs_of(id);
        lacking += usize::from(outputs.is_err());
        match outputs {
            Ok(rows) if json => {
                all.insert(id.to_string(), as_json(&rows));
            }
            Ok(rows) => {
                for (name, path, _) in rows {
                    println!("{id}\t{name}\t{}", path.display());
                }
            }
            Err(why) if json => {
                all.insert(id.to_string(), serde_json::json!({"error": why}));
            }
            Err(why) => eprintln!("{why}"),
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
    }
    Ok(if lacking < ids.len() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
