//! Training and evaluation of one backbone with the tutorial's recipe.
//!
//! Loss and accuracy are accumulated on the device and read back only when the progress display is
//! refreshed (at most twice a second) and at the end of an epoch, so a GPU is never stalled per step.
//! On CUDA, full batches replay a recorded CUDA graph of the whole step ([`crate::train::cuda_graph`]).

pub mod amp;
pub mod checkpoint;
pub mod cuda_graph;
pub mod distributed;
pub mod ema;
mod evaluate;
mod interrupt;
pub mod metrics;
pub mod objective;
pub mod optim;
mod progress;
pub mod schedule;
mod staging;
mod timing;

pub use evaluate::{eval_logits, evaluate, ClassAccuracy, Evaluation, Evaluator};
pub use interrupt::{stop_on_signals, stop_requested, Interrupted};
pub use progress::Progress;
pub use staging::place;
pub use timing::{warmup_seconds, PhaseTimes};

use evaluate::EvalSums;
use progress::Watch;
use timing::{PhaseClock, HEAD_STEPS};

use anyhow::{bail, Result};
use indicatif::ProgressBar;
use std::rc::Rc;
use std::time::Instant;
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

use crate::config::{CudaGraphs, DatasetName, Execution, Precision, Recipe};
use crate::data::transform;
use crate::data::{self, Dataset};
use crate::environment::synchronize;
use crate::models::sync_bn::SyncBatchNorm;
use crate::models::Backbone;
use crate::train::metrics::EpochMetrics;
use crate::train::optim::{LossScaler, Optimizer};
use checkpoint::EpochProgress;
use cuda_graph::{GraphPlan, MemoryPoolSlot, Replayer};
use distributed::{AllreduceStats, GradientAverager, Group};
use ema::Ema;
use schedule::LrTable;
use staging::Staging;

/// The input of `model` for the images at `index`: the recipe's transform, in the model's layout;
/// with `--aug` when training, given the batch's number on the device (`augment_counter`), with
/// `--eval-crop-pct`'s resize and centre crop when evaluating (`None`).
fn model_input(
    model: &Backbone,
    images: &Tensor,
    index: &Tensor,
    recipe: &Recipe,
    augment_counter: Option<&Tensor>,
) -> Tensor {
    let (size, normalize) = (recipe.image_size, recipe.normalize);
    let xs = match augment_counter {
        Some(counter) if !recipe.augment.is_none() => {
            transform::augmented_batch(images, index, size, normalize, recipe.augment, recipe.seed, counter)
        }
        None => match recipe.eval_crop_pct {
            Some(pct) => transform::center_crop_batch(images, index, size, normalize, pct),
            None => transform::batch(images, index, size, normalize),
        },
        Some(_) => transform::batch(images, index, size, normalize),
    };
    if model.is_channels_last() {
        transform::to_channels_last(&xs)
    } else {
        xs
    }
}

/// Batches of `batch_size` over `0..n`, the last one partial; a trailing batch of one image is
/// dropped when training, since BatchNorm cannot take train-mode statistics over a single value.
fn batch_bounds(n: usize, batch_size: usize, training: bool) -> Vec<(i64, i64)> {
    let mut bounds: Vec<(i64, i64)> =
        (0..n).step_by(batch_size).map(|s| (s as i64, (batch_size.min(n - s)) as i64)).collect();
    if training && n > 1 && bounds.last().is_some_and(|&(_, len)| len == 1) {
        bounds.pop();
    }
    bounds
}

/// An epoch's training sums, on the device: kept from epoch to epoch (zeroed in place), so that a
/// recorded step adds into the same tensors every time it is replayed.
struct TrainSums {
    /// Sum of batch loss times batch size.
    loss: Tensor,
    correct: Tensor,
    last_loss: Tensor,
}

impl TrainSums {
    fn new(device: Device) -> TrainSums {
        let zero = |kind| Tensor::zeros([], (kind, device));
        TrainSums { loss: zero(Kind::Double), correct: zero(Kind::Double), last_loss: zero(Kind::Float) }
    }

    fn zero(&mut self) {
        for t in [&mut self.loss, &mut self.correct, &mut self.last_loss] {
            let _ = t.zero_();
        }
    }

