// oneDNN's inner product with a fused ReLU (`mkldnn::_linear_pointwise`, the kernel torch.compile
// uses for linear layers on CPU), which tch 0.26 does not bind. Called from src/models/onednn.rs.
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>

#include "shim.h"

namespace {
// Looked up once: every evaluation batch calls the operator for each of its small-map layers.
const std::optional<c10::OperatorHandle>& linear_pointwise() {
  static const auto op = c10::Dispatcher::singleton().findSchema({"mkldnn::_linear_pointwise", ""});
  return op;
}
}  // namespace

extern "C" {
// Whether this libtorch was built with oneDNN and registers the operator.
int csp_tch_onednn_linear_available() { return linear_pointwise().has_value(); }

// relu(x @ weight^T + bias) for float CPU tensors x [n, k], weight [m, k], bias [m]: a new tensor,
// or null with the message in csp_tch_last_error().
at::Tensor* csp_tch_onednn_linear_relu(const at::Tensor* x, const at::Tensor* weight, const at::Tensor* bias) {
  return csp_tch::guarded<at::Tensor*>(nullptr, [&] {
    const auto& op = linear_pointwise();
    TORCH_CHECK(op.has_value(), "mkldnn::_linear_pointwise is not registered in this libtorch");
    std::vector<c10::IValue> stack{*x, *weight, *bias, std::string("relu"), c10::List<std::optional<at::Scalar>>(),
                                   c10::IValue()};
    op->callBoxed(&stack);
    return new at::Tensor(stack.at(0).toTensor());
  });
}
}
