//! oneDNN's inner product with a fused ReLU, which tch 0.26 does not bind (from `src/native/onednn.cpp`).
//! On this CPU it runs a `[64, 1024] x [1024, 2048]` product about twice as fast as MKL's sgemm
//! (what `Tensor::linear` calls) and as oneDNN's convolution kernels on maps of a pixel or two,
//! which is why [`crate::models`] evaluates its smallest maps with it.

use crate::native;
use std::sync::OnceLock;
use tch::{Device, Kind, Tensor};

/// Whether [`linear_relu`] can run on `xs`: float tensors on the CPU of a libtorch built with oneDNN.
pub fn linear_relu_applies(xs: &Tensor) -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    xs.device() == Device::Cpu
        && xs.kind() == Kind::Float
        && *AVAILABLE.get_or_init(|| unsafe { native::csp_tch_onednn_linear_available() } != 0)
}

/// `relu(xs @ weight^T + bias)` for `xs` `[n, k]`, `weight` `[m, k]`, `bias` `[m]`, all float on the CPU.
/// Panics with libtorch's message when the shapes do not fit, as tch's own operations do.
pub fn linear_relu(xs: &Tensor, weight: &Tensor, bias: &Tensor) -> Tensor {
    let out = unsafe { native::csp_tch_onednn_linear_relu(xs.as_ptr(), weight.as_ptr(), bias.as_ptr()) };
    if out.is_null() {
        panic!("oneDNN inner product: {}", native::last_error());
    }
    unsafe { Tensor::from_ptr(out) }
}
