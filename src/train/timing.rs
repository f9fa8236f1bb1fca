//! What the steps of a loop cost: the warm-up of its first steps beyond its steady rate, and the
//! time of each phase of a train step (for `bench --breakdown`).

use serde::Serialize;
use std::time::Instant;
use tch::Device;

use super::cuda_graph;

/// Steps timed at the start of each training and evaluation loop: the warm-up steps, then the one
/// recorded as a CUDA graph and replayed (on the CPU, the first steps alike).
pub(super) const HEAD_STEPS: usize = cuda_graph::WARMUP_STEPS + 1;

/// The time `head_seconds` of the first `head` of `steps` steps beyond what they take at the rate of
/// the others (`total_seconds` for all); 0 when they were no slower, or there are too few steps to tell.
pub fn warmup_seconds(head_seconds: f64, head: usize, total_seconds: f64, steps: usize) -> f64 {
    if steps <= head {
        return 0.0;
    }
    let steady = (total_seconds - head_seconds) / (steps - head) as f64;
    (head_seconds - head as f64 * steady).max(0.0)
}

/// Time spent in each phase of train steps (summed over the steps measured).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PhaseTimes {
    /// Gather, resize and normalise the batch.
    pub transform_ms: f64,
    /// Forward pass and loss.
    pub forward_ms: f64,
    pub backward_ms: f64,
    /// Adam update.
    pub optimizer_ms: f64,
}

/// Adds the time since the previous lap to one field of `times`, when there is one.
pub(super) struct PhaseClock<'a> {
    pub(super) times: Option<&'a mut PhaseTimes>,
    pub(super) device: Device,
    pub(super) last: Instant,
}

impl PhaseClock<'_> {
    pub(super) fn lap(&mut self, field: fn(&mut PhaseTimes) -> &mut f64) {
        if let Some(times) = self.times.as_deref_mut() {
            crate::environment::synchronize(self.device);
            let now = Instant::now();
            *field(times) += (now - self.last).as_secs_f64() * 1e3;
            self.last = now;
        }
    }
}
