// libtorch's fused Adam, `aten::_fused_adam_` (what `torch.optim.Adam(fused=True)` calls: a few
// multi-tensor kernels on CUDA, one vectorised pass per parameter on the CPU), which tch 0.26 does
// not bind. Called from src/train/optim.rs.
#include <ATen/ops/_fused_adam.h>

#include <vector>

#include "shim.h"

extern "C" {
// One Adam step (no weight decay, no amsgrad) of n parameters with their gradients and moments, all
// on one device with matching layouts. `step` is a float32 scalar on that device, shared by all
// parameters: the step count, already incremented for this step. `lr` is a scalar tensor the kernel
// reads when it runs (float32 on CUDA, where a recorded step then follows a changed learning rate;
// float64 on the CPU, read there as the double it holds). Returns 0, or -1 with the message in
// csp_tch_last_error().
int csp_tch_fused_adam(const at::Tensor* const* params, const at::Tensor* const* grads,
                       const at::Tensor* const* exp_avgs, const at::Tensor* const* exp_avg_sqs,
                       const at::Tensor* step, int n, const at::Tensor* lr, double beta1, double beta2, double eps) {
  return csp_tch::guarded(-1, [&] {
    auto deref = [n](const at::Tensor* const* tensors) {
      std::vector<at::Tensor> out;
      out.reserve(n);
      for (int i = 0; i < n; ++i) out.push_back(*tensors[i]);
      return out;
    };
    at::_fused_adam_(deref(params), deref(grads), deref(exp_avgs), deref(exp_avg_sqs), {},
                     std::vector<at::Tensor>(n, *step), *lr, beta1, beta2, /*weight_decay=*/0.0, eps,
                     /*amsgrad=*/false, /*maximize=*/false);
    return 0;
  });
}
}
