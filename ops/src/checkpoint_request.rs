//! SIGUSR1 asks a running worker for a checkpoint at its next step.
//!
//! A Slurm job gets SIGUSR1 some time before its limit (`--signal`); the
//! engine's `stage exec` passes it on to the worker, whose training loops
//! then save one checkpoint at the next step boundary besides their
//! `checkpoint_every` ones, so the resubmitted job resumes from there
//! rather than from the last periodic checkpoint.
//!
//! SIGUSR1 kills a process that has no handler for it, so the engine starts
//! workers with it blocked ([`block_before_exec`]) and the worker unblocks it
//! once its handler is in place ([`install`]): one sent in between waits.
//!
//! The engine side: what runs lists itself ([`Listener`]) and [`ask`] signals
//! the list: each worker, and the process group of each `exec` command that
//! takes the signal (`checkpoint_signal: true`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// What [`ask`] signals now (a pid, or a process group as `-pgid`), and
/// whether a checkpoint was asked for while no worker was listed.
static LISTENING: Mutex<(Vec<libc::pid_t>, bool)> = Mutex::new((Vec::new(), false));

/// A process (or group) on the list [`ask`] signals, until dropped.
pub struct Listener(libc::pid_t);

impl Listener {
    /// Lists worker `pid`; a checkpoint asked for before it started is
    /// asked of it now (SIGUSR1 waits, blocked, for its handler).
    pub fn worker(pid: u32) -> Listener {
        let pid = pid as libc::pid_t;
        let mut listening = LISTENING.lock().unwrap_or_else(|e| e.into_inner());
        listening.0.push(pid);
        if std::mem::take(&mut listening.1) {
            send_usr1(pid);
        }
        Listener(pid)
    }

    /// Lists the process group `pgid` of a user's command. A request made
    /// before it started is not passed on: a program whose handler is not
    /// yet installed would die of it.
    pub fn group(pgid: u32) -> Listener {
        let target = -(pgid as libc::pid_t);
        let mut listening = LISTENING.lock().unwrap_or_else(|e| e.into_inner());
        listening.0.push(target);
        Listener(target)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let mut listening = LISTENING.lock().unwrap_or_else(|e| e.into_inner());
        listening.0.retain(|&t| t != self.0);
    }
}

/// Asks what is listed for a checkpoint at its next step (SIGUSR1); with
/// nothing listed, the next worker to start. A Slurm job's `stage exec`
/// does, on its own SIGUSR1.
pub fn ask() {
    let mut listening = LISTENING.lock().unwrap_or_else(|e| e.into_inner());
    match listening.0.as_slice() {
        [] => listening.1 = true,
        targets => targets.iter().for_each(|&t| send_usr1(t)),
    }
}

fn send_usr1(target: libc::pid_t) {
    // SAFETY: a signal to a child (or its group) this process started and
    // has not yet reaped: it stays listed until its runner waited for it.
    unsafe { libc::kill(target, libc::SIGUSR1) };
}

static REQUESTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    // Async-signal-safe: one atomic store.
    REQUESTED.store(true, Ordering::SeqCst);
}

/// Installs the SIGUSR1 handler and unblocks the signal (delivering one
/// that waited). Call first thing in the worker's `main`.
pub fn install() -> std::io::Result<()> {
    // SAFETY: a plain sigaction with a handler that only stores an atomic,
    // and a mask change of this thread.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_usr1 as extern "C" fn(libc::c_int) as usize;
        action.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        set_usr1_blocked(false)
    }
}

/// Whether a checkpoint was asked for since the last call: a training loop
/// asks once per step and saves one when it was.
pub fn take() -> bool {
    REQUESTED.swap(false, Ordering::SeqCst)
}

/// Blocks SIGUSR1 in a child about to `exec` the worker (call it in
/// `pre_exec`; the mask survives `exec`): a signal sent before the worker's
/// handler is in place then waits for it instead of killing the worker.
/// Async-signal-safe.
pub fn block_before_exec() -> std::io::Result<()> {
    set_usr1_blocked(true)
}

/// Blocks or unblocks SIGUSR1 for the calling thread.
fn set_usr1_blocked(blocked: bool) -> std::io::Result<()> {
    // SAFETY: a signal set built in place and passed by pointer.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGUSR1);
        let how = if blocked {
            libc::SIG_BLOCK
        } else {
            libc::SIG_UNBLOCK
        };
        match libc::pthread_sigmask(how, &set, std::ptr::null_mut()) {
            0 => Ok(()),
            e => Err(std::io::Error::from_raw_os_error(e)),
        }
    }
}