    /// Adds one batch (under no_grad; reads nothing back).
    fn add(&mut self, loss: &Tensor, logits: &Tensor, ys: &Tensor) {
        let _guard = tch::no_grad_guard();
        self.loss += loss.to_kind(Kind::Double) * ys.size()[0] as f64;
        self.correct += logits.argmax(-1, false).eq_tensor(ys).sum(Kind::Double);
        self.last_loss.copy_(loss);
    }
}

/// The recorded steps of a trainer that replays CUDA graphs: full training batches and full
/// evaluation batches, sharing one memory pool (they never run at the same time). In a
/// data-parallel run evaluation steps run eagerly: a failed capture of one would turn graphs off
/// on its rank alone, and every rank's training steps must stay alike.
pub struct StepGraphs {
    train: Replayer,
    eval: Option<Replayer>,
    pool: MemoryPoolSlot,
}

impl StepGraphs {
    /// Why steps run eagerly after a failure, if one happened.
    fn off_reason(&self) -> Option<String> {
        self.train.off_reason().or_else(|| self.eval.as_ref().and_then(Replayer::off_reason))
    }

    /// Whether full evaluation batches replay a recorded step.
    fn eval_replays(&self) -> bool {
        self.eval.is_some() && self.off_reason().is_none()
    }
}

/// Whether a trainer's full batches replay CUDA graphs (`--cuda-graphs`), and if not, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GraphStatus {
    pub replayed: bool,
    pub off_reason: Option<String>,
}

/// What an epoch's training measured.
struct TrainedEpoch {
    /// Mean batch loss, weighted by batch size.
    loss: f64,
    accuracy: f64,
    last_loss: f64,
    steps: usize,
    images: i64,
    seconds: f64,
    warmup_seconds: f64,
    /// The rate of the epoch's first step, when a schedule moves it.
    lr: Option<f64>,
}

/// A model, its optimizer and the metrics so far: what a checkpoint holds.
pub struct Trainer {
    pub name: String,
    pub vs: nn::VarStore,
    pub model: Backbone,
    pub optimizer: Optimizer,
    /// `--ema`: the averaged weights, updated after every step.
    pub ema: Option<Ema>,
    /// The precision of forward passes (`--amp`).
    precision: Precision,
    /// Present when training in fp16.
    pub scaler: Option<LossScaler>,
    pub history: Vec<EpochMetrics>,
    /// Present when full batches replay CUDA graphs (`--cuda-graphs`).
    graphs: Option<StepGraphs>,
    /// Why they do not, when `graphs` is absent.
    eager_reason: Option<String>,
    /// Where the epoch in progress stands: set when a stop request ended it early (to be saved),
    /// or restored from a checkpoint (to continue from).
    pub epoch_progress: Option<EpochProgress>,
    train_sums: TrainSums,
    eval_sums: EvalSums,
    /// For a set kept in host memory, the device buffers training batches are copied into.
    train_staging: Option<Staging>,
    /// The number of the batch in training, from the run's start: what `--aug` draws from, written
    /// before every step (a recorded step reads it from the device).
    batch_counter: Tensor,
    /// In a data-parallel run: the group and this model's gradient averaging.
    parallel: Option<Parallel>,
}

/// A trainer's part in a data-parallel run.
struct Parallel {
    group: Rc<Group>,
    averager: GradientAverager,
    /// Whether some rank asked to stop (a signal), learnt with the last step's gradients.
    stop: bool,
    /// The failure of the last step's allreduce, for `train_batch` to return.
    error: Option<anyhow::Error>,
    /// `--sync-bn`: the model's BatchNorms' group statistics.
    sync_bn: Option<std::sync::Arc<SyncBatchNorm>>,
}

