//! The configuration a run is made of: presets, the recipe, execution options (memory format, CUDA
//! graphs) and the resolved run that comparison.json and checkpoints record. Types only, with the
//! rules that resolve them; nothing here runs anything.

use anyhow::{anyhow, bail, Result};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use tch::Device;

use crate::files::OutDir;
use crate::native;

/// Named sets of defaults; explicit flags override them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// The tutorial's recipe: full CIFAR-10, 224 px, 5 epochs, batch 64 (needs a GPU).
    Tutorial,
    /// CPU-sized: 32 px, 1500/500-image balanced subsets, 5 epochs (3 to 7.5 minutes for the three models on 2 cores).
    Quick,
    /// CIFAR-10 at 224 px to convergence: 100 epochs of AdamW (lr 1e-3, weight decay 0.05, BN and
    /// biases exempt), 5 of them linear warm-up from 1e-5, then a per-step cosine to 1e-5; crop-flip,
    /// label smoothing 0.1, unit normalisation. Projected from measured step times: about 2.6 h for
    /// the three tutorial models on one H200, weeks on this project's 2-core CPU.
    CifarLong,
    /// Flowers-102 (Paddle's split, 6,149 training images) at 224 px: 200 epochs of cifar-long's AdamW,
    /// warm-up and cosine, rrc-flip, evaluation resized to 256 and centre-cropped (0.875), label
    /// smoothing 0.1. Projected: about 40 min for the three tutorial models on one H200, about a
    /// week on the 2-core CPU.
    Flowers,
}

impl Preset {
    /// The recipe of flags left unset.
    pub fn recipe(self) -> Recipe {
        let converging = Recipe {
            image_size: 224,
            optimizer: OptimizerConfig::Adamw(AdamConfig {
                decay: WeightDecay { weight_decay: 0.05, no_decay_bn_bias: true },
                ..AdamConfig::default()
            }),
            normalize: Normalize::Unit,
            label_smoothing: 0.1,
            schedule: Some(Schedule {
                sched: SchedName::Cosine,
                on: SchedOn::Step,
                warmup_epochs: 5,
                min_lr: 1e-5,
                ..Schedule::default()
            }),
            ..Recipe::tutorial()
        };
        match self {
            Preset::Tutorial => Recipe::tutorial(),
            Preset::Quick => Recipe { image_size: 32, ..Recipe::tutorial() },
            Preset::CifarLong => Recipe { epochs: 100, augment: Augment::CropFlip, ..converging },
            Preset::Flowers => {
                Recipe { epochs: 200, augment: Augment::RrcFlip, eval_crop_pct: Some(0.875), ..converging }
            }
        }
    }

    /// The training and test limits of flags left unset.
    pub fn limits(self) -> (Option<usize>, Option<usize>) {
        match self {
            Preset::Quick => (Some(1500), Some(500)),
            Preset::Tutorial | Preset::CifarLong | Preset::Flowers => (None, None),
        }
    }

    /// The dataset of a `--dataset` left unset.
    pub fn dataset(self) -> DatasetName {
        match self {
            Preset::Flowers => DatasetName::Flowers102,
            Preset::Tutorial | Preset::Quick | Preset::CifarLong => DatasetName::Cifar10,
        }
    }
}

/// A resolved run: what comparison.json records under `config`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    pub preset: Preset,
    pub models: Vec<String>,
    #[serde(flatten)]
    pub recipe: Recipe,
    /// How it computes (`--amp`, `--memory-format`, `--cuda-graphs`), serialised beside the recipe.
    #[serde(flatten)]
    pub execution: Execution,
    pub classes: i64,
    /// `--dataset` and how it is read; absent from comparison.json for CIFAR-10 read as always.
    #[serde(default, skip_serializing_if = "DatasetSpec::is_default")]
    pub dataset: DatasetSpec,
    pub data_dir: PathBuf,
    pub train_limit: Option<usize>,
    pub test_limit: Option<usize>,
    pub device: String,
    pub out: PathBuf,
    /// `--seeds`: every model trained once per seed, each seed's run in `out/seed-<s>/`
    /// ([`RunConfig::for_seed`]); empty for a single run (`recipe.seed`, files in `out`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seeds: Vec<u64>,
    /// Processes of a data-parallel run, each with `recipe.batch_size` images a step (absent when 1).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub world_size: usize,
    /// `--sync-bn`: BatchNorm statistics over every process's images (absent when off).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub sync_bn: bool,
}

