//! A group of data-parallel ranks on torch's c10d collectives (the C++ side
//! and why it looks the way it does: `csrc/collectives.cpp`, `csrc/nccl.cpp`):
//! a `TCPStore` rendezvous and a `ProcessGroupGloo` on the CPU or a
//! `ProcessGroupNCCL` on one GPU per rank. Every collective has the group's
//! timeout, so a dead or stuck rank fails the others instead of hanging.

use std::ffi::{c_char, c_void, CString};
use std::time::Duration;

use tch::Tensor;

/// What a collective or the rendezvous failed on.
#[derive(Debug, thiserror::Error)]
pub enum DistError {
    /// The worker was built without torch's headers: no c10d shim.
    #[error("data parallelism needs the worker's c10d shim, which was not compiled in (no torch headers at build time)")]
    Unavailable,
    /// The rendezvous store could not be hosted or reached.
    #[error("rendezvous at {addr}: {message}")]
    Store { addr: String, message: String },
    /// The group did not form (a rank missing past the timeout).
    #[error("rank {rank} of {world}: forming the {backend} group: {message}")]
    Join {
        backend: &'static str,
        rank: usize,
        world: usize,
        message: String,
    },
    /// The worker was built without the NCCL group (no CUDA or NCCL
    /// headers at build time).
    #[error("data parallelism on GPUs needs the worker's NCCL group, which was not compiled in (no CUDA or NCCL headers at build time: `make setup` installs them)")]
    NcclUnavailable,
    /// A collective failed: a peer died, closed its sockets, or did not
    /// arrive within the timeout.
    #[error("rank {rank} of {world}: {op} failed: {message}")]
    Collective {
        op: &'static str,
        rank: usize,
        world: usize,
        message: String,
    },
}

#[cfg(alignflow_c10d)]
extern "C" {
    fn alignflow_dist_store_new(
        host: *const c_char,
        port: u16,
        is_server: bool,
        world: i32,
        timeout_ms: i64,
        bound_port: *mut u16,
        error: *mut *mut c_char,
    ) -> *mut c_void;
    fn alignflow_dist_store_free(store: *mut c_void);
    fn alignflow_dist_group_new(
        store: *mut c_void,
        rank: i32,
        world: i32,
        bind: *const c_char,
        by_interface: i32,
        timeout_ms: i64,
        error: *mut *mut c_char,
    ) -> *mut c_void;
    fn alignflow_dist_group_free(group: *mut c_void);
    #[cfg(alignflow_nccl)]
    fn alignflow_dist_group_new_nccl(
        store: *mut c_void,
        rank: i32,
        world: i32,
        device_index: i32,
        timeout_ms: i64,
        error: *mut *mut c_char,
    ) -> *mut c_void;
    fn alignflow_dist_all_reduce_sum(
        group: *mut c_void,
        tensor: *const c_void,
        error: *mut *mut c_char,
    ) -> bool;
    fn alignflow_dist_broadcast(
        group: *mut c_void,
        tensor: *const c_void,
        root: i32,
        error: *mut *mut c_char,
    ) -> bool;
    fn alignflow_dist_barrier(group: *mut c_void, error: *mut *mut c_char) -> bool;
}

#[cfg(alignflow_c10d)]
use crate::shim::take_message;

/// The rendezvous `TCPStore`: hosted by rank 0, reached by the others.
pub struct Store {
    raw: *mut c_void,
    host: String,
    port: u16,
}

impl Store {
    /// Hosts the store on `host:port` (port 0: a free one the OS picks, so
    /// two stages never race for a port); see [`Store::port`].
    pub fn host(
        host: &str,
        port: u16,
        world: usize,
        timeout: Duration,
    ) -> Result<Store, DistError> {
        Store::open(host, port, true, world, timeout)
    }

    /// Connects to the store at `host:port`, retrying within `timeout`.
    pub fn connect(
        host: &str,
        port: u16,
        world: usize,
        timeout: Duration,
    ) -> Result<Store, DistError> {
        Store::open(host, port, false, world, timeout)
    }

