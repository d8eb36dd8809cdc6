//! Data-parallel training: N worker processes, one per rank, that meet
//! through a c10d `TCPStore`, average their gradients with Gloo (CPU) or
//! NCCL (one GPU per rank) after each backward, and each take a share of every batch (`ops::training`). The
//! worker that the engine starts for a stage with `data_parallel: N` is
//! rank 0: it hosts the store and starts the other ranks ([`launch`]), as
//! its children ([`local`]) or, in a Slurm job, with srun ([`srun`]).
//!
//! The group is process-wide ([`group`]): a worker process runs one stage,
//! and the training loop finds the group without every op passing it on.

mod group;
mod launch;
mod local;
mod srun;

use std::sync::OnceLock;

use tch::nn::VarStore;
use tch::Tensor;

pub use group::{DistError, GlooBind, Group, Store};
pub use launch::{start, RankEnv, Ranks};
pub use srun::holds_rank_0_place;

static GROUP: OnceLock<Group> = OnceLock::new();

/// Whether this worker was built with the c10d shim (torch's headers were
/// there at build time): without it `data_parallel` over 1 fails.
pub fn available() -> bool {
    cfg!(alignflow_c10d)
}

/// Whether this worker was built with the NCCL group (the CUDA and NCCL
/// headers were there at build time): without it `data_parallel` over 1
/// on GPUs fails.
pub fn nccl_available() -> bool {
    cfg!(alignflow_nccl)
}

/// Forms a one-rank NCCL group on `cuda:0` and runs every collective data
/// parallelism uses (all-reduce, bucketed mean and broadcast, the row
/// gather, the float64 sums, the barrier), checking each answer: the
/// NCCL path end to end on a machine with one GPU (`alignflow-worker doctor
/// --nccl`). A one-rank group reduces nothing, so the answers are the
/// inputs.
pub fn nccl_self_check() -> anyhow::Result<String> {
    anyhow::ensure!(
        tch::Cuda::is_available(),
        "no CUDA device: NCCL runs on GPUs"
    );
    let timeout = std::time::Duration::from_secs(60);
    group::nccl_blocking_wait();
    let store = Store::host(local::HOST, 0, 1, timeout)?;
    let group = Group::join_nccl(store, 0, 1, 0, timeout)?;
    let gpu = tch::Device::Cuda(0);
    let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0]).to_device(gpu);
    group.all_reduce_sum(&t)?;
    let grads = [
        t.shallow_clone(),
        Tensor::from_slice(&[4.0f32]).to_device(gpu),
    ];
    group.all_reduce_mean(&grads)?;
    group.broadcast_all(&grads, 0)?;
    let rows = Tensor::from_slice(&[7i64, 8]).view([1, 2]).to_device(gpu);
    let gathered = gather_rows(&group, &rows, 0, 1)?;
    let sums = group.sum_f64(&[0.5, 2.0])?;
    group.barrier()?;
    let got = Vec::<f32>::try_from(&t.to_device(tch::Device::Cpu))?;
    anyhow::ensure!(got == [1.0, 2.0, 3.0], "all-reduce gave {got:?}");
    let row = Vec::<i64>::try_from(&gathered.view([-1]).to_device(tch::Device::Cpu))?;
    anyhow::ensure!(row == [7, 8], "the row gather gave {row:?}");
    anyhow::ensure!(sums == [0.5, 2.0], "the float64 sums gave {sums:?}");
    Ok("ok: a one-rank group on cuda:0 ran all-reduce, mean, broadcast, row gather, float64 sums and barrier".into())
}

/// This process's data-parallel group, if the stage runs on several ranks.
pub fn group() -> Option<&'static Group> {
    GROUP.get()
}

