//! CUDA graphs, for `--cuda-graphs`: a whole training or evaluation step recorded once and replayed
//! for every full batch, so that the GPU runs the step's ~2,000 kernels back to back instead of
//! waiting for the host to launch each one (`at::cuda::CUDAGraph` through `src/native/cuda_graph.cpp`).
//!
//! A [`Replayer`] runs a step eagerly for its first calls on the device's capture stream (cuDNN
//! picks its algorithms, the caching allocator settles), then records it on a static index buffer
//! and from then on copies each batch's indices into that buffer and replays. Recording does not
//! execute the step, so the batch it is recorded on is then replayed like the others. Steps of
//! another shape (the partial last batch) run eagerly.
//!
//! Under `--cuda-graphs auto` graphs can never fail a run: a failure in warm-up, capture or the first
//! replay (an asynchronous CUDA error included, read back by a synchronisation right after it) runs
//! the step eagerly instead and turns graphs off for the rest of the process ([`fallen_back`]), with
//! one warning. Under `on` the same failures are errors.
//!
//! In a data-parallel run ([`Replayer::share_with`]) the recorded training step holds the gradient
//! allreduce, and the ranks' steps must stay alike: every rank learns where the capture failed and
//! all fall back together; a warm-up step or first replay that failed may have run part of its
//! collectives, so it is an error whatever the setting.

use super::distributed::Group;
use crate::config::{CudaGraphs, Precision};
use crate::native::{self, status};
use anyhow::{bail, Context, Result};
use std::os::raw::{c_int, c_void};
use std::rc::Rc;
use std::sync::Mutex;
use tch::{Device, Tensor};

/// Sets whether cuDNN may only pick deterministic algorithms; returns the previous setting.
pub fn set_cudnn_deterministic(on: bool) -> bool {
    unsafe { native::csp_tch_set_cudnn_deterministic(on as c_int) != 0 }
}

/// Whether this binary can capture CUDA graphs (built against a libtorch with CUDA and CUDA headers
/// of its CUDA version).
pub fn built_with_cuda_graphs() -> bool {
    unsafe { native::csp_tch_cuda_graphs_built() != 0 }
}

/// Why this binary has no CUDA graphs, as build.rs found it (empty when it has them).
pub const MISSING_REASON: &str = env!("CSP_TCH_NO_GRAPHS_REASON");

fn cuda_index(device: Device) -> Result<c_int> {
    match device {
        Device::Cuda(index) => Ok(index as c_int),
        other => bail!("CUDA graphs need a CUDA device, not {other:?}"),
    }
}

/// Waits for `device` and reports an asynchronous CUDA error as an error instead of tch's panic.
pub fn synchronize(device: Device) -> Result<()> {
    status(unsafe { native::csp_tch_cuda_synchronize(cuda_index(device)?) }, "the CUDA device reported an error")
}

/// A memory pool that graphs which never run at the same time share (PyTorch's `graph_pool_handle()`).
pub struct MemoryPool(*mut c_void);

impl MemoryPool {
    pub fn new(device: Device) -> Result<MemoryPool> {
        let raw = unsafe { native::csp_tch_graph_pool_new(cuda_index(device)?) };
        if raw.is_null() {
            bail!("cannot create a CUDA graph memory pool: {}", native::last_error());
        }
        Ok(MemoryPool(raw))
    }
}

impl Drop for MemoryPool {
    fn drop(&mut self) {
        unsafe { native::csp_tch_graph_pool_free(self.0) }
    }
}

/// One recorded CUDA graph.
pub struct Graph(*mut c_void);