impl Trainer {
    /// A freshly initialised model (seeded by the recipe) with its optimizer, computing as
    /// `execution` says. The recipe's image size must suit the model: settings are checked where
    /// they are made (`run::Settings::check`, the bench arguments, a checkpoint's metadata).
    pub fn new(name: &str, classes: i64, recipe: &Recipe, execution: &Execution, device: Device) -> Result<Trainer> {
        let info = crate::models::model_info(name)?;
        let precision = execution.precision(device);
        let plan = cuda_graph::plan(execution.cuda_graphs, device, precision, None)?;
        let channels_last = execution
            .memory_format
            .channels_last(|| crate::models::summary(info, classes, recipe.image_size).smallest_map);
        tch::manual_seed(recipe.seed as i64);
        let (vs, model) = build_model(info, classes, device, channels_last);
        let ema = recipe.ema.map(|decay| {
            let (ema_vs, ema_model) = build_model(info, classes, device, channels_last);
            Ema::new(decay, ema_vs, ema_model, &vs, classes)
        });
        if device.is_cuda() {
            // Input shapes are fixed: let cuDNN pick the fastest algorithms once.
            tch::Cuda::cudnn_set_benchmark(true);
        }
        let optimizer = Optimizer::for_var_store(&vs, recipe.optimizer);
        let mut trainer = Trainer {
            name: name.to_string(),
            vs,
            model,
            optimizer,
            ema,
            precision: Precision::Fp32,
            scaler: None,
            history: Vec::new(),
            graphs: match &plan {
                GraphPlan::Replay(recorder) => {
                    let fall_back = execution.cuda_graphs == CudaGraphs::Auto;
                    Some(StepGraphs {
                        train: Replayer::new(device, *recorder, fall_back),
                        eval: Some(Replayer::new(device, *recorder, fall_back)),
                        pool: MemoryPoolSlot::default(),
                    })
                }
                GraphPlan::Eager(_) => None,
            },
            eager_reason: match plan {
                GraphPlan::Eager(why) => Some(why),
                GraphPlan::Replay(_) => None,
            },
            train_sums: TrainSums::new(device),
            eval_sums: EvalSums::new(device, classes),
            batch_counter: crate::data::augment::counter(device),
            train_staging: None,
            epoch_progress: None,
            parallel: None,
        };
        trainer.set_precision(precision);
        Ok(trainer)
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The last training batch's loss (reads it from the device).
    pub fn last_train_loss(&self) -> f64 {
        self.train_sums.last_loss.double_value(&[])
    }

    /// The epoch's training sums so far: batch loss times batch size, and correct predictions
    /// (reads them from the device).
    pub fn train_totals(&self) -> (f64, f64) {
        (self.train_sums.loss.double_value(&[]), self.train_sums.correct.double_value(&[]))
    }

    /// Zeroes the training sums in place, as the start of an epoch does.
    pub fn zero_train_totals(&mut self) {
        self.train_sums.zero();
    }

    /// Whether full batches replay CUDA graphs, and if not, why (a failure under `auto` turns
    /// them off).
    pub fn graph_status(&self) -> GraphStatus {
        let off_reason = match &self.graphs {
            Some(graphs) => graphs.off_reason(),
            None => self.eager_reason.clone(),
        };
        GraphStatus { replayed: off_reason.is_none(), off_reason }
    }

    /// Writes the trainer's state to `file` (see [`checkpoint`]): weights, statistics, the optimizer's state,
    /// and `run`'s metadata with the trainer's own progress in it: epochs, steps, loss scale,
    /// history, CUDA graphs and, after a stop inside an epoch, its place there.
    pub fn save_checkpoint(&self, file: &std::path::Path, run: &checkpoint::Meta) -> Result<()> {
        let graphs = self.graph_status();
        let meta = checkpoint::Meta {
            epochs_done: self.history.len(),
            optimizer_steps: self.optimizer.steps(),
            loss_scaler: self.scaler.clone(),
            history: self.history.clone(),
            cuda_graphs: Some(graphs.replayed),
            cuda_graphs_off: graphs.off_reason,
            epoch_progress: self.epoch_progress.clone(),
            ..run.clone()
        };
        checkpoint::save(file, &self.vs, self.ema.as_ref().map(|e| &e.vs), &self.optimizer, &meta)
    }

    /// Continues from the checkpoint in `file`: weights, statistics, the optimizer's state, the metrics so far
    /// and, when training in fp16, the loss scale it had reached. Returns its metadata.
    pub fn restore_checkpoint(&mut self, file: &std::path::Path) -> Result<checkpoint::Meta> {
        let ema = self.ema.as_ref().map(|e| &e.vs);
        let meta = checkpoint::restore(file, &self.name, &self.vs, ema, &mut self.optimizer)?;
        if let (Some(scaler), Some(saved)) = (self.scaler.as_mut(), &meta.loss_scaler) {
            *scaler = saved.clone();
        }
        self.history = meta.history.clone();
        self.epoch_progress = meta.epoch_progress.clone().filter(|p| p.epoch == self.history.len() + 1);
        Ok(meta)
    }

    /// Trains in `precision` from the next step: [`Recipe::precision`] sets it; tests set bf16
    /// or fp16 on the CPU to exercise mixed precision without a GPU. fp16 brings a fresh loss scaler.
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
        self.scaler = precision.needs_loss_scaling().then(LossScaler::new);
    }