fn one() -> usize {
    1
}

fn is_one(n: &usize) -> bool {
    *n == 1
}

impl RunConfig {
    /// The single run of seed `seed` within a multi-seed run.
    pub fn for_seed(&self, seed: u64) -> RunConfig {
        RunConfig {
            recipe: Recipe { seed, ..self.recipe.clone() },
            out: self.out_dir().seed(seed).root().to_path_buf(),
            seeds: Vec::new(),
            ..self.clone()
        }
    }

    /// The run's output folder.
    pub fn out_dir(&self) -> OutDir {
        OutDir::new(&self.out)
    }

    /// Whether this run follows the tutorial's recipe on its full data, so that its numbers can be
    /// set beside the tutorial's.
    pub fn comparable_to_tutorial(&self) -> bool {
        let tutorial = Recipe { seed: self.recipe.seed, ..Recipe::tutorial() };
        self.recipe == tutorial && self.dataset.is_default() && self.train_limit.is_none() && self.test_limit.is_none()
    }
}

/// `--dataset`: which data a run reads from `--data-dir`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DatasetName {
    /// CIFAR-10, binary version (the tutorial's).
    #[default]
    Cifar10,
    /// CIFAR-100, binary version.
    Cifar100,
    /// Oxford Flowers-102 (102flowers.tgz, imagelabels.mat, setid.mat).
    Flowers102,
    /// An image folder: <data-dir>/<split>/<class>/<image files>, as torchvision's ImageFolder.
    Folder,
}

impl DatasetName {
    /// As `--dataset` spells it.
    pub fn label(self) -> &'static str {
        match self {
            DatasetName::Cifar10 => "cifar10",
            DatasetName::Cifar100 => "cifar100",
            DatasetName::Flowers102 => "flowers102",
            DatasetName::Folder => "folder",
        }
    }
}

/// `--cifar100-labels`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Cifar100Labels {
    /// The 100 classes.
    #[default]
    Fine,
    /// The 20 superclasses.
    Coarse,
}

/// `--flowers-split`: whose assignment of Flowers-102's published lists to train / val / test.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FlowersSplit {
    /// Paddle's `Flowers` (the tutorial's framework): train tstid (6,149), val valid, test trnid (1,020).
    #[default]
    Paddle,
    /// torchvision's `Flowers102`: train trnid (1,020), val valid (1,020), test tstid (6,149).
    Torchvision,
}

/// Which data a run reads and how.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DatasetSpec {
    pub name: DatasetName,
    /// The split trained on (`--train-split`, folders and Flowers-102).
    pub train_split: String,
    /// The split evaluated on (`--val-split`); `None`: `val`, else `test` for folders, `test` for Flowers-102.
    pub val_split: Option<String>,
    pub cifar100_labels: Cifar100Labels,
    pub flowers_split: FlowersSplit,
    /// `--skip-bad-images`: leave out files that cannot be decoded (listed) instead of failing.
    pub skip_bad_images: bool,
}

impl Default for DatasetSpec {
    fn default() -> Self {
        DatasetSpec {
            name: DatasetName::Cifar10,
            train_split: "train".into(),
            val_split: None,
            cifar100_labels: Cifar100Labels::Fine,
            flowers_split: FlowersSplit::Paddle,
            skip_bad_images: false,
        }
    }
}

impl DatasetSpec {
    pub fn is_default(&self) -> bool {
        *self == DatasetSpec::default()
    }
}

