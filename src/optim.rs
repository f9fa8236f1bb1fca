//! Adam over tch tensors, with the same update as PyTorch's `torch.optim.Adam` (and libtorch's,
//! which tch's `nn::Adam` wraps), written out so that its moments can be checkpointed.
//!
//! On the CPU the update is one fused pass per element over parameter, gradient and both moments,
//! split across libtorch's thread count: 28 bytes of memory traffic per parameter instead of the
//! ~70 of the usual sequence of tensor operations, and no temporaries. Elsewhere (CUDA) it runs as
//! tensor operations, which the GPU executes asynchronously.

use tch::{Device, Kind, Tensor};

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
}

/// Adam without weight decay or amsgrad (the tutorial's optimizer), over named parameters so that
/// its state can be saved and restored by name.
pub struct Adam {
    pub config: AdamConfig,
    /// Use the fused CPU pass where possible (on by default; off measures or tests the plain path).
    pub fused_cpu: bool,
    names: Vec<String>,
    params: Vec<Tensor>,
    /// First and second moments, one pair per parameter.
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    steps: i64,
}

/// Per-step scalars of the update, in f32 as PyTorch's CPU kernels use them.
#[derive(Clone, Copy)]
struct Coefficients {
    beta1: f32,
    one_minus_beta1: f32,
    beta2: f32,
    one_minus_beta2: f32,
    bias_correction2_sqrt: f32,
    eps: f32,
    step_size: f32,
}