/// Set once this process starts forming a NCCL group.
static NCCL_STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Notes that this process forms a NCCL group ([`exit`]).
fn note_nccl() {
    NCCL_STARTED.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// Ends this worker process with `code`. A process that formed a NCCL
/// group, or began to, leaves by `_exit`, once its output is flushed: the
/// group lives as long as the process and is never destroyed (and a join
/// given up on may still be inside NCCL's setup, on its own thread), and
/// C++'s static destructors, which `exit` runs, would run beside NCCL's
/// threads, a teardown that can crash or hang and so turn a rank that
/// finished into one that failed or never ends. The kernel releases the
/// GPU; every output was written and closed before.
pub fn exit(code: i32) -> ! {
    if NCCL_STARTED.load(std::sync::atomic::Ordering::SeqCst) {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().flush();
        // SAFETY: _exit ends the process at once; nothing after it runs.
        unsafe { libc::_exit(code) }
    }
    std::process::exit(code)
}

/// Makes `group` the process's group (once).
fn install(group: Group) -> &'static Group {
    let _ = GROUP.set(group);
    GROUP.get().expect("the group was just set")
}

/// Rank `rank`'s share of a batch's example indices: a contiguous slice,
/// the sizes differing by at most one (the first `len % world` ranks take
/// one more).
pub fn shard(idx: &[usize], rank: usize, world: usize) -> &[usize] {
    &idx[share(idx.len(), rank, world)]
}

/// Rows `start..start + mine.size()[0]` of a `rows`-row tensor from each
/// rank, gathered: every rank gets the whole `[rows, ...]` tensor. Each
/// rank writes its rows into zeros and the copies are summed (in float64,
/// exact for float32 values and token ids alike): every element has one
/// rank's value and zeros from the others. The trailing dimensions must
/// agree across the ranks.
pub fn gather_rows(
    group: &Group,
    mine: &Tensor,
    start: usize,
    rows: usize,
) -> Result<Tensor, DistError> {
    let _guard = tch::no_grad_guard();
    let mut shape = mine.size();
    let len = shape[0];
    shape[0] = rows as i64;
    // On the group's device (NCCL reduces CUDA tensors only); the answer
    // goes back to `mine`'s.
    let all = Tensor::zeros(shape, (tch::Kind::Double, group.device()));
    if len > 0 {
        all.narrow(0, start as i64, len)
            .copy_(&mine.to_kind(tch::Kind::Double));
    }
    group.all_reduce_sum(&all)?;
    Ok(all.to_device(mine.device()).to_kind(mine.kind()))
}