impl Graph {
    /// Records what `record` queues on `device` (running nothing), on the device's capture stream.
    /// Tensors `record` allocates come from `pool`. `record` must not read values back from the
    /// device. A capture that fails leaves nothing in capture mode.
    pub fn capture(device: Device, pool: &MemoryPool, record: impl FnOnce() -> Result<()>) -> Result<Graph> {
        let raw = unsafe { native::csp_tch_graph_new(cuda_index(device)?) };
        if raw.is_null() {
            bail!("cannot create a CUDA graph: {}", native::last_error());
        }
        let graph = Graph(raw);
        status(unsafe { native::csp_tch_graph_capture_begin(graph.0, pool.0) }, "cannot begin a CUDA graph capture")?;
        // tch panics on a libtorch error (an operation that is not allowed while capturing, say):
        // end the capture either way, so that the device leaves capture mode.
        let recorded = catch_panic(record);
        let ended = status(unsafe { native::csp_tch_graph_capture_end(graph.0) }, "cannot end the CUDA graph capture");
        recorded.context("recording the step failed")?;
        ended?;
        Ok(graph)
    }

    /// Queues the recorded work on the current stream.
    pub fn replay(&self) -> Result<()> {
        status(unsafe { native::csp_tch_graph_replay(self.0) }, "replaying a CUDA graph failed")
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        unsafe { native::csp_tch_graph_free(self.0) }
    }
}

/// Runs `f` on `device`'s capture stream (after the work queued so far; waiting for it after).
fn on_capture_stream(device: Device, f: impl FnOnce() -> Result<()>) -> Result<()> {
    let index = cuda_index(device)?;
    let guard = unsafe { native::csp_tch_capture_stream_enter(index) };
    if guard.is_null() {
        bail!("cannot switch to the capture stream: {}", native::last_error());
    }
    let ran = catch_panic(f);
    let left =
        status(unsafe { native::csp_tch_capture_stream_leave(guard, index) }, "the warm-up step failed on the device");
    ran.context("the warm-up step failed")?;
    left
}

/// Runs `f`, turning a panic (tch's way of reporting a libtorch error) into an error, with the
/// panic message printer silenced.
fn catch_panic(f: impl FnOnce() -> Result<()>) -> Result<()> {
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    std::panic::set_hook(hook);
    result.map_err(|panic| anyhow::anyhow!("{}", panic_message(&panic)))?
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    let text = panic.downcast_ref::<String>().map(String::as_str).or_else(|| panic.downcast_ref::<&str>().copied());
    // tch's messages carry libtorch's whole backtrace after the first lines.
    text.map_or_else(|| "unknown panic".into(), |t| t.lines().take(3).collect::<Vec<_>>().join(" "))
}

/// Eager steps before a step is recorded: the first lets cuDNN benchmark its algorithms for the
/// shape, the next ones settle the allocator, as PyTorch's CUDA-graph recipe advises.
pub const WARMUP_STEPS: usize = 3;

/// Why graphs were turned off for the rest of this process, once a warm-up, capture or first
/// replay failed under `--cuda-graphs auto`.
static FALLEN_BACK: Mutex<Option<String>> = Mutex::new(None);

/// The reason graphs are off for the rest of this process, if a failure turned them off.
pub fn fallen_back() -> Option<String> {
    FALLEN_BACK.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Turns graphs off for the rest of the process (the first reason is kept), warning once.
fn fall_back(reason: &str) {
    let mut state = FALLEN_BACK.lock().unwrap_or_else(|e| e.into_inner());
    if state.is_none() {
        eprintln!("warning: CUDA graphs off for the rest of this run, steps run eagerly: {reason}");
        *state = Some(reason.to_string());
    }
}

/// A fault a simulated recorder injects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// The warm-up steps fail.
    Warmup,
    /// The capture fails.
    Capture,
    /// The first replay fails.
    Replay,
    /// Replays run on the batch the step was recorded on, not the one copied in: a broken graph.
    StaleIndex,
}

/// What records and replays the steps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Recorder {
    /// `at::cuda::CUDAGraph` on a CUDA device.
    Cuda,
    /// A stand-in for tests on any device: "recording" keeps the static index, a "replay" runs the
    /// step eagerly on it, and `Fault` fails where a real graph could.
    Simulated(Fault),
}

