//! Stopping a run between steps: the first Ctrl-C, SIGTERM or SIGHUP (what schedulers and torchrun
//! send) asks training to stop before its next step; a second one quits at once.

use std::sync::atomic::{AtomicBool, Ordering};

/// Set by the signal handler; training stops before the next step.
pub(super) static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The error of a run stopped by a signal.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Makes Ctrl-C, SIGTERM and SIGHUP stop training before its next step (the run saves where it is);
/// a second signal quits at once.
pub fn stop_on_signals() {
    // Only one handler per process: a second call (several runs in one process) keeps the first.
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            // At once means without destructors: `exit` would tear libtorch down under the
            // convolution the main thread is running (a segfault). Every file csp-tch writes is
            // complete or absent, so there is nothing to flush.
            unsafe { libc::_exit(130) };
        }
        eprintln!("\ninterrupt: stopping before the next step (a second Ctrl-C quits at once)");
    });
}

/// Whether a stop was asked for.
pub fn stop_requested() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}