/// Everything that decides what a training run computes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    pub epochs: usize,
    pub batch_size: usize,
    /// `--opt` with its hyperparameters, serialised under the optimizer's name (`"adam": {...}`).
    #[serde(flatten)]
    pub optimizer: OptimizerConfig,
    pub image_size: i64,
    pub normalize: Normalize,
    pub seed: u64,
    /// `--label-smoothing`: the training loss's targets smoothed by this much (0: none, the tutorial's).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub label_smoothing: f64,
    /// `--clip-grad`: the largest global L2 norm of a step's gradients (`None`: unclipped, the tutorial's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_grad: Option<f64>,
    /// `--sched` and `--warmup-epochs`: how the learning rate moves (`None`: constant, the tutorial's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schedule: Option<Schedule>,
    /// `--aug`: training-time augmentation (none: the tutorial's).
    #[serde(default, skip_serializing_if = "Augment::is_none")]
    pub augment: Augment,
    /// `--eval-crop-pct`: evaluation resizes to `floor(size / P)` and takes the centre `size` crop
    /// (timm's eval transform); `None`: the tutorial's plain resize.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_crop_pct: Option<f64>,
    /// `--ema`: the decay of an exponential moving average of the weights, evaluated beside them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema: Option<f64>,
}

/// `--aug`: what training batches go through before the resize, drawn on the device
/// ([`crate::data::augment`]); evaluation never.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Augment {
    /// The tutorial's: none.
    #[default]
    None,
    /// RandomHorizontalFlip(p=0.5).
    Flip,
    /// CIFAR's RandomCrop(stored size, padding=4) then RandomHorizontalFlip(p=0.5).
    CropFlip,
    /// RandomResizedCrop(size, scale=(0.08, 1), ratio=(3/4, 4/3), bilinear) then
    /// RandomHorizontalFlip(p=0.5), in place of the resize.
    RrcFlip,
}

impl Augment {
    pub fn is_none(&self) -> bool {
        *self == Augment::None
    }
}

/// `--sched`: the learning rate's course after any warm-up, as `torch.optim.lr_scheduler` computes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SchedName {
    /// Constant (after the warm-up, if any).
    None,
    /// CosineAnnealingLR(T_max = the units after warm-up, eta_min = --min-lr).
    Cosine,
    /// StepLR(step_size = --decay-epochs, gamma = --decay-rate), counted from the end of warm-up.
    Step,
    /// MultiStepLR(milestones = --decay-epochs, gamma = --decay-rate), the epochs counted from the start.
    Multistep,
}

/// `--sched-on`: what one unit of the schedule is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SchedOn {
    /// The scheduler steps after every epoch.
    #[default]
    Epoch,
    /// The scheduler steps after every optimizer step (epochs in the settings count as that many steps).
    Step,
}

impl Default for Schedule {
    /// No schedule: a constant rate; the values `--sched` and `--warmup-epochs` fill in when given.
    fn default() -> Self {
        Schedule {
            sched: SchedName::None,
            on: SchedOn::Epoch,
            warmup_epochs: 0,
            warmup_lr: 1e-5,
            min_lr: 0.0,
            decay_epochs: Vec::new(),
            decay_rate: 0.1,
        }
    }
}

/// A learning-rate schedule: `LinearLR(start_factor = warmup_lr / lr, total_iters = warm-up)` for the
/// warm-up, chained to the main scheduler by `SequentialLR(milestones = [warm-up])`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Schedule {
    pub sched: SchedName,
    pub on: SchedOn,
    /// Epochs of linear warm-up (0: none).
    pub warmup_epochs: usize,
    /// The learning rate the warm-up starts from.
    pub warmup_lr: f64,
    /// The floor of the cosine (`eta_min`).
    pub min_lr: f64,
    /// `step`: the period in epochs; `multistep`: the epochs after which the rate drops.
    pub decay_epochs: Vec<usize>,
    pub decay_rate: f64,
}

fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

/// How a run computes, not what: its numbers agree to rounding whatever these are (fp16 aside,
/// whose loss scaling can skip a step).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Execution {
    /// Mixed precision on CUDA: bf16 autocast where supported, else fp16 with dynamic loss scaling
    /// (no effect on the CPU); see [`crate::train::amp`].
    #[serde(default)]
    pub amp: bool,
    /// Memory layout of weights and activations.
    #[serde(default)]
    pub memory_format: MemoryFormat,
    /// Whether CUDA runs replay recorded CUDA graphs (`--cuda-graphs`).
    #[serde(default)]
    pub cuda_graphs: CudaGraphs,
    /// Where the dataset's images are kept (`--data-on`); absent from comparison.json under `auto`.
    #[serde(default, skip_serializing_if = "DataOn::is_auto")]
    pub data_on: DataOn,
}

