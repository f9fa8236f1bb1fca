//! `csp-tch bench`: the median time of a full train step (transform, forward, backward, Adam) or
//! an eval step (transform, forward) on a synthetic uint8 dataset held on the device, exactly as
//! `run-all` runs them. `csp-tch check-graphs`: the same steps eagerly and replayed from CUDA graphs,
//! side by side.

use anyhow::Result;
use serde::Serialize;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

use crate::config::{CudaGraphs, Recipe};
use crate::cuda_graph::WARMUP_STEPS;
use crate::environment::{device_label, synchronize};
use crate::train::{PhaseTimes, Trainer};

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
    /// Time the phases of train steps too (waits for the device between phases, and runs every step
    /// eagerly: a replayed CUDA graph has no phases to time).
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
    /// Whether the timed steps replayed a recorded CUDA graph (`--cuda-graphs`, resolved).
    pub cuda_graphs: bool,
    pub threads: i32,
    /// Whether freed tensor memory stays in the process ([`crate::environment::keep_freed_memory`]).
    pub keeps_freed_memory: bool,
    pub steps: usize,
    pub warmup: usize,
    /// Wall time of the untimed steps (cuDNN's algorithm search, CUDA graph capture).
    pub warmup_s: f64,
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

/// A few batches' worth of CIFAR-sized uint8 images (and labels) on the device, as run-all holds
/// them, and the `i`th batch's indices into them.
struct SyntheticBatches {
    images: Tensor,
    labels: Tensor,
    batch_size: i64,
}

impl SyntheticBatches {
    const BATCHES: i64 = 4;

    fn new(batch_size: usize, device: Device) -> SyntheticBatches {
        let (bs, pool) = (batch_size as i64, Self::BATCHES * batch_size as i64);
        SyntheticBatches {
            images: Tensor::randint(256, [pool, 3, 32, 32], (Kind::Uint8, device)),
            labels: Tensor::randint(crate::data::CLASSES, [pool], (Kind::Int64, device)),
            batch_size: bs,
        }
    }

    fn index(&self, i: usize) -> Tensor {
        let (first, bs) = ((i as i64 % Self::BATCHES) * self.batch_size, self.batch_size);
        Tensor::arange_start(first, first + bs, (Kind::Int64, self.images.device()))
    }
}

