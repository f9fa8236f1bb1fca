//! Checkpoints: `<out>/checkpoints/<model>.safetensors` holds a model's variables (weights and
//! BatchNorm statistics, as `model/<name>`), the optimizer's state (Adam's and AdamW's moments as
//! `adam.exp_avg/<name>` and `adam.exp_avg_sq/<name>`, SGD's `sgd.momentum_buffer/<name>`), the
//! `--ema` average (`ema/<name>`) and, in the safetensors metadata, the run position: epochs done,
//! the optimizer's step count, the metrics so far, the configuration that produced them and, after
//! a stop inside an epoch, the place there ([`EpochProgress`]).
//!
//! The shuffle of epoch `e` is a function of `(seed, e)` alone, so weights, moments, the epoch count
//! and the place inside an epoch are the whole training state: a resumed run replays exactly what an
//! uninterrupted one does.

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;
use tch::{nn, Device, Kind, Tensor};

use crate::config::{Recipe, RunConfig};
use crate::environment::RunEnvironment;
use crate::files::write_atomic;
use crate::models::Backbone;
use crate::train::metrics::EpochMetrics;
use crate::train::optim::{LossScaler, Optimizer};

pub const FORMAT: u32 = 1;
/// Where the `--ema` weights are kept, beside `model/`.
const EMA_PREFIX: &str = "ema";
const META_KEY: &str = "csp_tch";

/// What a checkpoint says about itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Meta {
    pub format: u32,
    pub model: String,
    pub config: RunConfig,
    /// Sizes of the training and test splits actually used (after limits).
    pub train_size: usize,
    pub test_size: usize,
    /// What the run read (dataset, splits, cache), for `csp-tch report`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<crate::data::DataInfo>,
    pub epochs_done: usize,
    /// The optimizer's step count (`adam_steps` before there were other optimizers).
    #[serde(alias = "adam_steps")]
    pub optimizer_steps: i64,
    /// The fp16 loss scaler's state, when the run trains in fp16.
    #[serde(default)]
    pub loss_scaler: Option<LossScaler>,
    pub history: Vec<EpochMetrics>,
    /// Where the last epoch ran.
    pub environment: RunEnvironment,
    /// Whether its full batches replayed CUDA graphs (`--cuda-graphs`), for `csp-tch report`.
    #[serde(default)]
    pub cuda_graphs: Option<bool>,
    /// Why they did not, when they did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_graphs_off: Option<String>,
    /// Where in an epoch a stopped run was: `--resume` continues from that step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch_progress: Option<EpochProgress>,
}

/// A position inside an epoch, with the epoch's running sums so far: with the weights, statistics
/// and optimizer state of the same moment, what an epoch needs to go on as if never stopped (its
/// shuffle is a function of the seed and the epoch).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochProgress {
    pub epoch: usize,
    /// Batches done.
    pub steps: usize,
    pub images: i64,
    /// The sums of [`crate::train::Trainer::train_totals`] and the last batch's loss.
    pub loss_sum: f64,
    pub correct: f64,
    pub last_loss: f64,
}

impl Meta {
    /// Checks what a checkpoint records as a command line would be checked, so that an edited or
    /// damaged file is refused with its name instead of failing (or panicking) later.
    fn check(&self, file: &Path) -> Result<()> {
        let damaged = |what: String| {
            anyhow::anyhow!("{}: {what}; the file was edited or damaged, train it again", file.display())
        };
        let info = crate::models::model_info(&self.model).map_err(|e| damaged(format!("{e:#}")))?;
        let r = &self.config.recipe;
        if !(1..=crate::models::MAX_IMAGE_SIZE).contains(&r.image_size) {
            return Err(damaged(format!(
                "its image size {} is not in 1..={}",
                r.image_size,
                crate::models::MAX_IMAGE_SIZE
            )));
        }
        info.check_image_size(r.image_size).map_err(|e| damaged(format!("{e:#}")))?;
        if r.batch_size < Recipe::MIN_BATCH_SIZE {
            return Err(damaged(format!("its batch size {} is below {}", r.batch_size, Recipe::MIN_BATCH_SIZE)));
        }
        if !(1..=crate::models::MAX_CLASSES).contains(&self.config.classes) {
            return Err(damaged(format!("its class count {} is out of range", self.config.classes)));
        }
        let lr = r.optimizer.lr();
        if !(lr.is_finite() && lr > 0.0) {
            return Err(damaged(format!("its learning rate {lr} is not a positive number")));
        }
        Ok(())
    }

