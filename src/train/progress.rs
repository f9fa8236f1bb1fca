//! Progress of an epoch: a bar on a terminal, plain lines when piped, and the occasional read of
//! the running loss that shows it and stops a diverged run.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use super::TrainSums;

/// Where progress goes: a bar per epoch on a terminal, one plain line per epoch otherwise.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub terminal: bool,
    /// Shows nothing: a data-parallel rank other than rank 0, which reports for all.
    pub quiet: bool,
}

impl Progress {
    pub fn detect() -> Progress {
        Progress { terminal: std::io::stderr().is_terminal(), quiet: false }
    }

    /// Progress shown only when `shown` (rank 0 of a data-parallel run, or a single process).
    pub fn shown_if(shown: bool) -> Progress {
        Progress { quiet: !shown, ..Progress::detect() }
    }

    pub(super) fn bar(&self, steps: usize, prefix: String) -> ProgressBar {
        if !self.terminal || self.quiet {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(steps as u64);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:28}] {pos}/{len} {msg} ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(prefix);
        bar
    }

    pub fn line(&self, bar: &ProgressBar, text: String) {
        if self.quiet {
            return;
        }
        if self.terminal {
            bar.println(text);
        } else {
            eprintln!("{text}");
        }
    }
}

/// Reads an epoch's running loss from the device now and then, for the progress bar and to stop a
/// diverged run early: at most twice a second on a terminal, every [`Watch::CHECK_EVERY`] steps, and
/// after the last step (reading waits for the device, so not every step).
pub(super) struct Watch<'a> {
    bar: &'a ProgressBar,
    started: Instant,
    last_read: Instant,
}

impl<'a> Watch<'a> {
    const CHECK_EVERY: usize = 50;

    pub(super) fn new(bar: &'a ProgressBar) -> Watch<'a> {
        Watch { bar, started: Instant::now(), last_read: Instant::now() }
    }

    /// A line above the bar (or on stderr when there is no bar).
    pub(super) fn show(&self, line: String) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    /// After `done` of `steps` steps and `images` images: `Err(loss)` when the loss is not finite.
    pub(super) fn after_step(
        &mut self,
        done: usize,
        steps: usize,
        images: i64,
        sums: &TrainSums,
    ) -> std::result::Result<(), f64> {
        let refresh = !self.bar.is_hidden() && self.last_read.elapsed() > Duration::from_millis(500);
        if !(done == steps || refresh || done.is_multiple_of(Self::CHECK_EVERY)) {
            return Ok(());
        }
        let loss = sums.last_loss.double_value(&[]);
        if !loss.is_finite() {
            return Err(loss);
        }
        self.bar.set_position(done as u64);
        self.bar.set_message(format!(
            "loss {loss:.4} acc {:.4} {:.0} ms/step",
            sums.correct.double_value(&[]) / images as f64,
            self.started.elapsed().as_secs_f64() * 1e3 / done as f64
        ));
        self.last_read = Instant::now();
        Ok(())
    }
}
