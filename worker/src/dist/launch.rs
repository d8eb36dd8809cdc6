//! Starting the ranks of a data-parallel stage and answering for them.
//!
//! The engine starts one worker per stage, as for any stage; with
//! `data_parallel: N` that worker becomes rank 0: it hosts the rendezvous
//! store (on a port the OS picks: no race between stages), starts ranks
//! 1..N with their rank, the world size and the store's address, and joins
//! the Gloo group with them. So the engine's protocol, its cache and its
//! cancellation (killing rank 0) are those of a one-process stage, and
//! only rank 0's events reach the engine.
//!
//! Where the other ranks run depends on where rank 0 does: as its child
//! processes on its own machine, meeting on 127.0.0.1 ([`local`]), or, in
//! the Slurm job of a stage run by the Slurm executor, as the tasks of one
//! `srun` step on the job's nodes ([`srun`]).
//!
//! A rank that dies makes the others' next collective fail (its Gloo
//! sockets close), or time out ([`timeout`]) if it hangs; rank 0 then
//! names the rank and how it ended in the stage's error, and stops the
//! survivors. Rank 0 also watches the other ranks' processes while its op
//! runs ([`Ranks::watch`]), so a rank that ends badly fails the stage
//! within seconds even when rank 0's next collective is far off, or is
//! NCCL's, whose shared-memory and peer-to-peer transports do not see a
//! process end. Ranks 1..N die with rank 0, so none outlives a cancelled
//! or crashed stage.
//!
//! [`local`]: super::local
//! [`srun`]: super::srun

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::Context;

use alignflow_ops::protocol::{Metrics, StageSpec, WorkerEvent, NOT_BITWISE_METRIC};
use alignflow_ops::role_devices::{gpu_index, slurm_gpu_run};
use alignflow_ops::training::data_parallel_ranks;
use alignflow_ops::RoleDevices;

use super::local::{self, LocalRanks};
use super::srun::{self, SrunRanks};
use super::{install, GlooBind, Group, Store};

/// The environment a rank other than 0 is started with (a rank started by
/// srun takes its rank from `SLURM_PROCID` instead of `ENV_RANK`).
pub(super) const ENV_RANK: &str = "ALIGNFLOW_DIST_RANK";
pub(super) const ENV_WORLD: &str = "ALIGNFLOW_DIST_WORLD";
pub(super) const ENV_STORE: &str = "ALIGNFLOW_DIST_STORE";
/// Set to `1`: a stage of one rank forms its data-parallel group all the
/// same (of one), so the data-parallel path, collectives included, runs in
/// one process: a check of that path on a machine with one GPU (NCCL), and
/// the measure of its cost against the plain path.
pub const ENV_GROUP_OF_ONE: &str = "ALIGNFLOW_DIST_GROUP_OF_ONE";
/// Seconds a collective (or the rendezvous) may wait for a peer.
const ENV_TIMEOUT: &str = "ALIGNFLOW_DIST_TIMEOUT_S";
const DEFAULT_TIMEOUT_S: u64 = 300;

/// How long rank 0 waits for the others to exit once the stage is over.
const EXIT_GRACE: Duration = Duration::from_secs(30);

/// The bound on every collective and on the rendezvous:
/// `ALIGNFLOW_DIST_TIMEOUT_S`, default 300 s.
pub fn timeout() -> Duration {
    let secs = std::env::var(ENV_TIMEOUT)
        .ok()
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or(DEFAULT_TIMEOUT_S);
    Duration::from_secs(secs.max(1))
}

/// The folder where rank `rank`'s copy of the op writes what only rank 0
/// keeps (rank 0 removes it when the stage is over).
pub(super) fn scratch_dir(checkpoint_dir: &Path, rank: usize) -> PathBuf {
    checkpoint_dir.join(format!("data-parallel-rank-{rank}"))
}

/// Makes the process `command` starts get `signal` when its parent (this
/// rank 0) ends, however it ends: no rank outlives its stage.
pub(super) fn die_with_parent(command: &mut std::process::Command, signal: libc::c_int) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe, as a pre_exec hook must be.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// [`scratch_dir`], emptied (a failed attempt may have left files).
pub(super) fn fresh_scratch(checkpoint_dir: &Path, rank: usize) -> anyhow::Result<PathBuf> {
    let scratch = scratch_dir(checkpoint_dir, rank);
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    Ok(scratch)
}

