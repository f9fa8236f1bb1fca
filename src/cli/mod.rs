//! The `csp-tch` command line: argument parsing and one function per subcommand.

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};

use std::path::PathBuf;

use crate::bench::{BenchConfig, Mode};
use crate::config::Normalize;
use crate::config::{
    AdamConfig, Augment, OptimizerConfig, OptimizerKind, SchedName, SchedOn, Schedule, SgdConfig, WeightDecay,
};
use crate::config::{Cifar100Labels, DatasetName, DatasetSpec, FlowersSplit};
use crate::config::{
    CudaGraphs, DataOn, DataParallel, DistBackend, DistOverlap, Execution, MemoryFormat, Preset, Recipe, RunConfig,
};
use crate::data::{self, Access};
use crate::environment::parse_device;
use crate::models;
use crate::run;

mod commands;
use commands::{bench, check_graphs, compare, data_check, env, eval, summary};

#[derive(Parser, Debug)]
#[command(name = "csp-tch", version, about = "DarkNet53 versus CSPDarkNet53 on CIFAR-10, on libtorch")]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Layer table and totals (params, MACs) of one backbone.
    Summary(SummaryArgs),
    /// csp-tch, tch and libtorch versions; CUDA, cuDNN and CPU threads.
    Env,
    /// The models csp-tch knows, one name a line (what --models and --model take).
    Models {
        /// Only the ones run-all trains without --models: the tutorial's three.
        #[arg(long)]
        default: bool,
    },
    /// Train and evaluate every backbone (or --models), write CSVs and the comparison report.
    RunAll(RunAllArgs),
    /// Train and evaluate one backbone into the same layout as run-all.
    Train(TrainArgs),
    /// Evaluate a checkpoint on the test split: loss, accuracy, per-class accuracy, confusion matrix.
    Eval(EvalArgs),
    /// Rebuild comparison.json, comparison.md and curves.svg from the CSVs in --out.
    Report {
        #[arg(long, default_value = "results")]
        out: PathBuf,
    },
    /// Whether run B reproduced run A: their environments, and each model's first differing metric.
    Compare {
        /// The first run's output folder (a multi-seed run's top folder compares seed by seed).
        a: PathBuf,
        /// The second run's output folder.
        b: PathBuf,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Median ms/step, images/s and GFLOP/s of a train or eval step.
    Bench(BenchArgs),
    /// Train a schedule of steps eagerly twice and once replayed from CUDA graphs; compare everything.
    CheckGraphs(CheckGraphsArgs),
    /// Fetch or check a dataset (--dataset), or synthesise CIFAR-10 in its binary layout.
    #[command(subcommand)]
    Data(DataCommand),
}

#[derive(Subcommand, Debug)]
enum DataCommand {
    /// Download the dataset's published files, verify their MD5s and lay them out in --data-dir.
    Download(DataArgs),
    /// Read the dataset in --data-dir as a run would (layout, labels, every image decoded into the
    /// cache) and count images per class.
    Check {
        #[command(flatten)]
        data: DataArgs,
        /// The run's input size, to which image files larger than it are resized.
        #[arg(long, default_value_t = Recipe::tutorial().image_size, value_parser = clap::value_parser!(i64).range(1..=models::MAX_IMAGE_SIZE))]
        image_size: i64,
    },
    /// Images per second to decode and resize an image folder (no cache, every core), and the time an
    /// epoch's batches take to gather once it is held; `scripts/bench.sh --data-folder` sets
    /// torchvision's ImageFolder + DataLoader beside it.
    Bench {
        /// An image folder (<split>/<class>/<image files>).
        #[arg(long)]
        data_dir: PathBuf,
        /// Its split to read.
        #[arg(long, default_value = "train")]
        split: String,
        #[arg(long, default_value_t = Recipe::tutorial().image_size, value_parser = clap::value_parser!(i64).range(1..=models::MAX_IMAGE_SIZE))]
        image_size: i64,
        /// Read only the first N files (torchvision's order).
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long, default_value_t = Recipe::tutorial().batch_size as u32, value_parser = clap::value_parser!(u32).range(1..))]
        batch_size: u32,
        /// Epochs of gathering timed (the median is reported).
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
        epochs: u32,
        #[arg(long, default_value = "auto")]
        device: String,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Write a learnable synthetic set in the same binary layout, for tests and demos.
    Synth {
        /// Folder to create.
        #[arg(long)]
        out: PathBuf,
        /// Distinct training images (repeated to fill the fixed 50,000-record layout).
        #[arg(long, default_value_t = 50_000)]
        train: usize,
        /// Distinct test images (repeated to fill the fixed 10,000-record layout).
        #[arg(long, default_value_t = 10_000)]
        test: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
}