    /// The port listened on or connected to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `host:port`.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    #[cfg(alignflow_c10d)]
    fn open(
        host: &str,
        port: u16,
        server: bool,
        world: usize,
        timeout: Duration,
    ) -> Result<Store, DistError> {
        let addr = format!("{host}:{port}");
        let c_host = CString::new(host).map_err(|e| DistError::Store {
            addr: addr.clone(),
            message: e.to_string(),
        })?;
        let mut bound = 0u16;
        let mut error: *mut c_char = std::ptr::null_mut();
        let raw = unsafe {
            alignflow_dist_store_new(
                c_host.as_ptr(),
                port,
                server,
                world as i32,
                timeout.as_millis() as i64,
                &mut bound,
                &mut error,
            )
        };
        if raw.is_null() {
            let message = unsafe { take_message(error) };
            return Err(DistError::Store { addr, message });
        }
        Ok(Store {
            raw,
            host: host.to_string(),
            port: bound,
        })
    }

    #[cfg(not(alignflow_c10d))]
    fn open(_: &str, _: u16, _: bool, _: usize, _: Duration) -> Result<Store, DistError> {
        Err(DistError::Unavailable)
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        #[cfg(alignflow_c10d)]
        unsafe {
            alignflow_dist_store_free(self.raw)
        }
    }
}

// The store is a client (and, on rank 0, a server) torch drives from its
// own threads; handing it to another thread is safe.
unsafe impl Send for Store {}

/// Bytes per all-reduce: gradients are flattened into buckets of about
/// this size (DDP's default, 25 MiB), so a model's hundreds of small
/// tensors cost a few collectives, not hundreds.
const BUCKET_BYTES: i64 = 25 << 20;

/// Where a rank's Gloo sockets listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GlooBind {
    /// An address of this machine the other ranks can reach (a hostname
    /// or an IP).
    Host(String),
    /// Network interfaces by name, comma-separated, as torch reads
    /// `GLOO_SOCKET_IFNAME`.
    Interfaces(String),
}

/// torch's variable naming the interfaces Gloo binds, the same on every
/// node.
const ENV_GLOO_IFNAME: &str = "GLOO_SOCKET_IFNAME";

impl GlooBind {
    /// A rank on a cluster node: the interfaces `ifname` names (the value
    /// of `GLOO_SOCKET_IFNAME`, for a node whose hostname does not resolve
    /// to the address the other nodes reach it at), else `host`.
    pub fn on_node(host: String, ifname: Option<String>) -> GlooBind {
        match ifname.filter(|i| !i.trim().is_empty()) {
            Some(names) => GlooBind::Interfaces(names),
            None => GlooBind::Host(host),
        }
    }

    /// [`GlooBind::on_node`] with this process's `GLOO_SOCKET_IFNAME`.
    pub fn on_this_node(host: String) -> GlooBind {
        GlooBind::on_node(host, std::env::var(ENV_GLOO_IFNAME).ok())
    }

    fn text(&self) -> &str {
        match self {
            GlooBind::Host(s) | GlooBind::Interfaces(s) => s,
        }
    }
}

impl std::fmt::Display for GlooBind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GlooBind::Host(host) => write!(f, "{host}"),
            GlooBind::Interfaces(names) => write!(f, "interface {names} ({ENV_GLOO_IFNAME})"),
        }
    }
}

/// This process's place in a group of data-parallel ranks.
pub struct Group {
    raw: *mut c_void,
    rank: usize,
    world: usize,
    /// Where the collectives' tensors live: the CPU (Gloo) or this rank's
    /// GPU (NCCL).
    device: tch::Device,
    // The group reads the store until it is dropped.
    _store: Store,
}

// The c10d process group is thread-safe: it queues collectives to its own
// threads. The worker issues them from one thread at a time anyway.
unsafe impl Send for Group {}
unsafe impl Sync for Group {}

