//! `--sync-bn`: a ConvBNLayer's training-mode BatchNorm with statistics over the images of every
//! rank of a data-parallel run, as `torch.nn.SyncBatchNorm` (the shim's autograd function, its
//! allreduce in the forward and the backward pass). Set on a built backbone and kept beside each
//! BatchNorm, like the folded eval path; evaluation and single-process runs never see it.

use std::cell::RefCell;
use std::sync::{Arc, Mutex};
use tch::nn;
use tch::Tensor;

use crate::native::ProcessGroup;

/// A data-parallel group's BatchNorm statistics, shared by every layer of a model.
pub struct SyncBatchNorm {
    group: Arc<ProcessGroup>,
    rank: usize,
    world_size: usize,
    /// The first failure (a rank gone in a forward pass), for the trainer to report after the step.
    error: Mutex<Option<String>>,
}

impl std::fmt::Debug for SyncBatchNorm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SyncBatchNorm(rank {} of {})", self.rank, self.world_size)
    }
}

impl SyncBatchNorm {
    pub fn new(group: Arc<ProcessGroup>, rank: usize, world_size: usize) -> SyncBatchNorm {
        SyncBatchNorm { group, rank, world_size, error: Mutex::new(None) }
    }

    /// The failure of a forward pass since the last call, if any.
    pub fn take_error(&self) -> Option<String> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Where a layer keeps its synchronised BatchNorm once set.
#[derive(Debug, Default)]
pub struct SyncSlot(RefCell<Option<Arc<SyncBatchNorm>>>);

impl SyncSlot {
    pub fn set(&self, sync: Option<Arc<SyncBatchNorm>>) {
        *self.0.borrow_mut() = sync;
    }

    /// The training-mode output of `bn` on `xs` with every rank's statistics, when set. After a
    /// failure the local statistics stand in, so that the step completes and the trainer reports it.
    pub fn forward(&self, xs: &Tensor, bn: &nn::BatchNorm, momentum: f64, eps: f64) -> Option<Tensor> {
        let slot = self.0.borrow();
        let sync = slot.as_ref()?;
        let (weight, bias) = (bn.ws.as_ref()?, bn.bs.as_ref()?);
        let (mean, var) = (&bn.running_mean, &bn.running_var);
        let (rank, world) = (sync.rank, sync.world_size);
        match sync.group.sync_batch_norm(xs, weight, bias, mean, var, momentum, eps, rank, world) {
            Ok(out) => Some(out),
            Err(err) => {
                sync.error.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(format!("{err:#}"));
                None
            }
        }
    }
}
