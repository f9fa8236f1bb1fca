//! Adam over tch tensors, with the same update as PyTorch's `torch.optim.Adam` (and libtorch's,
//! which tch's `nn::Adam` wraps), written out so that its moments can be checkpointed.
//!
//! The update runs as libtorch's fused Adam (`_fused_adam_`, through `src/native/fused_adam.cpp`; what
//! `torch.optim.Adam(fused=True)` runs): on CUDA a few multi-tensor kernels per step instead of about
//! eleven tensor operations per parameter, on the CPU one vectorised pass per parameter over
//! parameter, gradient and both moments. The step count and the learning rate live on the
//! parameters' device, so a CUDA graph can capture the whole update ([`crate::train::cuda_graph`]) and a
//! replayed step still follows a learning rate changed between replays ([`Adam::set_lr`]).

use crate::config::AdamConfig;
use crate::native;
use std::os::raw::c_int;
use tch::{Kind, Tensor};
use torch_sys::C_tensor;

/// How [`Adam::step`] computes the update; both give PyTorch's update to fp32 rounding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdamKernel {
    /// libtorch's `_fused_adam_` (the default).
    Fused,
    /// A sequence of tensor operations in libtorch's order: the reference the tests compare with.
    TensorOps,
}

/// Adam without weight decay or amsgrad (the tutorial's optimizer), over named parameters so that
/// its state can be saved and restored by name.
pub struct Adam {
    /// Private: its learning rate has a device copy ([`Adam::set_lr`] changes both).
    config: AdamConfig,
    pub kernel: AdamKernel,
    names: Vec<String>,
    params: Vec<Tensor>,
    /// First and second moments, one pair per parameter.
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    /// Steps taken: a float32 scalar on the parameters' device, incremented there by every step.
    step: Tensor,
    /// `config.lr` as the fused kernel reads it: a float32 scalar on CUDA (what its kernel takes), a
    /// float64 one on the CPU (which reads it as a double, so the update is the same as with a number).
    lr: Tensor,
}

impl Adam {
    pub fn new(named_params: Vec<(String, Tensor)>, config: AdamConfig) -> Adam {
        let (names, params): (Vec<String>, Vec<Tensor>) = named_params.into_iter().unzip();
        let device = params.first().map_or(tch::Device::Cpu, Tensor::device);
        let zeros = |ps: &[Tensor]| ps.iter().map(Tensor::zeros_like).collect::<Vec<_>>();
        Adam {
            config,
            kernel: AdamKernel::Fused,
            names,
            exp_avg: zeros(&params),
            exp_avg_sq: zeros(&params),
            params,
            step: Tensor::zeros([], (Kind::Float, device)),
            lr: Tensor::full([], config.lr, (if device.is_cuda() { Kind::Float } else { Kind::Double }, device)),
        }
    }

    pub fn config(&self) -> AdamConfig {
        self.config
    }

    /// Changes the learning rate from the next step on: written into the device tensor the fused
    /// kernel reads, so that replays of a recorded step use it too.
    pub fn set_lr(&mut self, lr: f64) {
        self.config.lr = lr;
        let _ = self.lr.fill_(lr);
    }

    /// The trainable variables of `vs`, sorted by name.
    pub fn for_var_store(vs: &tch::nn::VarStore, config: AdamConfig) -> Adam {
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Adam::new(named, config)
    }

    /// Gradients of `loss` for every parameter, as fresh tensors: nothing accumulates in `.grad()`,
    /// so no zeroing pass is needed (PyTorch's `zero_grad(set_to_none=True)`).
    pub fn gradients(&self, loss: &Tensor) -> Vec<Tensor> {
        Tensor::run_backward(&[loss], &self.params, false, false)
    }

    /// Number of steps taken so far (reads the count from the device).
    pub fn steps(&self) -> i64 {
        self.step.double_value(&[]) as i64
    }

    /// One update from `grads` (one per parameter, as [`Adam::gradients`] returns them); a
    /// parameter whose gradient is undefined (unused in the loss) is left alone, as in PyTorch.
    /// Nothing is read back from the device, so the step can be captured in a CUDA graph.
    pub fn step(&mut self, grads: &[Tensor]) {
        assert_eq!(grads.len(), self.params.len(), "one gradient per parameter");
        let _guard = tch::no_grad_guard();
        let _ = self.step.g_add_scalar_(1.0);
        match self.kernel {
            AdamKernel::Fused => self.fused_step(grads),
            AdamKernel::TensorOps => self.tensor_step(grads),
        }
    }