/// `--data-on`: where the uint8 images live while training. Either way every batch is resized,
/// augmented and normalised on the training device, so the numbers are the same.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DataOn {
    /// On the device when both splits take at most half of its free memory, else in host memory.
    #[default]
    Auto,
    /// Uploaded to the device once (the default for sets that fit).
    Device,
    /// Kept in host memory (a read image cache memory-mapped): each batch is gathered there into a
    /// pinned buffer and copied to the device.
    Host,
}

impl DataOn {
    pub fn is_auto(&self) -> bool {
        *self == DataOn::Auto
    }

    /// The share of the device's free memory a dataset may take under `auto`.
    pub const AUTO_SHARE: f64 = 0.5;

    /// Whether a set of `bytes` is kept in host memory on `device` whose memory is `memory`
    /// (free, total bytes; `None` when unknown, as on the CPU, where host and device are one).
    pub fn on_host(self, bytes: usize, memory: Option<(usize, usize)>) -> bool {
        match self {
            DataOn::Device => false,
            DataOn::Host => true,
            DataOn::Auto => memory.is_some_and(|(free, _)| bytes as f64 > free as f64 * Self::AUTO_SHARE),
        }
    }
}

impl Execution {
    /// The precision forward passes run in on `device`.
    pub fn precision(&self, device: Device) -> Precision {
        Precision::for_run(self.amp, device)
    }
}

/// `--cuda-graphs`: whether full-batch steps are recorded once as CUDA graphs and replayed. The
/// graph runs the same kernels on the same data as the eager step: results agree to float rounding.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CudaGraphs {
    /// On for CUDA runs, except in fp16 (its loss scaler reads the device every step); a capture
    /// that fails is reported and the run continues eagerly. Off on the CPU.
    #[default]
    Auto,
    /// On for CUDA runs; a capture that fails is an error, and so is fp16. Off on the CPU, which
    /// has no graphs.
    On,
    /// Every step runs eagerly.
    Off,
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
    /// The smallest batch a recipe may train on: BatchNorm cannot train on one value per channel.
    pub const MIN_BATCH_SIZE: usize = 2;

    /// The tutorial's recipe: 5 epochs of batch 64 at 224 px, Adam at 1e-3, Normalize(0.5, 0.5) on raw
    /// pixels, seed 0.
    pub fn tutorial() -> Recipe {
        Recipe {
            epochs: 5,
            batch_size: 64,
            optimizer: OptimizerConfig::Adam(AdamConfig::default()),
            image_size: 224,
            normalize: Normalize::Tutorial,
            seed: 0,
            label_smoothing: 0.0,
            clip_grad: None,
            schedule: None,
            augment: Augment::None,
            eval_crop_pct: None,
            ema: None,
        }
    }
}

/// How pixels are scaled after resizing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Normalize {
    /// The tutorial's: Normalize(0.5, 0.5) on raw 0..255 pixels, so inputs span [-1, 509].
    Tutorial,
    /// The usual one: pixels scaled to [0, 1] first, so inputs span [-1, 1].
    Unit,
}

/// `--opt`: which optimizer, with its hyperparameters; each updates as its `torch.optim` namesake.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerConfig {
    /// `torch.optim.Adam`: weight decay is an L2 term added to the gradient (the tutorial's, without).
    Adam(AdamConfig),
    /// `torch.optim.AdamW`: decoupled weight decay, `w -= lr * weight_decay * w` before the update.
    Adamw(AdamConfig),
    /// `torch.optim.SGD` without dampening: `buf = momentum * buf + g`, then `g + momentum * buf`
    /// with `--nesterov`, else `buf`.
    Sgd(SgdConfig),
}

impl OptimizerConfig {
    pub fn lr(&self) -> f64 {
        match self {
            OptimizerConfig::Adam(c) | OptimizerConfig::Adamw(c) => c.lr,
            OptimizerConfig::Sgd(c) => c.lr,
        }
    }

