//! Training and evaluation of one backbone with the tutorial's recipe.
//!
//! Loss and accuracy are accumulated on the device and read back only when the progress display is
//! refreshed (at most twice a second) and at the end of an epoch, so a GPU is never stalled per step.

use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

use crate::amp::{self, Precision};
use crate::data::{self, Cifar};
use crate::models::Backbone;
use crate::optim::{Adam, AdamConfig, LossScaler};
use crate::transform::{self, Normalize};

/// Set by the Ctrl-C handler; training stops before the next step.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// The error of a run stopped by Ctrl-C.
#[derive(Debug)]
pub struct Interrupted;

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "interrupted")
    }
}

impl std::error::Error for Interrupted {}

/// Makes Ctrl-C stop training at the next step (the epoch in progress is dropped, the last
/// checkpoint kept); a second Ctrl-C quits at once.
pub fn stop_on_ctrl_c() {
    // Only one handler per process: a second call (several runs in one process) keeps the first.
    let _ = ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: stopping before the next step (Ctrl-C again quits at once)");
    });
}

/// Everything that decides what a training run computes (timings aside).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    pub epochs: usize,
    pub batch_size: usize,
    pub adam: AdamConfig,
    pub image_size: i64,
    pub normalize: Normalize,
    pub seed: u64,
    /// Mixed precision on CUDA: bf16 autocast where supported, else fp16 with dynamic loss scaling
    /// (no effect on the CPU); see [`crate::amp`].
    #[serde(default)]
    pub amp: bool,
    /// Memory layout of weights and activations.
    #[serde(default)]
    pub memory_format: MemoryFormat,
}

/// Memory layout of weights and activations. The layout changes how libtorch's kernels round, not
/// what is computed; `auto` is a fixed rule, so that runs reproduce one another.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryFormat {
    /// Channels-last when every feature map of the model is at least 4 px at the run's input size,
    /// NCHW otherwise: on this project's CPU, channels-last is 10-20% faster on such maps and slower
    /// on the 1x1 and 2x2 maps of DarkNet53 at 32 px.
    #[default]
    Auto,
    /// NCHW, libtorch's default.
    Contiguous,
    /// NHWC.
    ChannelsLast,
}

impl MemoryFormat {
    /// Smallest feature map for which `auto` picks channels-last.
    pub const CHANNELS_LAST_MIN_MAP: i64 = 4;

    /// Whether a model runs channels-last; `smallest_map` gives its [`Summary::smallest_map`] at the
    /// run's input size, and is asked only by `auto`.
    ///
    /// [`Summary::smallest_map`]: crate::models::Summary::smallest_map
    pub fn channels_last(self, smallest_map: impl FnOnce() -> i64) -> bool {
        match self {
            MemoryFormat::Contiguous => false,
            MemoryFormat::ChannelsLast => true,
            MemoryFormat::Auto => smallest_map() >= Self::CHANNELS_LAST_MIN_MAP,
        }
    }

    pub fn label(channels_last: bool) -> &'static str {
        if channels_last {
            "channels-last"
        } else {
            "contiguous"
        }
    }
}

impl Recipe {
    /// The input of `model` for the images at `index`: the tutorial's transform, in the model's layout.
    fn input(&self, model: &Backbone, images: &Tensor, index: &Tensor) -> Tensor {
        let xs = transform::batch(images, index, self.image_size, self.normalize);
        if model.is_channels_last() {
            transform::to_channels_last(&xs)
        } else {
            xs
        }
    }

    /// The precision forward passes run in on `device`.
    pub fn precision(&self, device: Device) -> Precision {
        Precision::for_run(self.amp, device)
    }
}

/// One row of `<model>.csv`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    /// Mean training loss over the epoch.
    pub train_loss: f64,
    /// Running accuracy over the epoch's batches, as the tutorial's log reports it.
    pub train_acc: f64,
    /// Mean loss over the whole test set.
    pub eval_loss: f64,
    pub eval_acc: f64,
    pub train_ms_per_step: f64,
    pub eval_ms_per_step: f64,
    pub epoch_seconds: f64,
    pub train_images_per_s: f64,
    /// The epoch's last training batch loss (what the tutorial's log prints as `loss`).
    pub last_train_loss: f64,
    /// The last test batch's loss (what the tutorial's eval log prints as `loss`).
    pub last_eval_loss: f64,
}

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