/// Where the data of a run, `eval` or `data` command come from, and how they are read.
#[derive(Args, Debug)]
struct DataArgs {
    /// Dataset to read from --data-dir [cifar10; the flowers preset: flowers102].
    #[arg(long, value_enum)]
    dataset: Option<DatasetName>,
    /// The dataset's folder [data/cifar-10-batches-bin, data/cifar-100-binary, data/flowers-102;
    /// required for --dataset folder].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where to fetch the dataset when --data-dir is missing (http(s):// or file://) [the published
    /// archive; for flowers102 the folder URL of its three files].
    #[arg(long, env = "CSP_TCH_DATA_URL")]
    data_url: Option<String>,
    /// Expected MD5 of the archive (flowers102: three, comma-separated) [the published ones].
    #[arg(long)]
    data_md5: Option<String>,
    /// The split to train on: a subfolder of --data-dir (folder), or train / val / test
    /// (flowers102) [train].
    #[arg(long)]
    train_split: Option<String>,
    /// The split to evaluate on [folder: val, else test; flowers102: test].
    #[arg(long)]
    val_split: Option<String>,
    /// CIFAR-100's fine labels (100 classes) or coarse ones (20 superclasses) [fine].
    #[arg(long, value_enum)]
    cifar100_labels: Option<Cifar100Labels>,
    /// Whose assignment of Flowers-102's published lists to train / val / test [paddle].
    #[arg(long, value_enum)]
    flowers_split: Option<FlowersSplit>,
    /// Leave out image files that cannot be read or decoded (each listed in the log and in
    /// comparison.json) instead of stopping at the first (folder, flowers102).
    #[arg(long)]
    skip_bad_images: bool,
    /// Where decoded image files are cached [$XDG_CACHE_HOME/csp-tch or ~/.cache/csp-tch].
    #[arg(long, env = "CSP_TCH_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
}

impl DataArgs {
    /// The dataset settings; a flag that does not apply to `--dataset` is an error, not ignored.
    fn spec(&self, d: DatasetName) -> Result<DatasetSpec> {
        let images = matches!(d, DatasetName::Folder | DatasetName::Flowers102);
        let given = [
            ("--train-split", self.train_split.is_some(), images),
            ("--val-split", self.val_split.is_some(), images),
            ("--skip-bad-images", self.skip_bad_images, images),
            ("--cifar100-labels", self.cifar100_labels.is_some(), d == DatasetName::Cifar100),
            ("--flowers-split", self.flowers_split.is_some(), d == DatasetName::Flowers102),
        ];
        if let Some((flag, ..)) = given.iter().find(|(_, set, applies)| *set && !applies) {
            bail!("{flag} does not apply to --dataset {}; leave it out, or pick the dataset it belongs to", d.label());
        }
        let defaults = DatasetSpec::default();
        Ok(DatasetSpec {
            name: d,
            train_split: self.train_split.clone().unwrap_or(defaults.train_split),
            val_split: self.val_split.clone(),
            cifar100_labels: self.cifar100_labels.unwrap_or(defaults.cifar100_labels),
            flowers_split: self.flowers_split.unwrap_or(defaults.flowers_split),
            skip_bad_images: self.skip_bad_images,
        })
    }

    fn data_dir(&self, dataset: DatasetName) -> Result<PathBuf> {
        let default = match dataset {
            DatasetName::Cifar10 => "data/cifar-10-batches-bin",
            DatasetName::Cifar100 => "data/cifar-100-binary",
            DatasetName::Flowers102 => "data/flowers-102",
            DatasetName::Folder => {
                return self.data_dir.clone().ok_or_else(|| {
                    anyhow::anyhow!("--dataset folder needs --data-dir: a folder of <split>/<class>/<image files>")
                })
            }
        };
        Ok(self.data_dir.clone().unwrap_or_else(|| default.into()))
    }

    fn access(&self) -> Access {
        Access { url: self.data_url.clone(), md5: self.data_md5.clone(), cache_dir: default_cache_dir(&self.cache_dir) }
    }
}

/// `--cache-dir`, else `$XDG_CACHE_HOME/csp-tch`, else `~/.cache/csp-tch`.
fn default_cache_dir(explicit: &Option<PathBuf>) -> Option<PathBuf> {
    explicit.clone().or_else(|| {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))?;
        Some(base.join("csp-tch"))
    })
}

/// `N` images, or `all`.
fn parse_limit(s: &str) -> Result<Limit, String> {
    match s {
        "all" => Ok(Limit(None)),
        _ => match s.parse::<usize>() {
            Ok(n) if n > 0 => Ok(Limit(Some(n))),
            _ => Err(format!("'{s}' is not a positive number of images or 'all'")),
        },
    }
}

#[derive(Clone, Copy, Debug)]
struct Limit(Option<usize>);

/// Execution options that leave the recipe as it is.
#[derive(Args, Debug)]
struct AccelerationArgs {
    #[command(flatten)]
    numerics: NumericsArgs,
    /// CUDA runs: record each full-batch train and eval step once as a CUDA graph and replay it
    /// (`auto`: on, except for fp16 --amp, falling back to eager steps if a capture fails). No effect on the CPU.
    #[arg(long, value_enum, default_value_t = CudaGraphs::Auto)]
    cuda_graphs: CudaGraphs,
}