    /// The update through libtorch's `_fused_adam_`, which wants each gradient laid out like its
    /// parameter; a gradient in another layout (that of a channels-last kernel cut to its live
    /// taps) is copied into the parameter's layout first.
    fn fused_step(&mut self, grads: &[Tensor]) {
        let mut lists: [Vec<*mut C_tensor>; 4] = Default::default();
        let mut relaid = Vec::new();
        for (i, grad) in grads.iter().enumerate().filter(|(_, g)| g.defined()) {
            let p = &self.params[i];
            let grad = if grad.stride() == p.stride() {
                grad
            } else {
                let mut copy = p.empty_like();
                copy.copy_(grad);
                relaid.push(copy);
                relaid.last().expect("just pushed")
            };
            for (list, t) in lists.iter_mut().zip([p, grad, &self.exp_avg[i], &self.exp_avg_sq[i]]) {
                list.push(t.as_ptr() as *mut C_tensor);
            }
        }
        let AdamConfig { beta1, beta2, eps, .. } = self.config;
        let [params, grads, exp_avgs, exp_avg_sqs] = &lists;
        // SAFETY: every pointer is a live tensor of `self` or `grads`/`relaid`, which outlive the call.
        let status = unsafe {
            native::csp_tch_fused_adam(
                params.as_ptr(),
                grads.as_ptr(),
                exp_avgs.as_ptr(),
                exp_avg_sqs.as_ptr(),
                self.step.as_ptr() as *mut C_tensor,
                params.len() as c_int,
                self.lr.as_ptr() as *mut C_tensor,
                beta1,
                beta2,
                eps,
            )
        };
        // Only a broken invariant (a parameter on another device or dtype) gets here.
        assert_eq!(status, 0, "fused Adam: {}", native::last_error());
    }

    /// The update as tensor operations (any device), in libtorch's order.
    fn tensor_step(&mut self, grads: &[Tensor]) {
        let AdamConfig { lr, beta1, beta2, eps } = self.config;
        // The reference path reads the step count back; the fused kernels read it on the device.
        let step = self.steps() as i32;
        let step_size = lr / (1.0 - beta1.powi(step));
        let bias_correction2_sqrt = (1.0 - beta2.powi(step)).sqrt();
        let moments = self.exp_avg.iter_mut().zip(&mut self.exp_avg_sq);
        for ((p, grad), (m, v)) in self.params.iter_mut().zip(grads).zip(moments).filter(|((_, g), _)| g.defined()) {
            // exp_avg = beta1 * exp_avg + (1 - beta1) * grad
            let _ = m.g_mul_scalar_(beta1).g_add_(&(grad * (1.0 - beta1)));
            // exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad^2
            let _ = v.g_mul_scalar_(beta2).addcmul_(grad, &(grad * (1.0 - beta2)));
            // param -= step_size * exp_avg / (sqrt(exp_avg_sq) / sqrt(bias_correction2) + eps)
            let denom = (v.sqrt() / bias_correction2_sqrt).g_add_scalar_(eps);
            let _ = p.addcdiv_(&(&*m * -step_size), &denom);
        }
    }

    /// Parameter names with their first and second moments, for checkpoints.
    pub fn state(&self) -> (&[String], &[Tensor], &[Tensor]) {
        (&self.names, &self.exp_avg, &self.exp_avg_sq)
    }

    /// Restores the moments (in the order of [`Adam::state`]'s names) and the step count, copied
    /// into the optimizer's own tensors: their layout stays the parameters' (channels-last stays
    /// channels-last), and a recorded CUDA graph keeps updating the same memory.
    pub fn set_state(&mut self, moments: &[(Tensor, Tensor)], steps: i64) {
        assert_eq!(moments.len(), self.params.len(), "one pair of moments per parameter");
        let _guard = tch::no_grad_guard();
        for ((m, v), (saved_m, saved_v)) in self.exp_avg.iter_mut().zip(&mut self.exp_avg_sq).zip(moments) {
            m.copy_(saved_m);
            v.copy_(saved_v);
        }
        let _ = self.step.fill_(steps as f64);
    }
}

/// Dynamic loss scaling for fp16 training, as PyTorch's `GradScaler`: the loss is multiplied by
/// the scale before backward; gradients are divided by it before the step; a step with any
/// non-finite gradient is skipped and the scale halved; after 2000 clean steps it doubles.
/// Checkpoints keep its state, so a resumed fp16 run continues with the scale it had reached.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScaler {
    scale: f64,
    clean_steps: u32,
}

impl LossScaler {
    const INITIAL: f64 = 65536.0;
    const GROWTH_INTERVAL: u32 = 2000;

    pub fn new() -> LossScaler {
        LossScaler { scale: Self::INITIAL, clean_steps: 0 }
    }

    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Divides `grads` by the scale in place; returns whether all are finite (the step may be
    /// taken), and updates the scale. Reads one value from the device, as GradScaler does.
    pub fn unscale(&mut self, grads: &[Tensor]) -> bool {
        let _guard = tch::no_grad_guard();
        let mut non_finite: Option<Tensor> = None;
        for grad in grads.iter().filter(|g| g.defined()) {
            let _ = grad.shallow_clone().g_mul_scalar_(1.0 / self.scale);
            let bad = grad.isfinite().logical_not().any();
            non_finite = Some(match non_finite {
                Some(acc) => acc.logical_or(&bad),
                None => bad,
            });
        }
        let finite = non_finite.is_none_or(|t| t.to_kind(Kind::Int64).int64_value(&[]) == 0);
        if finite {
            self.clean_steps += 1;
            if self.clean_steps == Self::GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.clean_steps = 0;
            }
        } else {
            self.scale /= 2.0;
            self.clean_steps = 0;
        }
        finite
    }
}

impl Default for LossScaler {
    fn default() -> Self {
        LossScaler::new()
    }
}