/// This process's rank, from the environment rank 0 started it with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankEnv {
    pub rank: usize,
    pub world: usize,
    pub store_host: String,
    pub store_port: u16,
    /// Where this rank's Gloo sockets bind: 127.0.0.1 for a local rank,
    /// its node's hostname (or `GLOO_SOCKET_IFNAME`'s interfaces) for a
    /// task of rank 0's srun step.
    pub gloo_bind: GlooBind,
    /// Started by srun: the tasks share one spec file, so the rank takes
    /// its own scratch folder for outputs.
    pub by_srun: bool,
}

impl RankEnv {
    /// The rank's environment, if this process is a rank other than 0.
    pub fn from_env() -> anyhow::Result<Option<RankEnv>> {
        let (rank, gloo_bind, by_srun) = if let Ok(rank) = std::env::var(ENV_RANK) {
            let rank = rank.parse().with_context(|| format!("{ENV_RANK}={rank}"))?;
            (rank, GlooBind::Host(local::HOST.to_string()), false)
        } else if srun::is_task() {
            let bind = GlooBind::on_this_node(srun::node_host()?);
            (srun::task_rank()?, bind, true)
        } else {
            return Ok(None);
        };
        let var = |name: &str| {
            std::env::var(name)
                .with_context(|| format!("this is data-parallel rank {rank} but {name} is not set"))
        };
        let world = var(ENV_WORLD)?;
        let store = var(ENV_STORE)?;
        let (host, port) = store
            .rsplit_once(':')
            .with_context(|| format!("{ENV_STORE}={store}: expected HOST:PORT"))?;
        let world: usize = world
            .parse()
            .with_context(|| format!("{ENV_WORLD}={world}"))?;
        anyhow::ensure!(
            (1..world).contains(&rank),
            "data-parallel rank {rank} of {world}: not a rank other than 0"
        );
        Ok(Some(RankEnv {
            rank,
            world,
            store_host: host.to_string(),
            store_port: port
                .parse()
                .with_context(|| format!("{ENV_STORE}={store}"))?,
            gloo_bind,
            by_srun,
        }))
    }
}

/// Sets up this process's part in a data-parallel stage, before the op
/// runs: a rank started by rank 0 joins its group (a task of rank 0's srun
/// step also points `spec` at its own scratch folder); the worker the
/// engine started for a stage with `data_parallel` over 1 hosts the store,
/// starts the other ranks and joins them ([`Ranks`], to be finished with
/// the op's result). Also sets each rank's intra-op threads.
pub fn start(spec: &mut StageSpec) -> anyhow::Result<Option<Ranks>> {
    let timeout = timeout();
    if let Some(env) = RankEnv::from_env()? {
        super::test_fault_point_of(env.rank, 0);
        if env.by_srun {
            spec.out_dir = fresh_scratch(&spec.checkpoint_dir, env.rank)?;
            *spec = task_spec(spec, env.rank)?;
        }
        let store = Store::connect(&env.store_host, env.store_port, env.world, timeout)?;
        // Rank 0 gave a rank on a GPU its own (`LocalRanks::spawn`), and
        // the environment of NCCL's blocking wait.
        let group = match crate::model::device(&spec.device)? {
            tch::Device::Cuda(_) => {
                Group::join_nccl(store, env.rank, env.world, group_gpu(spec), timeout)?
            }
            _ => Group::join(store, env.rank, env.world, &env.gloo_bind, timeout)?,
        };
        let place = match env.by_srun {
            true => srun::place(),
            false => "this machine".into(),
        };
        tracing::info!(
            "rank {} of {} joined the data-parallel group on {place}",
            env.rank,
            env.world
        );
        install(group);
        return Ok(None);
    }
    let world = data_parallel_ranks(&spec.params);
    // Only for the ops that have a data-parallel path (a `data_parallel`
    // param), not for every stage the knob's process runs.
    let group_of_one = std::env::var(ENV_GROUP_OF_ONE).is_ok_and(|v| v == "1")
        && alignflow_ops::find(&spec.op).is_some_and(|op| op.takes_param("data_parallel"));
    if world <= 1 && !group_of_one {
        return Ok(None);
    }
    // No other rank to start: no srun step either.
    let by_srun = srun::launches_ranks() && world > 1;
    let backend = backend_of(spec, world, by_srun)?;
    if backend == Backend::Nccl {
        // Before any thread or rank starts; the ranks inherit it.
        super::group::nccl_blocking_wait();
    }
    let (threads, host) = match by_srun {
        // Each task has its own CPUs, rank 0's included.
        true => (srun::threads_per_rank(spec.threads), srun::store_host()?),
        false => (threads_per_rank(spec.threads, world), local::HOST.into()),
    };
    tch::set_num_threads(threads as i32);
    let store = Store::host(&host, 0, world, timeout)
        .with_context(|| format!("stage `{}`: hosting the rendezvous", spec.stage))?;
    tracing::info!(world, store = %store.addr(), threads, "starting data-parallel ranks");
    let (others, started) = match by_srun {
        true => {
            // Nothing was started if this fails: no ranks to answer for.
            let step = SrunRanks::start(spec, world, &store, threads).with_context(|| {
                format!(
                    "stage `{}`: starting data-parallel ranks with srun",
                    spec.stage
                )
            })?;
            (Others::Srun(step), Ok(()))
        }
        false => {
            let mut local = LocalRanks::new(world, backend);
            let started = local.spawn_all(spec, &store, threads);
            (Others::Local(local), started)
        }
    };
    let gloo_bind = match by_srun {
        true => GlooBind::on_this_node(host),
        false => GlooBind::Host(host),
    };
    let ranks = Ranks {
        gloo_bind,
        held: Arc::new(Held {
            stage: spec.stage.clone(),
            world,
            backend,
            others: Mutex::new(others),
            answered: AtomicBool::new(false),
        }),
    };
    if let Err(e) = started {
        return Err(ranks.held.fail(e));
    }
    match ranks.join_watching(store, group_gpu(spec), timeout) {
        Ok(group) => {
            install(group);
            ranks.watch();
            Ok(Some(ranks))
        }
        Err(e) => Err(ranks.held.fail(e)),
    }
}

