//! The optimizers of `--opt`, over tch tensors, with the updates of PyTorch's `torch.optim.Adam`,
//! `AdamW` and `SGD`, written out so that their state can be checkpointed.
//!
//! The update runs as libtorch's fused kernels (`_fused_adam_`, `_fused_adamw_`, `_fused_sgd_`,
//! through `src/native/fused_optim.cpp`; what `torch.optim.*(fused=True)` runs): on CUDA a few
//! multi-tensor kernels per step instead of about eleven tensor operations per parameter, on the CPU
//! one vectorised pass per parameter. The step count and the learning rate live on the parameters'
//! device, so a CUDA graph can capture the whole update ([`crate::train::cuda_graph`]) and a
//! replayed step still follows a learning rate changed between replays ([`Optimizer::set_lr`]).

use crate::config::{AdamConfig, OptimizerConfig, SgdConfig};
use crate::native;
use std::os::raw::c_int;
use tch::{Kind, Tensor};
use torch_sys::C_tensor;

/// How [`Optimizer::step`] computes the update; both give PyTorch's update to fp32 rounding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// libtorch's fused kernels (the default).
    Fused,
    /// A sequence of tensor operations in `torch.optim`'s order: the reference the tests compare with.
    TensorOps,
}

/// One of `--opt`'s optimizers (no amsgrad, no dampening) over named parameters, so that its state
/// can be saved and restored by name.
pub struct Optimizer {
    /// Private: its learning rate has a device copy ([`Optimizer::set_lr`] changes both).
    config: OptimizerConfig,
    pub kernel: Kernel,
    names: Vec<String>,
    params: Vec<Tensor>,
    /// Each parameter's weight decay (0 for those `--no-decay-bn-bias` exempts).
    decays: Vec<f64>,
    /// Per-parameter state, one list per [`Optimizer::state_names`] entry: Adam's first and second
    /// moments, SGD's momentum buffers (none without momentum).
    state: Vec<Vec<Tensor>>,
    /// Steps taken: a float32 scalar on the parameters' device, incremented there by every step.
    step: Tensor,
    /// The learning rate as the fused kernels read it: a float32 scalar on CUDA (what their kernels
    /// take), a float64 one on the CPU (which reads it as a double, so the update is the same as
    /// with a number).
    lr: Tensor,
}

impl Optimizer {
    pub fn new(named_params: Vec<(String, Tensor)>, config: OptimizerConfig) -> Optimizer {
        let (names, params): (Vec<String>, Vec<Tensor>) = named_params.into_iter().unzip();
        let device = params.first().map_or(tch::Device::Cpu, Tensor::device);
        let decay = config.weight_decay();
        let decays = names.iter().zip(&params).map(|(n, p)| decay.for_parameter(n, &p.size())).collect();
        let state =
            Self::state_names(&config).iter().map(|_| params.iter().map(Tensor::zeros_like).collect()).collect();
        Optimizer {
            config,
            kernel: Kernel::Fused,
            names,
            params,
            decays,
            state,
            step: Tensor::zeros([], (Kind::Float, device)),
            lr: Tensor::full([], config.lr(), (if device.is_cuda() { Kind::Float } else { Kind::Double }, device)),
        }
    }

    /// The trainable variables of `vs`, sorted by name.
    pub fn for_var_store(vs: &tch::nn::VarStore, config: OptimizerConfig) -> Optimizer {
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Optimizer::new(named, config)
    }

    /// The parameters it updates, in the order of [`Optimizer::gradients`].
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    pub fn config(&self) -> OptimizerConfig {
        self.config
    }

    /// Changes the learning rate from the next step on: written into the device tensor the fused
    /// kernels read, so that replays of a recorded step use it too.
    pub fn set_lr(&mut self, lr: f64) {
        self.config.set_lr(lr);
        let _ = self.lr.fill_(lr);
    }