impl Group {
    /// Joins `world` ranks at `store` as `rank`, binding this rank's Gloo
    /// sockets as `bind` says; blocks until every rank has joined, at
    /// most `timeout`, which also bounds every collective of the group.
    pub fn join(
        store: Store,
        rank: usize,
        world: usize,
        bind: &GlooBind,
        timeout: Duration,
    ) -> Result<Group, DistError> {
        let join_error = |message: String| DistError::Join {
            backend: "Gloo",
            rank,
            world,
            message,
        };
        let raw = open_group(&store, rank, world, bind, timeout)
            .map_err(|e| join_error(format!("binding {bind}: {e}")))?;
        Ok(Group {
            raw,
            rank,
            world,
            device: tch::Device::Cpu,
            _store: store,
        })
    }

    /// Joins `world` ranks at `store` as `rank` with NCCL, this rank on the
    /// GPU `cuda:{device_index}`, bound to the group (the CUDA current
    /// device is left as it is: every tensor of the worker names its
    /// device).
    /// Returns once every rank has joined (a barrier, which makes NCCL
    /// connect), at most `timeout`, which also bounds every collective
    /// (with [`nccl_blocking_wait`] called first).
    pub fn join_nccl(
        store: Store,
        rank: usize,
        world: usize,
        device_index: usize,
        timeout: Duration,
    ) -> Result<Group, DistError> {
        super::note_nccl();
        let raw =
            open_nccl_group(&store, rank, world, device_index, timeout).map_err(|e| match e {
                Some(message) => DistError::Join {
                    backend: "NCCL",
                    rank,
                    world,
                    message,
                },
                None => DistError::NcclUnavailable,
            })?;
        let group = Group {
            raw,
            rank,
            world,
            device: tch::Device::Cuda(device_index),
            _store: store,
        };
        // Connects now, as Gloo's construction does, so a missing rank
        // fails the join rather than the first step.
        group.barrier().map_err(|e| DistError::Join {
            backend: "NCCL",
            rank,
            world,
            message: e.to_string(),
        })?;
        Ok(group)
    }

    /// Where the collectives' tensors must live: the CPU for Gloo, this
    /// rank's GPU for NCCL.
    pub fn device(&self) -> tch::Device {
        self.device
    }

    /// This rank (0-based).
    pub fn rank(&self) -> usize {
        self.rank
    }

    /// The number of ranks.
    pub fn world(&self) -> usize {
        self.world
    }

    /// Whether this is rank 0, the one that writes outputs.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Sums `t` (contiguous) over the ranks, in place.
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<(), DistError> {
        self.call("all-reduce", |raw, error| unsafe {
            alignflow_dist_all_reduce_sum(raw, t.as_ptr().cast(), error)
        })
    }

    /// Replaces each tensor by its mean over the ranks, in place: tensors
    /// are flattened into buckets of about 25 MiB (per dtype), each bucket
    /// summed in one all-reduce and divided by the world size.
    pub fn all_reduce_mean(&self, tensors: &[Tensor]) -> Result<(), DistError> {
        in_buckets(tensors, self.device, |flat| {
            self.all_reduce_sum(flat)?;
            let _ = flat.shallow_clone().g_div_scalar_(self.world as f64);
            Ok(())
        })
    }

    /// Copies rank `root`'s tensors into every rank's, in place, in buckets
    /// as [`Group::all_reduce_mean`].
    pub fn broadcast_all(&self, tensors: &[Tensor], root: usize) -> Result<(), DistError> {
        in_buckets(tensors, self.device, |flat| self.broadcast(flat, root))
    }

    /// Copies rank `root`'s `t` into every rank's `t` (contiguous), in place.
    pub fn broadcast(&self, t: &Tensor, root: usize) -> Result<(), DistError> {
        self.call("broadcast", |raw, error| unsafe {
            alignflow_dist_broadcast(raw, t.as_ptr().cast(), root as i32, error)
        })
    }

