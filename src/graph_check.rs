//! `csp-tch check-graphs`: whether steps replayed from CUDA graphs compute what eager steps compute.
//!
//! One model is trained three times from the same initialisation on the same synthetic batches:
//! eagerly twice, whose difference is the noise floor (cuDNN is set deterministic for the check, so
//! the floor is usually zero), and with `--cuda-graphs on`. The [`schedule`] does around the replays
//! what a run does: a partial batch between train replays, evaluations between them (the eval graph
//! captured after the train graph, sharing its pool), a learning rate changed between replays, and a
//! new epoch's zeroed sums. Evaluation is unfolded on both sides (a graph keeps BatchNorm unfolded).
//! Every quantity is compared: losses, accuracies, weights, BatchNorm statistics, Adam's moments and
//! step count; each one's worst difference is set against the floor.

use anyhow::Result;
use serde::Serialize;
use tch::Tensor;

use crate::bench::{BenchConfig, SyntheticBatches};
use crate::config::{CudaGraphs, Execution};
use crate::environment::device_label;
use crate::train::Trainer;

/// One thing the check does to each of its trainers.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    /// Zero the epoch's sums (recording the previous epoch's first).
    NewEpoch,
    /// A full batch (the i-th of the synthetic set).
    Train(usize),
    /// The partial batch, always eager.
    TrainPartial,
    /// Evaluate the whole synthetic set: its full batches (replayed once recorded) and partial one.
    Eval,
    /// Scale the learning rate from the next step on.
    ScaleLr(f64),
}

/// The steps the check runs: the train graph is recorded on the 4th full batch and replayed from
/// there; the eval graph is recorded in the first evaluation and replayed in the later ones.
pub fn schedule() -> Vec<Op> {
    use Op::*;
    let mut ops = vec![NewEpoch];
    ops.extend((0..6).map(Train));
    ops.extend([TrainPartial, Train(6), Eval, Train(7), ScaleLr(0.5), Train(8), Train(9), Eval, NewEpoch]);
    ops.extend([Train(10), TrainPartial, Train(11), Eval]);
    ops
}

/// What one run of the schedule measured.
struct Trace {
    trainer: Trainer,
    /// Every train step's loss, each epoch's sums, every evaluation's loss.
    losses: Vec<f64>,
    /// Each epoch's training accuracy and every evaluation's accuracy.
    accuracies: Vec<f64>,
}

fn run(config: &BenchConfig, batches: &SyntheticBatches, cuda_graphs: CudaGraphs) -> Result<Trace> {
    let recipe = &config.recipe;
    let execution = Execution { cuda_graphs, ..config.execution };
    let mut trainer = Trainer::new(&config.model, crate::data::CLASSES, recipe, &execution, config.device)?;
    let (images, labels) = (&batches.images, &batches.labels);
    let (mut losses, mut accuracies, mut epoch_images) = (Vec::new(), Vec::new(), 0i64);
    let end_epoch = |trainer: &Trainer, losses: &mut Vec<f64>, accuracies: &mut Vec<f64>, images: i64| {
        if images > 0 {
            let (loss, correct) = trainer.train_totals();
            losses.push(loss / images as f64);
            accuracies.push(correct / images as f64);
        }
    };
    for op in schedule() {
        match op {
            Op::NewEpoch => {
                end_epoch(&trainer, &mut losses, &mut accuracies, epoch_images);
                trainer.zero_train_totals();
                epoch_images = 0;
            }
            Op::Train(_) | Op::TrainPartial => {
                let index = match op {
                    Op::Train(i) => batches.index(i),
                    _ => batches.tail_index(),
                };
                epoch_images += index.size()[0];
                trainer.train_batch(images, labels, &index, recipe)?;
                losses.push(trainer.last_train_loss());
            }
            Op::Eval => {
                let (evaluation, _) = trainer.evaluator_folding(false).run(images, labels, recipe)?;
                losses.push(evaluation.loss);
                accuracies.push(evaluation.accuracy);
            }
            Op::ScaleLr(factor) => {
                let lr = trainer.optimizer.config().lr() * factor;
                trainer.optimizer.set_lr(lr);
            }
        }
    }
    end_epoch(&trainer, &mut losses, &mut accuracies, epoch_images);
    Ok(Trace { trainer, losses, accuracies })
}

