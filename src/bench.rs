//! `csp-tch bench`: the median time of a full train step (transform, forward, backward, Adam) or
//! an eval step (transform, forward) on a synthetic uint8 dataset held on the device, exactly as
//! `run-all` runs them.

use anyhow::Result;
use serde::Serialize;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

use crate::environment::{device_label, synchronize};
use crate::train::{PhaseTimes, Recipe, Trainer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Transform, forward, backward and Adam step, BatchNorm in train mode.
    Train,
    /// Transform and forward under no_grad, BatchNorm in eval mode.
    Eval,
}

#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub model: String,
    pub recipe: Recipe,
    pub steps: usize,
    pub warmup: usize,
    pub mode: Mode,
    pub device: Device,
    /// Time the phases of train steps too (waits for the device between phases).
    pub breakdown: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct BenchResult {
    pub implementation: &'static str,
    pub model: String,
    pub image_size: i64,
    pub batch_size: usize,
    pub mode: Mode,
    pub device: String,
    /// What forward passes ran in (`--amp`).
    pub precision: crate::amp::Precision,
    /// NHWC weights and inputs (`--memory-format`, resolved).
    pub channels_last: bool,
    pub threads: i32,
    /// Whether freed tensor memory stays in the process ([`crate::environment::keep_freed_memory`]).
    pub keeps_freed_memory: bool,
    pub steps: usize,
    pub warmup: usize,
    /// Median over the timed steps.
    pub ms_per_step: f64,
    pub images_per_s: f64,
    /// Achieved GFLOP/s of the tutorial's MACs (`csp-tch summary`): 2 FLOPs per MAC, a train step
    /// counted as 3 forward passes. Taps csp-tch skips because they see padding alone count as done.
    pub gflops: f64,
    pub step_ms: Vec<f64>,
    /// Mean ms per train step in each phase, with `--breakdown`.
    pub phases_ms: Option<PhaseTimes>,
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len() % 2 == 1 {
        sorted[mid]
    } else {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    }
}

pub fn run(config: &BenchConfig) -> Result<BenchResult> {
    let recipe = &config.recipe;
    let bs = recipe.batch_size as i64;
    let mut trainer = Trainer::new(&config.model, crate::data::CLASSES, recipe, config.device)?;
    // A few batches' worth of CIFAR-sized uint8 images on the device, as run-all holds them.
    let pool = 4 * bs;
    let images = Tensor::randint(256, [pool, 3, 32, 32], (Kind::Uint8, config.device));
    let labels = Tensor::randint(crate::data::CLASSES, [pool], (Kind::Int64, config.device));
    let timed = |step: &mut dyn FnMut(&Tensor, bool)| {
        let mut step_ms = Vec::with_capacity(config.steps);
        for i in 0..(config.warmup + config.steps) as i64 {
            let index = Tensor::arange_start((i % 4) * bs, (i % 4 + 1) * bs, (Kind::Int64, config.device));
            let started = Instant::now();
            step(&index, i >= config.warmup as i64);
            synchronize(config.device);
            if i >= config.warmup as i64 {
                step_ms.push(started.elapsed().as_secs_f64() * 1e3);
            }
        }
        step_ms
    };
    let mut phases = PhaseTimes::default();
    let step_ms = match config.mode {
        Mode::Train => timed(&mut |index, measured| {
            let phases = (config.breakdown && measured).then_some(&mut phases);
            drop(trainer.train_step(&images, &labels, index, recipe, phases))
        }),
        Mode::Eval => {
            // Evaluation runs with BatchNorm folded, as `evaluate` does.
            let _folded = trainer.model.fold_batch_norm();
            let model = &trainer.model;
            timed(&mut |index, _| tch::no_grad(|| drop(crate::train::eval_logits(model, &images, index, recipe))))
        }
    };
    let ms_per_step = median(&step_ms);
    let macs = trainer.model.describe(recipe.image_size).macs as f64;
    let passes = match config.mode {
        Mode::Train => 3.0,
        Mode::Eval => 1.0,
    };
    Ok(BenchResult {
        implementation: "csp-tch",
        model: config.model.clone(),
        image_size: recipe.image_size,
        batch_size: recipe.batch_size,
        mode: config.mode,
        device: device_label(config.device),
        precision: trainer.precision(),
        channels_last: trainer.model.is_channels_last(),
        threads: tch::get_num_threads(),
        keeps_freed_memory: crate::environment::keeps_freed_memory(),
        steps: config.steps,
        warmup: config.warmup,
        ms_per_step,
        images_per_s: bs as f64 / ms_per_step * 1e3,
        gflops: 2.0 * macs * passes * bs as f64 / ms_per_step / 1e6,
        step_ms,
        phases_ms: (config.breakdown && config.mode == Mode::Train).then(|| {
            let n = config.steps as f64;
            PhaseTimes {
                transform_ms: phases.transform_ms / n,
                forward_ms: phases.forward_ms / n,
                backward_ms: phases.backward_ms / n,
                optimizer_ms: phases.optimizer_ms / n,
            }
        }),
    })
}