/// Where progress goes: a bar per epoch on a terminal, one plain line per epoch otherwise.
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    pub terminal: bool,
}

impl Progress {
    pub fn detect() -> Progress {
        Progress { terminal: std::io::stderr().is_terminal() }
    }

    fn bar(&self, steps: usize, prefix: String) -> ProgressBar {
        if !self.terminal {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(steps as u64);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:28}] {pos}/{len} {msg} ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(prefix);
        bar
    }

    pub fn line(&self, bar: &ProgressBar, text: String) {
        if self.terminal {
            bar.println(text);
        } else {
            eprintln!("{text}");
        }
    }
}

/// Time spent in each phase of train steps (summed over the steps measured).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PhaseTimes {
    /// Gather, resize and normalise the batch.
    pub transform_ms: f64,
    /// Forward pass and loss.
    pub forward_ms: f64,
    pub backward_ms: f64,
    /// Adam update.
    pub optimizer_ms: f64,
}

/// Adds the time since the previous lap to one field of `times`, when there is one.
struct PhaseClock<'a> {
    times: Option<&'a mut PhaseTimes>,
    device: Device,
    last: Instant,
}

impl PhaseClock<'_> {
    fn lap(&mut self, field: fn(&mut PhaseTimes) -> &mut f64) {
        if let Some(times) = self.times.as_deref_mut() {
            crate::environment::synchronize(self.device);
            let now = Instant::now();
            *field(times) += (now - self.last).as_secs_f64() * 1e3;
            self.last = now;
        }
    }
}

/// A model, its optimizer and the metrics so far: what a checkpoint holds.
pub struct Trainer {
    pub name: String,
    pub vs: nn::VarStore,
    pub model: Backbone,
    pub adam: Adam,
    /// The precision of forward passes (`--amp`).
    precision: Precision,
    /// Present when training in fp16.
    pub scaler: Option<LossScaler>,
    pub history: Vec<EpochMetrics>,
}

impl Trainer {
    /// A freshly initialised model (seeded by the recipe) with its optimizer.
    pub fn new(name: &str, classes: i64, recipe: &Recipe, device: Device) -> Result<Trainer> {
        let info = crate::models::model_info(name)?;
        info.check_image_size(recipe.image_size)?;
        // Before seeding: `auto` describes a throwaway model, which draws random numbers.
        let channels_last = recipe
            .memory_format
            .channels_last(|| crate::models::summary(info, classes, recipe.image_size).smallest_map);
        tch::manual_seed(recipe.seed as i64);
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
        if device.is_cuda() {
            // Input shapes are fixed: let cuDNN pick the fastest algorithms once.
            tch::Cuda::cudnn_set_benchmark(true);
        }
        let adam = Adam::for_var_store(&vs, recipe.adam);
        let mut trainer = Trainer {
            name: name.to_string(),
            vs,
            model,
            adam,
            precision: Precision::Fp32,
            scaler: None,
            history: Vec::new(),
        };
        trainer.set_precision(recipe.precision(device));
        Ok(trainer)
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Trains in `precision` from the next step: [`Recipe::precision`] sets it; tests set bf16
    /// or fp16 on the CPU to exercise mixed precision without a GPU. fp16 brings a fresh loss scaler.
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
        self.scaler = precision.needs_loss_scaling().then(LossScaler::new);
    }

