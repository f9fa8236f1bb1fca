//! A c10d process group (src/native/distributed.cpp): joined through a TCPStore, then collectives
//! on tensors in place and the store's keys. Every call waits for its result, up to the timeout,
//! except a training step's collectives on NCCL ([`ProcessGroup::all_reduce_sum_in_step`],
//! [`OverlappedAllreduce`]'s): the stream that uses the sums waits for them, so that a CUDA graph
//! can record them, and the caller waits for the step's end.

use anyhow::{bail, Result};
use std::ffi::CString;
use std::os::raw::{c_int, c_void};
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::Duration;
use tch::Tensor;

use super::{
    csp_tch_nccl_built, csp_tch_overlapped_allreduce_arm, csp_tch_overlapped_allreduce_finish,
    csp_tch_overlapped_allreduce_free, csp_tch_overlapped_allreduce_new, csp_tch_overlapped_allreduce_ready_order,
    csp_tch_process_group_abort, csp_tch_process_group_allreduce, csp_tch_process_group_broadcast,
    csp_tch_process_group_free, csp_tch_process_group_new, csp_tch_process_group_silent_ranks, csp_tch_store_free,
    csp_tch_store_get, csp_tch_store_set, csp_tch_sync_batch_norm, last_error,
};

/// Whether this build has c10d's NCCL process group (nccl.h was found beside libtorch).
pub fn nccl_built() -> bool {
    // SAFETY: no arguments.
    unsafe { csp_tch_nccl_built() != 0 }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GroupBackend {
    Gloo,
    /// On the CUDA device of this index.
    Nccl(usize),
}

/// Where and how a process joins its group.
#[derive(Clone, Debug)]
pub struct Rendezvous<'a> {
    pub host: &'a str,
    pub port: u16,
    pub rank: usize,
    pub world_size: usize,
    /// Whether rank 0 hosts the store (not when torchrun's agent does).
    pub host_store: bool,
    /// The prefix of every key of this group in the store.
    pub prefix: &'a str,
    pub timeout: Duration,
    pub backend: GroupBackend,
    /// The address Gloo binds to (empty: this machine's hostname, as c10d's default).
    pub gloo_host: &'a str,
    /// The network interface Gloo binds to (`GLOO_SOCKET_IFNAME`; empty: none).
    pub gloo_interface: &'a str,
}

/// A joined process group; freed (its connections closed) when dropped.
pub struct ProcessGroup {
    handle: NonNull<c_void>,
}

impl ProcessGroup {
    /// Joins the group: waits for every rank (up to the timeout) and connects to each.
    pub fn join(r: &Rendezvous) -> Result<ProcessGroup> {
        let text = |s: &str| CString::new(s).map_err(|_| anyhow::anyhow!("{s:?} holds a NUL byte"));
        let (host, prefix, gloo_host, gloo_interface) =
            (text(r.host)?, text(r.prefix)?, text(r.gloo_host)?, text(r.gloo_interface)?);
        let (backend, device) = match r.backend {
            GroupBackend::Gloo => (0, 0),
            GroupBackend::Nccl(device) => (1, device as c_int),
        };
        // SAFETY: NUL-terminated strings that outlive the call; the shim catches every exception.
        let handle = unsafe {
            csp_tch_process_group_new(
                backend,
                host.as_ptr(),
                r.port as c_int,
                r.rank as c_int,
                r.world_size as c_int,
                r.host_store as c_int,
                prefix.as_ptr(),
                r.timeout.as_millis() as i64,
                device,
                gloo_host.as_ptr(),
                gloo_interface.as_ptr(),
            )
        };
        match NonNull::new(handle) {
            Some(handle) => Ok(ProcessGroup { handle }),
            None => bail!("{}", last_error()),
        }
    }

    fn status(status: c_int) -> Result<()> {
        match status {
            0 => Ok(()),
            _ => bail!("{}", last_error()),
        }
    }

    /// Overwrites `tensor` on every rank with rank `root`'s.
    pub fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<()> {
        // SAFETY: a live group and tensor; the shim catches every exception.
        Self::status(unsafe { csp_tch_process_group_broadcast(self.handle.as_ptr(), tensor.as_ptr(), root as c_int) })
    }

