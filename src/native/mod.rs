//! The C++ shim (`src/native/*.cpp`, built by build.rs against csp-tch's libtorch) for the few
//! libtorch calls tch does not bind: autocast switches, oneDNN's inner product, fused optimizers, CUDA
//! graphs. Every `extern "C"` declaration of csp-tch is here; each C++ function catches every
//! exception (`csp_tch::guarded` in shim.h) and reports it through [`last_error`].

use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn csp_tch_last_error() -> *const c_char;

    // amp.cpp: device_type is a c10::DeviceType (0 CPU, 1 CUDA), dtype a c10::ScalarType.
    pub(crate) fn csp_tch_autocast_enabled(device_type: c_int) -> c_int;
    pub(crate) fn csp_tch_set_autocast_enabled(device_type: c_int, enabled: c_int);
    pub(crate) fn csp_tch_autocast_dtype(device_type: c_int) -> c_int;
    pub(crate) fn csp_tch_set_autocast_dtype(device_type: c_int, dtype: c_int);
    pub(crate) fn csp_tch_autocast_increment_nesting() -> c_int;
    pub(crate) fn csp_tch_autocast_decrement_nesting();
    pub(crate) fn csp_tch_cuda_supports_bf16() -> c_int;

    // onednn.cpp
    pub(crate) fn csp_tch_onednn_linear_available() -> i32;
    pub(crate) fn csp_tch_onednn_linear_relu(
        x: *const C_tensor,
        weight: *const C_tensor,
        bias: *const C_tensor,
    ) -> *mut C_tensor;

    // fused_optim.cpp: kind 0 Adam, 1 AdamW, 2 SGD; state_a/state_b null where the kind has none.
    pub(crate) fn csp_tch_fused_optimizer_step(
        kind: c_int,
        params: *const *mut C_tensor,
        grads: *const *mut C_tensor,
        state_a: *const *mut C_tensor,
        state_b: *const *mut C_tensor,
        step: *mut C_tensor,
        n: c_int,
        lr: *mut C_tensor,
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
        momentum: f64,
        nesterov: c_int,
    ) -> c_int;

    // cuda_graph.cpp
    pub(crate) fn csp_tch_cuda_graphs_built() -> c_int;
    pub(crate) fn csp_tch_graph_pool_new(device: c_int) -> *mut c_void;
    pub(crate) fn csp_tch_graph_pool_free(pool: *mut c_void);
    pub(crate) fn csp_tch_graph_new(device: c_int) -> *mut c_void;
    pub(crate) fn csp_tch_graph_free(graph: *mut c_void);
    pub(crate) fn csp_tch_capture_stream_enter(device: c_int) -> *mut c_void;
    pub(crate) fn csp_tch_capture_stream_leave(guard: *mut c_void, device: c_int) -> c_int;
    pub(crate) fn csp_tch_graph_capture_begin(graph: *mut c_void, pool: *mut c_void) -> c_int;
    pub(crate) fn csp_tch_graph_capture_end(graph: *mut c_void) -> c_int;
    pub(crate) fn csp_tch_graph_replay(graph: *mut c_void) -> c_int;
    pub(crate) fn csp_tch_cuda_synchronize(device: c_int) -> c_int;
    pub(crate) fn csp_tch_cuda_mem_info(device: c_int, free: *mut usize, total: *mut usize) -> c_int;
    pub(crate) fn csp_tch_set_cudnn_deterministic(on: c_int) -> c_int;
    fn csp_tch_cuda_event_new(device: c_int) -> *mut c_void;
    fn csp_tch_cuda_event_free(event: *mut c_void);
    fn csp_tch_cuda_event_record(event: *mut c_void) -> c_int;
    fn csp_tch_cuda_event_synchronize(event: *mut c_void) -> c_int;
    fn csp_tch_cuda_event_query(event: *mut c_void) -> c_int;
    fn csp_tch_cuda_stream_wait_event(event: *mut c_void) -> c_int;
    fn csp_tch_copy_on_side_stream(
        dst: *const C_tensor,
        src: *const C_tensor,
        after: *mut c_void,
        done: *mut c_void,
    ) -> c_int;

    // distributed.cpp: backend 0 Gloo, 1 NCCL.
    fn csp_tch_nccl_built() -> c_int;
    fn csp_tch_process_group_new(
        backend: c_int,
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        host_store: c_int,
        prefix: *const c_char,
        timeout_ms: i64,
        device: c_int,
        gloo_host: *const c_char,
        gloo_interface: *const c_char,
    ) -> *mut c_void;
    fn csp_tch_process_group_free(group: *mut c_void);
    fn csp_tch_process_group_silent_ranks(group: *mut c_void, world: c_int, wait_ms: i64, silent: *mut c_int) -> c_int;
    fn csp_tch_process_group_broadcast(group: *mut c_void, tensor: *const C_tensor, root: c_int) -> c_int;
    fn csp_tch_process_group_allreduce(group: *mut c_void, tensor: *const C_tensor, in_step: c_int) -> c_int;
    fn csp_tch_process_group_abort(group: *mut c_void);
    fn csp_tch_store_set(group: *mut c_void, key: *const c_char, value: *const u8, len: usize) -> c_int;
    fn csp_tch_store_get(group: *mut c_void, key: *const c_char, len: *mut usize) -> *mut u8;
    fn csp_tch_store_free(buffer: *mut u8);
    fn csp_tch_overlapped_allreduce_new(
        group: *mut c_void,
        params: *const *mut C_tensor,
        buckets_of: *const c_int,
        offsets: *const i64,
        n: c_int,
        flats: *const *mut C_tensor,
        n_buckets: c_int,
        scale: f64,
    ) -> *mut c_void;
    fn csp_tch_overlapped_allreduce_arm(reducer: *mut c_void);
    fn csp_tch_overlapped_allreduce_finish(reducer: *mut c_void, during: *mut c_int) -> c_int;
    fn csp_tch_overlapped_allreduce_ready_order(reducer: *mut c_void, out: *mut c_int) -> c_int;
    fn csp_tch_overlapped_allreduce_free(reducer: *mut c_void);
    fn csp_tch_sync_batch_norm(
        group: *mut c_void,
        input: *const C_tensor,
        weight: *const C_tensor,
        bias: *const C_tensor,
        running_mean: *const C_tensor,
        running_var: *const C_tensor,
        momentum: f64,
        eps: f64,
        rank: c_int,
        world: c_int,
    ) -> *mut C_tensor;
}