/// How the numbers are computed: precision and memory layout.
#[derive(Args, Debug)]
struct NumericsArgs {
    /// Mixed precision on CUDA: bf16 autocast where the GPU supports it (compute capability 8.0+), else fp16
    /// with dynamic loss scaling; fp32 weights and optimizer state. No effect on the CPU.
    #[arg(long)]
    amp: bool,
    /// Memory layout of weights and activations: `auto` is channels-last for a model whose feature maps
    /// are all at least 4 px at this input size, contiguous (NCHW) otherwise.
    #[arg(long, value_enum, default_value_t = MemoryFormat::Auto)]
    memory_format: MemoryFormat,
    /// Same as `--memory-format channels-last`.
    #[arg(long, conflicts_with = "memory_format")]
    channels_last: bool,
}

impl NumericsArgs {
    /// This precision and layout (and CUDA graphs as by default).
    fn execution(&self) -> Execution {
        let memory_format = if self.channels_last { MemoryFormat::ChannelsLast } else { self.memory_format };
        Execution { amp: self.amp, memory_format, ..Execution::default() }
    }
}

impl AccelerationArgs {
    fn execution(&self) -> Execution {
        Execution { cuda_graphs: self.cuda_graphs, ..self.numerics.execution() }
    }
}

#[derive(Args, Debug)]
struct RecipeArgs {
    /// Defaults for the flags below: `tutorial` (full data, 224 px, 5 epochs; for a GPU) or
    /// `quick` (32 px, 1500/500-image balanced subsets, 5 epochs; 3 to 7.5 minutes on 2 CPU cores).
    #[arg(long, value_enum, default_value_t = Preset::Tutorial)]
    preset: Preset,
    /// Epochs [preset].
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    epochs: Option<u32>,
    /// Square input size after resizing [preset].
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..=models::MAX_IMAGE_SIZE))]
    image_size: Option<i64>,
    /// Training images: a seeded class-balanced subset of N, or `all` [preset].
    #[arg(long, value_parser = parse_limit)]
    train_limit: Option<Limit>,
    /// Test images: a seeded class-balanced subset of N, or `all` [preset].
    #[arg(long, value_parser = parse_limit)]
    test_limit: Option<Limit>,
    /// Images per batch, at least 2: BatchNorm cannot train on one value per channel.
    #[arg(long, default_value_t = Recipe::tutorial().batch_size as u32, value_parser = clap::value_parser!(u32).range(Recipe::MIN_BATCH_SIZE as i64..))]
    batch_size: u32,
    #[command(flatten)]
    optimizer: OptimizerArgs,
    #[command(flatten)]
    schedule: ScheduleArgs,
    /// `tutorial`: Normalize(0.5, 0.5) on raw 0..255 pixels, as the tutorial; `unit`: pixels scaled to
    /// [0, 1] first [preset].
    #[arg(long, value_enum)]
    normalize: Option<Normalize>,
    /// Smooth the training loss's targets by E, as torch.nn.CrossEntropyLoss(label_smoothing=E):
    /// 1 - E on the label, E / classes on every class (evaluation keeps the plain loss) [preset; 0].
    #[arg(long)]
    label_smoothing: Option<f64>,
    /// Clip each step's gradients to a global L2 norm of at most N, as
    /// torch.nn.utils.clip_grad_norm_ (after fp16 unscaling, before the optimizer's update).
    #[arg(long)]
    clip_grad: Option<f64>,
    /// Augment training batches on the device: `none` (the tutorial's), `flip`
    /// (RandomHorizontalFlip), `crop-flip` (CIFAR's RandomCrop(padding=4), then the flip, on the
    /// stored images before the resize) or `rrc-flip` (torchvision's RandomResizedCrop at the run's
    /// size in place of the resize, Pillow's bilinear, then the flip); draws are a hash of (seed,
    /// batch, image), so resumed runs and replayed CUDA graphs draw exactly what an uninterrupted
    /// eager run does [preset; none].
    #[arg(long, value_enum)]
    aug: Option<Augment>,
    /// Evaluate as timm does: resize to floor(size / P) (a square, Pillow's bilinear), then the centre
    /// size x size crop (torchvision's CenterCrop); e.g. 0.875 [preset; without: the tutorial's plain resize].
    #[arg(long, value_name = "P")]
    eval_crop_pct: Option<f64>,
    /// Keep an exponential moving average of the weights and BatchNorm statistics, as timm's
    /// ModelEmaV2 (`ema = DECAY * ema + (1 - DECAY) * w` after every step), evaluated beside the raw
    /// weights every epoch (`eval_acc_ema` in the CSV); e.g. 0.9998.
    #[arg(long, value_name = "DECAY")]
    ema: Option<f64>,
    /// Seeds initialisation, subsets and the per-epoch shuffles.
    #[arg(long, default_value_t = Recipe::tutorial().seed)]
    seed: u64,
    /// Train every model once per seed (e.g. `0,1,2`): each seed's files in `--out`/seed-<s>/, and the
    /// spread over seeds (intervals, verdicts) in `--out`'s report.
    #[arg(long, value_delimiter = ',', conflicts_with = "seed")]
    seeds: Vec<u64>,
    #[command(flatten)]
    acceleration: AccelerationArgs,
    /// Where the images live while training: `device` (uploaded once), `host` (host memory, a read image
    /// cache memory-mapped; each batch gathered there and copied over, for sets larger than the GPU) or `auto`
    /// (device when both splits take at most half of its free memory). The numbers are the same.
    #[arg(long, value_enum, default_value_t = DataOn::Auto)]
    data_on: DataOn,
    /// `auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Output folder for CSVs, checkpoints and the report.
    #[arg(long, default_value = "results")]
    out: PathBuf,
    /// Continue each model from its checkpoint in --out; finished models are not retrained.
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    data: DataArgs,
    #[command(flatten)]
    parallel: ParallelArgs,
}