    /// The settings that must match for a run to continue this checkpoint: everything that
    /// changes what is computed, the data folder among them (compared as the folder it names),
    /// except the number of epochs (a run may be extended).
    fn fingerprint(&self) -> Value {
        let r = &self.config.recipe;
        let data_dir = std::fs::canonicalize(&self.config.data_dir).unwrap_or_else(|_| self.config.data_dir.clone());
        serde_json::json!({
            "data_dir": data_dir,
            "model": self.model,
            "classes": self.config.classes,
            "dataset": self.config.dataset,
            "batch_size": r.batch_size,
            "optimizer": r.optimizer,
            "image_size": r.image_size,
            "normalize": r.normalize,
            "seed": r.seed,
            "label_smoothing": r.label_smoothing,
            "clip_grad": r.clip_grad,
            "schedule": r.schedule,
            "ema": r.ema,
            "augment": r.augment,
            "eval_crop_pct": r.eval_crop_pct,
            // A schedule's course depends on the run's length: extending it changes every rate.
            "epochs": r.schedule.as_ref().map(|_| r.epochs),
            // A data-parallel run: its global batch and BatchNorm statistics change what is computed.
            "world_size": self.config.world_size,
            "sync_bn": self.config.sync_bn,
            "train_images": self.train_size,
            "test_images": self.test_size,
        })
    }

    /// An error listing every setting in which `self` (the checkpoint) and `wanted` differ.
    pub fn check_compatible(&self, wanted: &Meta, file: &Path) -> Result<()> {
        let (ours, theirs) = (self.fingerprint(), wanted.fingerprint());
        let differences: Vec<String> = ours
            .as_object()
            .expect("object")
            .iter()
            .filter(|(key, value)| theirs.get(key.as_str()) != Some(value))
            .map(|(key, value)| format!("{key}: checkpoint {value}, this run {}", theirs[key.as_str()]))
            .collect();
        if self.epochs_done > wanted.config.recipe.epochs {
            bail!(
                "{} has {} epochs done, more than --epochs {}: resume with --epochs {} or more, or run \
                 without --resume (or with another --out) to start afresh",
                file.display(),
                self.epochs_done,
                wanted.config.recipe.epochs,
                self.epochs_done
            );
        }
        if !differences.is_empty() {
            bail!(
                "{} was written under another configuration ({}); rerun with the checkpoint's \
                 settings, or without --resume (or with another --out) to start afresh",
                file.display(),
                differences.join("; ")
            );
        }
        Ok(())
    }
}