    /// Returns once every rank has called it.
    pub fn barrier(&self) -> Result<(), DistError> {
        self.call("barrier", |raw, error| unsafe {
            alignflow_dist_barrier(raw, error)
        })
    }

    /// Sums `values` over the ranks (in float64, exact for counts).
    pub fn sum_f64(&self, values: &[f64]) -> Result<Vec<f64>, DistError> {
        let t = Tensor::from_slice(values).to_device(self.device);
        self.all_reduce_sum(&t)?;
        Ok(Vec::<f64>::try_from(&t.to_device(tch::Device::Cpu)).expect("a float64 vector"))
    }

    /// Rank `root`'s `values`, on every rank (float64, bit for bit).
    pub fn broadcast_f64(&self, values: &[f64], root: usize) -> Result<Vec<f64>, DistError> {
        let t = Tensor::from_slice(values).to_device(self.device);
        self.broadcast(&t, root)?;
        Ok(Vec::<f64>::try_from(&t.to_device(tch::Device::Cpu)).expect("a float64 vector"))
    }

    #[cfg(alignflow_c10d)]
    fn call(
        &self,
        op: &'static str,
        f: impl FnOnce(*mut c_void, *mut *mut c_char) -> bool,
    ) -> Result<(), DistError> {
        let mut error: *mut c_char = std::ptr::null_mut();
        if f(self.raw, &mut error) {
            return Ok(());
        }
        Err(DistError::Collective {
            op,
            rank: self.rank,
            world: self.world,
            message: unsafe { take_message(error) },
        })
    }

    #[cfg(not(alignflow_c10d))]
    fn call(
        &self,
        _: &'static str,
        _: impl FnOnce(*mut c_void, *mut *mut c_char) -> bool,
    ) -> Result<(), DistError> {
        Err(DistError::Unavailable)
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        #[cfg(alignflow_c10d)]
        unsafe {
            alignflow_dist_group_free(self.raw)
        }
    }
}

#[cfg(alignflow_c10d)]
fn open_group(
    store: &Store,
    rank: usize,
    world: usize,
    bind: &GlooBind,
    timeout: Duration,
) -> Result<*mut c_void, String> {
    let text = CString::new(bind.text()).map_err(|e| e.to_string())?;
    let by_interface = matches!(bind, GlooBind::Interfaces(_));
    let mut error: *mut c_char = std::ptr::null_mut();
    let raw = unsafe {
        alignflow_dist_group_new(
            store.raw,
            rank as i32,
            world as i32,
            text.as_ptr(),
            i32::from(by_interface),
            timeout.as_millis() as i64,
            &mut error,
        )
    };
    if raw.is_null() {
        return Err(unsafe { take_message(error) });
    }
    Ok(raw)
}

/// Turns on torch's blocking wait for NCCL (`TORCH_NCCL_BLOCKING_WAIT=1`)
/// unless the user set it, so that a collective's wait blocks and honours
/// the group's timeout instead of only ordering the CUDA stream. Call it on
/// the main thread before any other starts (the environment is not safe to
/// change under running threads); ranks started later inherit it.
pub fn nccl_blocking_wait() {
    const VAR: &str = "TORCH_NCCL_BLOCKING_WAIT";
    if std::env::var_os(VAR).is_none() {
        std::env::set_var(VAR, "1");
    }
}

/// The NCCL group's handle, or its error message (`None`: no NCCL group
/// compiled in).
#[cfg(alignflow_nccl)]
fn open_nccl_group(
    store: &Store,
    rank: usize,
    world: usize,
    device_index: usize,
    timeout: Duration,
) -> Result<*mut c_void, Option<String>> {
    let mut error: *mut c_char = std::ptr::null_mut();
    let raw = unsafe {
        alignflow_dist_group_new_nccl(
            store.raw,
            rank as i32,
            world as i32,
            device_index as i32,
            timeout.as_millis() as i64,
            &mut error,
        )
    };
    if raw.is_null() {
        return Err(Some(unsafe { take_message(error) }));
    }
    Ok(raw)
}