/// Data-parallel training (DistributedDataParallel's semantics on c10d): under torchrun
/// (`torchrun --nproc-per-node N --no-python csp-tch run-all ...`, its variables RANK, WORLD_SIZE,
/// MASTER_ADDR, MASTER_PORT read from the environment) or started by csp-tch itself.
#[derive(Args, Debug)]
struct ParallelArgs {
    /// Start N worker processes of this command on this machine, one per GPU (cuda:0 ..) or, on the
    /// CPU, sharing its cores: a data-parallel run as torchrun would start it. --batch-size is per
    /// process, so a step takes N times as many images.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    nproc_per_node: Option<u32>,
    /// The process group: `auto` (NCCL on CUDA, Gloo on the CPU), `gloo` or `nccl`.
    #[arg(long, value_enum, default_value_t = DistBackend::Auto)]
    dist_backend: DistBackend,
    /// When the gradient allreduce runs: `on`, during the backward pass (each bucket summed once its
    /// gradients are in, as DistributedDataParallel does), or `off`, after it (the same sums).
    #[arg(long, value_enum, default_value_t = DistOverlap::On)]
    dist_overlap: DistOverlap,
    /// Seconds a rank waits for the others (joining, each allreduce, rank 0 reading the data) before it
    /// stops with an error: a rank that died or hangs stops the run within this time [PyTorch's 30 min].
    #[arg(long, value_name = "SECONDS", default_value_t = 1800.0)]
    dist_timeout: f64,
    /// BatchNorm statistics over the images of every process in training, as torch.nn.SyncBatchNorm
    /// (mean and variance of the global batch, forward and backward); without it each process
    /// normalises by its own batch, as DistributedDataParallel's default.
    #[arg(long)]
    sync_bn: bool,
}

/// What this process is in a data-parallel command.
enum Role {
    /// It started `--nproc-per-node` workers, which have all finished.
    Launched,
    /// It does the work: alone (`None`) or as a rank of a data-parallel run (torchrun's variables set).
    Worker(Option<DataParallel>),
}

impl ParallelArgs {
    /// This process's role: with `--nproc-per-node`, the launcher of the workers, once `check` has
    /// accepted the settings (so a bad flag fails once, before any worker starts).
    fn role(&self, check: impl FnOnce() -> Result<()>) -> Result<Role> {
        let place = DataParallel::from_env(
            |name| std::env::var(name).ok(),
            self.dist_backend,
            self.dist_overlap,
            self.dist_timeout,
        )?;
        let Some(workers) = self.nproc_per_node else { return Ok(Role::Worker(place)) };
        if place.is_some() {
            bail!(
                "--nproc-per-node: this process is already a data-parallel worker (RANK and WORLD_SIZE are set, as \
                 torchrun sets them); drop --nproc-per-node under torchrun"
            );
        }
        check()?;
        let args: Vec<String> = std::env::args().skip(1).collect();
        let timeout = std::time::Duration::from_secs_f64(self.dist_timeout);
        run::launch::launch(workers as usize, &run::launch::worker_args(&args), timeout)?;
        Ok(Role::Launched)
    }

    /// Runs `config` as this process's part: one process, a data-parallel rank, or the launcher of
    /// `--nproc-per-node` workers.
    fn run(&self, mut config: RunConfig, resume: bool, access: &Access) -> Result<()> {
        config.sync_bn = self.sync_bn;
        let check = || {
            crate::train::distributed::check_execution(&config.execution, self.sync_bn)?;
            run::Settings::check(config.clone(), resume, None)?;
            Ok(())
        };
        match self.role(check)? {
            Role::Launched => Ok(()),
            Role::Worker(None) if self.sync_bn => bail!(
                "--sync-bn synchronises the processes of a data-parallel run; this is a single process (add \
                 --nproc-per-node N, or start it under torchrun)"
            ),
            Role::Worker(place) => run::run(&run::Settings::check(config, resume, place)?, access),
        }
    }
}