mod distributed;
pub use distributed::{nccl_built, GroupBackend, OverlappedAllreduce, ProcessGroup, Rendezvous};

/// The message of the last libtorch error a shim function reported on this thread.
pub(crate) fn last_error() -> String {
    // SAFETY: the shim returns a NUL-terminated string that lives until the next error on this thread.
    unsafe { CStr::from_ptr(csp_tch_last_error()) }.to_string_lossy().into_owned()
}

/// A shim call's status as a result: `Ok` for 0, else the shim's message after `what`.
pub(crate) fn status(code: c_int, what: &str) -> anyhow::Result<()> {
    if code != 0 {
        anyhow::bail!("{what}: {}", last_error());
    }
    Ok(())
}

/// A CUDA event: recorded after the work queued on a stream so far, then waited for by the host or
/// by another stream. Waiting for one never recorded returns at once.
pub(crate) struct CudaEvent(std::ptr::NonNull<c_void>);

impl CudaEvent {
    pub fn new(device: usize) -> anyhow::Result<CudaEvent> {
        // SAFETY: the shim catches every exception; null means failure.
        let event = unsafe { csp_tch_cuda_event_new(device as c_int) };
        std::ptr::NonNull::new(event)
            .map(CudaEvent)
            .ok_or_else(|| anyhow::anyhow!("cannot create a CUDA event: {}", last_error()))
    }

    /// Records the event on its device's current stream.
    pub fn record(&self) -> anyhow::Result<()> {
        // SAFETY: a live event; the shim catches every exception.
        status(unsafe { csp_tch_cuda_event_record(self.0.as_ptr()) }, "recording a CUDA event")
    }

    /// Waits on the host for the work before the last recording.
    pub fn synchronize(&self) -> anyhow::Result<()> {
        // SAFETY: as in `record`.
        status(unsafe { csp_tch_cuda_event_synchronize(self.0.as_ptr()) }, "waiting for a CUDA event")
    }

    /// Whether the work before the last recording is done (without waiting).
    pub fn is_done(&self) -> anyhow::Result<bool> {
        // SAFETY: as in `record`.
        match unsafe { csp_tch_cuda_event_query(self.0.as_ptr()) } {
            -1 => anyhow::bail!("querying a CUDA event: {}", last_error()),
            done => Ok(done == 1),
        }
    }

    /// Makes the device's current stream wait (on the device) for the work before the last recording.
    pub fn wait_on_current_stream(&self) -> anyhow::Result<()> {
        // SAFETY: as in `record`.
        status(unsafe { csp_tch_cuda_stream_wait_event(self.0.as_ptr()) }, "waiting for a CUDA event")
    }
}

impl Drop for CudaEvent {
    fn drop(&mut self) {
        // SAFETY: made by csp_tch_cuda_event_new, freed once.
        unsafe { csp_tch_cuda_event_free(self.0.as_ptr()) }
    }
}

/// Copies `src` (pinned host memory) into `dst` (on `done`'s device) on that device's copy stream,
/// the host not waiting: the copy starts after the work before `after`'s last recording, and
/// `done` is recorded after it. Neither tensor may be reused or freed before `done` is reached.
pub(crate) fn copy_on_side_stream(
    dst: &Tensor,
    src: &Tensor,
    after: &CudaEvent,
    done: &CudaEvent,
) -> anyhow::Result<()> {
    // SAFETY: live tensors and events; the shim catches every exception.
    let code = unsafe { csp_tch_copy_on_side_stream(dst.as_ptr(), src.as_ptr(), after.0.as_ptr(), done.0.as_ptr()) };
    status(code, "copying a batch to the device")
}

/// The free and total memory of CUDA device `index` in bytes (`None` when this build or device cannot say).
pub fn cuda_memory(index: usize) -> Option<(usize, usize)> {
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: two valid out-pointers; the shim catches every exception.
    let status = unsafe { csp_tch_cuda_mem_info(index as c_int, &mut free, &mut total) };
    (status == 0).then_some((free, total))
}