/// The collectives a data-parallel stage's ranks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Backend {
    /// On the CPU.
    Gloo,
    /// Ranks on GPUs, each on its own run of the GPUs the engine reserved
    /// for the stage ([`rank_spec`]).
    Nccl,
}

/// The stage's `placement`, if it has a valid one that places a role.
fn placement_of(spec: &StageSpec) -> Option<RoleDevices> {
    let placement = spec.params.get("placement")?;
    serde_json::from_value::<RoleDevices>(placement.clone())
        .ok()
        .filter(|p| !p.is_empty())
}

/// The stage's GPUs each rank holds ([`gpus_per_rank`] of the GPUs
/// `placement` names: at least one for a rank on a GPU).
///
/// [`gpus_per_rank`]: alignflow_ops::role_devices::gpus_per_rank
fn gpus_per_rank(placement: Option<&RoleDevices>, backend: Backend) -> usize {
    let placed = placement.map_or(0, RoleDevices::gpus);
    alignflow_ops::role_devices::gpus_per_rank(placed, backend == Backend::Nccl)
}

/// Rank `rank`'s copy of the stage's spec as to devices: the stage's GPUs
/// are dealt out in runs of [`gpus_per_rank`], so the rank's device and
/// the GPUs its placement names move to its own run (rank 0 keeps the
/// stage's `cuda:0..`, rank R starts at `cuda:(R * per_rank)`).
pub(super) fn rank_spec(spec: &StageSpec, rank: usize, backend: Backend) -> StageSpec {
    let placement = placement_of(spec);
    let per_rank = gpus_per_rank(placement.as_ref(), backend);
    let mut own = spec.clone();
    if backend == Backend::Nccl {
        own.device = format!("cuda:{}", rank * per_rank);
    }
    if let (Some(placement), Some(params)) = (placement, own.params.as_object_mut()) {
        let moved = serde_json::to_value(placement.for_rank(rank, per_rank))
            .expect("a placement serializes");
        params.insert("placement".into(), moved);
    }
    own
}