    /// Makes this trainer one rank of `group`'s data-parallel run, before its first step (after a
    /// checkpoint is restored: every rank restores the same one): every variable and average
    /// broadcast from rank 0, gradients averaged from the next step. Recorded training steps hold
    /// the allreduce, unless [`distributed::graph_obstacle`] says they cannot; evaluation steps run
    /// eagerly. Other ranks than rank 0 keep none of a resumed epoch's sums: rank 0's checkpoint
    /// holds those of all ranks.
    ///
    /// `sync_bn`: BatchNorm statistics over every rank's images in training (`--sync-bn`).
    pub fn distribute(&mut self, group: Rc<Group>, sync_bn: bool) -> Result<()> {
        let state = self.rank_state(true);
        tch::no_grad(|| group.broadcast_from_first(&state, "broadcasting rank 0's weights"))?;
        if group.rank() != 0 {
            if let Some(p) = self.epoch_progress.as_mut() {
                (p.loss_sum, p.correct, p.images) = (0.0, 0.0, 0);
            }
        }
        let overlap = group.overlaps().then_some(&*group);
        let averager = GradientAverager::new(self.optimizer.params(), group.world_size(), overlap)?;
        match (self.graphs.as_mut(), distributed::graph_obstacle(group.device, group.place.backend, sync_bn)) {
            (Some(_), Some(why)) => {
                self.graphs = None;
                self.eager_reason = Some(why.to_string());
            }
            (Some(graphs), None) => {
                graphs.train.share_with(group.clone());
                graphs.eval = None;
            }
            (None, _) => {}
        }
        let sync_bn = sync_bn.then(|| std::sync::Arc::new(group.sync_batch_norm()));
        self.model.set_sync_batch_norm(sync_bn.clone());
        self.parallel = Some(Parallel { group, averager, stop: false, error: None, sync_bn });
        Ok(())
    }

    /// In a data-parallel run, what the gradient allreduce cost since the last call.
    pub fn take_allreduce_stats(&mut self) -> Option<AllreduceStats> {
        self.parallel.as_mut().map(|p| p.averager.take_stats())
    }

    /// Gives every rank rank 0's BatchNorm statistics (and averages), so that all evaluate, and rank 0
    /// saves, rank 0's model, as DDP's `broadcast_buffers` has it at every forward pass.
    fn share_first_rank_state(&self) -> Result<()> {
        let Some(parallel) = &self.parallel else { return Ok(()) };
        let statistics = self.rank_state(false);
        tch::no_grad(|| parallel.group.broadcast_from_first(&statistics, "broadcasting rank 0's statistics"))
    }

    /// What rank 0 hands the other ranks, in an order every rank shares (by name): the model's
    /// variables (`with_parameters`) or only its buffers, then `--ema`'s average.
    fn rank_state(&self, with_parameters: bool) -> Vec<Tensor> {
        let mut named: Vec<(String, Tensor)> =
            self.vs.variables().into_iter().filter(|(_, t)| with_parameters || !t.requires_grad()).collect();
        named.sort_by(|a, b| a.0.cmp(&b.0));
        let mut state: Vec<Tensor> = named.into_iter().map(|(_, t)| t).collect();
        state.extend(self.ema.iter().flat_map(Ema::variables));
        state
    }

    /// This rank's share of epoch `epoch`'s shuffle of `n` images: all of it in a single-process run.
    fn epoch_order(&self, n: usize, seed: u64, epoch: usize) -> Vec<i64> {
        let order = data::epoch_permutation(n, seed, epoch);
        match &self.parallel {
            Some(p) => distributed::shard(&order, p.group.rank(), p.group.world_size()),
            None => order,
        }
    }

