//! `--ema DECAY`: an exponential moving average of the weights and BatchNorm statistics, as timm's
//! `ModelEmaV2` keeps it (`ema = decay * ema + (1 - decay) * w` after every step, every entry of the
//! state dict), evaluated beside the raw weights. The update is device ops only, inside the recorded
//! step when CUDA graphs are on.

use tch::nn;
use tch::Tensor;

use super::evaluate::{EvalSums, Evaluator};
use crate::config::Precision;
use crate::models::Backbone;

/// The averaged copy of a model.
pub struct Ema {
    decay: f64,
    pub vs: nn::VarStore,
    model: Backbone,
    /// (averaged, live) variables, every one of the model's, by name.
    pairs: Vec<(Tensor, Tensor)>,
    sums: EvalSums,
}

impl Ema {
    /// An average that starts as a copy of `live` (the variables of the same architecture that
    /// `vs` and `model` hold, laid out alike), as timm's `deepcopy` of the model.
    pub fn new(decay: f64, mut vs: nn::VarStore, model: Backbone, live: &nn::VarStore, classes: i64) -> Ema {
        vs.copy(live).expect("the same architecture");
        vs.freeze();
        let live = live.variables();
        let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let pairs = named.into_iter().map(|(name, ema)| (ema, live[&name].shallow_clone())).collect();
        let sums = EvalSums::new(vs.device(), classes);
        Ema { decay, vs, model, pairs, sums }
    }

    /// One update after a step, as `ModelEmaV2._update`: `ema.copy_(ema * decay + (1 - decay) * w)`.
    pub fn update(&mut self) {
        let _guard = tch::no_grad_guard();
        for (ema, live) in &mut self.pairs {
            let _ = ema.g_mul_scalar_(self.decay).g_add_(&(&*live * (1.0 - self.decay)));
        }
    }

    /// The averaged model set up for (eager) evaluation.
    pub fn evaluator(&mut self, precision: Precision) -> Evaluator<'_> {
        Evaluator::new(&self.model, precision, None, &mut self.sums, true)
    }
}
