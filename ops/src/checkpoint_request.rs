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

use std::sync::atomic::{AtomicBool, Ordering};

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
