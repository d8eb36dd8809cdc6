//! A real Slurm for the tests: munged, slurmctld and one or more slurmd on
//! 127.0.0.1, configured from scratch in a temporary folder (its own state
//! folders, ports and munge key), up in about a second and stopped by pid.
//!
//! Debian's `slurmctld slurmd slurm-client munge` (the Makefile's `test`
//! target installs them when missing). Each node has 2 CPUs, 2000 MB and two
//! fake GPUs (character devices the helper creates) for `--gres=gpu:N`, so
//! Slurm sets `CUDA_VISIBLE_DEVICES` per job as on a real cluster.
//! `squeue`, `sbatch` and `scancel` are reached through wrappers that count
//! their calls.

use std::fmt::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running test cluster; dropping it stops every daemon it started.
pub struct Slurm {
    pub dir: tempfile::TempDir,
    daemons: Vec<(String, Child)>,
    /// Node names, `n1`, `n2`, ...
    pub nodes: Vec<String>,
}

/// Where a daemon binary is: Debian puts them in /usr/sbin, which a plain
/// user's PATH may lack.
fn sbin(name: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/sbin", "/usr/local/sbin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "`{name}` is not installed: `make test` installs Debian's slurmctld slurmd slurm-client munge"
    );
}

/// A free TCP port on 127.0.0.1 (free when asked; the daemons bind it
/// next). Its listener goes into `held` until the whole configuration is
/// written: released at once, the kernel may hand the same port out again
/// for the controller and a node, and one daemon could not bind it.
fn free_port(held: &mut Vec<TcpListener>) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a free port");
    let port = listener.local_addr().expect("a free port").port();
    held.push(listener);
    port
}