    /// One optimisation step on the images at `index` (transform, forward, backward, Adam).
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
        let xs = recipe.input(&self.model, images, index);
        let ys = labels.index_select(0, index);
        clock.lap(|t| &mut t.transform_ms);
        let (logits, loss) = amp::autocast(device, self.precision, || {
            let logits = self.model.forward_t(&xs, true);
            let loss = logits.cross_entropy_for_logits(&ys);
            (logits, loss)
        });
        clock.lap(|t| &mut t.forward_ms);
        let grads = match &self.scaler {
            Some(scaler) => self.adam.gradients(&(&loss * scaler.scale())),
            None => self.adam.gradients(&loss),
        };
        clock.lap(|t| &mut t.backward_ms);
        // In fp16, a step whose gradients overflowed is skipped (and the loss scale lowered).
        if self.scaler.as_mut().is_none_or(|scaler| scaler.unscale(&grads)) {
            self.adam.step(&grads);
        }
        clock.lap(|t| &mut t.optimizer_ms);
        (loss.detach(), logits.detach().to_kind(Kind::Float), ys)
    }

    /// Trains one epoch (number `history.len() + 1`) and evaluates on the test split.
    /// `first_steps` is called once, with the mean ms/step of the first epoch's first few steps;
    /// a line it returns is shown above the progress bar.
    pub fn run_epoch(
        &mut self,
        data: &Cifar,
        recipe: &Recipe,
        progress: Progress,
        first_steps: &mut dyn FnMut(f64) -> Option<String>,
    ) -> Result<EpochMetrics> {
        let epoch = self.history.len() + 1;
        let device = self.vs.device();
        let started = Instant::now();
        let order = data::epoch_permutation(data.train_len(), recipe.seed, epoch);
        let order = Tensor::from_slice(&order).to_device(device);
        let bounds = batch_bounds(data.train_len(), recipe.batch_size, true);
        let bar = progress.bar(bounds.len(), format!("{} {epoch}/{}", self.name, recipe.epochs));

        let stats = || Tensor::zeros([], (Kind::Double, device));
        let (mut loss_sum, mut correct, mut seen) = (stats(), stats(), 0i64);
        let mut last_loss = Tensor::zeros([], (Kind::Float, device));
        let mut last_refresh = Instant::now();
        // The first step includes one-off allocations; the next few time the run.
        const TIMED_STEPS: usize = 3;
        let mut timed_from = started;
        for (step, &(start, len)) in bounds.iter().enumerate() {
            if INTERRUPTED.load(Ordering::SeqCst) {
                bar.abandon();
                return Err(Interrupted.into());
            }
            if step == 1 {
                timed_from = Instant::now();
            }
            let index = order.narrow(0, start, len);
            let (loss, logits, ys) = self.train_step(&data.train_images, &data.train_labels, &index, recipe, None);
            tch::no_grad(|| {
                loss_sum += loss.to_kind(Kind::Double) * len as f64;
                correct += logits.argmax(-1, false).eq_tensor(&ys).sum(Kind::Double);
            });
            last_loss = loss;
            seen += len;
            if step == TIMED_STEPS && epoch == 1 {
                last_loss.double_value(&[]); // waits for the device
                if let Some(line) = first_steps(timed_from.elapsed().as_secs_f64() * 1e3 / TIMED_STEPS as f64) {
                    progress.line(&bar, line);
                }
            }
            let last = step + 1 == bounds.len();
            // Reading the loss waits for the device: at most twice a second on a terminal, and every
            // CHECK_EVERY steps anyway so that a diverged run stops early.
            const CHECK_EVERY: usize = 50;
            let refresh = progress.terminal && last_refresh.elapsed() > Duration::from_millis(500);
            if last || refresh || (step + 1) % CHECK_EVERY == 0 {
                let loss_now = last_loss.double_value(&[]);
                if !loss_now.is_finite() {
                    bar.abandon();
                    bail!(
                        "{}: the training loss became {loss_now} in epoch {epoch} (step {}); \
                         training stopped (try a lower --lr)",
                        self.name,
                        step + 1
                    );
                }
                let elapsed = started.elapsed().as_secs_f64();
                bar.set_position(step as u64 + 1);
                bar.set_message(format!(
                    "loss {loss_now:.4} acc {:.4} {:.0} ms/step",
                    correct.double_value(&[]) / seen as f64,
                    elapsed * 1e3 / (step + 1) as f64
                ));
                last_refresh = Instant::now();
            }
        }
        let train_seconds = started.elapsed().as_secs_f64();
        let train_loss = loss_sum.double_value(&[]) / seen as f64;
        let train_acc = correct.double_value(&[]) / seen as f64;
        bar.finish_and_clear();

        let eval = evaluate(&self.model, &data.test_images, &data.test_labels, recipe, device)?;
        let metrics = EpochMetrics {
            epoch,
            train_loss,
            train_acc,
            eval_loss: eval.loss,
            eval_acc: eval.accuracy,
            train_ms_per_step: train_seconds * 1e3 / bounds.len() as f64,
            eval_ms_per_step: eval.ms_per_step,
            epoch_seconds: started.elapsed().as_secs_f64(),
            train_images_per_s: seen as f64 / train_seconds,
            last_train_loss: last_loss.double_value(&[]),
            last_eval_loss: eval.last_batch_loss,
        };
        if !metrics.eval_loss.is_finite() {
            bail!("{}: the evaluation loss is {} after epoch {epoch}; training stopped", self.name, metrics.eval_loss);
        }
        progress.line(
            &bar,
            format!(
                "{} epoch {epoch}/{}: train loss {:.4} acc {:.4} | eval loss {:.4} acc {:.4} | \
                 {:.0} ms/step train, {:.0} ms/step eval, {:.1} s",
                self.name,
                recipe.epochs,
                metrics.train_loss,
                metrics.train_acc,
                metrics.eval_loss,
                metrics.eval_acc,
                metrics.train_ms_per_step,
                metrics.eval_ms_per_step,
                metrics.epoch_seconds
            ),
        );
        self.history.push(metrics.clone());
        Ok(metrics)
    }
}