impl RecipeArgs {
    fn resolve(&self, models: Vec<String>) -> Result<RunConfig> {
        let preset = self.preset.recipe();
        let label_smoothing = self.label_smoothing.unwrap_or(preset.label_smoothing);
        if !(0.0..1.0).contains(&label_smoothing) {
            bail!("--label-smoothing {label_smoothing} must be at least 0 and below 1");
        }
        if let Some(n) = self.clip_grad.filter(|n| !(n.is_finite() && *n > 0.0)) {
            bail!("--clip-grad {n} must be a positive number");
        }
        if let Some(pct) = self.eval_crop_pct.filter(|p| !(*p > 0.0 && *p <= 1.0)) {
            bail!("--eval-crop-pct {pct} must be above 0 and at most 1 (e.g. 0.875)");
        }
        if let Some(decay) = self.ema.filter(|d| !(*d > 0.0 && *d < 1.0)) {
            bail!("--ema {decay} must be above 0 and below 1 (e.g. 0.9998)");
        }
        if let Some(Limit(Some(1))) = self.train_limit {
            bail!("--train-limit 1 leaves one image to train on, which BatchNorm cannot; use 2 or more");
        }
        if let Some(twice) = first_repeated(&self.seeds) {
            bail!("--seeds lists {twice} twice; name each seed once");
        }
        // One seed in --seeds is a single run with that seed.
        let (seed, seeds) = match self.seeds.as_slice() {
            [] => (self.seed, Vec::new()),
            [one] => (*one, Vec::new()),
            many => (many[0], many.to_vec()),
        };
        let epochs = self.epochs.map_or(preset.epochs, |e| e as usize);
        let optimizer = self.optimizer.resolve(preset.optimizer)?;
        let schedule = self.schedule.resolve(epochs, optimizer.lr(), preset.schedule.as_ref())?;
        let dataset_name = self.data.dataset.unwrap_or(self.preset.dataset());
        let (dataset, data_dir) = (self.data.spec(dataset_name)?, self.data.data_dir(dataset_name)?);
        let (train_limit, test_limit) = self.preset.limits();
        Ok(RunConfig {
            preset: self.preset,
            models,
            recipe: Recipe {
                epochs,
                batch_size: self.batch_size as usize,
                optimizer,
                image_size: self.image_size.unwrap_or(preset.image_size),
                normalize: self.normalize.unwrap_or(preset.normalize),
                seed,
                label_smoothing,
                clip_grad: self.clip_grad.or(preset.clip_grad),
                schedule,
                augment: self.aug.unwrap_or(preset.augment),
                eval_crop_pct: self.eval_crop_pct.or(preset.eval_crop_pct),
                ema: self.ema.or(preset.ema),
            },
            execution: Execution { data_on: self.data_on, ..self.acceleration.execution() },
            classes: data::class_count(&dataset, &data_dir)?,
            dataset,
            data_dir,
            train_limit: self.train_limit.map_or(train_limit, |l| l.0),
            test_limit: self.test_limit.map_or(test_limit, |l| l.0),
            device: self.device.clone(),
            out: self.out.clone(),
            seeds,
            world_size: 1,
            sync_bn: false,
        })
    }
}

/// `--opt` and its hyperparameters; each left unset takes the preset's value when the optimizer is
/// the preset's, else the optimizer's default.
#[derive(Args, Debug)]
struct OptimizerArgs {
    /// `adam` (torch.optim.Adam, the tutorial's), `adamw` (torch.optim.AdamW: decoupled weight decay)
    /// or `sgd` (torch.optim.SGD, no dampening) [preset].
    #[arg(long, value_enum)]
    opt: Option<OptimizerKind>,
    /// Learning rate [adam, adamw: 1e-3 (the tutorial's); sgd: 0.1].
    #[arg(long)]
    lr: Option<f64>,
    /// Weight decay [adam: 0; adamw: 0.01, as torch.optim.AdamW; sgd: 0]: an L2 term added to the
    /// gradient for adam and sgd, decoupled (`w -= lr * wd * w`) for adamw.
    #[arg(long)]
    weight_decay: Option<f64>,
    /// Exempt one-dimensional parameters (BatchNorm weights, biases) from weight decay, as timm's
    /// `param_groups_weight_decay` [on for adamw and sgd, off for adam]; `--no-decay-bn-bias false` decays them.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    no_decay_bn_bias: Option<bool>,
    /// SGD's momentum [0.9].
    #[arg(long)]
    momentum: Option<f64>,
    /// SGD with Nesterov momentum.
    #[arg(long)]
    nesterov: bool,
    /// Adam's and AdamW's betas, `B1,B2` [0.9,0.999].
    #[arg(long, value_delimiter = ',')]
    betas: Vec<f64>,
    /// Adam's and AdamW's epsilon [1e-8].
    #[arg(long)]
    eps: Option<f64>,
}

/// `--sched` and its settings, as `torch.optim.lr_scheduler` computes them.
#[derive(Args, Debug)]
struct ScheduleArgs {
    /// The learning rate's course after any warm-up, at unit t of T (epochs or steps, --sched-on) after
    /// W warm-up units: `none` (constant, the tutorial's); `cosine`, CosineAnnealingLR:
    /// min_lr + (lr - min_lr) (1 + cos(pi (t - W) / (T - W))) / 2; `step`, StepLR: lr * rate^floor((t -
    /// W) / period), the period --decay-epochs; `multistep`, MultiStepLR: lr * rate^(number of
    /// --decay-epochs passed, counted from the start). The warm-up is LinearLR: lr (s + (1 - s) t / W)
    /// with s = warmup_lr / lr, chained by SequentialLR. PyTorch computes these recursively, and so
    /// does csp-tch, to the bit [preset].
    #[arg(long, value_enum)]
    sched: Option<SchedName>,
    /// Step the schedule after every epoch (timm's default) or every optimizer step [epoch].
    #[arg(long, value_enum)]
    sched_on: Option<SchedOn>,
    /// Epochs of linear warm-up [preset; 0].
    #[arg(long)]
    warmup_epochs: Option<u32>,
    /// The learning rate the warm-up starts from, above 0 and at most --lr [1e-5, timm's].
    #[arg(long)]
    warmup_lr: Option<f64>,
    /// The cosine's floor, eta_min [0].
    #[arg(long)]
    min_lr: Option<f64>,
    /// `step`: the period in epochs (one number); `multistep`: the epochs after which the rate drops
    /// (increasing, each after the warm-up).
    #[arg(long, value_delimiter = ',')]
    decay_epochs: Vec<u32>,
    /// The factor of each drop, gamma [0.1].
    #[arg(long)]
    decay_rate: Option<f64>,
}