impl Recorder {
    /// The test-only stand-in the environment asks for: `CSP_TCH_SIMULATE_CUDA_GRAPHS=ok`, or a
    /// fault: `warmup`, `capture`, `replay`, `stale-index`; `FAULT@R`: on data-parallel rank R only
    /// (torchrun's `RANK`), the other ranks record and replay.
    pub fn simulated_from_env() -> Result<Option<Recorder>> {
        const VAR: &str = "CSP_TCH_SIMULATE_CUDA_GRAPHS";
        let Ok(value) = std::env::var(VAR) else { return Ok(None) };
        let (name, rank) = value.split_once('@').map_or((value.as_str(), None), |(name, rank)| (name, Some(rank)));
        let fault = match name {
            "ok" => Fault::None,
            "warmup" => Fault::Warmup,
            "capture" => Fault::Capture,
            "replay" => Fault::Replay,
            "stale-index" => Fault::StaleIndex,
            other => bail!("{VAR}={other}: expected ok, warmup, capture, replay or stale-index, then @RANK or not"),
        };
        let elsewhere = rank.is_some_and(|rank| std::env::var("RANK").ok().as_deref() != Some(rank));
        Ok(Some(Recorder::Simulated(if elsewhere { Fault::None } else { fault })))
    }
}

/// A recorded step: the graph (none when simulated) and the index buffer it reads.
struct Recorded {
    graph: Option<Graph>,
    static_index: Tensor,
    /// What a simulated stale-index replay runs on.
    captured_index: Tensor,
    replays: usize,
}

/// Runs one kind of step (train or eval, one batch shape) eagerly, then as a recorded graph.
pub struct Replayer {
    device: Device,
    recorder: Recorder,
    /// Whether a failure leaves the steps eager (`--cuda-graphs auto`) instead of failing the run (`on`).
    fall_back: bool,
    eager_left: usize,
    recorded: Option<Recorded>,
    /// Why steps run eagerly after a failure.
    failure: Option<String>,
    /// In a data-parallel run, the group whose ranks record and replay the step together.
    peers: Option<Rc<Group>>,
}

impl Replayer {
    pub fn new(device: Device, recorder: Recorder, fall_back: bool) -> Replayer {
        Replayer { device, recorder, fall_back, eager_left: WARMUP_STEPS, recorded: None, failure: None, peers: None }
    }

    /// Makes this replayer's steps those of one rank of `group`'s data-parallel run, from its first
    /// step: captures are agreed over the ranks, and the first replay is waited for with the
    /// group's timeout.
    pub fn share_with(&mut self, group: Rc<Group>) {
        self.peers = Some(group);
    }

    /// Why this replayer's steps run eagerly: its own failure, or an earlier one in this process.
    pub fn off_reason(&self) -> Option<String> {
        self.failure.clone().or_else(fallen_back)
    }

    /// Runs `step` on the batch `index` (always of the same length): eagerly during warm-up, then
    /// recorded once into `pool` and replayed. A failure is an error (`--cuda-graphs on`), or the
    /// step runs eagerly instead and graphs are off for the rest of the process (`auto`).
    pub fn run(
        &mut self,
        index: &Tensor,
        pool: &MemoryPoolSlot,
        mut step: impl FnMut(&Tensor) -> Result<()>,
    ) -> Result<()> {
        if self.failure.is_some() || fallen_back().is_some() {
            return step(index);
        }
        if self.eager_left > 0 {
            self.eager_left -= 1;
            return match self.warm_up(index, &mut step) {
                Ok(()) => Ok(()),
                // Its collectives may have run in part: the ranks' steps can no longer match.
                Err(err) if self.peers.is_some() => Err(err.context("a data-parallel step before the capture")),
                Err(err) => self.fail(err.context("warm-up"), || step(index)),
            };
        }
        if self.recorded.is_none() {
            let recorded = self.record(index, pool, &mut step);
            match self.agree(recorded)? {
                Ok(recorded) => self.recorded = Some(recorded),
                Err(err) => return self.fail(err.context("capture"), || step(index)),
            }
        }
        let first = self.recorded.as_ref().is_some_and(|r| r.replays == 0);
        match self.replay(index, first, &mut step) {
            Err(err) if first && self.peers.is_some() => Err(err.context(
                "the first replay of the data-parallel step (which may have run part of its collectives, so the \
                 ranks cannot fall back together; use --cuda-graphs off)",
            )),
            Err(err) if first => self.fail(err.context("first replay"), || step(index)),
            other => other,
        }
    }