    /// What each per-parameter state list holds, as checkpoints name it.
    fn state_names(config: &OptimizerConfig) -> &'static [&'static str] {
        match config {
            OptimizerConfig::Adam(_) | OptimizerConfig::Adamw(_) => &["exp_avg", "exp_avg_sq"],
            OptimizerConfig::Sgd(c) if c.momentum != 0.0 => &["momentum_buffer"],
            OptimizerConfig::Sgd(_) => &[],
        }
    }

    /// Gradients of `loss` for every parameter, as fresh tensors: nothing accumulates in `.grad()`,
    /// so no zeroing pass is needed (PyTorch's `zero_grad(set_to_none=True)`).
    /// Fails only where the backward pass talks to other processes (`--sync-bn`) and one is gone.
    pub fn gradients(&self, loss: &Tensor) -> Result<Vec<Tensor>, tch::TchError> {
        Tensor::f_run_backward(&[loss], &self.params, false, false)
    }

    /// Number of steps taken so far (reads the count from the device).
    pub fn steps(&self) -> i64 {
        self.step.double_value(&[]) as i64
    }

    /// One update from `grads` (one per parameter, as [`Optimizer::gradients`] returns them); a
    /// parameter whose gradient is undefined (unused in the loss) is left alone, as in PyTorch.
    /// Nothing is read back from the device, so the step can be captured in a CUDA graph.
    pub fn step(&mut self, grads: &[Tensor]) {
        assert_eq!(grads.len(), self.params.len(), "one gradient per parameter");
        let _guard = tch::no_grad_guard();
        let _ = self.step.g_add_scalar_(1.0);
        match self.kernel {
            Kernel::Fused => self.fused_step(grads),
            Kernel::TensorOps => self.tensor_step(grads),
        }
    }

    /// The update through libtorch's fused kernels, one call per distinct weight decay. They want
    /// each gradient laid out like its parameter; a gradient in another layout (that of a
    /// channels-last kernel cut to its live taps) is copied into the parameter's layout first.
    fn fused_step(&mut self, grads: &[Tensor]) {
        let mut decays = self.decays.clone();
        decays.sort_by(f64::total_cmp);
        decays.dedup();
        for decay in decays {
            self.fused_group(grads, decay);
        }
    }

    fn fused_group(&self, grads: &[Tensor], weight_decay: f64) {
        let mut params = Vec::new();
        let mut grad_list = Vec::new();
        let mut states: Vec<Vec<*mut C_tensor>> = vec![Vec::new(); self.state.len()];
        let mut relaid = Vec::new();
        let members = (0..self.params.len()).filter(|&i| grads[i].defined() && self.decays[i] == weight_decay);
        for i in members {
            let (p, grad) = (&self.params[i], &grads[i]);
            let grad = if grad.stride() == p.stride() {
                grad
            } else {
                let mut copy = p.empty_like();
                copy.copy_(grad);
                relaid.push(copy);
                relaid.last().expect("just pushed")
            };
            params.push(p.as_ptr() as *mut C_tensor);
            grad_list.push(grad.as_ptr() as *mut C_tensor);
            for (list, state) in states.iter_mut().zip(&self.state) {
                list.push(state[i].as_ptr() as *mut C_tensor);
            }
        }
        if params.is_empty() {
            return;
        }
        let list = |k: usize| states.get(k).map_or(std::ptr::null(), |l| l.as_ptr());
        let (kind, beta1, beta2, eps, momentum, nesterov) = match self.config {
            OptimizerConfig::Adam(c) => (0, c.beta1, c.beta2, c.eps, 0.0, false),
            OptimizerConfig::Adamw(c) => (1, c.beta1, c.beta2, c.eps, 0.0, false),
            OptimizerConfig::Sgd(c) => (2, 0.0, 0.0, 0.0, c.momentum, c.nesterov),
        };
        // SAFETY: every pointer is a live tensor of `self`, `grads` or `relaid`, which outlive the
        // call; each list holds `params.len()` of them.
        let status = unsafe {
            native::csp_tch_fused_optimizer_step(
                kind,
                params.as_ptr(),
                grad_list.as_ptr(),
                list(0),
                list(1),
                self.step.as_ptr() as *mut C_tensor,
                params.len() as c_int,
                self.lr.as_ptr() as *mut C_tensor,
                beta1,
                beta2,
                eps,
                weight_decay,
                momentum,
                nesterov as c_int,
            )
        };
        // Only a broken invariant (a parameter on another device or dtype) gets here.
        assert_eq!(status, 0, "fused {}: {}", self.config.kind().label(), native::last_error());
    }

    /// The update as tensor operations (any device), in `torch.optim`'s order (its for-loop
    /// implementations).
    fn tensor_step(&mut self, grads: &[Tensor]) {
        // The reference path reads the step count back; the fused kernels read it on the device.
        let step = self.steps() as i32;
        for i in (0..self.params.len()).filter(|&i| grads[i].defined()) {
            let (p, decay) = (&mut self.params[i], self.decays[i]);
            match self.config {
                OptimizerConfig::Adam(c) => {
                    let grad = if decay != 0.0 { &grads[i] + &*p * decay } else { grads[i].shallow_clone() };
                    adam_update(p, &grad, &mut self.state, i, &c, step);
                }
                OptimizerConfig::Adamw(c) => {
                    let _ = p.g_mul_scalar_(1.0 - c.lr * decay);
                    adam_update(p, &grads[i], &mut self.state, i, &c, step);
                }
                OptimizerConfig::Sgd(c) => sgd_update(p, &grads[i], &mut self.state, i, &c, decay),
            }
        }
    }

    /// Parameter names with each kind of state, named as [`Optimizer::state_names`] says, for
    /// checkpoints: `(state name, parameter name, tensor)`.
    pub fn state(&self) -> impl Iterator<Item = (&'static str, &str, &Tensor)> {
        Self::state_names(&self.config)
            .iter()
            .zip(&self.state)
            .flat_map(move |(kind, list)| self.names.iter().zip(list).map(move |(n, t)| (*kind, n.as_str(), t)))
    }

    /// The checkpoint prefix of this optimizer's state: `adam` for Adam and AdamW, `sgd`.
    pub fn state_prefix(&self) -> &'static str {
        match self.config {
            OptimizerConfig::Adam(_) | OptimizerConfig::Adamw(_) => "adam",
            OptimizerConfig::Sgd(_) => "sgd",
        }
    }

    /// Restores the state (in the order of [`Optimizer::state`]) and the step count, copied into
    /// the optimizer's own tensors: their layout stays the parameters' (channels-last stays
    /// channels-last), and a recorded CUDA graph keeps updating the same memory.
    pub fn set_state(&mut self, saved: &[Tensor], steps: i64) {
        let _guard = tch::no_grad_guard();
        let own: Vec<&mut Tensor> = self.state.iter_mut().flatten().collect();
        assert_eq!(own.len(), saved.len(), "one saved tensor per state tensor");
        for (t, s) in own.into_iter().zip(saved) {
            t.copy_(s);
        }
        let _ = self.step.fill_(steps as f64);
    }
}