    pub fn set_lr(&mut self, lr: f64) {
        match self {
            OptimizerConfig::Adam(c) | OptimizerConfig::Adamw(c) => c.lr = lr,
            OptimizerConfig::Sgd(c) => c.lr = lr,
        }
    }

    /// The decay and whether BatchNorm weights and biases are exempt from it.
    pub fn weight_decay(&self) -> WeightDecay {
        match self {
            OptimizerConfig::Adam(c) | OptimizerConfig::Adamw(c) => c.decay,
            OptimizerConfig::Sgd(c) => c.decay,
        }
    }

    pub fn kind(&self) -> OptimizerKind {
        match self {
            OptimizerConfig::Adam(_) => OptimizerKind::Adam,
            OptimizerConfig::Adamw(_) => OptimizerKind::Adamw,
            OptimizerConfig::Sgd(_) => OptimizerKind::Sgd,
        }
    }
}

/// `--opt`: which optimizer, without its hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OptimizerKind {
    Adam,
    Adamw,
    Sgd,
}

impl OptimizerKind {
    /// As `--opt` spells it.
    pub fn label(self) -> &'static str {
        match self {
            OptimizerKind::Adam => "adam",
            OptimizerKind::Adamw => "adamw",
            OptimizerKind::Sgd => "sgd",
        }
    }

    /// The optimizer with its defaults: PyTorch's (AdamW's weight decay 0.01), SGD at lr 0.1 with
    /// momentum 0.9 (the usual CIFAR recipe; PyTorch's SGD has no default worth training with).
    pub fn defaults(self) -> OptimizerConfig {
        match self {
            OptimizerKind::Adam => OptimizerConfig::Adam(AdamConfig::default()),
            OptimizerKind::Adamw => OptimizerConfig::Adamw(AdamConfig {
                decay: WeightDecay { weight_decay: 0.01, no_decay_bn_bias: true },
                ..AdamConfig::default()
            }),
            OptimizerKind::Sgd => OptimizerConfig::Sgd(SgdConfig {
                lr: 0.1,
                momentum: 0.9,
                nesterov: false,
                decay: WeightDecay::default(),
            }),
        }
    }
}

/// Adam's and AdamW's hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    #[serde(flatten)]
    pub decay: WeightDecay,
}

impl Default for AdamConfig {
    /// `torch.optim.Adam`'s defaults, at the tutorial's learning rate 1e-3.
    fn default() -> Self {
        AdamConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, decay: WeightDecay::default() }
    }
}

/// SGD's hyperparameters.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub nesterov: bool,
    #[serde(flatten)]
    pub decay: WeightDecay,
}

/// Weight decay, absent from comparison.json when off.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WeightDecay {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub weight_decay: f64,
    /// `--no-decay-bn-bias`: one-dimensional parameters (BatchNorm weights, biases) are not decayed,
    /// as timm's `param_groups_weight_decay` groups them.
    #[serde(default, skip_serializing_if = "is_false")]
    pub no_decay_bn_bias: bool,
}

impl WeightDecay {
    /// The decay the parameter `name` of shape `shape` gets.
    pub fn for_parameter(&self, name: &str, shape: &[i64]) -> f64 {
        let exempt = self.no_decay_bn_bias && (shape.len() <= 1 || name.ends_with(".bias"));
        if exempt {
            0.0
        } else {
            self.weight_decay
        }
    }
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// The precision forward passes run in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    Fp32,
    /// bf16 autocast: fp32's exponent range, so no loss scaling.
    Bf16,
    /// fp16 autocast with dynamic loss scaling.
    Fp16,
}

impl Precision {
    /// What a run on `device` computes in: fp32 unless `amp` on CUDA (CPU runs are unaffected).
    pub fn for_run(amp: bool, device: Device) -> Precision {
        if !(amp && device.is_cuda()) {
            Precision::Fp32
        } else if unsafe { native::csp_tch_cuda_supports_bf16() } != 0 {
            Precision::Bf16
        } else {
            Precision::Fp16
        }
    }

    /// Whether gradients need loss scaling to survive this precision.
    pub fn needs_loss_scaling(self) -> bool {
        self == Precision::Fp16
    }
}