    /// Replaces `tensor` on every rank by its sum over the ranks.
    pub fn all_reduce_sum(&self, tensor: &Tensor) -> Result<()> {
        // SAFETY: as in `broadcast`.
        Self::status(unsafe { csp_tch_process_group_allreduce(self.handle.as_ptr(), tensor.as_ptr(), 0) })
    }

    /// As [`ProcessGroup::all_reduce_sum`], for a collective of a training step: on NCCL the
    /// current stream waits for the sum, not the host.
    pub fn all_reduce_sum_in_step(&self, tensor: &Tensor) -> Result<()> {
        // SAFETY: as in `broadcast`.
        Self::status(unsafe { csp_tch_process_group_allreduce(self.handle.as_ptr(), tensor.as_ptr(), 1) })
    }

    /// Aborts the collectives in flight (NCCL's kernels then end), once a step was not done within
    /// the timeout, so that the process can exit.
    pub fn abort(&self) {
        // SAFETY: a live group; the shim catches every exception.
        unsafe { csp_tch_process_group_abort(self.handle.as_ptr()) }
    }

    /// After a failed collective: the ranks of `world_size` whose heartbeat (counted up twice a
    /// second by each rank) did not move within `wait`, or an error when the store is unreachable.
    pub fn silent_ranks(&self, world_size: usize, wait: Duration) -> Result<Vec<usize>> {
        let mut silent = vec![0 as c_int; world_size];
        // SAFETY: a live group and room for `world_size` ranks.
        let count = unsafe {
            csp_tch_process_group_silent_ranks(
                self.handle.as_ptr(),
                world_size as c_int,
                wait.as_millis() as i64,
                silent.as_mut_ptr(),
            )
        };
        if count < 0 {
            bail!("{}", last_error());
        }
        Ok(silent[..count as usize].iter().map(|&r| r as usize).collect())
    }

    /// A training-mode BatchNorm of NCHW `input` with statistics over every rank's images (this
    /// `rank` of `world_size`), as `torch.nn.SyncBatchNorm`; updates the running statistics in place.
    #[allow(clippy::too_many_arguments)]
    pub fn sync_batch_norm(
        &self,
        input: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        running_mean: &Tensor,
        running_var: &Tensor,
        momentum: f64,
        eps: f64,
        rank: usize,
        world_size: usize,
    ) -> Result<Tensor> {
        // SAFETY: live tensors and group; the shim catches every exception and returns a new tensor.
        let out = unsafe {
            csp_tch_sync_batch_norm(
                self.handle.as_ptr(),
                input.as_ptr(),
                weight.as_ptr(),
                bias.as_ptr(),
                running_mean.as_ptr(),
                running_var.as_ptr(),
                momentum,
                eps,
                rank as c_int,
                world_size as c_int,
            )
        };
        if out.is_null() {
            bail!("{}", last_error());
        }
        // SAFETY: a tensor the shim allocated for us to own.
        Ok(unsafe { Tensor::from_ptr(out) })
    }

    /// Sets `key` (under the group's prefix) in the store.
    pub fn store_set(&self, key: &str, value: &[u8]) -> Result<()> {
        let key = CString::new(key)?;
        // SAFETY: a live group, a NUL-terminated key and `value.len()` readable bytes.
        Self::status(unsafe { csp_tch_store_set(self.handle.as_ptr(), key.as_ptr(), value.as_ptr(), value.len()) })
    }

    /// The value of `key` in the store, waiting for a rank to set it (up to the timeout).
    pub fn store_get(&self, key: &str) -> Result<Vec<u8>> {
        let key = CString::new(key)?;
        let mut len = 0usize;
        // SAFETY: a live group, a NUL-terminated key and a valid out-pointer.
        let buffer = unsafe { csp_tch_store_get(self.handle.as_ptr(), key.as_ptr(), &mut len) };
        if buffer.is_null() {
            bail!("{}", last_error());
        }
        // SAFETY: the shim returned `len` bytes at `buffer`, freed here once copied.
        let value = unsafe { std::slice::from_raw_parts(buffer, len) }.to_vec();
        unsafe { csp_tch_store_free(buffer) };
        Ok(value)
    }
}