    fn warm_up(&self, index: &Tensor, step: &mut impl FnMut(&Tensor) -> Result<()>) -> Result<()> {
        match self.recorder {
            Recorder::Cuda => on_capture_stream(self.device, || step(index)),
            Recorder::Simulated(Fault::Warmup) => bail!("simulated warm-up failure"),
            Recorder::Simulated(_) => step(index),
        }
    }

    /// In a data-parallel run, `recorded` as every rank sees it: failed wherever it failed on any
    /// rank (a capture runs nothing, so every rank can still run the step eagerly), naming where.
    fn agree(&self, recorded: Result<Recorded>) -> Result<Result<Recorded>> {
        let Some(group) = &self.peers else { return Ok(recorded) };
        let failed = group.failed_ranks(recorded.is_err(), "agreeing on the CUDA graph capture")?;
        let on = |ranks: &[usize]| {
            let ranks: Vec<String> = ranks.iter().map(|r| format!("rank {r}")).collect();
            format!("failed on {} of {}", ranks.join(", "), group.world_size())
        };
        Ok(match recorded {
            Ok(_) if !failed.is_empty() => Err(anyhow::anyhow!("the capture {}", on(&failed))),
            Err(err) => Err(err.context(on(&failed))),
            ok => ok,
        })
    }

    fn record(
        &self,
        index: &Tensor,
        pool: &MemoryPoolSlot,
        step: &mut impl FnMut(&Tensor) -> Result<()>,
    ) -> Result<Recorded> {
        let static_index = index.copy();
        let graph = match self.recorder {
            Recorder::Cuda => Some(Graph::capture(self.device, pool.get(self.device)?, || step(&static_index))?),
            Recorder::Simulated(Fault::Capture) => bail!("simulated capture failure"),
            Recorder::Simulated(_) => None,
        };
        Ok(Recorded { graph, captured_index: static_index.copy(), static_index, replays: 0 })
    }

    /// Replays the recorded step on `index`; `first`: no replay has run yet.
    fn replay(&mut self, index: &Tensor, first: bool, step: &mut impl FnMut(&Tensor) -> Result<()>) -> Result<()> {
        let recorded = self.recorded.as_mut().expect("recorded before replaying");
        recorded.static_index.copy_(index);
        recorded.replays += 1;
        match (&recorded.graph, self.recorder) {
            (Some(graph), _) => {
                graph.replay()?;
                // An asynchronous fault of the first replay shows at the next synchronisation: make
                // that one here, where it can still fall back (data-parallel: bounded by the
                // group's timeout, since the step waits for the other ranks).
                match (&self.peers, first) {
                    (Some(group), true) => group.wait_for_device("the first replayed step")?,
                    (None, true) => synchronize(self.device)?,
                    (_, false) => {}
                }
                Ok(())
            }
            (None, Recorder::Simulated(Fault::Replay)) => bail!("simulated replay failure"),
            (None, Recorder::Simulated(Fault::StaleIndex)) => step(&recorded.captured_index),
            (None, _) => step(&recorded.static_index),
        }
    }

    /// A failure: an error under `on`; under `auto` the step runs eagerly instead (it ran on the
    /// device at most in part: a capture runs nothing) and graphs are off from then on.
    fn fail(&mut self, err: anyhow::Error, eager_step: impl FnOnce() -> Result<()>) -> Result<()> {
        self.recorded = None;
        if !self.fall_back {
            return Err(err.context("--cuda-graphs on (use --cuda-graphs auto to fall back to eager steps, or off)"));
        }
        let reason = format!("{err:#}");
        fall_back(&reason);
        self.failure = Some(reason);
        eager_step()
    }
}

