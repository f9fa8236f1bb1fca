//! The C++ shim (`src/native/*.cpp`, built by build.rs against csp-tch's libtorch) for the few
//! libtorch calls tch does not bind: autocast switches, oneDNN's inner product, fused optimizers, CUDA
//! graphs. Every `extern "C"` declaration of csp-tch is here; each C++ function catches every
//! exception (`csp_tch::guarded` in shim.h) and reports it through [`last_error`].

use std::ffi::CStr;
use std::os::raw::{c_char, c_int, c_void};
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
    fn csp_tch_process_group_allreduce(group: *mut c_void, tensor: *const C_tensor) -> c_int;
    fn csp_tch_store_set(group: *mut c_void, key: *const c_char, value: *const u8, len: usize) -> c_int;
    fn csp_tch_store_get(group: *mut c_void, key: *const c_char, len: *mut usize) -> *mut u8;
    fn csp_tch_store_free(buffer: *mut u8);
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
pub use distributed::{nccl_built, GroupBackend, ProcessGroup, Rendezvous};

/// The message of the last libtorch error a shim function reported on this thread.
pub(crate) fn last_error() -> String {
    // SAFETY: the shim returns a NUL-terminated string that lives until the next error on this thread.
    unsafe { CStr::from_ptr(csp_tch_last_error()) }.to_string_lossy().into_owned()
}

/// The free and total memory of CUDA device `index` in bytes (`None` when this build or device cannot say).
pub fn cuda_memory(index: usize) -> Option<(usize, usize)> {
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: two valid out-pointers; the shim catches every exception.
    let status = unsafe { csp_tch_cuda_mem_info(index as c_int, &mut free, &mut total) };
    (status == 0).then_some((free, total))
}
