//! What the C++ shims (`src/*.cpp`, built by build.rs) share with Rust: their last error message.

use std::ffi::CStr;
use std::os::raw::c_char;

extern "C" {
    fn csp_tch_last_error() -> *const c_char;
}

/// The message of the last libtorch error a shim function reported on this thread.
pub(crate) fn last_error() -> String {
    // SAFETY: the shim returns a NUL-terminated string that lives until the next error on this thread.
    unsafe { CStr::from_ptr(csp_tch_last_error()) }.to_string_lossy().into_owned()
}