impl ScheduleArgs {
    /// The schedule of these flags over `preset`'s (whose settings apply to its own `--sched`).
    fn resolve(&self, epochs: usize, lr: f64, preset: Option<&Schedule>) -> Result<Option<Schedule>> {
        let base = match (self.sched, preset) {
            (None, Some(p)) => p.clone(),
            (Some(s), Some(p)) if s == p.sched => p.clone(),
            _ => Schedule::default(),
        };
        let sched = self.sched.unwrap_or(base.sched);
        let warmup = self.warmup_epochs.map_or(base.warmup_epochs, |w| w as usize);
        let decays = matches!(sched, SchedName::Step | SchedName::Multistep);
        let refuse = |flag: &str, set: bool, applies: bool, wants: &str| -> Result<()> {
            if set && !applies {
                bail!("{flag} applies only {wants}; leave it out or add what it needs");
            }
            Ok(())
        };
        refuse("--min-lr", self.min_lr.is_some(), sched == SchedName::Cosine, "to --sched cosine")?;
        refuse("--decay-epochs", !self.decay_epochs.is_empty(), decays, "to --sched step or multistep")?;
        refuse("--decay-rate", self.decay_rate.is_some(), decays, "to --sched step or multistep")?;
        refuse("--warmup-lr", self.warmup_lr.is_some(), warmup > 0, "with --warmup-epochs")?;
        if sched == SchedName::None && warmup == 0 {
            refuse("--sched-on", self.sched_on.is_some(), false, "with --sched or --warmup-epochs")?;
            return Ok(None);
        }
        if warmup >= epochs {
            bail!(
                "--warmup-epochs {warmup} leaves no epoch after the warm-up of {epochs}; use fewer, or more --epochs"
            );
        }
        let warmup_lr = self.warmup_lr.unwrap_or(base.warmup_lr);
        if !(warmup_lr > 0.0 && warmup_lr <= lr) {
            bail!(
                "--warmup-lr {warmup_lr} must be above 0 and at most --lr {lr} (LinearLR's start factor is in (0, 1])"
            );
        }
        let min_lr = if sched == SchedName::Cosine { self.min_lr.unwrap_or(base.min_lr) } else { 0.0 };
        if !(min_lr >= 0.0 && min_lr < lr) {
            bail!("--min-lr {min_lr} must be at least 0 and below --lr {lr}");
        }
        let decay_rate = self.decay_rate.unwrap_or(base.decay_rate);
        if !(decay_rate > 0.0 && decay_rate <= 1.0) {
            bail!("--decay-rate {decay_rate} must be above 0 and at most 1");
        }
        let decay_epochs: Vec<usize> = match self.decay_epochs.as_slice() {
            [] => base.decay_epochs.clone(),
            given => given.iter().map(|&e| e as usize).collect(),
        };
        match sched {
            SchedName::Step if decay_epochs.len() != 1 || decay_epochs[0] == 0 => {
                bail!("--sched step needs one --decay-epochs N, the period in epochs (N at least 1)")
            }
            SchedName::Multistep => {
                if decay_epochs.is_empty() {
                    bail!("--sched multistep needs --decay-epochs E1,E2,..., the epochs after which the rate drops");
                }
                if !decay_epochs.windows(2).all(|w| w[0] < w[1]) || decay_epochs[0] <= warmup {
                    let listed: Vec<String> = decay_epochs.iter().map(usize::to_string).collect();
                    bail!(
                        "--decay-epochs {}: list increasing epochs, each after the {warmup} of warm-up",
                        listed.join(",")
                    );
                }
            }
            _ => {}
        }
        Ok(Some(Schedule {
            sched,
            on: self.sched_on.unwrap_or(base.on),
            warmup_epochs: warmup,
            warmup_lr,
            min_lr,
            decay_epochs,
            decay_rate,
        }))
    }
}