/// One compared quantity: the worst difference between the replayed and an eager run, the floor
/// (the same between the two eager runs) and the bound the first must stay within.
#[derive(Clone, Debug, Serialize)]
pub struct Compared {
    pub quantity: &'static str,
    /// How differences are measured.
    pub measure: &'static str,
    pub graphs: f64,
    pub floor: f64,
    pub bound: f64,
    pub ok: bool,
}

impl Compared {
    /// The bound is [`FLOOR_FACTOR`] times the floor, and never below `least`.
    fn new(quantity: &'static str, measure: &'static str, graphs: f64, floor: f64, least: f64) -> Compared {
        let bound = (FLOOR_FACTOR * floor).max(least);
        Compared { quantity, measure, graphs, floor, bound, ok: graphs <= bound }
    }
}

/// How far above the floor a difference may be.
pub const FLOOR_FACTOR: f64 = 4.0;
/// The least bound of relative differences: far above the rounding of a dozen steps, far below what
/// a wrong graph does (a stale batch, a lost update, an ignored learning rate: 1e-2 and more).
pub const LEAST_RELATIVE: f64 = 1e-4;

#[derive(Clone, Debug, Serialize)]
pub struct GraphCheck {
    pub model: String,
    pub device: String,
    pub precision: crate::config::Precision,
    /// Whether the third run really replayed graphs (false on the CPU, where all three run eagerly).
    pub replayed: bool,
    pub schedule: Vec<Op>,
    /// Every train step's loss, each epoch's mean and every evaluation's loss: eager, then replayed.
    pub eager_losses: Vec<f64>,
    pub graph_losses: Vec<f64>,
    pub compared: Vec<Compared>,
    pub ok: bool,
}

/// Largest `|a - b| / max(|a|, 1e-6)` over paired values.
fn scalar_difference(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter().zip(b).map(|(&a, &b)| (a - b).abs() / a.abs().max(1e-6)).fold(0.0, f64::max)
}

/// Largest `|a - b|` over paired values.
fn absolute_difference(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    a.iter().zip(b).map(|(&a, &b)| (a - b).abs()).fold(0.0, f64::max)
}

/// Largest `‖a - b‖ / ‖a‖` over paired tensors (a single element off by rounding, as Adam's first
/// sign-driven steps make, barely moves it; a wrong update moves it a lot).
fn tensor_difference(a: &[Tensor], b: &[Tensor]) -> f64 {
    let norm = |t: &Tensor| t.to_kind(tch::Kind::Double).norm().double_value(&[]);
    a.iter().zip(b).map(|(a, b)| norm(&(a - b)) / norm(a).max(1e-12)).fold(0.0, f64::max)
}

/// The tensors of a trainer that a replayed step updates: weights, BatchNorm statistics, Adam's
/// moments, each in name order, and the step count.
struct State {
    weights: Vec<Tensor>,
    statistics: Vec<Tensor>,
    moments: Vec<Tensor>,
    steps: f64,
}

impl State {
    fn of(trainer: &Trainer) -> State {
        let mut variables: Vec<(String, Tensor)> = trainer.vs.variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        let (weights, statistics): (Vec<_>, Vec<_>) = variables.into_iter().partition(|(_, t)| t.requires_grad());
        let float = |t: Tensor| t.to_kind(tch::Kind::Double);
        State {
            weights: weights.into_iter().map(|(_, t)| float(t)).collect(),
            statistics: statistics.into_iter().map(|(_, t)| float(t)).collect(),
            moments: trainer.optimizer.state().map(|(_, _, t)| float(t.shallow_clone())).collect(),
            steps: trainer.optimizer.steps() as f64,
        }
    }
}