/// Logits of the images at `index` with BatchNorm in eval mode (call under `no_grad`, and with
/// the model's BatchNorms folded for speed).
pub fn eval_logits(model: &Backbone, images: &Tensor, index: &Tensor, recipe: &Recipe) -> Tensor {
    let xs = recipe.input(model, images, index);
    let device = images.device();
    amp::autocast(device, recipe.precision(device), || model.forward_t(&xs, false)).to_kind(Kind::Float)
}

/// Test loss, accuracy and confusion matrix over all of `images` (BatchNorm in eval mode).
pub fn evaluate(
    model: &Backbone,
    images: &Tensor,
    labels: &Tensor,
    recipe: &Recipe,
    device: Device,
) -> Result<Evaluation> {
    let _guard = tch::no_grad_guard();
    let _folded = model.fold_batch_norm();
    let n = labels.size()[0] as usize;
    let classes = data::CLASSES;
    let started = Instant::now();
    let bounds = batch_bounds(n, recipe.batch_size, false);
    let mut loss_sum = Tensor::zeros([], (Kind::Double, device));
    let mut confusion = Tensor::zeros([classes * classes], (Kind::Int64, device));
    let mut last_loss = Tensor::zeros([], (Kind::Float, device));
    for &(start, len) in &bounds {
        let index = Tensor::arange_start(start, start + len, (Kind::Int64, device));
        let ys = labels.index_select(0, &index);
        let logits = eval_logits(model, images, &index, recipe);
        last_loss = logits.cross_entropy_for_logits(&ys);
        loss_sum += last_loss.to_kind(Kind::Double) * len as f64;
        let cells = &ys * classes + logits.argmax(-1, false);
        confusion += cells.bincount::<Tensor>(None, classes * classes);
    }
    let loss = loss_sum.double_value(&[]) / n as f64;
    let ms_per_step = started.elapsed().as_secs_f64() * 1e3 / bounds.len() as f64;
    let flat = Vec::<i64>::try_from(confusion.to_device(Device::Cpu))?;
    let confusion: Vec<Vec<i64>> = flat.chunks(classes as usize).map(<[i64]>::to_vec).collect();
    let correct: i64 = (0..classes as usize).map(|c| confusion[c][c]).sum();
    Ok(Evaluation {
        loss,
        accuracy: correct as f64 / n as f64,
        last_batch_loss: last_loss.double_value(&[]),
        ms_per_step,
        confusion,
    })
}

#[cfg(test)]
mod tests {
    use super::batch_bounds;

    #[test]
    fn batches_cover_everything_once_and_never_leave_a_single_image_to_train_on() {
        assert_eq!(batch_bounds(130, 64, true), vec![(0, 64), (64, 64), (128, 2)]);
        assert_eq!(batch_bounds(129, 64, true), vec![(0, 64), (64, 64)]);
        assert_eq!(batch_bounds(129, 64, false), vec![(0, 64), (64, 64), (128, 1)]);
        assert_eq!(batch_bounds(50_000, 64, true).len(), 782);
        assert_eq!(batch_bounds(10_000, 64, false).len(), 157);
    }
}