/// The memory pool a trainer's graphs share, made when the first capture needs it.
#[derive(Default)]
pub struct MemoryPoolSlot(std::cell::OnceCell<MemoryPool>);

impl MemoryPoolSlot {
    fn get(&self, device: Device) -> Result<&MemoryPool> {
        if let Some(pool) = self.0.get() {
            return Ok(pool);
        }
        let pool = MemoryPool::new(device)?;
        Ok(self.0.get_or_init(|| pool))
    }
}

/// What `--cuda-graphs` comes to for a run: what records and replays its full-batch steps, or why
/// every step runs eagerly.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GraphPlan {
    Replay(Recorder),
    Eager(String),
}

/// What a run on `device` in `precision` does: replay graphs, or run eagerly and why. `obstacle`:
/// why this run's steps cannot be recorded otherwise (a data-parallel run's, [`super::distributed::graph_obstacle`]).
/// The test-only `CSP_TCH_SIMULATE_CUDA_GRAPHS` stands in for a CUDA device ([`Recorder::Simulated`]).
pub fn plan(setting: CudaGraphs, device: Device, precision: Precision, obstacle: Option<&str>) -> Result<GraphPlan> {
    let eager = |why: &str| Ok(GraphPlan::Eager(why.to_string()));
    let simulated = Recorder::simulated_from_env()?;
    if setting == CudaGraphs::Off {
        return eager("--cuda-graphs off");
    }
    if !device.is_cuda() && simulated.is_none() {
        return eager("not a CUDA device");
    }
    if precision.needs_loss_scaling() {
        if setting == CudaGraphs::On {
            bail!(
                "--cuda-graphs on: this GPU trains --amp in fp16, whose loss scaler reads the device \
                 every step and cannot be recorded; use --cuda-graphs auto (fp16 then runs eagerly) or off"
            );
        }
        return eager("fp16 --amp, whose loss scaler reads the device every step");
    }
    if let Some(reason) = fallen_back().filter(|_| setting == CudaGraphs::Auto) {
        return eager(&format!("an earlier failure in this process: {reason}"));
    }
    if let Some(why) = obstacle {
        if setting == CudaGraphs::On {
            return Err(refused_on(why));
        }
        return eager(why);
    }
    if let Some(recorder) = simulated {
        return Ok(GraphPlan::Replay(recorder));
    }
    if !built_with_cuda_graphs() {
        if setting == CudaGraphs::On {
            bail!(
                "--cuda-graphs on: this csp-tch was built without CUDA graphs ({}); rebuild it or use auto",
                MISSING_REASON
            );
        }
        return eager(&format!("this build has no CUDA graphs: {}", MISSING_REASON));
    }
    Ok(GraphPlan::Replay(Recorder::Cuda))
}

/// The one line `run-all`, `train` and `bench` print about CUDA graphs, for what [`plan`] makes of
/// these settings.
pub fn decision_line(
    setting: CudaGraphs,
    device: Device,
    precision: Precision,
    obstacle: Option<&str>,
) -> Result<String> {
    Ok(describe(setting, &plan(setting, device, precision, obstacle)?))
}

/// The line that says what `setting` came to (`plan`).
pub fn describe(setting: CudaGraphs, plan: &GraphPlan) -> String {
    let name = clap::ValueEnum::to_possible_value(&setting).map(|v| v.get_name().to_string()).unwrap_or_default();
    let flag = format!("--cuda-graphs {name}");
    match plan {
        GraphPlan::Replay(Recorder::Cuda) => {
            format!("CUDA graphs: on ({flag}): full batches replay recorded steps")
        }
        GraphPlan::Replay(recorder) => format!("CUDA graphs: on ({flag}), {recorder:?}: a test stand-in"),
        GraphPlan::Eager(why) => format!("CUDA graphs: off ({flag}): {why}"),
    }
}

/// The error for `--cuda-graphs on` when `why` keeps this run's steps from being recorded.
pub fn refused_on(why: &str) -> anyhow::Error {
    anyhow::anyhow!("--cuda-graphs on: {why}; use --cuda-graphs auto (steps then run eagerly) or off")
}