    /// One optimisation step on the images at `index` (transform, forward, backward, gradient
    /// clipping when the recipe asks for it, the optimizer's update).
    /// Returns the loss, the logits and the labels of the batch. With `phases`, the time of each
    /// phase is added to it (waiting for the device after each, so only for measurements).
    pub fn train_step(
        &mut self,
        images: &Tensor,
        labels: &Tensor,
        index: &Tensor,
        recipe: &Recipe,
        phases: Option<&mut PhaseTimes>,
    ) -> (Tensor, Tensor, Tensor) {
        let device = images.device();
        let mut clock = PhaseClock { times: phases, device, last: Instant::now() };
        let xs = model_input(&self.model, images, index, recipe, Some(&self.batch_counter));
        let ys = labels.index_select(0, index);
        clock.lap(|t| &mut t.transform_ms);
        let (logits, loss) = amp::autocast(device, self.precision, || {
            let logits = self.model.forward_t(&xs, true);
            let loss = objective::train_loss(&logits, &ys, recipe.label_smoothing);
            (logits, loss)
        });
        clock.lap(|t| &mut t.forward_ms);
        if let Some(parallel) = self.parallel.as_mut() {
            parallel.averager.begin();
        }
        let grads = match &self.scaler {
            Some(scaler) => self.optimizer.gradients(&(&loss * scaler.scale())),
            None => self.optimizer.gradients(&loss),
        };
        let grads = match (grads, self.parallel.as_mut()) {
            (Ok(grads), _) => grads,
            // Only a backward pass that talks to other ranks (--sync-bn, --dist-overlap) can fail:
            // train_batch reports it.
            (Err(err), Some(parallel)) => {
                parallel.error.get_or_insert(anyhow::anyhow!(
                    "{}",
                    parallel.group.failed_message("the data-parallel backward pass", &err.to_string())
                ));
                return (loss.detach(), logits.detach().to_kind(Kind::Float), ys);
            }
            (Err(err), None) => panic!("the backward pass failed: {err}"),
        };
        if let Some(parallel) = self.parallel.as_mut() {
            if let Some(err) = parallel.sync_bn.as_ref().and_then(|s| s.take_error()) {
                let message = parallel.group.failed_message("the --sync-bn forward pass", &err);
                parallel.error.get_or_insert(anyhow::anyhow!("{message}"));
            }
            if let Err(err) = parallel.averager.average(&parallel.group, self.optimizer.params(), &grads) {
                parallel.error.get_or_insert(err);
            }
        }
        clock.lap(|t| &mut t.backward_ms);
        // In fp16, a step whose gradients overflowed is skipped (and the loss scale lowered).
        if self.scaler.as_mut().is_none_or(|scaler| scaler.unscale(&grads)) {
            if let Some(max_norm) = recipe.clip_grad {
                let _norm = objective::clip_grad_norm(&grads, max_norm);
            }
            self.optimizer.step(&grads);
        }
        // timm updates its average after every iteration, a skipped fp16 step too.
        if let Some(ema) = self.ema.as_mut() {
            ema.update();
        }
        clock.lap(|t| &mut t.optimizer_ms);
        (loss.detach(), logits.detach().to_kind(Kind::Float), ys)
    }

    /// A train step on the images at `index` with its loss and accuracy added to the epoch's sums:
    /// a replay of the recorded step for a full batch when CUDA graphs are on, eager otherwise. In a
    /// data-parallel run this rank's vote to stop goes with it, and every rank's comes back.
    pub fn train_batch(&mut self, images: &Tensor, labels: &Tensor, index: &Tensor, recipe: &Recipe) -> Result<()> {
        let step = |trainer: &mut Trainer, index: &Tensor| {
            let (loss, logits, ys) = trainer.train_step(images, labels, index, recipe, None);
            trainer.train_sums.add(&loss, &logits, &ys);
            trainer.parallel.as_mut().and_then(|p| p.error.take()).map_or(Ok(()), Err)
        };
        if let Some(parallel) = self.parallel.as_mut() {
            parallel.averager.set_vote(stop_requested());
        }
        let full = index.size()[0] == recipe.batch_size as i64;
        match self.graphs.take() {
            Some(mut graphs) if full => {
                let result = graphs.train.run(index, &graphs.pool, |index| step(self, index));
                self.graphs = Some(graphs);
                result?;
            }
            graphs => {
                self.graphs = graphs;
                partial_batch(images.device(), full, || step(self, index))?;
            }
        }
        if let Some(parallel) = self.parallel.as_mut() {
            parallel.stop |= parallel.averager.stop_voted(&parallel.group)?;
        }
        Ok(())
    }