/// `--dist-backend`: what the processes of a data-parallel run talk through (c10d's process groups).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DistBackend {
    /// NCCL on CUDA, Gloo on the CPU (as torch.distributed's default).
    #[default]
    Auto,
    Gloo,
    Nccl,
}

impl DistBackend {
    /// The backend for a rank on CUDA (`cuda`) or the CPU, in a build with NCCL (`nccl_built`) or not.
    pub fn resolve(self, cuda: bool, nccl_built: bool) -> Result<DistBackend> {
        Ok(match self {
            DistBackend::Auto if cuda && nccl_built => DistBackend::Nccl,
            DistBackend::Auto => DistBackend::Gloo,
            DistBackend::Nccl if !cuda => {
                bail!("--dist-backend nccl needs CUDA devices; on the CPU use --dist-backend gloo (or auto)")
            }
            DistBackend::Nccl if !nccl_built => bail!(
                "--dist-backend nccl: this csp-tch was built without NCCL (no nccl.h beside libtorch; run \
                 scripts/setup.sh and build again), use --dist-backend gloo"
            ),
            chosen => chosen,
        })
    }

    pub fn label(self) -> &'static str {
        match self {
            DistBackend::Auto => "auto",
            DistBackend::Gloo => "gloo",
            DistBackend::Nccl => "nccl",
        }
    }
}

/// `--dist-overlap`: whether the gradient allreduce runs during the backward pass (hooks on the
/// parameters launch each bucket's sum once its gradients are in, as DistributedDataParallel does) or
/// after it. On by default, as DDP: over Gloo on 2 CPU cores it measured no slower a step
/// (docs/DISTRIBUTED.md), and over NCCL the sums run on the GPU beside the backward kernels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DistOverlap {
    #[default]
    On,
    Off,
}

/// This process's place in a data-parallel run, from the variables torchrun sets (`--nproc-per-node`
/// sets the same for the workers it starts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataParallel {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// `TORCHELASTIC_USE_AGENT_STORE`: torchrun's agent already hosts the TCPStore on the master port,
    /// so rank 0 joins it as a client, as `torch.distributed`'s env:// rendezvous does.
    pub agent_store: bool,
    /// `TORCHELASTIC_RESTART_COUNT`: which of torchrun's attempts this is (their store keys are apart).
    pub attempt: u32,
    /// As asked for; Gloo or NCCL once resolved for the device (`run::Settings::check`).
    pub backend: DistBackend,
    pub overlap: DistOverlap,
    pub timeout: std::time::Duration,
}

