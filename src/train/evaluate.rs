//! Evaluation on a test split: loss, accuracy and confusion matrix summed on the device, with
//! BatchNorm folded for eager steps or a recorded CUDA graph replayed.

use anyhow::Result;
use serde::Serialize;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

use super::distributed::{self, Group};
use super::staging::{self, Staging};
use super::timing::{warmup_seconds, HEAD_STEPS};
use super::{amp, batch_bounds, model_input, partial_batch, StepGraphs};
use crate::config::{Precision, Recipe};
use crate::data::Dataset;
use crate::environment::synchronize;
use crate::models::fastpath::FoldedBatchNorm;
use crate::models::Backbone;
use tch::nn::ModuleT;

/// Result of evaluating a model on a test split.
#[derive(Clone, Debug, Serialize)]
pub struct Evaluation {
    pub loss: f64,
    pub accuracy: f64,
    pub last_batch_loss: f64,
    pub ms_per_step: f64,
    /// `confusion[true][predicted]` counts.
    pub confusion: Vec<Vec<i64>>,
}

/// One class's accuracy on a test split.
#[derive(Clone, Debug, Serialize)]
pub struct ClassAccuracy {
    pub class: usize,
    pub name: String,
    pub images: i64,
    /// NaN (`null` in JSON) for a class with no test image.
    pub accuracy: f64,
}

impl Evaluation {
    /// Each class's accuracy, from the confusion matrix, named by `class_names`.
    pub fn per_class(&self, class_names: &[String]) -> Vec<ClassAccuracy> {
        let classes = self.confusion.iter().enumerate();
        classes
            .map(|(class, row)| {
                let images: i64 = row.iter().sum();
                let accuracy = if images > 0 { row[class] as f64 / images as f64 } else { f64::NAN };
                ClassAccuracy { class, name: class_names[class].clone(), images, accuracy }
            })
            .collect()
    }
}

/// An evaluation's sums on the device, kept like [`TrainSums`].
pub(super) struct EvalSums {
    loss: Tensor,
    /// `confusion[true * classes + predicted]` counts.
    confusion: Tensor,
    classes: i64,
    last_loss: Tensor,
    /// For a test set kept in host memory, the device buffers its batches are copied into: kept with
    /// the sums from epoch to epoch, so that a recorded evaluation step finds them in place.
    staging: Option<Staging>,
}

impl EvalSums {
    pub(super) fn new(device: Device, classes: i64) -> EvalSums {
        EvalSums {
            loss: Tensor::zeros([], (Kind::Double, device)),
            confusion: Tensor::zeros([classes * classes], (Kind::Int64, device)),
            classes,
            last_loss: Tensor::zeros([], (Kind::Float, device)),
            staging: None,
        }
    }

    pub(super) fn zero(&mut self) {
        for t in [&mut self.loss, &mut self.confusion, &mut self.last_loss] {
            let _ = t.zero_();
        }
    }

    /// Adds one batch (reads nothing back: `index_add_`, unlike `bincount`, needs no device value).
    fn add(&mut self, logits: &Tensor, ys: &Tensor) {
        let loss = logits.cross_entropy_for_logits(ys);
        self.loss += loss.to_kind(Kind::Double) * ys.size()[0] as f64;
        let cells = ys * self.classes + logits.argmax(-1, false);
        let _ = self.confusion.index_add_(0, &cells, &Tensor::ones_like(&cells));
        self.last_loss.copy_(&loss);
    }

    /// Adds every rank's sums into each rank's (the last batch loss stays this rank's).
    fn sum_over(&self, group: &Group) -> Result<()> {
        group.sum(&[&self.loss, &self.confusion], "summing the evaluation over the ranks")
    }

    /// Reads the sums back: loss, accuracy, last batch loss and confusion matrix over `n` images.
    fn read(&self, n: usize, ms_per_step: f64) -> Result<Evaluation> {
        let classes = self.classes as usize;
        let flat = Vec::<i64>::try_from(self.confusion.to_device(Device::Cpu))?;
        let confusion: Vec<Vec<i64>> = flat.chunks(classes).map(<[i64]>::to_vec).collect();
        let correct: i64 = (0..classes).map(|c| confusion[c][c]).sum();
        Ok(Evaluation {
            loss: self.loss.double_value(&[]) / n as f64,
            accuracy: correct as f64 / n as f64,
            last_batch_loss: self.last_loss.double_value(&[]),
            ms_per_step,
            confusion,
        })
    }
}

/// Logits of the images at `index` with BatchNorm in eval mode (call under `no_grad`, and with
/// the model's BatchNorms folded for speed).
pub fn eval_logits(model: &Backbone, images: &Tensor, index: &Tensor, recipe: &Recipe, precision: Precision) -> Tensor {
    let xs = model_input(model, images, index, recipe, None);
    amp::autocast(images.device(), precision, || model.forward_t(&xs, false)).to_kind(Kind::Float)
}

