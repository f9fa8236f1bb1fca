//! What a train step minimises and how far its gradients may go: the cross-entropy loss, with
//! `--label-smoothing` as `torch.nn.CrossEntropyLoss(label_smoothing=E)` computes it, and
//! `--clip-grad` as `torch.nn.utils.clip_grad_norm_`. Both are device ops only, so a recorded CUDA
//! graph replays them.

use tch::{Kind, Reduction, Tensor};

/// The mean cross-entropy of `logits` against `labels`, the targets smoothed by `smoothing`
/// (`(1 - E)` on the label, `E / classes` spread over every class). With 0 it is the plain loss,
/// computed exactly as before smoothing existed.
pub fn train_loss(logits: &Tensor, labels: &Tensor, smoothing: f64) -> Tensor {
    if smoothing == 0.0 {
        return logits.cross_entropy_for_logits(labels);
    }
    logits.cross_entropy_loss::<Tensor>(labels, None, Reduction::Mean, -100, smoothing)
}

/// Scales `grads` in place so that their global L2 norm is at most `max_norm`, as
/// `clip_grad_norm_(parameters, max_norm)` does: each gradient's norm, the norm of those, then
/// every gradient times `min(1, max_norm / (total + 1e-6))`. Returns the norm before clipping.
pub fn clip_grad_norm(grads: &[Tensor], max_norm: f64) -> Tensor {
    let norms: Vec<Tensor> = grads.iter().map(|g| g.norm().to_kind(Kind::Float)).collect();
    let total = Tensor::stack(&norms, 0).norm();
    let coef = (max_norm / (&total + 1e-6)).clamp_max(1.0);
    for g in grads {
        let _ = g.shallow_clone().g_mul_(&coef.to_kind(g.kind()));
    }
    total
}
