//! Stopping a run between steps: the first Ctrl-C asks training to stop before its next step;
//! a second one quits at once.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set by the Ctrl-C handler; training stops before the next step.
pub(super) static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The error of a run stopped by Ctrl-C.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Makes Ctrl-C stop training at the next step (the epoch in progress is dropped, the last
/// checkpoint kept); a second Ctrl-C quits at once.
pub fn stop_on_ctrl_c() {
    // Only one handler per process: a second call (several runs in one process) keeps the first.
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            // At once means without destructors: `exit` would tear libtorch down under the
            // convolution the main thread is running (a segfault). Every file csp-tch writes is
            // complete or absent, so there is nothing to flush.
            unsafe { libc::_exit(130) };
        }
        eprintln!("\ninterrupt: stopping before the next step (Ctrl-C again quits at once)");
    });
}

/// Whether a stop was asked for.
pub fn requested() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}