/// A task of rank 0's srun step's copy of the stage's spec as to devices:
/// where its ranks hold GPUs, the run of them Slurm gave the task
/// ([`slurm_gpu_run`]; rank 0, in the batch step, holds its node's first).
fn task_spec(spec: &StageSpec, rank: usize) -> anyhow::Result<StageSpec> {
    let backend = match crate::model::device(&spec.device)? {
        tch::Device::Cpu => Backend::Gloo,
        _ => Backend::Nccl,
    };
    let per_rank = gpus_per_rank(placement_of(spec).as_ref(), backend);
    if per_rank == 0 {
        return Ok(spec.clone());
    }
    let visible = visible_gpus();
    let local_id = srun::local_id();
    let run = slurm_gpu_run(visible, local_id, per_rank).with_context(|| {
        format!(
            "stage `{}`: data-parallel rank {rank} on {} holds {per_rank} GPU(s) but sees {visible} (CUDA_VISIBLE_DEVICES={})",
            spec.stage,
            srun::place(),
            std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default()
        )
    })?;
    tracing::info!(
        "rank {rank}, task {local_id} of its node, takes GPUs {}..{} of the {visible} it sees",
        run * per_rank,
        (run + 1) * per_rank - 1
    );
    Ok(rank_spec(spec, run, backend))
}

/// The GPUs this process sees.
fn visible_gpus() -> usize {
    match tch::Cuda::is_available() {
        true => tch::Cuda::device_count() as usize,
        false => 0,
    }
}

/// The GPU a rank's NCCL group is bound to: its policy's, whose gradients
/// every all-reduce carries (the value model's, on another device, are
/// copied there: [`super::group`]), else the rank's device (`auto` on a
/// GPU is `cuda:0`).
pub(super) fn group_gpu(spec: &StageSpec) -> usize {
    placement_of(spec)
        .and_then(|p| p.policy.as_deref().and_then(gpu_index))
        .or_else(|| gpu_index(&spec.device))
        .unwrap_or(0)
}

/// The backend of a stage with `world` ranks on its `device`: Gloo on the
/// CPU, NCCL on GPUs. Every rank holds its own run of GPUs: of this
/// machine's, for ranks this worker starts ([`rank_spec`]); of its node's,
/// for the tasks of an srun step (`by_srun`, [`task_spec`]), where this
/// rank 0 holds the first.
fn backend_of(spec: &StageSpec, world: usize, by_srun: bool) -> anyhow::Result<Backend> {
    let stage = &spec.stage;
    let placement = placement_of(spec);
    let backend = match crate::model::device(&spec.device)? {
        tch::Device::Cpu => Backend::Gloo,
        device => {
            anyhow::ensure!(
                device == tch::Device::Cuda(0),
                "stage `{stage}`: data_parallel: {world} deals the stage's GPUs out to its ranks; device `{}` pins one GPU: set `device: cuda`",
                spec.device
            );
            anyhow::ensure!(
                super::nccl_available(),
                "stage `{stage}`: {}",
                super::DistError::NcclUnavailable
            );
            Backend::Nccl
        }
    };
    let per_rank = gpus_per_rank(placement.as_ref(), backend);
    if per_rank > 0 {
        let visible = visible_gpus();
        let what = match (backend, per_rank) {
            (Backend::Nccl, 1) => "one GPU per rank".to_string(),
            (_, n) => format!("the {n} GPU(s) `params.placement` names, for each rank"),
        };
        let (needed, here) = match by_srun {
            true => (per_rank, "this rank sees"),
            false => (world * per_rank, "this stage sees"),
        };
        anyhow::ensure!(
            visible >= needed,
            "stage `{stage}`: data_parallel: {world} takes {what}, but {here} {visible} GPU(s)"
        );
    }
    Ok(backend)
}

/// Intra-op threads per rank: the stage's threads (else the machine's
/// cores) shared among the ranks, so N ranks do not oversubscribe them.
fn threads_per_rank(stage_threads: Option<usize>, world: usize) -> usize {
    let total = stage_threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    (total / world).max(1)
}

/// The other ranks, as rank 0 started them.
enum Others {
    Local(LocalRanks),
    Srun(SrunRanks),
}

impl Others {
    /// Whether a rank (or the srun step of ranks) has already ended badly.
    fn ended_badly(&mut self) -> bool {
        match self {
            Others::Local(local) => local.ended_badly(),
            Others::Srun(step) => step.ended_badly(),
        }
    }
}

/// The other ranks of a data-parallel stage, held by rank 0.
pub struct Ranks {
    /// Where rank 0's Gloo sockets bind: `host`, or under srun the
    /// interfaces `GLOO_SOCKET_IFNAME` names.
    gloo_bind: GlooBind,
    held: Arc<Held>,
}

