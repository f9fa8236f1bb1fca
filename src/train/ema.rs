//! `--ema DECAY`: an exponential moving average of the weights and BatchNorm statistics, as timm's
//! `ModelEmaV2` keeps it (`ema = decay * ema + (1 - decay) * w` after every step, every entry of the
//! state dict), evaluated beside the raw weights. The update is device ops only, inside the recorded
//! step when CUDA graphs are on.

use tch::nn;
use tch::Tensor;

use super::evaluate::{EvalSums, Evaluator};
use crate::config::Precision;
use crate::models::Backbone;

/// The average itself: every variable of a copy, updated from the live model's of the same name.
pub struct Average {
    decay: f64,
    /// (averaged, live) variables, by name.
    pairs: Vec<(Tensor, Tensor)>,
}

impl Average {
    /// An average in `ema` (variables of the same names and shapes as `live`'s, laid out alike) that
    /// starts as a copy of `live`, as timm's `deepcopy` of the model.
    pub fn new(decay: f64, ema: &mut nn::VarStore, live: &nn::VarStore) -> Average {
        ema.copy(live).expect("the same architecture");
        ema.freeze();
        let live = live.variables();
        let mut named: Vec<(String, Tensor)> = ema.variables().into_iter().collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let pairs = named.into_iter().map(|(name, ema)| (ema, live[&name].shallow_clone())).collect();
        Average { decay, pairs }
    }

    /// One update after a step, as `ModelEmaV2.update`: `ema.copy_(decay * ema + (1 - decay) * w)`.
    pub fn update(&mut self) {
        let _guard = tch::no_grad_guard();
        for (ema, live) in &mut self.pairs {
            let _ = ema.g_mul_scalar_(self.decay).g_add_(&(&*live * (1.0 - self.decay)));
        }
    }
}

/// The averaged copy of a model, with what evaluating it needs.
pub struct Ema {
    pub vs: nn::VarStore,
    model: Backbone,
    average: Average,
    sums: EvalSums,
}

impl Ema {
    /// An average of `live` kept in `vs` and `model` (a fresh build of the same architecture).
    pub fn new(decay: f64, mut vs: nn::VarStore, model: Backbone, live: &nn::VarStore, classes: i64) -> Ema {
        let average = Average::new(decay, &mut vs, live);
        let sums = EvalSums::new(vs.device(), classes);
        Ema { vs, model, average, sums }
    }

    /// One update after a step.
    pub fn update(&mut self) {
        self.average.update();
    }

    /// The averaged model set up for (eager) evaluation.
    pub fn evaluator(&mut self, precision: Precision) -> Evaluator<'_> {
        Evaluator::new(&self.model, precision, None, &mut self.sums, true)
    }

    /// Every averaged variable, sorted by name (what a data-parallel run broadcasts from rank 0).
    pub fn variables(&self) -> Vec<Tensor> {
        self.average.pairs.iter().map(|(ema, _)| ema.shallow_clone()).collect()
    }
}