// SAFETY: c10d's process groups and stores are used from several threads by design (their work runs
// on threads of their own, TCPStore serialises its requests); csp-tch calls them from the training
// thread and, for --sync-bn's backward pass, from libtorch's autograd threads, never concurrently.
unsafe impl Send for ProcessGroup {}
unsafe impl Sync for ProcessGroup {}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: the handle came from csp_tch_process_group_new and is freed once.
        unsafe { csp_tch_process_group_free(self.handle.as_ptr()) }
    }
}

/// Gradient hooks that sum a model's gradients over a group while the backward pass runs, as
/// DistributedDataParallel's reducer does: each parameter's gradient, times a scale, is copied into
/// its slice of a bucket (a flat buffer) when the backward pass produces it, and a bucket whose
/// gradients are all in is summed over the ranks at once, buckets strictly in their order. The
/// hooks stay on the parameters until this is dropped, and act only after [`OverlappedAllreduce::arm`].
pub struct OverlappedAllreduce {
    handle: NonNull<c_void>,
    /// Keeps the group alive while the hooks can use it.
    _group: Arc<ProcessGroup>,
    params: usize,
}

impl OverlappedAllreduce {
    /// Hooks on `params`: parameter p's gradient times `scale` goes to elements `offsets[p]..` of
    /// `flats[buckets_of[p]]`.
    pub fn new(
        group: Arc<ProcessGroup>,
        params: &[Tensor],
        buckets_of: &[usize],
        offsets: &[i64],
        flats: &[Tensor],
        scale: f64,
    ) -> Result<OverlappedAllreduce> {
        assert!(params.len() == buckets_of.len() && params.len() == offsets.len(), "one bucket place per parameter");
        let pointers = |ts: &[Tensor]| ts.iter().map(|t| t.as_ptr() as *mut _).collect::<Vec<_>>();
        let (param_ptrs, flat_ptrs) = (pointers(params), pointers(flats));
        let buckets_of: Vec<c_int> = buckets_of.iter().map(|&b| b as c_int).collect();
        // SAFETY: live tensors and group, arrays of the lengths passed; the shim catches every
        // exception and keeps its own references to the tensors.
        let handle = unsafe {
            csp_tch_overlapped_allreduce_new(
                group.handle.as_ptr(),
                param_ptrs.as_ptr(),
                buckets_of.as_ptr(),
                offsets.as_ptr(),
                params.len() as c_int,
                flat_ptrs.as_ptr(),
                flats.len() as c_int,
                scale,
            )
        };
        match NonNull::new(handle) {
            Some(handle) => Ok(OverlappedAllreduce { handle, _group: group, params: params.len() }),
            None => bail!("{}", last_error()),
        }
    }

    /// Makes the hooks act in the next backward pass.
    pub fn arm(&self) {
        // SAFETY: a live reducer.
        unsafe { csp_tch_overlapped_allreduce_arm(self.handle.as_ptr()) }
    }

    /// After the backward pass: launches the buckets left (a parameter that got no gradient counts as
    /// zeros) and waits for every sum. Returns how many buckets were launched during the pass (before
    /// its last gradient came, so while it still computed).
    pub fn finish(&self) -> Result<usize> {
        let mut during: c_int = 0;
        // SAFETY: a live reducer and a valid out-pointer; the shim catches every exception.
        ProcessGroup::status(unsafe { csp_tch_overlapped_allreduce_finish(self.handle.as_ptr(), &mut during) })?;
        Ok(during as usize)
    }

    /// The parameters (by index) in the order their gradients came in the last backward pass.
    pub fn ready_order(&self) -> Vec<usize> {
        let mut order = vec![0 as c_int; self.params];
        // SAFETY: a live reducer and room for every parameter.
        let count = unsafe { csp_tch_overlapped_allreduce_ready_order(self.handle.as_ptr(), order.as_mut_ptr()) };
        order[..count as usize].iter().map(|&p| p as usize).collect()
    }
}

impl Drop for OverlappedAllreduce {
    fn drop(&mut self) {
        // SAFETY: made by csp_tch_overlapped_allreduce_new, freed once (the hooks removed).
        unsafe { csp_tch_overlapped_allreduce_free(self.handle.as_ptr()) }
    }
}