#[cfg(not(alignflow_nccl))]
fn open_nccl_group(
    _: &Store,
    _: usize,
    _: usize,
    _: usize,
    _: Duration,
) -> Result<*mut c_void, Option<String>> {
    Err(None)
}

#[cfg(not(alignflow_c10d))]
fn open_group(
    _: &Store,
    _: usize,
    _: usize,
    _: &GlooBind,
    _: Duration,
) -> Result<*mut c_void, String> {
    Err(DistError::Unavailable.to_string())
}

/// `tensors` in order, cut into runs of one dtype and device of at most
/// [`BUCKET_BYTES`] (a larger tensor is a bucket of its own).
fn buckets(tensors: &[Tensor]) -> Vec<Vec<&Tensor>> {
    let mut out: Vec<Vec<&Tensor>> = Vec::new();
    let mut bytes = 0i64;
    for t in tensors {
        let size = t.numel() as i64 * t.kind().elt_size_in_bytes() as i64;
        let fits = out.last().is_some_and(|b| {
            let head = b[0];
            head.kind() == t.kind() && head.device() == t.device() && bytes + size <= BUCKET_BYTES
        });
        if fits {
            out.last_mut().expect("a bucket").push(t);
            bytes += size;
        } else {
            out.push(vec![t]);
            bytes = size;
        }
    }
    out
}

