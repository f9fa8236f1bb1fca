//! `csp-tch bench`: the median time of a full train step (transform, forward, backward, Adam) or
//! an eval step (transform, forward) on a synthetic uint8 dataset held on the device, exactly as
//! `run-all` runs them.

use anyhow::{bail, Result};
use serde::Serialize;
use std::rc::Rc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

use crate::config::{CudaGraphs, Execution, Recipe};
use crate::environment::{device_label, synchronize};
use crate::train::cuda_graph::WARMUP_STEPS;
use crate::train::distributed::{graph_obstacle, Group};
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
    pub execution: Execution,
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
    pub precision: crate::config::Precision,
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
    /// A data-parallel bench (`--nproc-per-node`): its processes, backend and the median ms per step
    /// spent in the gradient allreduce (on rank 0, waiting for the others included; absent when the
    /// steps replayed CUDA graphs, which hold the allreduce).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub world_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allreduce_ms_per_step: Option<f64>,
    /// With `--dist-overlap on`: how much of the allreduce was launched during the backward pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allreduce_overlap: Option<OverlapShare>,
}

/// The buckets of an overlapped allreduce (`--dist-overlap on`), over the timed steps.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct OverlapShare {
    pub buckets_per_step: f64,
    /// The share of the buckets launched before the backward pass ended.
    pub launched_during_backward: f64,
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
/// them, possibly with a partial batch after the full ones; the `i`th full batch's indices into them.
pub(crate) struct SyntheticBatches {
    pub images: Tensor,
    pub labels: Tensor,
    batch_size: i64,
    tail: i64,
}

impl SyntheticBatches {
    pub const BATCHES: i64 = 4;

    /// `BATCHES` full batches of `batch_size` images, then `tail` more.
    pub fn new(batch_size: usize, tail: usize, device: Device) -> SyntheticBatches {
        let (bs, tail) = (batch_size as i64, tail as i64);
        let pool = Self::BATCHES * bs + tail;
        SyntheticBatches {
            images: Tensor::randint(256, [pool, 3, 32, 32], (Kind::Uint8, device)),
            labels: Tensor::randint(crate::data::CLASSES, [pool], (Kind::Int64, device)),
            batch_size: bs,
            tail,
        }
    }

    pub fn index(&self, i: usize) -> Tensor {
        let (first, bs) = ((i as i64 % Self::BATCHES) * self.batch_size, self.batch_size);
        Tensor::arange_start(first, first + bs, (Kind::Int64, self.images.device()))
    }

    /// The partial batch's indices.
    pub fn tail_index(&self) -> Tensor {
        let first = Self::BATCHES * self.batch_size;
        Tensor::arange_start(first, first + self.tail, (Kind::Int64, self.images.device()))
    }
}

/// Runs the bench; as one rank of `group`'s data-parallel run when given (train steps only, their
/// gradients averaged over the ranks as in a run).
pub fn run(config: &BenchConfig, group: Option<Rc<Group>>) -> Result<BenchResult> {
    let mut execution = config.execution;
    if config.breakdown {
        execution.cuda_graphs = CudaGraphs::Off;
    }
    let recipe = &config.recipe;
    let bs = recipe.batch_size as i64;
    let mut trainer = Trainer::new(&config.model, crate::data::CLASSES, recipe, &execution, config.device)?;
    let parallel = group.as_ref().map(|g| (g.world_size(), g.place.backend.label()));
    let overlap = group.as_ref().is_some_and(|g| g.overlaps());
    let obstacle = group.as_ref().and_then(|g| graph_obstacle(g.device, g.place.backend, false));
    if let Some(group) = group {
        if config.mode != Mode::Train || config.breakdown {
            bail!("a data-parallel bench times train steps: drop --mode eval and --breakdown");
        }
        trainer.distribute(group, false)?;
    }
    eprintln!(
        "{}",
        crate::train::cuda_graph::decision_line(execution.cuda_graphs, config.device, trainer.precision(), obstacle)?
    );
    // With CUDA graphs, the untimed steps include the eager ones and the capture.
    let warmup = if trainer.graph_status().replayed { config.warmup.max(WARMUP_STEPS + 1) } else { config.warmup };
    let batches = SyntheticBatches::new(recipe.batch_size, 0, config.device);
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
    let mut allreduce = Vec::new();
    let step_ms = match config.mode {
        Mode::Train if config.breakdown => timed(&mut |index, measured| {
            let phases = measured.then_some(&mut phases);
            drop(trainer.train_step(images, labels, index, recipe, phases));
            Ok(())
        })?,
        Mode::Train => timed(&mut |index, measured| {
            trainer.train_batch(images, labels, index, recipe)?;
            // A replayed step's allreduce is inside the graph, not timed apart.
            match trainer.take_allreduce_stats() {
                Some(stats) if measured && stats.steps > 0 => allreduce.push(stats),
                _ => {}
            }
            Ok(())
        })?,
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
        cuda_graphs: trainer.graph_status().replayed,
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
        world_size: parallel.map(|(world, _)| world),
        backend: parallel.map(|(_, backend)| backend),
        allreduce_ms_per_step: (!allreduce.is_empty())
            .then(|| median(&allreduce.iter().map(|s| s.seconds * 1e3).collect::<Vec<_>>())),
        allreduce_overlap: (overlap && !allreduce.is_empty()).then(|| {
            let (steps, buckets, during) = allreduce
                .iter()
                .fold((0, 0, 0), |(n, b, d), s| (n + s.steps, b + s.buckets, d + s.launched_during_backward));
            OverlapShare {
                buckets_per_step: buckets as f64 / steps.max(1) as f64,
                launched_during_backward: during as f64 / buckets.max(1) as f64,
            }
        }),
    })
}