/// Rank `rank`'s share of `n` items as a range: [`shard`]'s split.
pub fn share(n: usize, rank: usize, world: usize) -> std::ops::Range<usize> {
    let (base, extra) = (n / world, n % world);
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

/// Replaces the gradient of each of `params` by its mean over the ranks.
/// A tensor that no rank's backward reached has no gradient yet on any
/// rank; one only some ranks reached gets a zero gradient on the others
/// first, so every rank all-reduces the same list.
pub fn average_gradients(group: &Group, params: &[&Tensor]) -> Result<(), DistError> {
    for p in params {
        if !p.grad().defined() {
            (*p * 0.0).sum(tch::Kind::Float).backward();
        }
    }
    let grads: Vec<Tensor> = params.iter().map(|p| p.grad()).collect();
    group.all_reduce_mean(&grads)
}

/// How long a rank looks again for the checkpoint rank 0 resumes from.
pub const CHECKPOINT_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// The checkpoint of `checkpoints` that this rank resumes from: rank 0's
/// latest, told to every rank by its step, which each finds in the shared
/// folder (listed again for up to `patience`: a network filesystem may
/// show a node a stale listing after a resubmission). Each rank listing
/// for itself could resume ranks from different steps, with optimizer
/// states and schedules apart, which diverge silently until a collective
/// times out. Without a group: the latest.
pub fn agreed_checkpoint(
    group: Option<&Group>,
    checkpoints: &crate::train::Checkpoints,
    patience: std::time::Duration,
) -> anyhow::Result<Option<std::path::PathBuf>> {
    let mut listing = checkpoints.list()?;
    let Some(g) = group else {
        return Ok(listing.pop().map(|(_, dir)| dir));
    };
    let latest = listing.last().map_or(-1.0, |(step, _)| *step as f64);
    let chosen = g.broadcast_f64(&[latest], 0)?[0];
    if chosen < 0.0 {
        return Ok(None);
    }
    let step = chosen as u64;
    let deadline = std::time::Instant::now() + patience;
    loop {
        if let Some((_, dir)) = listing.iter().find(|(s, _)| *s == step) {
            return Ok(Some(dir.clone()));
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "rank {} does not see the checkpoint of step {step} that rank 0 resumes from, in {} (its steps: {:?}); is the folder shared by every node?",
            g.rank(),
            checkpoints.root().display(),
            listing.iter().map(|(s, _)| *s).collect::<Vec<_>>()
        );
        std::thread::sleep(std::time::Duration::from_millis(500));
        listing = checkpoints.list()?;
    }
}

/// Copies rank 0's variables of `vs` (sorted by name, so every rank lists
/// them alike) into every rank's.
pub fn broadcast_weights(group: &Group, vs: &VarStore) -> Result<(), DistError> {
    let _guard = tch::no_grad_guard();
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let tensors: Vec<Tensor> = named.into_iter().map(|(_, t)| t).collect();
    group.broadcast_all(&tensors, 0)
}

/// Test hooks, in step STEP (1-based) after the rank's forward pass and
/// before its backward (step 0 is before the rank joins the group):
/// `ALIGNFLOW_DIST_TEST_KILL=RANK:STEP` makes rank RANK kill itself with
/// SIGKILL, a rank lost mid-step; `ALIGNFLOW_DIST_TEST_STALL=RANK:STEP:SECS`
/// holds rank RANK there for SECS seconds, a rank busy far from its next
/// collective (or stuck in one that does not see a peer die, as NCCL's).
pub fn test_fault_point(step: u64) {
    if let Some(g) = group() {
        test_fault_point_of(g.rank(), step);
    }
}

/// [`test_fault_point`] for `rank`, before the group exists.
fn test_fault_point_of(rank: usize, step: u64) {
    let numbers = |name: &str| -> Vec<u64> {
        std::env::var(name)
            .map(|spec| spec.split(':').filter_map(|n| n.parse().ok()).collect())
            .unwrap_or_default()
    };
    let here = |at: &[u64]| at.len() >= 2 && (at[0], at[1]) == (rank as u64, step);
    let stall = numbers("ALIGNFLOW_DIST_TEST_STALL");
    if here(&stall) && stall.len() == 3 {
        tracing::warn!(
            rank,
            step,
            secs = stall[2],
            "ALIGNFLOW_DIST_TEST_STALL: holding this rank"
        );
        std::thread::sleep(std::time::Duration::from_secs(stall[2]));
    }
    if here(&numbers("ALIGNFLOW_DIST_TEST_KILL")) {
        tracing::warn!(rank, step, "ALIGNFLOW_DIST_TEST_KILL: killing this rank");
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// A test hook: with `ALIGNFLOW_DIST_TEST_GRADS=DIR`, each rank (rank 0
/// alone without a group) writes the gradients it steps with after step
/// STEP (averaged over the ranks, clipped) to
/// `DIR/rank-R-step-STEP.safetensors`, for the tests that compare them with
/// one process's.
pub fn test_dump_grads(vs: &VarStore, step: u64) -> anyhow::Result<()> {
    let Some(dir) = std::env::var_os("ALIGNFLOW_DIST_TEST_GRADS") else {
        return Ok(());
    };
    let rank = group().map_or(0, Group::rank);
    let grads: Vec<(String, Tensor)> = crate::train::trainable_named(vs)
        .into_iter()
        .filter(|(_, t)| t.grad().defined())
        .map(|(n, t)| (n, t.grad()))
        .collect();
    let path = std::path::Path::new(&dir).join(format!("rank-{rank}-step-{step}.safetensors"));
    Tensor::write_safetensors(&grads, &path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::shard;

    #[test]
    fn shards_cover_the_batch_in_order_and_differ_by_at_most_one() {
        let idx: Vec<usize> = (10..17).collect();
        let parts: Vec<&[usize]> = (0..3).map(|r| shard(&idx, r, 3)).collect();
        assert_eq!(parts, vec![&[10, 11, 12][..], &[13, 14][..], &[15, 16][..]]);
        assert_eq!(shard(&idx, 0, 1), &idx[..]);
    }
}