fn user_name() -> String {
    let out = Command::new("id").arg("-un").output().expect("id -un");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn host_name() -> String {
    let out = Command::new("hostname").output().expect("hostname");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

impl Slurm {
    /// A cluster of `nodes` slurmd daemons (one host, one port each) in a
    /// `debug` partition, ready (every node idle) when this returns.
    pub fn start(nodes: usize) -> Slurm {
        let dir = tempfile::Builder::new()
            .prefix("af-slurm-")
            .tempdir()
            .expect("temp dir");
        let root = dir.path().to_path_buf();
        for sub in ["state", "spool", "log", "dev", "munge", "bin"] {
            std::fs::create_dir_all(root.join(sub)).unwrap();
        }
        let node_names: Vec<String> = (1..=nodes).map(|i| format!("n{i}")).collect();
        write_munge_key(&root);
        let mut slurm = Slurm {
            dir,
            daemons: Vec::new(),
            nodes: node_names.clone(),
        };
        write_config(&root, &node_names);
        for client in ["squeue", "sbatch", "scancel"] {
            write_counter(&root, client);
        }

        let munge = root.join("munge");
        slurm.spawn(
            "munged",
            Command::new(sbin("munged")).args([
                "--foreground",
                "--force",
                &format!("--socket={}", munge.join("sock").display()),
                &format!("--key-file={}", munge.join("key").display()),
                &format!("--pid-file={}", munge.join("pid").display()),
                &format!("--log-file={}", munge.join("log").display()),
                &format!("--seed-file={}", munge.join("seed").display()),
            ]),
        );
        wait_for(Duration::from_secs(10), "munged's socket", || {
            munge.join("sock").exists()
        });
        let conf = root.join("slurm.conf");
        slurm.spawn(
            "slurmctld",
            Command::new(sbin("slurmctld"))
                .args(["-D", "-i", "-f"])
                .arg(&conf),
        );
        for name in &node_names {
            std::fs::create_dir_all(root.join("spool").join(name)).unwrap();
            slurm.spawn(
                &format!("slurmd {name}"),
                Command::new(sbin("slurmd"))
                    .args(["-D", "-N", name, "-f"])
                    .arg(&conf),
            );
        }
        slurm.wait_idle();
        slurm
    }

    fn spawn(&mut self, what: &str, command: &mut Command) {
        let log = std::fs::File::create(
            self.dir
                .path()
                .join("log")
                .join(format!("{}.out", what.replace(' ', "-"))),
        )
        .unwrap();
        let child = command
            .env("SLURM_CONF", self.conf())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {what}: {e}"));
        self.daemons.push((what.to_string(), child));
    }

    /// Waits until `sinfo` shows every node idle.
    fn wait_idle(&mut self) {
        let start = Instant::now();
        loop {
            let out = self
                .command("sinfo")
                .args(["-h", "-N", "-o", "%N %T"])
                .output()
                .expect("sinfo runs");
            let text = String::from_utf8_lossy(&out.stdout).to_string();
            // A node is listed once per partition it is in.
            let idle = text
                .lines()
                .filter(|l| l.split_whitespace().nth(1) == Some("idle"))
                .filter_map(|l| l.split_whitespace().next())
                .collect::<std::collections::BTreeSet<_>>()
                .len();
            if idle == self.nodes.len() {
                return;
            }
            let exited = self
                .daemons
                .iter_mut()
                .find_map(|(what, child)| match child.try_wait() {
                    Ok(Some(status)) => Some(format!("{what} exited ({status})")),
                    _ => None,
                });
            if let Some(exited) = exited {
                panic!("{exited}; logs:\n{}", self.logs());
            }
            if start.elapsed() > Duration::from_secs(30) {
                panic!(
                    "Slurm did not come up in 30 s (sinfo: {text:?}); logs:\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops slurmctld (by pid) and starts it again with its state cleared
    /// (`-c`): every job it knew is gone from `squeue`, as on a cluster whose
    /// controller lost its state. Returns once it answers again.
    pub fn restart_controller_clean(&mut self) {
        self.restart_controller_clean_after(|| {});
    }

    /// [`Slurm::restart_controller_clean`], doing `meanwhile` while no
    /// controller runs: what a job does then is out of its sight for good.
    pub fn restart_controller_clean_after(&mut self, meanwhile: impl FnOnce()) {
        let at = self
            .daemons
            .iter()
            .position(|(what, _)| what == "slurmctld")
            .expect("slurmctld was started");
        let (_, mut old) = self.daemons.remove(at);
        unsafe {
            libc::kill(old.id() as libc::pid_t, libc::SIGTERM);
        }
        old.wait().unwrap();
        meanwhile();
        let conf = self.conf();
        self.spawn(
            "slurmctld",
            Command::new(sbin("slurmctld"))
                .args(["-D", "-c", "-i", "-f"])
                .arg(&conf),
        );
        wait_for(Duration::from_secs(20), "slurmctld answering", || {
            self.command("squeue")
                .arg("-h")
                .output()
                .is_ok_and(|o| o.status.success())
        });
    }

    /// Every daemon log, for a failure message.
    pub fn logs(&self) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(self.dir.path().join("log")).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            let _ = writeln!(all, "== {}", path.display());
            for line in tail.into_iter().rev() {
                let _ = writeln!(all, "{line}");
            }
        }
        all
    }

    pub fn conf(&self) -> PathBuf {
        self.dir.path().join("slurm.conf")
    }

    /// `PATH` with the counting client wrappers first.
    pub fn path_env(&self) -> String {
        format!(
            "{}:{}:/usr/sbin",
            self.dir.path().join("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }

    /// Points a command at this cluster (config, the counting wrappers).
    pub fn env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        cmd.env("SLURM_CONF", self.conf())
            .env("PATH", self.path_env())
    }

    /// A Slurm client command (`squeue`, `scancel`, ...) against this cluster.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(program);
        cmd.env("SLURM_CONF", self.conf());
        cmd
    }

    /// How many times `client` (`squeue`, `sbatch`, `scancel`) was called
    /// through its wrapper.
    pub fn calls(&self, client: &str) -> usize {
        std::fs::read_to_string(self.dir.path().join(format!("calls-{client}")))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    }

    /// The arguments of each call of `client` through its wrapper, one
    /// line per call.
    pub fn call_lines(&self, client: &str) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join(format!("calls-{client}")))
            .map(|t| t.lines().map(String::from).collect())
            .unwrap_or_default()
    }

    /// `squeue -h -t all -o FORMAT` for every job the controller knows.
    pub fn jobs(&self, format: &str) -> String {
        let out = self
            .command("squeue")
            .args(["-h", "-t", "all", "-o", format])
            .output()
            .expect("squeue runs");
        String::from_utf8_lossy(&out.stdout).to_string()
    }
}

impl Drop for Slurm {
    /// Stops the daemons by pid (SIGTERM, then SIGKILL after 5 s), slurmds
    /// first, then what they leave running.
    fn drop(&mut self) {
        for (_, child) in self.daemons.iter().rev() {
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
        }
        for (_, child) in self.daemons.iter_mut().rev() {
            let start = Instant::now();
            while matches!(child.try_wait(), Ok(None)) {
                if start.elapsed() > Duration::from_secs(5) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        kill_leftover_steps(self.dir.path());
    }
}

/// Job step daemons (`slurmstepd`) outlive slurmd, and so would the jobs
/// they run (a training stage of a million steps, say, hogging the CPUs of
/// every test after it): found by the cluster's log they hold open, each
/// goes, with every process under it.
fn kill_leftover_steps(dir: &Path) {
    let procs: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // `pid (comm) state ppid ...`: comm may hold spaces.
            let after = &stat[stat.rfind(')')? + 2..];
            let ppid = after.split(' ').nth(1)?.parse().ok()?;
            Some((pid, ppid))
        })
        .collect();
    let holds_our_files = |pid: i32| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.starts_with(dir)))
    };
    let mut doomed: Vec<i32> = procs
        .iter()
        .map(|&(pid, _)| pid)
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "slurmstepd")
                && holds_our_files(pid)
        })
        .collect();
    let mut i = 0;
    while i < doomed.len() {
        let parent = doomed[i];
        doomed.extend(
            procs
                .iter()
                .filter(|&&(_, pp)| pp == parent)
                .map(|&(p, _)| p),
        );
        i += 1;
    }
    for pid in doomed {
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn wait_for(limit: Duration, what: &str, mut ready: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < limit,
            "{what} did not appear in {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A fresh munge key, readable by its owner only (munged insists).
fn write_munge_key(root: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let mut key = vec![0u8; 1024];
    let mut f = std::fs::File::open("/dev/urandom").unwrap();
    std::io::Read::read_exact(&mut f, &mut key).unwrap();
    let path = root.join("munge").join("key");
    std::fs::write(&path, key).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::set_permissions(root.join("munge"), std::fs::Permissions::from_mode(0o700)).unwrap();
}

/// slurm.conf and gres.conf: no accounting, proctrack/linuxproc,
/// select/cons_tres with cores and memory as resources.
fn write_config(root: &Path, nodes: &[String]) {
    let user = user_name();
    let host = host_name();
    let r = root.display();
    let mut held = Vec::new();
    let mut conf = format!(
        "ClusterName=aftest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={ctld}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/sock
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/builtin
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
GresTypes=gpu
MessageTimeout=5
KillWait=2
MinJobAge=600
InactiveLimit=0
EnforcePartLimits=NO
",
        ctld = free_port(&mut held),
    );
    let mut gres = String::new();
    for name in nodes {
        let dev = root.join("dev");
        // Fake GPUs: character devices (Slurm checks the type), like /dev/null.
        for g in 0..2 {
            let path = dev.join(format!("{name}-gpu{g}"));
            let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
            let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o666, libc::makedev(1, 3)) };
            assert_eq!(
                rc,
                0,
                "mknod {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            );
        }
        let _ = writeln!(
            conf,
            "NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=2 RealMemory=2000 Gres=gpu:2 State=UNKNOWN",
            port = free_port(&mut held)
        );
        let _ = writeln!(
            gres,
            "NodeName={name} Name=gpu File={}/{name}-gpu[0-1]",
            dev.display()
        );
    }
    let _ = writeln!(
        conf,
        "PartitionName=debug Nodes={} Default=YES MaxTime=INFINITE State=UP DefMemPerCPU=100",
        nodes.join(",")
    );
    // A partition whose limit a job can exceed: accepted (Slurm's default
    // `EnforcePartLimits=NO`), then pending for ever.
    let _ = writeln!(
        conf,
        "PartitionName=short Nodes={} MaxTime=1 State=UP DefMemPerCPU=100",
        nodes.join(",")
    );
    std::fs::write(root.join("slurm.conf"), conf).unwrap();
    std::fs::write(root.join("gres.conf"), gres).unwrap();
}

/// `bin/CLIENT`: notes each call in `calls-CLIENT`, then runs the real one.
fn write_counter(root: &Path, client: &str) {
    use std::os::unix::fs::PermissionsExt;
    let real = ["/usr/bin", "/usr/local/bin"]
        .into_iter()
        .map(|d| Path::new(d).join(client))
        .find(|p| p.exists())
        .unwrap_or_else(|| {
            panic!("`{client}` is not installed: `make test` installs slurm-client")
        });
    let path = root.join("bin").join(client);
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\necho \"$*\" >> '{}'\nexec {} \"$@\"\n",
            root.join(format!("calls-{client}")).display(),
            real.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}
