//! CUDA graphs, for `--cuda-graphs`: a whole training or evaluation step recorded once and replayed
//! for every full batch, so that the GPU runs the step's ~2,000 kernels back to back instead of
//! waiting for the host to launch each one (`at::cuda::CUDAGraph` through `src/cuda_graph.cpp`).
//!
//! A [`Replayer`] runs a step eagerly for its first calls (cuDNN picks its algorithms, the caching
//! allocator settles), then records it on a static index buffer and from then on copies each batch's
//! indices into that buffer and replays. Recording does not execute the step, so the batch it is
//! recorded on is then replayed like the others. Steps of another shape (the partial last batch) run
//! eagerly.

use anyhow::{bail, Result};
use std::os::raw::{c_int, c_void};
use tch::{Device, Tensor};

use crate::shim::last_error;

extern "C" {
    fn csp_tch_cuda_graphs_built() -> c_int;
    fn csp_tch_graph_new(device: c_int) -> *mut c_void;
    fn csp_tch_graph_free(graph: *mut c_void);
    fn csp_tch_graph_capture_begin(graph: *mut c_void, share_pool_of: *mut c_void) -> c_int;
    fn csp_tch_graph_capture_end(graph: *mut c_void) -> c_int;
    fn csp_tch_graph_replay(graph: *mut c_void) -> c_int;
}

/// Whether this binary can capture CUDA graphs (built against a libtorch with CUDA and its headers).
pub fn built_with_cuda_graphs() -> bool {
    unsafe { csp_tch_cuda_graphs_built() != 0 }
}

/// One recorded CUDA graph with its private memory pool.
pub struct Graph(*mut c_void);

impl Graph {
    /// Records what `record` queues on `device` (running nothing). Tensors `record` allocates come
    /// from the graph's memory pool, or from `share_pool_of`'s: graphs that never run at the same
    /// time may share one. `record` must not read values back from the device.
    pub fn capture(device: Device, share_pool_of: Option<&Graph>, record: impl FnOnce()) -> Result<Graph> {
        let Device::Cuda(index) = device else { bail!("CUDA graphs need a CUDA device, not {device:?}") };
        let raw = unsafe { csp_tch_graph_new(index as c_int) };
        if raw.is_null() {
            bail!("cannot create a CUDA graph: {}", last_error());
        }
        let graph = Graph(raw);
        let pool = share_pool_of.map_or(std::ptr::null_mut(), |g| g.0);
        if unsafe { csp_tch_graph_capture_begin(graph.0, pool) } != 0 {
            bail!("cannot begin a CUDA graph capture: {}", last_error());
        }
        // tch panics on a libtorch error (an operation that is not allowed while capturing, say):
        // end the capture either way, so that the device leaves capture mode.
        let recorded = quietly(|| std::panic::catch_unwind(std::panic::AssertUnwindSafe(record)));
        let ended = unsafe { csp_tch_graph_capture_end(graph.0) } == 0;
        match (recorded, ended) {
            (Ok(()), true) => Ok(graph),
            (Err(panic), _) => bail!("recording the step failed: {}", panic_message(&panic)),
            (Ok(()), false) => bail!("cannot end the CUDA graph capture: {}", last_error()),
        }
    }

    /// Queues the recorded work on the current stream.
    pub fn replay(&self) -> Result<()> {
        if unsafe { csp_tch_graph_replay(self.0) } != 0 {
            bail!("replaying a CUDA graph failed: {}", last_error());
        }
        Ok(())
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        unsafe { csp_tch_graph_free(self.0) }
    }
}

/// Runs `f` with the panic message printer silenced (a failed capture is reported as an error).
fn quietly<T>(f: impl FnOnce() -> T) -> T {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = f();
    std::panic::set_hook(hook);
    result
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let text = panic.downcast_ref::<String>().map(String::as_str).or_else(|| panic.downcast_ref::<&str>().copied());
    // tch's messages carry libtorch's whole backtrace after the first lines.
    text.map_or_else(|| "unknown panic".into(), |t| t.lines().take(3).collect::<Vec<_>>().join(" "))
}

/// Eager steps before a step is recorded: the first lets cuDNN benchmark its algorithms for the
/// shape, the next ones settle the allocator, as PyTorch's CUDA-graph recipe advises.
pub const WARMUP_STEPS: usize = 3;

/// Runs one kind of step (train or eval, one batch shape) eagerly, then as a recorded graph.
pub struct Replayer {
    device: Device,
    /// Whether a capture that fails leaves the steps eager (`--cuda-graphs auto`) instead of
    /// failing the run (`on`).
    fall_back: bool,
    eager_left: usize,
    recorded: Option<(Graph, Tensor)>,
    /// A capture failed: every step runs eagerly.
    failed: bool,
}

impl Replayer {
    pub fn new(device: Device, fall_back: bool) -> Replayer {
        Replayer { device, fall_back, eager_left: WARMUP_STEPS, recorded: None, failed: false }
    }

    /// Whether a capture failed, so that steps run eagerly.
    pub fn failed(&self) -> bool {
        self.failed
    }

    /// The graph steps are recorded in, for another replayer to share its memory pool.
    pub fn graph(&self) -> Option<&Graph> {
        self.recorded.as_ref().map(|(graph, _)| graph)
    }

    /// Runs `step` on the batch `index` (always of the same length): eagerly during warm-up, then
    /// recorded once (sharing `share_pool_of`'s memory pool) and replayed. A capture that fails is
    /// an error, or with `fall_back` reported on stderr, and the steps run eagerly from then on.
    pub fn run(&mut self, index: &Tensor, share_pool_of: Option<&Graph>, mut step: impl FnMut(&Tensor)) -> Result<()> {
        if self.failed || self.eager_left > 0 {
            self.eager_left = self.eager_left.saturating_sub(1);
            step(index);
            return Ok(());
        }
        if self.recorded.is_none() {
            let static_index = index.copy();
            match Graph::capture(self.device, share_pool_of, || step(&static_index)) {
                Ok(graph) => self.recorded = Some((graph, static_index)),
                Err(err) if !self.fall_back => return Err(err.context("--cuda-graphs on")),
                Err(err) => {
                    eprintln!("warning: CUDA graph capture failed, running eagerly: {err:#}");
                    self.failed = true;
                    step(index);
                    return Ok(());
                }
            }
        }
        let (graph, static_index) = self.recorded.as_mut().expect("recorded above");
        static_index.copy_(index);
        graph.replay()
    }
}
