//! What the entry points of the C++ shim (`csrc/`) share on the Rust side:
//! a call that fails sets a message the shim allocated, which is read here
//! and handed back to be freed.

#[cfg(alignflow_c10d)]
use std::ffi::{c_char, CStr};

#[cfg(alignflow_c10d)]
extern "C" {
    fn alignflow_free_message(message: *mut c_char);
}

/// The message a failed shim call set, freed.
///
/// # Safety
/// `error` is null or a message the shim set and nothing freed yet.
#[cfg(alignflow_c10d)]
pub(crate) unsafe fn take_message(error: *mut c_char) -> String {
    if error.is_null() {
        return "unknown error".into();
    }
    let message = CStr::from_ptr(error).to_string_lossy().into_owned();
    alignflow_free_message(error);
    message
}