impl DataParallel {
    /// The variables a worker of a data-parallel run is started with (by torchrun or `--nproc-per-node`).
    pub const ENV: [&'static str; 4] = ["RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"];

    /// This process's place from `env` (a lookup of the environment), or `None` when it is not a worker
    /// (no `RANK` or `WORLD_SIZE`): a single-process run. `backend` is resolved once the device is
    /// known ([`DistBackend::resolve`]).
    pub fn from_env(
        env: impl Fn(&str) -> Option<String>,
        backend: DistBackend,
        overlap: DistOverlap,
        timeout_s: f64,
    ) -> Result<Option<DataParallel>> {
        if env("RANK").is_none() && env("WORLD_SIZE").is_none() {
            return Ok(None);
        }
        let var = |name: &str| {
            env(name).ok_or_else(|| {
                anyhow!(
                    "{name} is not set, but RANK or WORLD_SIZE is: a data-parallel worker needs all of {} (as                      torchrun sets them); unset RANK and WORLD_SIZE for a single-process run",
                    Self::ENV.join(", ")
                )
            })
        };
        fn number<T: std::str::FromStr>(name: &str, value: String) -> Result<T> {
            value.trim().parse().map_err(|_| anyhow!("{name}={value:?} is not a non-negative whole number"))
        }
        let rank: usize = number("RANK", var("RANK")?)?;
        let world_size: usize = number("WORLD_SIZE", var("WORLD_SIZE")?)?;
        if world_size == 0 || rank >= world_size {
            bail!("RANK={rank} with WORLD_SIZE={world_size}: a rank must be below the world size");
        }
        let local_rank: usize = match env("LOCAL_RANK") {
            Some(v) => number("LOCAL_RANK", v)?,
            None => rank,
        };
        let master_port: u16 = number("MASTER_PORT", var("MASTER_PORT")?)?;
        let attempt: u32 = match env("TORCHELASTIC_RESTART_COUNT") {
            Some(v) => number("TORCHELASTIC_RESTART_COUNT", v)?,
            None => 0,
        };
        if !(timeout_s.is_finite() && timeout_s > 0.0) {
            bail!("--dist-timeout {timeout_s} must be a positive number of seconds");
        }
        Ok(Some(DataParallel {
            rank,
            world_size,
            local_rank,
            master_addr: var("MASTER_ADDR")?,
            master_port,
            agent_store: env("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true")),
            attempt,
            backend,
            overlap,
            timeout: std::time::Duration::from_secs_f64(timeout_s),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::{DataOn, DataParallel, DistBackend, DistOverlap};

    fn place(vars: &[(&str, &str)]) -> anyhow::Result<Option<DataParallel>> {
        let env = |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string());
        DataParallel::from_env(env, DistBackend::Auto, DistOverlap::On, 30.0)
    }

    #[test]
    fn torchrun_s_variables_make_a_rank_and_bad_ones_are_named() {
        assert_eq!(place(&[]).unwrap(), None, "no RANK, no WORLD_SIZE: one process");
        let full = [("RANK", "1"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "29500")];
        let p = place(&full).unwrap().unwrap();
        assert_eq!((p.rank, p.world_size, p.local_rank, p.master_port, p.attempt), (1, 2, 1, 29500, 0));
        assert!(!p.agent_store);
        let torchrun = [&full[..], &[("LOCAL_RANK", "0"), ("TORCHELASTIC_USE_AGENT_STORE", "True")]].concat();
        let torchrun = [&torchrun[..], &[("TORCHELASTIC_RESTART_COUNT", "3")]].concat();
        let p = place(&torchrun).unwrap().unwrap();
        assert_eq!((p.local_rank, p.agent_store, p.attempt), (0, true, 3));
        let err = |vars: &[(&str, &str)]| format!("{:#}", place(vars).unwrap_err());
        assert!(err(&full[..3]).contains("MASTER_PORT is not set"));
        assert!(err(&[("RANK", "0")]).contains("WORLD_SIZE is not set"));
        let beyond = [("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")];
        assert!(err(&beyond).contains("must be below the world size"));
        let word = [("RANK", "one"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")];
        assert!(err(&word).contains("RANK=\"one\""));
        let env = |name: &str| full.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string());
        assert!(DataParallel::from_env(env, DistBackend::Auto, DistOverlap::On, 0.0).is_err(), "a zero timeout");
    }

    #[test]
    fn the_backend_follows_the_device_and_the_build() {
        assert_eq!(DistBackend::Auto.resolve(true, true).unwrap(), DistBackend::Nccl);
        assert_eq!(DistBackend::Auto.resolve(true, false).unwrap(), DistBackend::Gloo, "no NCCL in the build");
        assert_eq!(DistBackend::Auto.resolve(false, true).unwrap(), DistBackend::Gloo);
        assert_eq!(DistBackend::Gloo.resolve(true, true).unwrap(), DistBackend::Gloo, "asked for");
        assert!(DistBackend::Nccl.resolve(false, true).is_err(), "NCCL on the CPU");
        assert!(DistBackend::Nccl.resolve(true, false).is_err(), "NCCL not built");
    }

    #[test]
    fn auto_keeps_a_set_on_the_host_only_when_it_would_take_over_half_the_free_memory() {
        const GB: usize = 1 << 30;
        assert!(DataOn::Auto.on_host(10 * GB, Some((15 * GB, 140 * GB))), "10 GB of 15 free");
        assert!(!DataOn::Auto.on_host(10 * GB, Some((30 * GB, 140 * GB))), "10 GB of 30 free");
        assert!(!DataOn::Auto.on_host(500 * GB, None), "no device memory to ask (the CPU): one memory");
        assert!(DataOn::Host.on_host(1, Some((30 * GB, 140 * GB))) && DataOn::Host.on_host(1, None));
        assert!(!DataOn::Device.on_host(500 * GB, Some((1, 1))), "asked for: the device's out-of-memory error");
    }
}
