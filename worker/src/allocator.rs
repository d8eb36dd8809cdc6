//! The worker's memory allocator: jemalloc, for Rust and (through its
//! unprefixed `malloc`/`free`, which the executable exports) for libtorch's
//! CPU tensors too, with page purging off.
//!
//! Why: a training step frees and reallocates the same large buffers
//! (activations, logits, gradients) many times a second. glibc hands
//! buffers above its mmap threshold back to the kernel on every free, so
//! each reuse page-faults fresh zeroed pages; jemalloc keeps them. Its
//! default gradual purging (`dirty_decay_ms`) costs the same again, and a
//! stage worker is a one-stage process whose resident set is its peak
//! anyway, so nothing is purged. Measured on docs/DESIGN.md's PPO iteration (2 CPU
//! threads): 0.68 s with glibc, 0.63 s with this, peak RSS 900 -> 800 MiB;
//! jemalloc with its default purging was slower than glibc (0.75 s).

use std::ffi::c_char;

#[global_allocator]
static JEMALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's compile-time options, read before `main` (its weak
/// `malloc_conf` symbol, defined here). The `MALLOC_CONF` environment
/// variable still overrides them.
#[allow(non_upper_case_globals)]
#[no_mangle]
pub static malloc_conf: Option<&'static c_char> = Some(unsafe {
    // SAFETY: a NUL-terminated static string, read only by jemalloc.
    &*(c"dirty_decay_ms:-1,muzzy_decay_ms:-1".as_ptr())
});

#[cfg(test)]
mod tests {
    /// The options above are the ones jemalloc runs with.
    #[test]
    fn jemalloc_runs_with_purging_off() {
        let read = |name: &std::ffi::CStr| -> isize {
            let mut value: isize = 0;
            let mut len = std::mem::size_of::<isize>();
            // SAFETY: `opt.*_decay_ms` are `ssize_t`; `value` has that size.
            let rc = unsafe {
                tikv_jemalloc_sys::mallctl(
                    name.as_ptr(),
                    (&mut value as *mut isize).cast(),
                    &mut len,
                    std::ptr::null_mut(),
                    0,
                )
            };
            assert_eq!(rc, 0, "mallctl {name:?}");
            value
        };
        assert_eq!(read(c"opt.dirty_decay_ms"), -1);
        assert_eq!(read(c"opt.muzzy_decay_ms"), -1);
    }
}
