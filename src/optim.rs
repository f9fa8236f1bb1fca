//! Adam over tch tensors, with the same update as PyTorch's `torch.optim.Adam` (and libtorch's,
//! which tch's `nn::Adam` wraps), written out so that its moments can be checkpointed.

use tch::Tensor;

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
    names: Vec<String>,
    params: Vec<Tensor>,
    /// First and second moments, one pair per parameter.
    exp_avg: Vec<Tensor>,
    exp_avg_sq: Vec<Tensor>,
    steps: i64,
}

impl Adam {
    pub fn new(named_params: Vec<(String, Tensor)>, config: AdamConfig) -> Adam {
        let (names, params): (Vec<String>, Vec<Tensor>) = named_params.into_iter().unzip();
        let zeros = |ps: &[Tensor]| ps.iter().map(Tensor::zeros_like).collect::<Vec<_>>();
        Adam { config, names, exp_avg: zeros(&params), exp_avg_sq: zeros(&params), params, steps: 0 }
    }

    /// The trainable variables of `vs`, sorted by name.
    pub fn for_var_store(vs: &tch::nn::VarStore, config: AdamConfig) -> Adam {
        let mut named: Vec<(String, Tensor)> =
            vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        Adam::new(named, config)
    }

    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.zero_grad();
        }
    }

    /// Number of steps taken so far.
    pub fn steps(&self) -> i64 {
        self.steps
    }

    /// One update from the current gradients.
    pub fn step(&mut self) {
        let _guard = tch::no_grad_guard();
        self.steps += 1;
        let AdamConfig { lr, beta1, beta2, eps } = self.config;
        let bias_correction1 = 1.0 - beta1.powi(self.steps as i32);
        let bias_correction2_sqrt = (1.0 - beta2.powi(self.steps as i32)).sqrt();
        let step_size = lr / bias_correction1;
        for ((p, m), v) in self.params.iter_mut().zip(&mut self.exp_avg).zip(&mut self.exp_avg_sq) {
            let grad = p.grad();
            if !grad.defined() {
                continue;
            }
            // exp_avg = beta1 * exp_avg + (1 - beta1) * grad
            let _ = m.g_mul_scalar_(beta1).g_add_(&(&grad * (1.0 - beta1)));
            // exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad^2
            let _ = v.g_mul_scalar_(beta2).addcmul_(&grad, &(&grad * (1.0 - beta2)));
            // param -= step_size * exp_avg / (sqrt(exp_avg_sq) / sqrt(bias_correction2) + eps)
            let denom = (v.sqrt() / bias_correction2_sqrt).g_add_scalar_(eps);
            let _ = p.addcdiv_(&(&*m * -step_size), &denom);
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
