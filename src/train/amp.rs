//! `--amp`: mixed precision on CUDA. bf16 autocast where the GPU computes it natively (compute
//! capability 8.0+), otherwise fp16 autocast with dynamic loss scaling ([`crate::train::optim::LossScaler`]).
//! Weights, gradients and Adam's moments stay fp32 either way: autocast casts per operation.
//!
//! tch 0.26 binds CUDA autocast in fp16 only, so the switches come from `src/native/amp.cpp`.

use crate::config::Precision;
use crate::native;
use std::os::raw::c_int;
use tch::Device;

/// `c10::DeviceType` values.
const CPU: c_int = 0;
const CUDA: c_int = 1;

/// `c10::ScalarType` of `precision`'s autocast dtype; `None` for fp32 (no autocast).
fn scalar_type(precision: Precision) -> Option<c_int> {
    match precision {
        Precision::Fp32 => None,
        Precision::Fp16 => Some(5),
        Precision::Bf16 => Some(15),
    }
}

/// Runs `f` under autocast to `precision` for `device`'s operations (`f` alone for fp32), and
/// restores the previous autocast state afterwards, also when `f` panics.
pub fn autocast<T>(device: Device, precision: Precision, f: impl FnOnce() -> T) -> T {
    let Some(dtype) = scalar_type(precision) else { return f() };
    let device_type = if device.is_cuda() { CUDA } else { CPU };
    let _region = unsafe {
        let region = Region {
            device_type,
            was_enabled: native::csp_tch_autocast_enabled(device_type),
            was_dtype: native::csp_tch_autocast_dtype(device_type),
        };
        native::csp_tch_set_autocast_enabled(device_type, 1);
        native::csp_tch_set_autocast_dtype(device_type, dtype);
        native::csp_tch_autocast_increment_nesting();
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
            native::csp_tch_autocast_decrement_nesting();
            native::csp_tch_set_autocast_dtype(self.device_type, self.was_dtype);
            native::csp_tch_set_autocast_enabled(self.device_type, self.was_enabled);
        }
    }
}