/// A model set up for evaluation: its BatchNorms folded into the convolutions for eager steps, or
/// its recorded CUDA graphs replayed (a graph keeps the unfolded layers, whose tensors stay in place
/// from epoch to epoch, where a fold makes new ones).
pub struct Evaluator<'a> {
    model: &'a Backbone,
    precision: Precision,
    graphs: Option<&'a mut StepGraphs>,
    sums: &'a mut EvalSums,
    _folded: Option<FoldedBatchNorm<'a>>,
    /// Whether the images are kept in host memory, to be staged batch by batch.
    on_host: bool,
    /// In a data-parallel run: this rank evaluates its share of the images, the sums are added.
    group: Option<&'a Group>,
}

impl<'a> Evaluator<'a> {
    pub(super) fn new(
        model: &'a Backbone,
        precision: Precision,
        graphs: Option<&'a mut StepGraphs>,
        sums: &'a mut EvalSums,
        fold: bool,
    ) -> Evaluator<'a> {
        let folded = fold.then(|| model.fold_batch_norm());
        Evaluator { model, precision, graphs, sums, _folded: folded, on_host: false, group: None }
    }

    /// In a data-parallel run: this rank's share of the images ([`distributed::eval_shard`]), the
    /// sums added over the ranks.
    pub(super) fn sharded(mut self, group: Option<&'a Group>) -> Evaluator<'a> {
        self.group = group;
        self
    }

    /// For images kept in host memory (`Dataset::images_on_host`): each batch staged on the device.
    pub fn staged(mut self, on_host: bool) -> Evaluator<'a> {
        self.on_host = on_host;
        self
    }

    /// One batch into the sums: replayed when steps are recorded and the batch is full.
    pub fn batch(&mut self, images: &Tensor, labels: &Tensor, index: &Tensor, recipe: &Recipe) -> Result<()> {
        let _guard = tch::no_grad_guard();
        let (model, precision, sums) = (self.model, self.precision, &mut *self.sums);
        let mut step = |index: &Tensor| {
            sums.add(&eval_logits(model, images, index, recipe, precision), &labels.index_select(0, index))
        };
        let full = index.size()[0] == recipe.batch_size as i64;
        match self.graphs.as_deref_mut() {
            Some(StepGraphs { eval: Some(eval), pool, .. }) if full => eval.run(index, pool, |index| {
                step(index);
                Ok(())
            }),
            _ => {
                partial_batch(images.device(), full, || step(index));
                Ok(())
            }
        }
    }

    /// All of `images`, in batches: the evaluation and the warm-up time of its first batches.
    pub fn run(mut self, images: &Tensor, labels: &Tensor, recipe: &Recipe) -> Result<(Evaluation, f64)> {
        let device = labels.device();
        let n = labels.size()[0] as usize;
        // This process's images: all, or its rank's share.
        let mine = self.group.map(|g| Tensor::from_slice(&distributed::eval_shard(n, g.rank(), g.world_size())));
        let count = mine.as_ref().map_or(n, |m| m.size()[0] as usize);
        let mine_on_device = mine.as_ref().map(|m| m.to_device(device));
        let bounds = batch_bounds(count, recipe.batch_size, false);
        self.sums.zero();
        let started = Instant::now();
        let mut head_seconds = 0.0;
        // The indices of the batch at (start, len): into this rank's share, or into the whole split.
        let range = |on: Device, shard: Option<&Tensor>, (start, len): (i64, i64)| match shard {
            Some(shard) => shard.narrow(0, start, len),
            None => Tensor::arange_start(start, start + len, (Kind::Int64, on)),
        };
        for (step, &(start, len)) in bounds.iter().enumerate() {
            let [batch_images, batch_labels, index] = staging::step_input(
                &mut self.sums.staging,
                self.on_host,
                (images, labels),
                range(device, mine_on_device.as_ref(), (start, len)),
                || range(Device::Cpu, mine.as_ref(), (start, len)),
                recipe.batch_size as i64,
            )?;
            self.batch(&batch_images, &batch_labels, &index, recipe)?;
            if let Some(&next) = bounds.get(step + 1) {
                staging::prefetch(&mut self.sums.staging, images, || range(Device::Cpu, mine.as_ref(), next))?;
            }
            if step + 1 == HEAD_STEPS {
                synchronize(device);
                head_seconds = started.elapsed().as_secs_f64();
            }
        }
        synchronize(device);
        let seconds = started.elapsed().as_secs_f64();
        if let Some(group) = self.group {
            self.sums.sum_over(group)?;
        }
        let evaluation = self.sums.read(n, seconds * 1e3 / bounds.len().max(1) as f64)?;
        Ok((evaluation, warmup_seconds(head_seconds, HEAD_STEPS, seconds, bounds.len())))
    }
}

/// Test loss, accuracy and confusion matrix over all of `data`'s test split (BatchNorm in eval
/// mode), eagerly.
pub fn evaluate(model: &Backbone, data: &Dataset, recipe: &Recipe, precision: Precision) -> Result<Evaluation> {
    let mut sums = EvalSums::new(data.test_labels.device(), model.classes);
    let evaluator = Evaluator::new(model, precision, None, &mut sums, true).staged(data.images_on_host);
    Ok(evaluator.run(&data.test_images, &data.test_labels, recipe)?.0)
}