impl Adam {
    pub fn new(named_params: Vec<(String, Tensor)>, config: AdamConfig) -> Adam {
        let (names, params): (Vec<String>, Vec<Tensor>) = named_params.into_iter().unzip();
        let zeros = |ps: &[Tensor]| ps.iter().map(Tensor::zeros_like).collect::<Vec<_>>();
        Adam { config, fused_cpu: true, names, exp_avg: zeros(&params), exp_avg_sq: zeros(&params), params, steps: 0 }
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

    /// Number of steps taken so far.
    pub fn steps(&self) -> i64 {
        self.steps
    }

    /// One update from `grads` (one per parameter, as [`Adam::gradients`] returns them); a
    /// parameter whose gradient is undefined (unused in the loss) is left alone, as in PyTorch.
    pub fn step(&mut self, grads: &[Tensor]) {
        assert_eq!(grads.len(), self.params.len(), "one gradient per parameter");
        let _guard = tch::no_grad_guard();
        self.steps += 1;
        let AdamConfig { lr, beta1, beta2, eps } = self.config;
        let c = Coefficients {
            beta1: beta1 as f32,
            one_minus_beta1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            one_minus_beta2: (1.0 - beta2) as f32,
            bias_correction2_sqrt: (1.0 - beta2.powi(self.steps as i32)).sqrt() as f32,
            eps: eps as f32,
            step_size: (lr / (1.0 - beta1.powi(self.steps as i32))) as f32,
        };
        if !self.fused_cpu {
            return self.tensor_step(grads, c);
        }
        // Each parameter goes to the fused loop or, when it cannot (see `fused_gradient`), to the
        // tensor path; an undefined gradient skips a path.
        let moments = self.exp_avg.iter().zip(&self.exp_avg_sq);
        let (fused, rest): (Vec<Tensor>, Vec<Tensor>) = self
            .params
            .iter()
            .zip(grads)
            .zip(moments)
            .map(|((p, g), (m, v))| match fused_gradient(p, g, m, v) {
                Some(g) => (g, Tensor::new()),
                None => (Tensor::new(), g.shallow_clone()),
            })
            .unzip();
        fused_cpu_step(&self.params, &fused, &self.exp_avg, &self.exp_avg_sq, c);
        self.tensor_step(&rest, c);
    }

    /// The update as tensor operations (any device), in libtorch's order.
    fn tensor_step(&mut self, grads: &[Tensor], c: Coefficients) {
        let moments = self.exp_avg.iter_mut().zip(&mut self.exp_avg_sq);
        for ((p, grad), (m, v)) in self.params.iter_mut().zip(grads).zip(moments).filter(|((_, g), _)| g.defined()) {
            // exp_avg = beta1 * exp_avg + (1 - beta1) * grad
            let _ = m.g_mul_scalar_(c.beta1 as f64).g_add_(&(grad * c.one_minus_beta1 as f64));
            // exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad^2
            let _ = v.g_mul_scalar_(c.beta2 as f64).addcmul_(grad, &(grad * c.one_minus_beta2 as f64));
            // param -= step_size * exp_avg / (sqrt(exp_avg_sq) / sqrt(bias_correction2) + eps)
            let denom = (v.sqrt() / c.bias_correction2_sqrt as f64).g_add_scalar_(c.eps as f64);
            let _ = p.addcdiv_(&(&*m * -(c.step_size as f64)), &denom);
        }
    }

    /// Parameter names with their first and second moments, for checkpoints.
    pub fn state(&self) -> (&[String], &[Tensor], &[Tensor]) {
        (&self.names, &self.exp_avg, &self.exp_avg_sq)
    }

    /// Restores the moments (in the order of [`Adam::state`]'s names) and the step count.
    pub fn set_state(&mut self, moments: Vec<(Tensor, Tensor)>, steps: i64) {
        assert_eq!(moments.len(), self.params.len(), "one pair of moments per parameter");
        (self.exp_avg, self.exp_avg_sq) = moments.into_iter().unzip();
        self.steps = steps;
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

/// The gradient `g` of `p` as the fused loop takes it, or `None` when the loop cannot update `p`.
/// The loop walks raw memory, so a parameter's four buffers must be CPU fp32, dense and in one
/// layout (NCHW-contiguous or channels-last alike). A gradient laid out otherwise (that of a
/// channels-last kernel cut to its live taps) is copied into the parameter's layout.
fn fused_gradient(p: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor) -> Option<Tensor> {
    let cpu_fp32 = |t: &Tensor| t.device() == Device::Cpu && t.kind() == Kind::Float;
    let fusable = |t: &Tensor| cpu_fp32(t) && same_order(p, t) && is_dense(t);
    if !(g.defined() && cpu_fp32(g) && [p, m, v].into_iter().all(fusable)) {
        return None;
    }
    if fusable(g) {
        return Some(g.shallow_clone());
    }
    let mut relaid = p.empty_like();
    relaid.copy_(g);
    Some(relaid)
}

/// Whether `t`'s elements fill its storage span exactly once (contiguous in some order of its
/// dimensions, e.g. channels-last), so that it can be walked as a flat slice.
fn is_dense(t: &Tensor) -> bool {
    let (sizes, strides) = (t.size(), t.stride());
    let mut dims: Vec<usize> = (0..sizes.len()).filter(|&d| sizes[d] != 1).collect();
    dims.sort_by_key(|&d| strides[d]);
    let mut expected = 1;
    for d in dims {
        if strides[d] != expected {
            return false;
        }
        expected *= sizes[d];
    }
    true
}

/// Whether `a` and `b` have the same shape and put their elements in the same memory order (strides
/// of size-1 dimensions do not matter).
fn same_order(a: &Tensor, b: &Tensor) -> bool {
    let (sizes, a_strides, b_strides) = (a.size(), a.stride(), b.stride());
    sizes == b.size() && (0..sizes.len()).all(|d| sizes[d] == 1 || a_strides[d] == b_strides[d])
}

/// Raw views of one parameter's four buffers.
#[derive(Clone, Copy)]
struct Buffers {
    param: *mut f32,
    grad: *const f32,
    exp_avg: *mut f32,
    exp_avg_sq: *mut f32,
    len: usize,
}

// Each thread touches a disjoint element range of each buffer, see `fused_cpu_step`.
unsafe impl Send for Buffers {}
unsafe impl Sync for Buffers {}

/// The Adam update of elements `range` of one parameter.
///
/// # Safety
/// The pointers must be valid for `b.len` f32s, and no other thread may touch `range`.
unsafe fn update(b: Buffers, range: std::ops::Range<usize>, c: Coefficients) {
    let n = range.len();
    let p = std::slice::from_raw_parts_mut(b.param.add(range.start), n);
    let g = std::slice::from_raw_parts(b.grad.add(range.start), n);
    let m = std::slice::from_raw_parts_mut(b.exp_avg.add(range.start), n);
    let v = std::slice::from_raw_parts_mut(b.exp_avg_sq.add(range.start), n);
    for i in 0..n {
        let gi = g[i];
        let mi = m[i] * c.beta1 + gi * c.one_minus_beta1;
        let vi = v[i] * c.beta2 + c.one_minus_beta2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        let denom = vi.sqrt() / c.bias_correction2_sqrt + c.eps;
        p[i] += -c.step_size * (mi / denom);
    }
}

/// One fused pass over all parameters, the total element count split evenly across threads.
fn fused_cpu_step(params: &[Tensor], grads: &[Tensor], exp_avg: &[Tensor], exp_avg_sq: &[Tensor], c: Coefficients) {
    let buffers: Vec<Buffers> = params
        .iter()
        .zip(grads)
        .zip(exp_avg.iter().zip(exp_avg_sq))
        .filter(|((_, g), _)| g.defined())
        .map(|((p, g), (m, v))| Buffers {
            param: p.data_ptr() as *mut f32,
            grad: g.data_ptr() as *const f32,
            exp_avg: m.data_ptr() as *mut f32,
            exp_avg_sq: v.data_ptr() as *mut f32,
            len: p.numel(),
        })
        .collect();
    let total: usize = buffers.iter().map(|b| b.len).sum();
    let threads = (tch::get_num_threads().max(1) as usize).min(total.div_ceil(1 << 16)).max(1);
    let work = |share: std::ops::Range<usize>| {
        let mut offset = 0;
        for &b in &buffers {
            let (start, end) = (share.start.max(offset), share.end.min(offset + b.len));
            if start < end {
                // SAFETY: the shares of different threads are disjoint ranges of the global index.
                unsafe { update(b, start - offset..end - offset, c) };
            }
            offset += b.len;
        }
    };
    std::thread::scope(|scope| {
        for t in 1..threads {
            let work = &work;
            scope.spawn(move || work(total * t / threads..total * (t + 1) / threads));
        }
        work(0..total / threads);
    });
}
