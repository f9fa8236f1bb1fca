// libtorch's fused optimizers, `aten::_fused_adam_`, `_fused_adamw_` and `_fused_sgd_` (what
// `torch.optim.Adam/AdamW/SGD(fused=True)` call: a few multi-tensor kernels on CUDA, one vectorised
// pass per parameter on the CPU), which tch 0.26 does not bind. Called from src/train/optim.rs.
#include <ATen/ops/_fused_adam.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/ops/_fused_sgd.h>

#include <stdexcept>
#include <vector>

#include "shim.h"

extern "C" {
// One step of n parameters with their gradients and state, all on one device with matching
// layouts. kind: 0 Adam (weight decay added to the gradient), 1 AdamW (decoupled decay), 2 SGD.
// Adam and AdamW: state_a and state_b are the first and second moments; `step` is a float32 scalar
// on that device shared by all parameters, already incremented for this step. SGD: state_a holds
// the momentum buffers (null when momentum is 0); they start as zeros, so that the first step's
// `momentum * 0 + grad` is PyTorch's `buf = grad` and every step, a recorded one too, runs the
// same kernel. `lr` is a scalar tensor the kernel reads when it runs (float32 on CUDA, where a
// recorded step then follows a changed learning rate; float64 on the CPU, read there as the double
// it holds). Returns 0, or -1 with the message in csp_tch_last_error().
int csp_tch_fused_optimizer_step(int kind, const at::Tensor* const* params, const at::Tensor* const* grads,
                                 const at::Tensor* const* state_a, const at::Tensor* const* state_b,
                                 const at::Tensor* step, int n, const at::Tensor* lr, double beta1, double beta2,
                                 double eps, double weight_decay, double momentum, int nesterov) {
  return csp_tch::guarded(-1, [&] {
    auto deref = [n](const at::Tensor* const* tensors) {
      std::vector<at::Tensor> out;
      if (tensors == nullptr) return out;
      out.reserve(n);
      for (int i = 0; i < n; ++i) out.push_back(*tensors[i]);
      return out;
    };
    switch (kind) {
      case 0:
      case 1: {
        auto steps = std::vector<at::Tensor>(n, *step);
        if (kind == 0) {
          at::_fused_adam_(deref(params), deref(grads), deref(state_a), deref(state_b), {}, steps, *lr, beta1,
                           beta2, weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
        } else {
          at::_fused_adamw_(deref(params), deref(grads), deref(state_a), deref(state_b), {}, steps, *lr, beta1,
                            beta2, weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
        }
        return 0;
      }
      case 2:
        at::_fused_sgd_(deref(params), deref(grads), deref(state_a), weight_decay, momentum, *lr,
                        /*dampening=*/0.0, nesterov != 0, /*maximize=*/false, /*is_first_step=*/false);
        return 0;
      default:
        throw std::invalid_argument("unknown optimizer kind");
    }
  });
}
}