impl OptimizerArgs {
    /// The optimizer of these flags over `preset`'s.
    fn resolve(&self, preset: OptimizerConfig) -> Result<OptimizerConfig> {
        let opt = self.opt.unwrap_or(preset.kind());
        let base = if opt == preset.kind() { preset } else { opt.defaults() };
        let refuse = |flag: &str, set: bool, applies: bool| -> Result<()> {
            if set && !applies {
                let name = opt.label();
                bail!("{flag} does not apply to --opt {name}; leave it out, or choose an optimizer it applies to");
            }
            Ok(())
        };
        let sgd = opt == OptimizerKind::Sgd;
        refuse("--momentum", self.momentum.is_some(), sgd)?;
        refuse("--nesterov", self.nesterov, sgd)?;
        refuse("--betas", !self.betas.is_empty(), !sgd)?;
        refuse("--eps", self.eps.is_some(), !sgd)?;
        let lr = self.lr.unwrap_or(base.lr());
        if !(lr.is_finite() && lr > 0.0) {
            bail!("--lr {lr} must be a positive number");
        }
        let base_decay = base.weight_decay();
        let weight_decay = self.weight_decay.unwrap_or(base_decay.weight_decay);
        if !(weight_decay.is_finite() && weight_decay >= 0.0) {
            bail!("--weight-decay {weight_decay} must be a number of at least 0");
        }
        // Recorded only where there is a decay to exempt from.
        let exempt = self.no_decay_bn_bias.unwrap_or(opt != OptimizerKind::Adam || base_decay.no_decay_bn_bias);
        let decay = WeightDecay { weight_decay, no_decay_bn_bias: weight_decay > 0.0 && exempt };
        match base {
            OptimizerConfig::Sgd(base) => {
                let momentum = self.momentum.unwrap_or(base.momentum);
                if !(momentum.is_finite() && (0.0..1.0).contains(&momentum)) {
                    bail!("--momentum {momentum} must be at least 0 and below 1");
                }
                let nesterov = self.nesterov || base.nesterov;
                if nesterov && momentum == 0.0 {
                    bail!("--nesterov needs a momentum above 0 (--momentum)");
                }
                Ok(OptimizerConfig::Sgd(SgdConfig { lr, momentum, nesterov, decay }))
            }
            OptimizerConfig::Adam(base) | OptimizerConfig::Adamw(base) => {
                let (beta1, beta2) = match self.betas.as_slice() {
                    [] => (base.beta1, base.beta2),
                    [b1, b2] => (*b1, *b2),
                    _ => bail!("--betas takes two numbers, B1,B2 (e.g. 0.9,0.999)"),
                };
                if ![beta1, beta2].iter().all(|b| (0.0..1.0).contains(b)) {
                    bail!("--betas {beta1},{beta2}: each must be at least 0 and below 1");
                }
                let eps = self.eps.unwrap_or(base.eps);
                if !(eps.is_finite() && eps > 0.0) {
                    bail!("--eps {eps} must be a positive number");
                }
                let config = AdamConfig { lr, beta1, beta2, eps, decay };
                Ok(if opt == OptimizerKind::Adam {
                    OptimizerConfig::Adam(config)
                } else {
                    OptimizerConfig::Adamw(config)
                })
            }
        }
    }
}

#[derive(Args, Debug)]
struct EvalArgs {
    /// A checkpoint written by run-all or train (`<out>/checkpoints/<model>.safetensors`).
    #[arg(long)]
    checkpoint: PathBuf,
    /// The dataset's folder [the checkpoint's]; the dataset is the checkpoint's, and must have its
    /// number of classes.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where decoded image files are cached [$XDG_CACHE_HOME/csp-tch or ~/.cache/csp-tch].
    #[arg(long, env = "CSP_TCH_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Test images: a seeded class-balanced subset of N, or `all` [the checkpoint's].
    #[arg(long, value_parser = parse_limit)]
    test_limit: Option<Limit>,
    #[arg(long, default_value = "auto")]
    device: String,
    /// Evaluate the run's `--ema` average instead of its trained weights.
    #[arg(long)]
    ema: bool,
    /// Print one JSON object instead of tables.
    #[arg(long)]
    json: bool,
}

/// What `bench` and `check-graphs` run: one model's steps on synthetic CIFAR-sized batches.
#[derive(Args, Debug)]
struct StepArgs {
    #[arg(long, value_parser = model_name_parser())]
    model: String,
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(i64).range(1..=models::MAX_IMAGE_SIZE))]
    image_size: i64,
    #[arg(long, default_value_t = Recipe::tutorial().batch_size as u32, value_parser = clap::value_parser!(u32).range(Recipe::MIN_BATCH_SIZE as i64..))]
    batch_size: u32,
    #[arg(long, default_value = "auto")]
    device: String,
}

impl StepArgs {
    /// The bench configuration of these steps computed as `execution` says.
    fn config(self, execution: Execution, steps: u32, warmup: u32, mode: Mode, breakdown: bool) -> Result<BenchConfig> {
        models::model_info(&self.model)?.check_image_size(self.image_size)?;
        Ok(BenchConfig {
            recipe: Recipe {
                epochs: 1,
                batch_size: self.batch_size as usize,
                image_size: self.image_size,
                ..Recipe::tutorial()
            },
            execution,
            model: self.model,
            steps: steps as usize,
            warmup: warmup as usize,
            mode,
            device: parse_device(&self.device)?,
            breakdown,
        })
    }
}

#[derive(Args, Debug)]
struct BenchArgs {
    #[command(flatten)]
    step: StepArgs,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    steps: u32,
    /// Untimed steps first.
    #[arg(long, default_value_t = 3)]
    warmup: u32,
    #[arg(long, value_enum, default_value_t = Mode::Train)]
    mode: Mode,
    #[command(flatten)]
    acceleration: AccelerationArgs,
    /// Also time each phase of a train step: transform, forward, backward, optimizer (every step eager).
    #[arg(long)]
    breakdown: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    parallel: ParallelArgs,
}