/// What rank 0 answers for, shared with its watcher ([`watch`]).
struct Held {
    stage: String,
    world: usize,
    backend: Backend,
    others: Mutex<Others>,
    /// Set by whoever reports the stage's end: rank 0's op returning
    /// ([`Ranks::finish`]) or the watcher; the other then stands aside.
    answered: AtomicBool,
}

/// How often rank 0's watcher looks at the other ranks.
const WATCH_EVERY: Duration = Duration::from_millis(200);
/// How long the watcher leaves rank 0's op to fail by itself once another
/// rank ended badly: over Gloo the dead rank's closed sockets fail the next
/// collective at once, and that error says where rank 0 was.
const WATCH_GRACE: Duration = Duration::from_secs(2);

impl Ranks {
    /// Joins the group as rank 0 (bound to `gpu` over NCCL) while watching
    /// the other ranks: the join
    /// waits (up to `timeout`) for every rank to arrive, and one that died
    /// on the way never will, so the join runs on its own thread and a dead
    /// rank fails the stage at once. (The abandoned thread ends with the
    /// process, which reports the failure and exits.)
    fn join_watching(&self, store: Store, gpu: usize, timeout: Duration) -> anyhow::Result<Group> {
        let (world, bind, backend) = (self.held.world, self.gloo_bind.clone(), self.held.backend);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(match backend {
                Backend::Gloo => Group::join(store, 0, world, &bind, timeout),
                Backend::Nccl => Group::join_nccl(store, 0, world, gpu, timeout),
            });
        });
        loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(joined) => return Ok(joined?),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(e) => anyhow::bail!("joining the group: {e}"),
            }
            let ended = match &mut *self.held.others() {
                Others::Local(local) => local.ended_early(),
                Others::Srun(step) => step.ended_early(),
            };
            if let Some(ended) = ended {
                anyhow::bail!("rank 0 of {world}: {ended}");
            }
        }
    }

    /// Watches the other ranks while rank 0's op runs: one that ends badly
    /// fails the stage within [`WATCH_GRACE`], whatever rank 0 is doing.
    /// Rank 0 would otherwise learn of it only from its own next
    /// collective, which may be far off (a long rollout) and, over NCCL,
    /// may wait for the timeout: NCCL's shared-memory and peer-to-peer
    /// transports do not see a process end. If the op has not failed by
    /// itself within the grace, the watcher reports the stage's failure as
    /// the op's error would (naming the rank and how it ended), stops the
    /// survivors and ends this process: everything committed so far is
    /// checkpoints, written whole or not at all, as after a kill.
    fn watch(&self) {
        let held = self.held.clone();
        std::thread::spawn(move || loop {
            std::thread::sleep(WATCH_EVERY);
            if held.answered.load(Ordering::SeqCst) {
                return;
            }
            if !held.others().ended_badly() {
                continue;
            }
            std::thread::sleep(WATCH_GRACE);
            if held.answered.swap(true, Ordering::SeqCst) {
                return;
            }
            let e = held.fail(anyhow::anyhow!(
                "it stopped at once instead of waiting up to {} s (ALIGNFLOW_DIST_TIMEOUT_S) for a collective with a rank that is gone",
                timeout().as_secs()
            ));
            tracing::error!("{e:#}");
            let line = WorkerEvent::Failed {
                message: format!("{e:#}"),
            }
            .to_line();
            let mut out = std::io::stdout().lock();
            // The leading newline ends any event line the op's thread was
            // half-way through writing.
            let _ = write!(out, "\n{line}\n");
            let _ = out.flush();
            // SAFETY: _exit ends the process without running destructors
            // or atexit handlers, which could block on the op's thread,
            // stuck in a collective.
            unsafe { libc::_exit(1) }
        });
    }

    /// The stage's result once rank 0's op returned `result`: on success,
    /// the other ranks must exit cleanly too (within a grace period); on
    /// failure, the error names each rank that failed and how, the
    /// survivors are stopped. Scratch folders are removed either way.
    pub fn finish(self, result: anyhow::Result<Metrics>) -> anyhow::Result<Metrics> {
        if self.held.answered.swap(true, Ordering::SeqCst) {
            // The watcher is reporting a lost rank and ends the process.
            std::thread::sleep(EXIT_GRACE);
            anyhow::bail!(
                "stage `{}`: a data-parallel rank ended badly (see above)",
                self.held.stage
            );
        }
        let held = &self.held;
        match result {
            Ok(mut metrics) => {
                let bad = held.settle(EXIT_GRACE, true);
                held.clean();
                // One rank's all-reduce sums nothing: a group of one keeps
                // the one-process bits.
                if held.backend == Backend::Nccl && held.world > 1 {
                    metrics.insert(
                        NOT_BITWISE_METRIC.into(),
                        format!(
                            "NCCL all-reduces over {} GPU(s), whose sums are not bitwise reproducible from run to run",
                            held.world
                        )
                        .into(),
                    );
                }
                if bad.is_empty() {
                    Ok(metrics)
                } else {
                    anyhow::bail!(
                        "stage `{}`: rank 0 finished but {}",
                        held.stage,
                        bad.join("; ")
                    )
                }
            }
            Err(e) => Err(held.fail(e)),
        }
    }
}

