//! The configuration a run is made of: presets, the recipe, execution options (memory format, CUDA
//! graphs) and the resolved run that comparison.json and checkpoints record. Types only, with the
//! rules that resolve them; nothing here runs anything.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use tch::Device;

use crate::files::OutDir;
use crate::native;

/// Named sets of defaults; explicit flags override them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// The tutorial's recipe: full CIFAR-10, 224 px, 5 epochs, batch 64 (needs a GPU).
    Tutorial,
    /// CPU-sized: 32 px, 1500/500-image balanced subsets, 5 epochs (3 to 7.5 minutes for the three models on 2 cores).
    Quick,
}

/// Defaults a preset gives to flags left unset.
pub struct PresetDefaults {
    pub image_size: i64,
    pub epochs: usize,
    pub train_limit: Option<usize>,
    pub test_limit: Option<usize>,
}

impl Preset {
    pub fn defaults(self) -> PresetDefaults {
        match self {
            Preset::Tutorial => {
                let recipe = Recipe::tutorial();
                PresetDefaults {
                    image_size: recipe.image_size,
                    epochs: recipe.epochs,
                    train_limit: None,
                    test_limit: None,
                }
            }
            Preset::Quick => PresetDefaults {
                image_size: 32,
                epochs: Recipe::tutorial().epochs,
                train_limit: Some(1500),
                test_limit: Some(500),
            },
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
    pub adam: AdamConfig,
    pub image_size: i64,
    pub normalize: Normalize,
    pub seed: u64,
    /// `--label-smoothing`: the training loss's targets smoothed by this much (0: none, the tutorial's).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub label_smoothing: f64,
    /// `--clip-grad`: the largest global L2 norm of a step's gradients (`None`: unclipped, the tutorial's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_grad: Option<f64>,
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
            adam: AdamConfig::default(),
            image_size: 224,
            normalize: Normalize::Tutorial,
            seed: 0,
            label_smoothing: 0.0,
            clip_grad: None,
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

#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AdamConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8 }
    }
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