pub fn run(config: &BenchConfig) -> Result<BenchResult> {
    let mut recipe = config.recipe.clone();
    if config.breakdown {
        recipe.cuda_graphs = CudaGraphs::Off;
    }
    let recipe = &recipe;
    let bs = recipe.batch_size as i64;
    let mut trainer = Trainer::new(&config.model, crate::data::CLASSES, recipe, config.device)?;
    // With CUDA graphs, the untimed steps include the eager ones and the capture.
    let warmup = if trainer.replays_cuda_graphs() { config.warmup.max(WARMUP_STEPS + 1) } else { config.warmup };
    let batches = SyntheticBatches::new(recipe.batch_size, config.device);
    let (images, labels) = (&batches.images, &batches.labels);
    let mut warmup_s = 0.0;
    let mut timed = |step: &mut dyn FnMut(&Tensor, bool) -> Result<()>| -> Result<Vec<f64>> {
        let mut step_ms = Vec::with_capacity(config.steps);
        let warmup_started = Instant::now();
        for i in 0..warmup + config.steps {
            if i == warmup {
                warmup_s = warmup_started.elapsed().as_secs_f64();
            }
            let index = batches.index(i);
            let started = Instant::now();
            step(&index, i >= warmup)?;
            synchronize(config.device);
            if i >= warmup {
                step_ms.push(started.elapsed().as_secs_f64() * 1e3);
            }
        }
        Ok(step_ms)
    };
    let mut phases = PhaseTimes::default();
    let step_ms = match config.mode {
        Mode::Train if config.breakdown => timed(&mut |index, measured| {
            let phases = measured.then_some(&mut phases);
            drop(trainer.train_step(images, labels, index, recipe, phases));
            Ok(())
        })?,
        Mode::Train => timed(&mut |index, _| trainer.train_batch(images, labels, index, recipe))?,
        Mode::Eval => {
            // As `run-all` evaluates: BatchNorm folded, or the recorded step replayed.
            let mut evaluator = trainer.evaluator();
            timed(&mut |index, _| evaluator.batch(images, labels, index, recipe))?
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
        cuda_graphs: trainer.replays_cuda_graphs(),
        threads: tch::get_num_threads(),
        keeps_freed_memory: crate::environment::keeps_freed_memory(),
        steps: config.steps,
        warmup,
        warmup_s,
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

/// `csp-tch check-graphs`: one model trained for a few steps eagerly and again with its steps
/// replayed from CUDA graphs, from the same initialisation on the same batches.
#[derive(Clone, Debug, Serialize)]
pub struct GraphCheck {
    pub model: String,
    pub device: String,
    pub precision: crate::amp::Precision,
    /// Whether the second run really replayed graphs (false on the CPU, where both run eagerly).
    pub replayed: bool,
    /// Each train step's loss, eager and replayed (the first [`WARMUP_STEPS`] run eagerly in both).
    pub eager_losses: Vec<f64>,
    pub graph_losses: Vec<f64>,
    /// Largest `|a - b| / max(|a|, 1e-6)` over the steps' losses.
    pub max_loss_difference: f64,
    /// Largest difference of any weight, BatchNorm statistic or Adam step count after the steps,
    /// relative to that tensor's largest magnitude.
    pub max_state_difference: f64,
    /// The evaluation loss on the same batches afterwards (full batches replay the eval graph).
    pub eager_eval_loss: f64,
    pub graph_eval_loss: f64,
    /// All three within [`GraphCheck::TOLERANCE`].
    pub ok: bool,
}

impl GraphCheck {
    /// Float rounding of a few steps: replays run the eager steps' kernels, but atomics in some
    /// cuDNN backward kernels and in the accumulation sum in a varying order.
    pub const TOLERANCE: f64 = 1e-3;
}

/// Trains `config.model` for `steps` steps eagerly and with `--cuda-graphs on` (on CUDA), and compares.
pub fn check_graphs(config: &BenchConfig) -> Result<GraphCheck> {
    let steps = config.steps.max(WARMUP_STEPS + 2);
    let batches = SyntheticBatches::new(config.recipe.batch_size, config.device);
    let run = |cuda_graphs: CudaGraphs| -> Result<(Trainer, Vec<f64>, f64)> {
        let recipe = Recipe { cuda_graphs, ..config.recipe.clone() };
        let mut trainer = Trainer::new(&config.model, crate::data::CLASSES, &recipe, config.device)?;
        let mut losses = Vec::with_capacity(steps);
        for i in 0..steps {
            trainer.train_batch(&batches.images, &batches.labels, &batches.index(i), &recipe)?;
            losses.push(trainer.last_train_loss());
        }
        // Twice, so that the second evaluation replays its recorded batches.
        trainer.evaluate(&batches.images, &batches.labels, &recipe)?;
        let (evaluation, _) = trainer.evaluate(&batches.images, &batches.labels, &recipe)?;
        Ok((trainer, losses, evaluation.loss))
    };
    let (eager, eager_losses, eager_eval_loss) = run(CudaGraphs::Off)?;
    let graphs_on = if config.device.is_cuda() { CudaGraphs::On } else { CudaGraphs::Auto };
    let (graph, graph_losses, graph_eval_loss) = run(graphs_on)?;
    let relative = |a: f64, b: f64| (a - b).abs() / a.abs().max(1e-6);
    let max_loss_difference = eager_losses.iter().zip(&graph_losses).map(|(&a, &b)| relative(a, b)).fold(0.0, f64::max);
    let graph_vars = graph.vs.variables();
    let mut max_state_difference = relative(eager.adam.steps() as f64, graph.adam.steps() as f64);
    for (name, a) in eager.vs.variables() {
        let b = &graph_vars[&name];
        let scale = a.abs().max().double_value(&[]).max(1e-6);
        max_state_difference = max_state_difference.max((&a - b).abs().max().double_value(&[]) / scale);
    }
    let ok = max_loss_difference <= GraphCheck::TOLERANCE
        && max_state_difference <= GraphCheck::TOLERANCE
        && relative(eager_eval_loss, graph_eval_loss) <= GraphCheck::TOLERANCE;
    Ok(GraphCheck {
        model: config.model.clone(),
        device: device_label(config.device),
        precision: graph.precision(),
        replayed: graph.replays_cuda_graphs(),
        eager_losses,
        graph_losses,
        max_loss_difference,
        max_state_difference,
        eager_eval_loss,
        graph_eval_loss,
        ok,
    })
}