#[derive(Args, Debug)]
struct CheckGraphsArgs {
    #[command(flatten)]
    step: StepArgs,
    #[command(flatten)]
    numerics: NumericsArgs,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
struct RunAllArgs {
    /// Comma-separated backbones to run, or `all` [the tutorial's three: darknet53, cspdarknet53,
    /// cspdarknet53-pad0]. Each CSP model is compared with its plain network when that runs too.
    #[arg(long, value_delimiter = ',', value_parser = models_parser())]
    models: Vec<String>,
    #[command(flatten)]
    recipe: RecipeArgs,
}

#[derive(Args, Debug)]
struct TrainArgs {
    /// Backbone to train.
    #[arg(long, value_parser = model_name_parser())]
    model: String,
    #[command(flatten)]
    recipe: RecipeArgs,
}

#[derive(Args, Debug)]
struct SummaryArgs {
    /// Backbone name.
    #[arg(long, value_parser = model_name_parser())]
    model: String,
    /// Square input size in pixels.
    #[arg(long, default_value_t = Recipe::tutorial().image_size, value_parser = clap::value_parser!(i64).range(1..=models::MAX_IMAGE_SIZE))]
    image_size: i64,
    /// Classes in the linear head (at most 1,000,000).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(i64).range(1..=models::MAX_CLASSES))]
    classes: i64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// Accepts registered model names; clap's error lists the valid ones.
fn model_name_parser() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(models::model_names())
}

/// The first item of a list given earlier in it too (`--models a,a`, `--seeds 1,1`).
fn first_repeated<T: PartialEq>(items: &[T]) -> Option<&T> {
    items.iter().enumerate().find_map(|(i, item)| items[..i].contains(item).then_some(item))
}

/// Registered model names and `all`.
fn models_parser() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(models::model_names().into_iter().chain(["all"]))
}

/// Parses the arguments, runs the command, prints any error without a backtrace; returns the exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => 0,
        Err(err) if err.is::<crate::train::Interrupted>() => 130,
        Err(err) => {
            eprintln!("error: {err:#}");
            1
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Summary(args) => summary(args),
        Command::Env => env(),
        Command::Models { default } => {
            let names = if default { models::default_models() } else { models::model_names() };
            names.iter().for_each(|name| println!("{name}"));
            Ok(())
        }
        Command::RunAll(args) => {
            let models: Vec<String> = match args.models.as_slice() {
                [] => models::default_models().into_iter().map(String::from).collect(),
                names if names.iter().any(|n| n == "all") => {
                    models::model_names().into_iter().map(String::from).collect()
                }
                names => names.to_vec(),
            };
            if let Some(twice) = first_repeated(&models) {
                bail!("--models lists {twice} twice; name each model once");
            }
            let recipe = &args.recipe;
            recipe.parallel.run(recipe.resolve(models)?, recipe.resume, &recipe.data.access())
        }
        Command::Train(args) => {
            let recipe = &args.recipe;
            recipe.parallel.run(recipe.resolve(vec![args.model])?, recipe.resume, &recipe.data.access())
        }
        Command::Eval(args) => eval(args),
        Command::Compare { a, b, json } => compare(&a, &b, json),
        Command::Bench(args) => bench(args),
        Command::CheckGraphs(args) => check_graphs(args),
        Command::Report { out } => {
            let models = run::rebuild(&out)?;
            eprintln!("rebuilt the report of {} in {}", models.join(", "), out.display());
            Ok(())
        }
        Command::Data(DataCommand::Download(args)) => {
            let name = args.dataset.unwrap_or_default();
            data::download(&args.spec(name)?, &args.data_dir(name)?, &args.access())
        }
        Command::Data(DataCommand::Check { data, image_size }) => {
            let name = data.dataset.unwrap_or_default();
            data_check(&data.spec(name)?, &data.data_dir(name)?, &data.access(), image_size)
        }
        Command::Data(DataCommand::Bench { data_dir, split, image_size, limit, batch_size, epochs, device, json }) => {
            let device = parse_device(&device)?;
            let (size, batch) = (image_size as usize, batch_size as usize);
            let result = data::bench::run(&data_dir.join(&split), size, limit, batch, epochs as usize, device)?;
            if json {
                println!("{}", serde_json::to_string(&result)?);
            } else {
                println!(
                    "{}: {} images decoded and resized to {image_size} px in {:.2} s ({:.0} images/s, {} threads); \
                     an epoch's batches of {batch_size} gathered in {:.2} ms (median of {epochs})",
                    result.folder,
                    result.images,
                    result.decode_seconds,
                    result.decode_images_per_s,
                    result.threads,
                    result.epoch_gather_ms
                );
            }
            Ok(())
        }
        Command::Data(DataCommand::Synth { out, train, test, seed }) => {
            data::write_synthetic(&out, train, test, seed)?;
            eprintln!(
                "wrote a synthetic CIFAR-10 layout ({train} train / {test} test distinct images) to {}",
                out.display()
            );
            Ok(())
        }
    }
}