    /// Trains one epoch (number `history.len() + 1`), evaluates on the test split, logs a line and
    /// records the epoch's metrics. `first_steps` is called once, with the mean ms/step of the first
    /// epoch's first few steps; a line it returns is shown above the progress bar.
    pub fn run_epoch(
        &mut self,
        data: &Dataset,
        recipe: &Recipe,
        progress: Progress,
        first_steps: &mut dyn FnMut(f64) -> Option<String>,
    ) -> Result<EpochMetrics> {
        let epoch = self.history.len() + 1;
        let started = Instant::now();
        let steps = batch_bounds(self.epoch_order(data.train_len(), recipe.seed, epoch).len(), recipe.batch_size, true);
        let bar = progress.bar(steps.len(), self.epoch_label(epoch, recipe));
        let trained = self.train_epoch(data, recipe, epoch, &bar, first_steps)?;
        bar.finish_and_clear();
        self.share_first_rank_state()?;
        let on_host = data.images_on_host;
        let group = self.parallel.as_ref().map(|p| p.group.clone());
        let (eval, eval_warmup) = self.evaluator().staged(on_host).sharded(group.as_deref()).run(
            &data.test_images,
            &data.test_labels,
            recipe,
        )?;
        let precision = self.precision;
        let ema_eval = match self.ema.as_mut() {
            Some(ema) => Some(
                ema.evaluator(precision)
                    .staged(on_host)
                    .sharded(group.as_deref())
                    .run(&data.test_images, &data.test_labels, recipe)?
                    .0,
            ),
            None => None,
        };
        let metrics = EpochMetrics {
            epoch,
            train_loss: trained.loss,
            train_acc: trained.accuracy,
            eval_loss: eval.loss,
            eval_acc: eval.accuracy,
            train_ms_per_step: trained.seconds * 1e3 / trained.steps as f64,
            eval_ms_per_step: eval.ms_per_step,
            epoch_seconds: started.elapsed().as_secs_f64(),
            train_images_per_s: trained.images as f64 / trained.seconds,
            last_train_loss: trained.last_loss,
            last_eval_loss: eval.last_batch_loss,
            warmup_seconds: trained.warmup_seconds + eval_warmup,
            lr: trained.lr,
            eval_loss_ema: ema_eval.as_ref().map(|e| e.loss),
            eval_acc_ema: ema_eval.as_ref().map(|e| e.accuracy),
            dataset: (data.info.dataset != DatasetName::Cifar10).then(|| data.info.dataset.label().to_string()),
        };
        if !metrics.eval_loss.is_finite() {
            bail!("{}: the evaluation loss is {} after epoch {epoch}; training stopped", self.name, metrics.eval_loss);
        }
        progress.line(&bar, self.epoch_line(&metrics, recipe));
        self.history.push(metrics.clone());
        Ok(metrics)
    }

    /// `darknet53 2/5`.
    fn epoch_label(&self, epoch: usize, recipe: &Recipe) -> String {
        format!("{} {epoch}/{}", self.name, recipe.epochs)
    }

    /// The log line of a finished epoch.
    fn epoch_line(&self, m: &EpochMetrics, recipe: &Recipe) -> String {
        format!(
            "{} epoch {}/{}: train loss {:.4} acc {:.4} | eval loss {:.4} acc {:.4} | {:.0} ms/step train, {:.0} \
             ms/step eval, {:.1} s",
            self.name,
            m.epoch,
            recipe.epochs,
            m.train_loss,
            m.train_acc,
            m.eval_loss,
            m.eval_acc,
            m.train_ms_per_step,
            m.eval_ms_per_step,
            m.epoch_seconds
        )
    }