impl Held {
    fn others(&self) -> MutexGuard<'_, Others> {
        self.others.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `e` (rank 0's error), preceded by what became of the other ranks:
    /// those that failed or died first are named; the rest are stopped.
    fn fail(&self, e: anyhow::Error) -> anyhow::Error {
        // A rank that died made this one fail: give its exit a moment to
        // be observed; ranks blocked in a collective with this one would
        // only time out, so they are not waited for long.
        let causes = self.settle(Duration::from_secs(5), false);
        self.clean();
        let cause = match causes.is_empty() {
            true => String::new(),
            false => format!("{}; ", causes.join("; ")),
        };
        e.context(format!(
            "stage `{}`: data-parallel training on {} ranks failed: {cause}rank 0 then failed",
            self.stage, self.world
        ))
    }

    /// Waits up to `grace` for the other ranks to end, stops the rest, and
    /// describes those that failed (see `LocalRanks::settle`).
    fn settle(&self, grace: Duration, rank_0_ok: bool) -> Vec<String> {
        match &mut *self.others() {
            Others::Local(local) => local.settle(grace, rank_0_ok),
            Others::Srun(step) => step.settle(grace, rank_0_ok),
        }
    }

    /// Removes what the other ranks wrote for themselves.
    fn clean(&self) {
        match &*self.others() {
            Others::Local(local) => local.clean(),
            Others::Srun(step) => step.clean(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_world_comes_from_data_parallel_and_threads_are_shared() {
        assert_eq!(data_parallel_ranks(&serde_json::json!({"lr": 1e-4})), 1);
        assert_eq!(
            data_parallel_ranks(&serde_json::json!({"data_parallel": 2})),
            2
        );
        assert_eq!(threads_per_rank(Some(8), 2), 4);
        assert_eq!(threads_per_rank(Some(1), 2), 1);
    }

    fn spec(device: &str, params: serde_json::Value) -> StageSpec {
        StageSpec {
            pipeline: "p".into(),
            stage: "ppo".into(),
            op: "ppo".into(),
            op_version: 1,
            params,
            inputs: Default::default(),
            outputs: Vec::new(),
            out_dir: "out".into(),
            work_dir: ".".into(),
            checkpoint_dir: "ckpt".into(),
            device: device.into(),
            seed: 0,
            threads: None,
        }
    }

    #[test]
    fn each_gpu_rank_holds_its_own_run_of_the_stages_gpus() {
        // Two ranks, each with the two GPUs the placement names: rank 1
        // holds the stage's GPUs 2 and 3.
        let placed = spec(
            "cuda",
            serde_json::json!({"data_parallel": 2, "placement": {"reference": "cuda:1", "reward": "cpu"}}),
        );
        assert_eq!(
            gpus_per_rank(placement_of(&placed).as_ref(), Backend::Nccl),
            2
        );
        let first = rank_spec(&placed, 0, Backend::Nccl);
        assert_eq!(first.device, "cuda:0");
        assert_eq!(first.params["placement"]["reference"], "cuda:1");
        let second = rank_spec(&placed, 1, Backend::Nccl);
        assert_eq!(second.device, "cuda:2");
        assert_eq!(
            second.params["placement"],
            serde_json::json!({"reference": "cuda:3", "reward": "cpu"})
        );
        assert_eq!(second.params["data_parallel"], 2);
        // The group sits on the policy's GPU: the rank's device here, the
        // placed one where the policy is placed.
        assert_eq!(group_gpu(&first), 0);
        assert_eq!(group_gpu(&second), 2);
        let policy_on_1 = spec(
            "cuda",
            serde_json::json!({"placement": {"policy": "cuda:1", "value": "cuda"}}),
        );
        let third = rank_spec(&policy_on_1, 2, Backend::Nccl);
        assert_eq!(third.device, "cuda:4");
        assert_eq!(third.params["placement"]["value"], "cuda:4");
        assert_eq!(group_gpu(&third), 5);
        // Without a placement, one GPU per rank, as before.
        let plain = spec("cuda", serde_json::json!({"data_parallel": 3}));
        assert_eq!(
            gpus_per_rank(placement_of(&plain).as_ref(), Backend::Nccl),
            1
        );
        assert_eq!(rank_spec(&plain, 2, Backend::Nccl).device, "cuda:2");
        assert!(rank_spec(&plain, 2, Backend::Nccl)
            .params
            .get("placement")
            .is_none());
    }

    #[test]
    fn cpu_ranks_keep_the_cpu_and_move_only_the_gpus_a_placement_names() {
        let on_cpu = spec(
            "cpu",
            serde_json::json!({"placement": {"policy": "cpu", "reward": "cpu"}}),
        );
        assert_eq!(
            gpus_per_rank(placement_of(&on_cpu).as_ref(), Backend::Gloo),
            0
        );
        let second = rank_spec(&on_cpu, 1, Backend::Gloo);
        assert_eq!(second.device, "cpu");
        assert_eq!(second.params, on_cpu.params);
        // Gloo ranks whose reward model is on a GPU: one GPU each.
        let reward_on_gpu = spec("cpu", serde_json::json!({"placement": {"reward": "cuda"}}));
        assert_eq!(
            gpus_per_rank(placement_of(&reward_on_gpu).as_ref(), Backend::Gloo),
            1
        );
        let second = rank_spec(&reward_on_gpu, 1, Backend::Gloo);
        assert_eq!(
            (
                second.device.as_str(),
                &second.params["placement"]["reward"]
            ),
            ("cpu", &serde_json::json!("cuda:1"))
        );
        // A placement that is not one is left to the op to name.
        let bad = spec("cuda", serde_json::json!({"placement": "cuda:1"}));
        assert_eq!(rank_spec(&bad, 1, Backend::Nccl).params, bad.params);
    }

    #[test]
    fn rank_0_of_an_srun_step_needs_only_its_own_gpus() {
        let on_cpu = spec("cpu", serde_json::json!({"placement": {"reward": "cpu"}}));
        assert_eq!(backend_of(&on_cpu, 2, true).unwrap(), Backend::Gloo);
        // 64 GPUs for rank 0 alone: more than any machine here has; the
        // others' are their nodes'.
        let placed = spec(
            "cpu",
            serde_json::json!({"placement": {"reward": "cuda:63"}}),
        );
        let err = backend_of(&placed, 2, true).unwrap_err().to_string();
        assert!(
            err.contains("stage `ppo`: data_parallel: 2 takes the 64 GPU(s) `params.placement` names, for each rank, but this rank sees"),
            "{err}"
        );
    }

    #[test]
    fn a_task_without_gpus_keeps_the_spec_and_one_that_lacks_them_says_so() {
        let on_cpu = spec("cpu", serde_json::json!({"data_parallel": 2}));
        let same = task_spec(&on_cpu, 1).unwrap();
        assert_eq!((same.device, same.params), (on_cpu.device, on_cpu.params));
        let placed = spec(
            "cpu",
            serde_json::json!({"data_parallel": 2, "placement": {"reward": "cuda:63"}}),
        );
        let err = format!("{:#}", task_spec(&placed, 1).unwrap_err());
        assert!(
            err.contains("stage `ppo`: data-parallel rank 1 on ")
                && err.contains("holds 64 GPU(s) but sees"),
            "{err}"
        );
    }

    #[test]
    fn ranks_whose_placement_names_gpus_the_stage_lacks_fail_before_starting() {
        // 64 GPUs for each of two ranks: more than any machine here has.
        let placed = spec(
            "cpu",
            serde_json::json!({"placement": {"reward": "cuda:63"}}),
        );
        let err = backend_of(&placed, 2, false).unwrap_err().to_string();
        assert!(
            err.contains("stage `ppo`: data_parallel: 2 takes the 64 GPU(s) `params.placement` names, for each rank, but this stage sees"),
            "{err}"
        );
    }
}
