//! `--amp`: mixed precision on CUDA. bf16 autocast where the GPU computes it natively (compute
//! capability 8.0+), otherwise fp16 autocast with dynamic loss scaling ([`crate::optim::LossScaler`]).
//! Weights, gradients and Adam's moments stay fp32 either way: autocast casts per operation.
//!
//! tch 0.26 binds CUDA autocast in fp16 only, so the switches come from `src/amp.cpp`.

use serde::{Deserialize, Serialize};
use std::os::raw::c_int;
use tch::Device;

extern "C" {
    fn csp_tch_autocast_enabled(device_type: c_int) -> c_int;
    fn csp_tch_set_autocast_enabled(device_type: c_int, enabled: c_int);
    fn csp_tch_autocast_dtype(device_type: c_int) -> c_int;
    fn csp_tch_set_autocast_dtype(device_type: c_int, dtype: c_int);
    fn csp_tch_autocast_increment_nesting() -> c_int;
    fn csp_tch_autocast_decrement_nesting();
    fn csp_tch_cuda_supports_bf16() -> c_int;
}

/// `c10::DeviceType` values.
const CPU: c_int = 0;
const CUDA: c_int = 1;

/// The precision forward passes run in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    /// bf16 autocast: fp32's exponent range, so no loss scaling.
    Bf16,
    /// fp16 autocast with dynamic loss scaling.
    Fp16,
}

impl Precision {
    /// What a run on `device` computes in: fp32 unless `amp` on CUDA (CPU runs are unaffected).
    pub fn for_run(amp: bool, device: Device) -> Precision {
        if !(amp && device.is_cuda()) {
            Precision::Fp32
        } else if unsafe { csp_tch_cuda_supports_bf16() } != 0 {
            Precision::Bf16
        } else {
            Precision::Fp16
        }
    }

    /// Whether gradients need loss scaling to survive this precision.
    pub fn needs_loss_scaling(self) -> bool {
        self == Precision::Fp16
    }

    /// `c10::ScalarType` of the autocast dtype; `None` for fp32 (no autocast).
    fn scalar_type(self) -> Option<c_int> {
        match self {
            Precision::Fp32 => None,
            Precision::Fp16 => Some(5),
            Precision::Bf16 => Some(15),
        }
    }
}

/// Runs `f` under autocast to `precision` for `device`'s operations (`f` alone for fp32), and
/// restores the previous autocast state afterwards, also when `f` panics.
pub fn autocast<T>(device: Device, precision: Precision, f: impl FnOnce() -> T) -> T {
    let Some(dtype) = precision.scalar_type() else { return f() };
    let device_type = if device.is_cuda() { CUDA } else { CPU };
    let _region = unsafe {
        let region = Region {
            device_type,
            was_enabled: csp_tch_autocast_enabled(device_type),
            was_dtype: csp_tch_autocast_dtype(device_type),
        };
        csp_tch_set_autocast_enabled(device_type, 1);
        csp_tch_set_autocast_dtype(device_type, dtype);
        csp_tch_autocast_increment_nesting();
        region
    };
    f()
}

/// An autocast region: restores the state it found when dropped.
struct Region {
    device_type: c_int,
    was_enabled: c_int,
    was_dtype: c_int,
}

impl Drop for Region {
    fn drop(&mut self) {
        unsafe {
            csp_tch_autocast_decrement_nesting();
            csp_tch_set_autocast_dtype(self.device_type, self.was_dtype);
            csp_tch_set_autocast_enabled(self.device_type, self.was_enabled);
        }
    }
}