/// Runs `f` on each bucket of `tensors` flattened into one tensor on the
/// group's `device`, then copies the bucket back into the tensors. A
/// model placed on another device than the group's (a value model beside
/// the policy's GPU) thus takes part at the cost of a copy each way.
fn in_buckets(
    tensors: &[Tensor],
    device: tch::Device,
    mut f: impl FnMut(&Tensor) -> Result<(), DistError>,
) -> Result<(), DistError> {
    let _guard = tch::no_grad_guard();
    for bucket in buckets(tensors) {
        let flat = Tensor::cat(
            &bucket.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(),
            0,
        )
        .to_device(device);
        f(&flat)?;
        let mut at = 0;
        for t in bucket {
            let n = t.numel() as i64;
            // A shallow clone shares the tensor's storage: this writes it.
            t.shallow_clone().copy_(&flat.narrow(0, at, n).view_as(t));
            at += n;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The environment variable that makes a test process rank 1 of a
    /// test's group (its value is the store's port).
    const RANK1_PORT: &str = "ALIGNFLOW_TEST_RANK1_PORT";

    /// Runs a two-rank test with rank 1 in a child process: the test
    /// binary itself, filtered to `test`, with the store's port in its
    /// environment. Ranks are separate processes in a stage, and two Gloo
    /// groups in one process (one torn down while the other runs) are not
    /// something torch supports or a stage ever does.
    fn localhost() -> GlooBind {
        GlooBind::Host("127.0.0.1".into())
    }

    #[test]
    fn gloo_binds_the_named_interfaces_else_the_host() {
        let host = || "n1.cluster".to_string();
        assert_eq!(
            GlooBind::on_node(host(), Some("ib0,eth0".into())),
            GlooBind::Interfaces("ib0,eth0".into())
        );
        assert_eq!(
            GlooBind::on_node(host(), Some(" ".into())),
            GlooBind::Host(host())
        );
        assert_eq!(GlooBind::on_node(host(), None), GlooBind::Host(host()));
    }

    fn spawn_rank1(test: &str, port: u16) -> std::process::Child {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args([test, "--exact", "--test-threads=1", "--nocapture"])
            .env(RANK1_PORT, port.to_string())
            .spawn()
            .expect("starting rank 1")
    }

    /// The port to join as rank 1 of, if this process is a test's rank 1.
    fn rank1_port() -> Option<u16> {
        std::env::var(RANK1_PORT).ok().map(|p| p.parse().unwrap())
    }

    /// What one rank of `two_ranks_all_reduce_broadcast_and_meet` does,
    /// checked against sums computed by hand.
    fn all_reduce_broadcast_and_meet(store: Store, r: usize, timeout: Duration) {
        // Rank 1 binds by interface, as `GLOO_SOCKET_IFNAME=lo` asks.
        let bind = match r {
            0 => GlooBind::Host("127.0.0.1".into()),
            _ => GlooBind::Interfaces("lo".into()),
        };
        let g = Group::join(store, r, 2, &bind, timeout).unwrap();
        // Two buckets' worth of a float tensor, and a small one.
        let big = Tensor::full(
            [7 << 20],
            r as f64 + 1.0,
            (tch::Kind::Float, tch::Device::Cpu),
        );
        let small = Tensor::from_slice(&[r as f32, 10.0 * r as f32]);
        g.all_reduce_mean(&[big.shallow_clone(), small.shallow_clone()])
            .unwrap();
        let sums = g.sum_f64(&[1.0, r as f64]).unwrap();
        let b = Tensor::from_slice(&[r as f32 + 5.0; 3]);
        g.broadcast(&b, 1).unwrap();
        let from_1 = g.broadcast_f64(&[r as f64 + 0.1, -(r as f64)], 1).unwrap();
        g.barrier().unwrap();
        assert_eq!(from_1, vec![1.1, -1.0]);
        assert_eq!(big.mean(tch::Kind::Double).double_value(&[]), 1.5);
        assert_eq!(Vec::<f32>::try_from(&small).unwrap(), vec![0.5, 5.0]);
        assert_eq!(sums, vec![2.0, 1.0]);
        assert_eq!(Vec::<f32>::try_from(&b).unwrap(), vec![6.0; 3]);
    }

    /// Two ranks (this process and a child): the store, the group and
    /// each collective.
    #[test]
    fn two_ranks_all_reduce_broadcast_and_meet() {
        let timeout = Duration::from_secs(30);
        if let Some(port) = rank1_port() {
            let store = Store::connect("127.0.0.1", port, 2, timeout).unwrap();
            all_reduce_broadcast_and_meet(store, 1, timeout);
            return;
        }
        let store = Store::host("127.0.0.1", 0, 2, timeout).unwrap();
        assert_ne!(store.port(), 0);
        let mut r1 = spawn_rank1(
            "dist::group::tests::two_ranks_all_reduce_broadcast_and_meet",
            store.port(),
        );
        all_reduce_broadcast_and_meet(store, 0, timeout);
        assert!(r1.wait().unwrap().success(), "rank 1 failed");
        let zero = || Tensor::zeros([], (tch::Kind::Float, tch::Device::Cpu));
        assert_eq!(buckets(&[zero(), zero()]).len(), 1);
        let big = Tensor::zeros([7 << 20], (tch::Kind::Float, tch::Device::Cpu));
        assert_eq!(buckets(&[big.shallow_clone(), big]).len(), 2);
    }

    /// What one rank of `ranks_resume_from_rank_0s_checkpoint` sees: rank 0
    /// steps 2 and 4; rank 1 also a newer 6 (its own leftover), then a
    /// listing without 4 (a stale one).
    fn resume_from_rank_0s_checkpoint(store: Store, r: usize, timeout: Duration) {
        use crate::train::Checkpoints;
        let g = Group::join(store, r, 2, &localhost(), timeout).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let steps = |steps: &[u64]| {
            let root = dir.path().join(format!("seen-{steps:?}"));
            for step in steps {
                let folder = root.join(format!("step-{step}"));
                std::fs::create_dir_all(&folder).unwrap();
                std::fs::write(folder.join("state.json"), "{}").unwrap();
            }
            Checkpoints::new(root, 2)
        };
        let patience = Duration::from_secs(1);
        let (first, second) = match r {
            0 => (steps(&[2, 4]), steps(&[2, 4])),
            _ => (steps(&[2, 4, 6]), steps(&[2])),
        };
        let agreed = crate::dist::agreed_checkpoint(Some(&g), &first, patience).unwrap();
        assert_eq!(agreed, Some(first.root().join("step-4")));
        let stale = crate::dist::agreed_checkpoint(Some(&g), &second, patience);
        match r {
            0 => assert_eq!(stale.unwrap(), Some(second.root().join("step-4"))),
            _ => {
                let err = stale.unwrap_err().to_string();
                assert!(
                    err.contains("rank 1 does not see the checkpoint of step 4"),
                    "{err}"
                );
            }
        }
        g.barrier().unwrap();
    }

    /// Ranks resume from the checkpoint rank 0 chose, each finding it in
    /// its own listing, or fail naming the one it cannot see.
    #[test]
    fn ranks_resume_from_rank_0s_checkpoint() {
        let timeout = Duration::from_secs(30);
        if let Some(port) = rank1_port() {
            let store = Store::connect("127.0.0.1", port, 2, timeout).unwrap();
            resume_from_rank_0s_checkpoint(store, 1, timeout);
            return;
        }
        let store = Store::host("127.0.0.1", 0, 2, timeout).unwrap();
        let mut r1 = spawn_rank1(
            "dist::group::tests::ranks_resume_from_rank_0s_checkpoint",
            store.port(),
        );
        resume_from_rank_0s_checkpoint(store, 0, timeout);
        assert!(r1.wait().unwrap().success(), "rank 1 failed");
    }

    /// A rank that leaves (its process exits) makes its peer's next
    /// collective fail, with the op and the rank in the message, instead
    /// of waiting forever.
    #[test]
    fn a_vanished_peer_fails_the_collective_instead_of_hanging() {
        let timeout = Duration::from_secs(20);
        if let Some(port) = rank1_port() {
            let store = Store::connect("127.0.0.1", port, 2, timeout).unwrap();
            let g = Group::join(store, 1, 2, &localhost(), timeout).unwrap();
            g.barrier().unwrap();
            // The process exits: its sockets close.
            std::process::exit(0);
        }
        let store = Store::host("127.0.0.1", 0, 2, timeout).unwrap();
        let mut r1 = spawn_rank1(
            "dist::group::tests::a_vanished_peer_fails_the_collective_instead_of_hanging",
            store.port(),
        );
        let g = Group::join(store, 0, 2, &localhost(), timeout).unwrap();
        g.barrier().unwrap();
        assert!(r1.wait().unwrap().success(), "rank 1 failed");
        let start = std::time::Instant::now();
        let err = g
            .all_reduce_sum(&Tensor::from_slice(&[1.0f32]))
            .unwrap_err();
        let message = err.to_string();
        assert!(
            message.starts_with("rank 0 of 2: all-reduce failed"),
            "{message}"
        );
        assert!(start.elapsed() < timeout + Duration::from_secs(5));
    }

    /// torch's `ProcessGroupNCCL` through the shim: linked, constructed with
    /// the library's `Options` and its exceptions turned into errors. On a
    /// machine without a GPU it refuses, naming the reason (what this test
    /// checks in CI); with one, a one-rank group runs every collective.
    #[test]
    fn a_nccl_group_forms_on_a_gpu_and_says_why_not_without_one() {
        if tch::Cuda::is_available() {
            let done = super::super::nccl_self_check().unwrap();
            assert!(done.starts_with("ok"), "{done}");
            return;
        }
        let store = Store::host("127.0.0.1", 0, 1, Duration::from_secs(10)).unwrap();
        let err = match Group::join_nccl(store, 0, 1, 0, Duration::from_secs(10)) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("a NCCL group formed on a machine without CUDA"),
        };
        assert!(
            err.starts_with("rank 0 of 1: forming the NCCL group: "),
            "{err}"
        );
        assert!(err.to_lowercase().contains("gpu"), "{err}");
    }
}