    /// The training half of epoch `epoch`: every batch of its shuffle, with the progress shown on
    /// `bar` and the loss checked for divergence on the way.
    fn train_epoch(
        &mut self,
        data: &Dataset,
        recipe: &Recipe,
        epoch: usize,
        bar: &ProgressBar,
        first_steps: &mut dyn FnMut(f64) -> Option<String>,
    ) -> Result<TrainedEpoch> {
        let device = self.vs.device();
        let started = Instant::now();
        let order = Tensor::from_slice(&self.epoch_order(data.train_len(), recipe.seed, epoch));
        let (order_host, order) = (order.shallow_clone(), order.to_device(device));
        let bounds = batch_bounds(order.size()[0] as usize, recipe.batch_size, true);
        let base_lr = recipe.optimizer.lr();
        let rates = recipe.schedule.as_ref().map(|s| LrTable::new(s, base_lr, recipe.epochs, bounds.len()));
        self.zero_train_totals();
        let mut watch = Watch::new(bar);
        let (mut images, mut timed_from, mut head_seconds) = (0i64, started, 0.0);
        // A resumed epoch goes on from where it stopped, with its sums as they were (a restored
        // place is always the next epoch's: see `restore_checkpoint`).
        let first = match self.epoch_progress.take() {
            Some(p) => {
                let _ = self.train_sums.loss.fill_(p.loss_sum);
                let _ = self.train_sums.correct.fill_(p.correct);
                let _ = self.train_sums.last_loss.fill_(p.last_loss);
                images = p.images;
                bar.set_position(p.steps as u64);
                p.steps
            }
            None => 0,
        };
        for (step, &(start, len)) in bounds.iter().enumerate().skip(first) {
            // Every rank of a data-parallel run stops at the same step: the one after any asked to.
            let stop = self.parallel.as_ref().map_or_else(stop_requested, |p| p.stop);
            if stop {
                bar.abandon();
                let images = self.sum_over_ranks(images)?;
                let (loss_sum, correct) = self.train_totals();
                let last_loss = self.last_train_loss();
                self.epoch_progress = Some(EpochProgress { epoch, steps: step, images, loss_sum, correct, last_loss });
                return Err(Interrupted.into());
            }
            if step == 1 {
                timed_from = Instant::now();
            }
            if !recipe.augment.is_none() {
                // Each rank's batch draws its own numbers.
                let (rank, world) = self.parallel.as_ref().map_or((0, 1), |p| (p.group.rank(), p.group.world_size()));
                let _ = self.batch_counter.fill_((((epoch - 1) * bounds.len() + step) * world + rank) as i64);
            }
            if let Some(lr) = rates.as_ref().map(|r| r.lr(epoch, step)) {
                if lr != self.optimizer.config().lr() {
                    self.optimizer.set_lr(lr);
                }
            }
            let [batch_images, batch_labels, index] = staging::step_input(
                &mut self.train_staging,
                data.images_on_host,
                (&data.train_images, &data.train_labels),
                order.narrow(0, start, len),
                || order_host.narrow(0, start, len),
                recipe.batch_size as i64,
            )?;
            self.train_batch(&batch_images, &batch_labels, &index, recipe)?;
            if let Some(&(start, len)) = bounds.get(step + 1) {
                staging::prefetch(&mut self.train_staging, &data.train_images, || order_host.narrow(0, start, len))?;
            }
            images += len;
            if step + 1 == HEAD_STEPS {
                synchronize(device);
                head_seconds = started.elapsed().as_secs_f64();
                // The steps after the first time the run, for the estimate of its length.
                let ms_per_step = timed_from.elapsed().as_secs_f64() * 1e3 / (HEAD_STEPS - 1) as f64;
                if let Some(line) = (epoch == 1).then(|| first_steps(ms_per_step)).flatten() {
                    watch.show(line);
                }
            }
            watch.after_step(step + 1, bounds.len(), images, &self.train_sums).map_err(|loss| {
                bar.abandon();
                anyhow::anyhow!(
                    "{}: the training loss became {loss} in epoch {epoch} (step {}); training stopped (try a \
                     lower --lr)",
                    self.name,
                    step + 1
                )
            })?;
        }
        let seconds = started.elapsed().as_secs_f64();
        let images = self.sum_over_ranks(images)?;
        Ok(TrainedEpoch {
            loss: self.train_sums.loss.double_value(&[]) / images as f64,
            accuracy: self.train_sums.correct.double_value(&[]) / images as f64,
            last_loss: self.train_sums.last_loss.double_value(&[]),
            // The steps this call ran, for the time per step.
            steps: bounds.len() - first,
            images,
            seconds,
            warmup_seconds: warmup_seconds(head_seconds, HEAD_STEPS, seconds, bounds.len()),
            lr: rates.map(|r| r.lr(epoch, 0)),
        })
    }