/// A tensor's bytes, for the safetensors writer.
struct Bytes {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &Bytes {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn to_bytes(t: &Tensor) -> Result<Bytes> {
    ensure!(t.kind() == Kind::Float, "checkpoints hold float32 tensors, got {:?}", t.kind());
    let t = t.to_device(Device::Cpu).contiguous();
    let numel = t.numel();
    let mut data = vec![0u8; numel * 4];
    t.copy_data_u8(&mut data, numel);
    Ok(Bytes { dtype: safetensors::Dtype::F32, shape: t.size().iter().map(|&d| d as usize).collect(), data })
}

/// The key of one of `optimizer`'s state tensors: `adam.exp_avg/<name>`, `sgd.momentum_buffer/<name>`.
fn state_key(optimizer: &Optimizer, state: &str, name: &str) -> String {
    format!("{}.{state}/{name}", optimizer.state_prefix())
}

/// Writes a model's variables (`vs`), its optimizer's state and `meta` atomically.
pub fn save(
    file: &Path,
    vs: &nn::VarStore,
    ema: Option<&nn::VarStore>,
    optimizer: &Optimizer,
    meta: &Meta,
) -> Result<()> {
    let mut tensors: Vec<(String, Bytes)> = Vec::new();
    for (prefix, vs) in [("model", Some(vs)), (EMA_PREFIX, ema)] {
        for (name, var) in vs.map(nn::VarStore::variables).unwrap_or_default() {
            tensors.push((format!("{prefix}/{name}"), to_bytes(&var)?));
        }
    }
    for (state, name, t) in optimizer.state() {
        tensors.push((state_key(optimizer, state, name), to_bytes(t)?));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let info = HashMap::from([(META_KEY.to_string(), serde_json::to_string(meta)?)]);
    let bytes = safetensors::serialize(tensors.iter().map(|(n, b)| (n.as_str(), b)), Some(info))
        .context("cannot serialise the checkpoint")?;
    write_atomic(file, &bytes)
}

fn corrupt(file: &Path) -> String {
    format!("{} is not a readable csp-tch checkpoint (corrupt or truncated?)", file.display())
}

/// Reads a checkpoint's bytes and metadata.
fn read(file: &Path) -> Result<(Vec<u8>, Meta)> {
    let bytes = std::fs::read(file).with_context(|| format!("cannot read checkpoint {}", file.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).with_context(|| corrupt(file))?;
    let json = header.metadata().as_ref().and_then(|m| m.get(META_KEY)).with_context(|| corrupt(file))?;
    let meta: Meta = serde_json::from_str(json).with_context(|| corrupt(file))?;
    ensure!(
        meta.format == FORMAT,
        "{} has checkpoint format {}, this csp-tch reads {FORMAT}",
        file.display(),
        meta.format
    );
    meta.check(file)?;
    Ok((bytes, meta))
}

/// A checkpoint's metadata alone.
pub fn read_meta(file: &Path) -> Result<Meta> {
    read(file).map(|(_, meta)| meta)
}

/// One tensor of a checkpoint, checked against the shape the model wants, on `like`'s device.
fn load_tensor(tensors: &safetensors::SafeTensors, file: &Path, key: &str, like: &Tensor) -> Result<Tensor> {
    let view = tensors.tensor(key).with_context(|| format!("{}: no tensor {key}", corrupt(file)))?;
    let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
    ensure!(
        view.dtype() == safetensors::Dtype::F32 && shape == like.size(),
        "{}: {key} has shape {shape:?}, the model wants {:?}",
        file.display(),
        like.size()
    );
    Ok(Tensor::from_data_size(view.data(), &shape, Kind::Float).to_device(like.device()))
}

/// Copies the checkpoint's `<prefix>/...` tensors into every variable of `vs`.
fn load_variables(tensors: &safetensors::SafeTensors, file: &Path, prefix: &str, vs: &nn::VarStore) -> Result<()> {
    let _guard = tch::no_grad_guard();
    for (name, mut var) in vs.variables() {
        var.copy_(&load_tensor(tensors, file, &format!("{prefix}/{name}"), &var)?);
    }
    Ok(())
}

/// Loads the checkpoint of `model` into its variables (`vs`) and optimizer; returns its metadata,
/// which holds the rest of the training state (metrics so far, the fp16 loss scaler).
pub fn restore(
    file: &Path,
    model: &str,
    vs: &nn::VarStore,
    ema: Option<&nn::VarStore>,
    optimizer: &mut Optimizer,
) -> Result<Meta> {
    let (bytes, meta) = read(file)?;
    ensure!(meta.model == model, "{} holds {}, not {model}", file.display(), meta.model);
    let tensors = safetensors::SafeTensors::deserialize(&bytes).with_context(|| corrupt(file))?;
    load_variables(&tensors, file, "model", vs)?;
    if let Some(ema) = ema {
        load_variables(&tensors, file, EMA_PREFIX, ema)?;
    }
    let saved = optimizer
        .state()
        .map(|(state, name, like)| load_tensor(&tensors, file, &state_key(optimizer, state, name), like))
        .collect::<Result<Vec<_>>>()?;
    optimizer.set_state(&saved, meta.optimizer_steps);
    Ok(meta)
}

/// Which of a checkpoint's weights to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Weights {
    /// The trained weights (`model/`).
    Trained,
    /// The `--ema` average (`ema/`).
    Ema,
}

/// The checkpoint's model, built on `device` with the checkpoint's weights and BN statistics (the
/// trained ones, or the `--ema` average of a run that kept one).
pub fn load_model(file: &Path, device: Device, weights: Weights) -> Result<(Meta, nn::VarStore, Backbone)> {
    let (bytes, meta) = read(file)?;
    if weights == Weights::Ema && meta.config.recipe.ema.is_none() {
        bail!(
            "{} was trained without --ema, so it holds no averaged weights; evaluate it without --ema",
            file.display()
        );
    }
    let tensors = safetensors::SafeTensors::deserialize(&bytes).with_context(|| corrupt(file))?;
    let vs = nn::VarStore::new(device);
    let model = crate::models::build(&vs.root(), crate::models::model_info(&meta.model)?, meta.config.classes);
    let prefix = match weights {
        Weights::Trained => "model",
        Weights::Ema => EMA_PREFIX,
    };
    load_variables(&tensors, file, prefix, &vs)?;
    Ok((meta, vs, model))
}