/// Adam's update of `p` from `grad` (weight decay already applied), state `i` of the moments.
fn adam_update(p: &mut Tensor, grad: &Tensor, state: &mut [Vec<Tensor>], i: usize, c: &AdamConfig, step: i32) {
    let AdamConfig { lr, beta1, beta2, eps, .. } = *c;
    let step_size = lr / (1.0 - beta1.powi(step));
    let bias_correction2_sqrt = (1.0 - beta2.powi(step)).sqrt();
    let [m, v] = state else { unreachable!("Adam keeps two moments") };
    // exp_avg = beta1 * exp_avg + (1 - beta1) * grad
    let _ = m[i].g_mul_scalar_(beta1).g_add_(&(grad * (1.0 - beta1)));
    // exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad^2
    let _ = v[i].g_mul_scalar_(beta2).addcmul_(grad, &(grad * (1.0 - beta2)));
    // param -= step_size * exp_avg / (sqrt(exp_avg_sq) / sqrt(bias_correction2) + eps)
    let denom = (v[i].sqrt() / bias_correction2_sqrt).g_add_scalar_(eps);
    let _ = p.addcdiv_(&(&m[i] * -step_size), &denom);
}

/// SGD's update of `p` from `grad` with weight decay `decay`, momentum buffer `i` (zeros at first).
fn sgd_update(p: &mut Tensor, grad: &Tensor, state: &mut [Vec<Tensor>], i: usize, c: &SgdConfig, decay: f64) {
    let mut d_p = if decay != 0.0 { grad + &*p * decay } else { grad.shallow_clone() };
    if let [buf] = state {
        let _ = buf[i].g_mul_scalar_(c.momentum).g_add_(&d_p);
        d_p = if c.nesterov { &d_p + &buf[i] * c.momentum } else { buf[i].shallow_clone() };
    }
    let _ = p.g_add_(&(d_p * -c.lr));
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