    /// In a data-parallel run, the training sums and `images` (this rank's count) added over the
    /// ranks, so that the epoch's loss and accuracy are those of all its images; else `images`.
    fn sum_over_ranks(&mut self, images: i64) -> Result<i64> {
        let Some(parallel) = &self.parallel else { return Ok(images) };
        let count = Tensor::from_slice(&[images as f64]).to_device(self.vs.device());
        let sums = [&self.train_sums.loss, &self.train_sums.correct, &count];
        parallel.group.sum(&sums, "summing the epoch's training metrics over the ranks")?;
        Ok(count.double_value(&[0]) as i64)
    }

    /// Evaluates on all of `images` as [`evaluate`] does, replaying a recorded step for full batches
    /// when CUDA graphs are on; also returns the warm-up time of its first batches.
    pub fn evaluate(&mut self, images: &Tensor, labels: &Tensor, recipe: &Recipe) -> Result<(Evaluation, f64)> {
        self.evaluator().run(images, labels, recipe)
    }

    /// The model set up for evaluation as [`Trainer::evaluate`] runs it (`bench` times its batches).
    pub fn evaluator(&mut self) -> Evaluator<'_> {
        // Folded unless full batches replay a graph (after a fallback they run eagerly).
        let fold = !self.graphs.as_ref().is_some_and(StepGraphs::eval_replays);
        self.evaluator_folding(fold)
    }

    /// The model set up for evaluation, with its BatchNorms folded for eager steps or not
    /// (`check-graphs` compares graphs, which keep the layers unfolded, with unfolded eager steps).
    pub fn evaluator_folding(&mut self, fold: bool) -> Evaluator<'_> {
        let Trainer { model, graphs, eval_sums, precision, .. } = self;
        Evaluator::new(model, *precision, graphs.as_mut(), eval_sums, fold)
    }
}

/// A freshly initialised model on `device` (from libtorch's generator as seeded), its 4-d weights
/// channels-last when `channels_last`.
fn build_model(
    info: &'static crate::models::ModelInfo,
    classes: i64,
    device: Device,
    channels_last: bool,
) -> (nn::VarStore, Backbone) {
    let vs = nn::VarStore::new(device);
    let model = crate::models::build(&vs.root(), info, classes);
    if channels_last {
        tch::no_grad(|| {
            for (_, mut var) in vs.variables() {
                if var.dim() == 4 {
                    var.set_data(&transform::to_channels_last(&var));
                }
            }
        });
    }
    (vs, model)
}

/// Runs a step eagerly; one of a partial batch without cuDNN's benchmark mode: a new shape would
/// make cuDNN time every algorithm for a single batch per epoch, at a cost of seconds per model.
fn partial_batch<T>(device: Device, full: bool, step: impl FnOnce() -> T) -> T {
    if full || !device.is_cuda() {
        return step();
    }
    tch::Cuda::cudnn_set_benchmark(false);
    let result = step();
    tch::Cuda::cudnn_set_benchmark(true);
    result
}

#[cfg(test)]
mod tests {
    use super::{batch_bounds, warmup_seconds};

    #[test]
    fn batches_cover_everything_once_and_never_leave_a_single_image_to_train_on() {
        assert_eq!(batch_bounds(130, 64, true), vec![(0, 64), (64, 64), (128, 2)]);
        assert_eq!(batch_bounds(129, 64, true), vec![(0, 64), (64, 64)]);
        assert_eq!(batch_bounds(129, 64, false), vec![(0, 64), (64, 64), (128, 1)]);
        assert_eq!(batch_bounds(50_000, 64, true).len(), 782);
        assert_eq!(batch_bounds(10_000, 64, false).len(), 157);
    }

    #[test]
    fn warmup_is_the_first_steps_time_beyond_the_steady_rate() {
        // 4 of 10 steps took 3.0 s, all 10 took 4.2 s: the other 6 ran at 0.2 s a step, so the
        // first 4 would have taken 0.8 s and 2.2 s was warm-up.
        assert!((warmup_seconds(3.0, 4, 4.2, 10) - 2.2).abs() < 1e-12);
        assert_eq!(warmup_seconds(0.5, 4, 2.0, 10), 0.0, "first steps no slower than the rest");
        assert_eq!(warmup_seconds(3.0, 4, 3.0, 4), 0.0, "no steps after the first four");
    }
}
