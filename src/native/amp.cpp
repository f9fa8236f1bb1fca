// libtorch's per-device autocast switches and bf16 capability, which tch 0.26 does not expose
// (its `autocast` drives CUDA autocast in float16 only). Called from src/train/amp.rs. None of
// these calls throws in practice; each is guarded all the same, so that none could cross into Rust.
#include <ATen/detail/CUDAHooksInterface.h>
#include <c10/core/DeviceType.h>
#include <c10/core/ScalarType.h>

#include "shim.h"

// Declared in ATen/autocast_mode.h, which pulls in the whole of ATen to compile.
namespace at::autocast {
TORCH_API bool is_autocast_enabled(at::DeviceType device_type);
TORCH_API void set_autocast_enabled(at::DeviceType device_type, bool enabled);
TORCH_API at::ScalarType get_autocast_dtype(at::DeviceType device_type);
TORCH_API void set_autocast_dtype(at::DeviceType device_type, at::ScalarType dtype);
TORCH_API void clear_cache();
TORCH_API int increment_nesting();
TORCH_API int decrement_nesting();
}  // namespace at::autocast

extern "C" {
// device_type: c10::DeviceType (0 CPU, 1 CUDA); dtype: c10::ScalarType, as tch's Kind::c_int.
int csp_tch_autocast_enabled(int device_type) {
  return csp_tch::guarded(0, [&] { return int(at::autocast::is_autocast_enabled(static_cast<at::DeviceType>(device_type))); });
}

void csp_tch_set_autocast_enabled(int device_type, int enabled) {
  csp_tch::guarded(0, [&] {
    at::autocast::set_autocast_enabled(static_cast<at::DeviceType>(device_type), enabled != 0);
    return 0;
  });
}

int csp_tch_autocast_dtype(int device_type) {
  return csp_tch::guarded(-1, [&] {
    return static_cast<int>(at::autocast::get_autocast_dtype(static_cast<at::DeviceType>(device_type)));
  });
}

void csp_tch_set_autocast_dtype(int device_type, int dtype) {
  csp_tch::guarded(0, [&] {
    at::autocast::set_autocast_dtype(static_cast<at::DeviceType>(device_type), static_cast<at::ScalarType>(dtype));
    return 0;
  });
}

int csp_tch_autocast_increment_nesting() {
  return csp_tch::guarded(-1, [] { return at::autocast::increment_nesting(); });
}

// Clears the cache of casted weights when the outermost autocast region ends, as torch.autocast does.
void csp_tch_autocast_decrement_nesting() {
  csp_tch::guarded(0, [] {
    if (at::autocast::decrement_nesting() == 0) at::autocast::clear_cache();
    return 0;
  });
}

// Whether the current CUDA device computes bfloat16 convolutions natively (compute capability 8.0+).
int csp_tch_cuda_supports_bf16() {
  return csp_tch::guarded(0, [] { return int(at::detail::getCUDAHooks().supportsBFloat16ConvolutionWithCuDNNv8()); });
}
}