/// Runs the check for `config.model` on `config.device`.
pub fn check_graphs(config: &BenchConfig) -> Result<GraphCheck> {
    let batches = SyntheticBatches::new(config.recipe.batch_size, config.recipe.batch_size / 2, config.device);
    let deterministic = crate::train::cuda_graph::set_cudnn_deterministic(true);
    let runs = (|| -> Result<_> {
        let first = run(config, &batches, CudaGraphs::Off)?;
        let second = run(config, &batches, CudaGraphs::Off)?;
        // `on`: a failure is an error here, not a silent fallback (the CPU runs eagerly all the same).
        Ok((first, second, run(config, &batches, CudaGraphs::On)?))
    })();
    crate::train::cuda_graph::set_cudnn_deterministic(deterministic);
    let (eager, again, graphs) = runs?;
    let (e, a, g) = (State::of(&eager.trainer), State::of(&again.trainer), State::of(&graphs.trainer));
    let eval_images = batches.labels.size()[0] as f64;
    let mut compared = vec![
        Compared::new(
            "losses",
            "relative",
            scalar_difference(&eager.losses, &graphs.losses),
            scalar_difference(&eager.losses, &again.losses),
            LEAST_RELATIVE,
        ),
        Compared::new(
            "accuracies",
            "absolute",
            absolute_difference(&eager.accuracies, &graphs.accuracies),
            absolute_difference(&eager.accuracies, &again.accuracies),
            // Two images' predictions flipped by rounding near a tie.
            2.0 / eval_images,
        ),
        Compared::new("optimizer steps", "absolute", (e.steps - g.steps).abs(), (e.steps - a.steps).abs(), 0.0),
    ];
    let tensors: [(&'static str, fn(&State) -> &[Tensor]); 3] =
        [("weights", |s| &s.weights), ("batchnorm statistics", |s| &s.statistics), ("optimizer state", |s| &s.moments)];
    for (i, (quantity, of)) in tensors.into_iter().enumerate() {
        let (graphs, floor) = (tensor_difference(of(&e), of(&g)), tensor_difference(of(&e), of(&a)));
        compared.insert(2 + i, Compared::new(quantity, "relative norm", graphs, floor, LEAST_RELATIVE));
    }
    let status = graphs.trainer.graph_status();
    Ok(GraphCheck {
        model: config.model.clone(),
        device: device_label(config.device),
        precision: graphs.trainer.precision(),
        replayed: status.replayed,
        schedule: schedule(),
        ok: compared.iter().all(|c| c.ok),
        eager_losses: eager.losses,
        graph_losses: graphs.losses,
        compared,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_replays_around_partial_batches_evaluations_a_new_learning_rate_and_a_new_epoch() {
        let ops = schedule();
        let position = |op: Op| ops.iter().position(|&o| o == op).unwrap();
        let recorded = crate::train::cuda_graph::WARMUP_STEPS; // the 4th full batch is recorded
        assert!(position(Op::TrainPartial) > position(Op::Train(recorded + 1)), "a partial batch between replays");
        assert!(position(Op::Train(7)) > position(Op::Eval), "a train replay after the eval capture");
        assert!(matches!(ops[position(Op::ScaleLr(0.5)) + 1], Op::Train(_)), "a replay after the new rate");
        assert_eq!(ops.iter().filter(|&&o| o == Op::NewEpoch).count(), 2);
        assert_eq!(ops.iter().filter(|&&o| o == Op::Eval).count(), 3, "eval recorded, then replayed twice");
    }

    #[test]
    fn differences_are_bounded_by_the_floor_or_the_least_bound() {
        assert!(Compared::new("x", "relative", 3e-4, 1e-4, LEAST_RELATIVE).ok);
        assert!(!Compared::new("x", "relative", 5e-4, 1e-4, LEAST_RELATIVE).ok);
        assert!(Compared::new("x", "relative", 1e-5, 0.0, LEAST_RELATIVE).ok);
        assert!(!Compared::new("x", "relative", 2e-2, 0.0, LEAST_RELATIVE).ok);
        assert_eq!(scalar_difference(&[1.0], &[1.0, 2.0]), f64::INFINITY, "a missing value is a difference");
    }
}
