//! Metric files and the comparison report: per-model CSVs, comparison.json and comparison.md, both
//! rendered from the typed [`Comparison`]; the report over seeds, the plot, the tutorial's figures.

pub mod compare;
pub mod format;
pub mod plot;
pub mod seeds;
pub mod tutorial;

use format::{opt, serde_label};
pub use format::{si, thousands};

use anyhow::{Context, Result};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use std::path::Path;

use crate::config::{MemoryFormat, Recipe, RunConfig};
use crate::data::DataInfo;
use crate::environment::RunEnvironment;
use crate::files::{write_atomic, OutDir};
use crate::models;
use crate::report::tutorial::{Figures, TUTORIAL_EPOCHS, TUTORIAL_PARAMS};
use crate::train::metrics::EpochMetrics;

/// Writes one model's per-epoch metrics as CSV (header = the fields of [`EpochMetrics`]).
pub fn write_csv(path: &Path, rows: &[EpochMetrics]) -> Result<()> {
    let mut writer = csv::Writer::from_writer(Vec::new());
    for row in rows {
        writer.serialize(row)?;
    }
    write_atomic(path, &writer.into_inner()?)
}

/// Reads a CSV written by [`write_csv`].
pub fn read_csv(path: &Path) -> Result<Vec<EpochMetrics>> {
    let mut reader = csv::Reader::from_path(path).with_context(|| format!("cannot read {}", path.display()))?;
    reader
        .deserialize()
        .collect::<std::result::Result<Vec<EpochMetrics>, _>>()
        .with_context(|| format!("{} is not a csp-tch metrics CSV", path.display()))
}

/// How a model's training ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// All its epochs ran.
    Ok,
    /// An error stopped it (a diverging loss, say); `error` says which.
    Failed,
    /// Stopped before its last epoch without an error (interrupted); `--resume` continues it.
    Incomplete,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Failed => "failed",
            Status::Incomplete => "incomplete",
        }
    }
}

/// One model's entry under `models` in comparison.json.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelReport {
    pub trainable_params: i64,
    /// Trainable parameters plus BatchNorm's running statistics, with the run's head (`config.classes`).
    pub paddle_style_params: i64,
    /// MACs per image at the run's image size (convolutions and head).
    pub macs: i64,
    /// The layout it trained in: "contiguous" or "channels-last" (`--memory-format`, resolved).
    #[serde(default)]
    pub memory_format: String,
    pub epochs: Vec<EpochMetrics>,
    pub final_eval_acc: Option<f64>,
    pub best_eval_acc: Option<f64>,
    /// The same of the `--ema` weights, when the run kept an average.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub final_eval_acc_ema: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_eval_acc_ema: Option<f64>,
    /// Wall time of all epochs, evaluation included.
    pub total_train_seconds: f64,
    /// Of which warm-up: the first steps' time beyond the steady rate, summed over epochs
    /// ([`EpochMetrics::warmup_seconds`]).
    #[serde(default)]
    pub warmup_seconds: f64,
    /// Whether its full batches replayed CUDA graphs (`--cuda-graphs`); unknown in a report
    /// rebuilt from the CSVs alone.
    #[serde(default)]
    pub cuda_graphs: Option<bool>,
    /// Why its steps ran eagerly, when they did: `--cuda-graphs off`, not a CUDA device, fp16, a
    /// build without graphs, or the failure that turned graphs off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda_graphs_off: Option<String>,
    pub mean_train_ms_per_step: Option<f64>,
    pub mean_eval_ms_per_step: Option<f64>,
    pub status: Status,
    pub error: Option<String>,
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// The first epoch with a non-finite metric, as an error message.
pub fn non_finite(epochs: &[EpochMetrics]) -> Option<String> {
    epochs.iter().find(|e| !e.all_finite()).map(|e| format!("epoch {} has a non-finite metric", e.epoch))
}

/// How a model ran, as only its run knew: its memory layout and whether its full batches replayed
/// CUDA graphs (and why not). Each is unknown (`None`) in a report rebuilt without a record of it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RanAs {
    pub channels_last: Option<bool>,
    pub cuda_graphs: Option<bool>,
    pub cuda_graphs_off: Option<String>,
}

impl ModelReport {
    /// The report of a model trained under `config`: the epochs it completed, how it ran and, when
    /// it failed, the error that stopped it. Fewer epochs than configured without an error is
    /// `incomplete`; a non-finite metric is a failure whatever else is known. A layout nobody
    /// recorded is the one `--memory-format`'s rule gives.
    pub fn new(
        name: &str,
        config: &RunConfig,
        epochs: Vec<EpochMetrics>,
        ran_as: RanAs,
        error: Option<String>,
    ) -> Result<ModelReport> {
        let error = error.or_else(|| non_finite(&epochs));
        let status = match &error {
            Some(_) => Status::Failed,
            None if epochs.len() < config.recipe.epochs => Status::Incomplete,
            None => Status::Ok,
        };
        let summary = models::summary(models::model_info(name)?, config.classes, config.recipe.image_size);
        Ok(ModelReport {
            trainable_params: summary.trainable_params,
            paddle_style_params: summary.paddle_style_params,
            macs: summary.macs,
            memory_format: MemoryFormat::label(
                ran_as
                    .channels_last
                    .unwrap_or_else(|| config.execution.memory_format.channels_last(|| summary.smallest_map)),
            )
            .into(),
            final_eval_acc: epochs.last().map(|e| e.eval_acc),
            best_eval_acc: epochs.iter().map(|e| e.eval_acc).reduce(f64::max),
            final_eval_acc_ema: epochs.last().and_then(|e| e.eval_acc_ema),
            best_eval_acc_ema: epochs.iter().filter_map(|e| e.eval_acc_ema).reduce(f64::max),
            // Summed from +0.0 (a float sum of nothing is -0.0).
            total_train_seconds: epochs.iter().fold(0.0, |s, e| s + e.epoch_seconds),
            warmup_seconds: epochs.iter().fold(0.0, |s, e| s + e.warmup_seconds),
            cuda_graphs: ran_as.cuda_graphs,
            cuda_graphs_off: ran_as.cuda_graphs_off,
            mean_train_ms_per_step: mean(epochs.iter().map(|e| e.train_ms_per_step)),
            mean_eval_ms_per_step: mean(epochs.iter().map(|e| e.eval_ms_per_step)),
            status,
            error,
            epochs,
        })
    }
}

/// A model against the baseline.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgainstBaseline {
    pub baseline: String,
    pub param_ratio: f64,
    pub mac_ratio: f64,
    pub eval_acc_difference: Option<f64>,
    pub train_step_time_ratio: Option<f64>,
}

/// A count the tutorial states beside ours.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatedCount {
    pub tutorial: Option<i64>,
    pub ours: i64,
    pub difference: Option<i64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochDifferences {
    pub train_acc: Option<f64>,
    pub eval_acc: Option<f64>,
    pub train_ms_per_step_ratio: Option<f64>,
}

/// One logged epoch of the tutorial beside ours.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TutorialEpochRow {
    pub epoch: usize,
    pub tutorial: Figures,
    pub ours: Option<EpochMetrics>,
    pub difference: EpochDifferences,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TutorialModel {
    pub paddle_style_params_1000_classes: StatedCount,
    pub epochs: Vec<TutorialEpochRow>,
}

/// The tutorial's figures beside ours.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TutorialSection {
    /// Whether this run follows the tutorial's recipe on its full data.
    pub comparable: bool,
    pub note: String,
    pub models: IndexMap<String, TutorialModel>,
}

/// Everything comparison.json holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Comparison {
    pub config: RunConfig,
    /// What the run read: dataset, splits, images and classes per split, the image cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<DataInfo>,
    pub environment: RunEnvironment,
    pub models: IndexMap<String, ModelReport>,
    /// Each CSP model against its plain network ([`crate::models::ModelInfo::base`]), when the run has it.
    pub comparison: IndexMap<String, AgainstBaseline>,
    pub tutorial: TutorialSection,
}

fn difference(ours: Option<f64>, theirs: Option<f64>) -> Option<f64> {
    Some(ours? - theirs?)
}

fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    let (a, b) = (a?, b?);
    (b != 0.0).then(|| a / b)
}

impl Comparison {
    /// The report of `models` trained under `config`.
    pub fn new(
        config: &RunConfig,
        environment: &RunEnvironment,
        data: Option<DataInfo>,
        models: IndexMap<String, ModelReport>,
    ) -> Comparison {
        Comparison {
            data,
            comparison: against_baseline(&models),
            tutorial: tutorial_section(config, &models),
            config: config.clone(),
            environment: environment.clone(),
            models,
        }
    }

    /// Writes comparison.json and comparison.md into `out`.
    pub fn write(&self, out: &OutDir) -> Result<()> {
        write_atomic(&out.json(), serde_json::to_string_pretty(self)?.as_bytes())?;
        write_atomic(&out.markdown(), self.markdown().as_bytes())
    }

    /// The models table, failures and the comparison with the baseline, as Markdown.
    pub fn models_markdown(&self) -> String {
        let classes = self.config.classes;
        let mut md = format!(
            "## Models\n\n| model | status | trainable params | Paddle-style params ({classes} classes) | \
             MACs/image | layout | final eval acc | best eval acc | train ms/step | eval ms/step | total s | \
             warm-up s |\n|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|\n"
        );
        for (name, m) in &self.models {
            md += &format!(
                "| {name} | {} | {} | {} | {} | {}{} | {} | {} | {} | {} | {:.1} | {:.1} |\n",
                m.status.label(),
                thousands(m.trainable_params),
                thousands(m.paddle_style_params),
                si(m.macs as f64),
                m.memory_format,
                if m.cuda_graphs == Some(true) { ", CUDA graphs" } else { "" },
                opt(m.final_eval_acc, 4),
                opt(m.best_eval_acc, 4),
                opt(m.mean_train_ms_per_step, 1),
                opt(m.mean_eval_ms_per_step, 1),
                m.total_train_seconds,
                m.warmup_seconds,
            );
        }
        for (name, error) in self.models.iter().filter_map(|(n, m)| Some((n, m.error.as_ref()?))) {
            md += &format!("\n**{name} failed:** {error}\n");
        }
        if let Some(decay) = self.config.recipe.ema {
            md += &format!(
                "\n## The averaged weights (`--ema {decay}`)\n\n| model | final eval acc | EMA final eval acc | best \
                 eval acc | EMA best eval acc |\n|---|---:|---:|---:|---:|\n"
            );
            for (name, m) in &self.models {
                md += &format!(
                    "| {name} | {} | {} | {} | {} |\n",
                    opt(m.final_eval_acc, 4),
                    opt(m.final_eval_acc_ema, 4),
                    opt(m.best_eval_acc, 4),
                    opt(m.best_eval_acc_ema, 4),
                );
            }
        }
        if !self.comparison.is_empty() {
            md += "\n## Against the plain networks\n\n| model | against | param ratio | MAC ratio | eval acc difference | \
                   train step-time ratio |\n|---|---|---:|---:|---:|---:|\n";
            for (name, c) in &self.comparison {
                md += &format!(
                    "| {name} | {} | {:.3} | {:.3} | {} | {} |\n",
                    c.baseline,
                    c.param_ratio,
                    c.mac_ratio,
                    opt(c.eval_acc_difference, 4),
                    opt(c.train_step_time_ratio, 3),
                );
            }
        }
        md
    }

    /// comparison.json as readable Markdown tables.
    pub fn markdown(&self) -> String {
        let mut md = format!("# csp-tch comparison\n\n{}\n\n", run_line(&self.config, &self.environment));
        md += &self.models_markdown();
        md += "\n## Per epoch\n\n| model | epoch | train loss | train acc | eval loss | eval acc | train ms/step | \
               eval ms/step | images/s | epoch s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
        for (name, m) in &self.models {
            for e in &m.epochs {
                md += &format!(
                    "| {name} | {} | {:.4} | {:.4} | {:.4} | {:.4} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
                    e.epoch,
                    e.train_loss,
                    e.train_acc,
                    e.eval_loss,
                    e.eval_acc,
                    e.train_ms_per_step,
                    e.eval_ms_per_step,
                    e.train_images_per_s,
                    e.epoch_seconds,
                );
            }
        }
        let tutorial = &self.tutorial;
        md += &format!(
            "\n## Beside the tutorial\n\n{}.\n\n| model | epoch | train acc (tutorial / ours) | eval acc (tutorial / \
             ours) | train ms/step (tutorial / ours) |\n|---|---:|---:|---:|---:|\n",
            tutorial.note
        );
        for (name, t) in &tutorial.models {
            for e in &t.epochs {
                let ours = e.ours.as_ref();
                md += &format!(
                    "| {name} | {} | {:.4} / {} | {} / {} | {:.0} / {} |\n",
                    e.epoch,
                    e.tutorial.train_acc,
                    opt(ours.map(|o| o.train_acc), 4),
                    opt(e.tutorial.eval_acc, 4),
                    opt(ours.map(|o| o.eval_acc), 4),
                    e.tutorial.train_ms_per_step,
                    opt(ours.map(|o| o.train_ms_per_step), 0),
                );
            }
        }
        md += "\n| model | Paddle-style params, 1000 classes (tutorial / ours) |\n|---|---:|\n";
        for (name, t) in &tutorial.models {
            let p = &t.paddle_style_params_1000_classes;
            let stated = p.tutorial.map_or_else(|| "—".into(), thousands);
            md += &format!("| {name} | {stated} / {} |\n", thousands(p.ours));
        }
        md
    }
}

/// What a rebuild takes from an earlier comparison.json: the run's configuration and environment,
/// and each model's status (its epochs come from its CSV, where a metric can be NaN, which JSON
/// cannot hold).
#[derive(Clone, Debug, Deserialize)]
pub struct RecordedRun {
    pub config: RunConfig,
    #[serde(default)]
    pub data: Option<DataInfo>,
    pub environment: RunEnvironment,
    /// Empty for a multi-seed run's report, whose models are in its seeds' folders.
    #[serde(default)]
    pub models: IndexMap<String, RecordedModel>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct RecordedModel {
    pub status: Status,
    pub error: Option<String>,
    #[serde(default)]
    pub memory_format: Option<String>,
    #[serde(default)]
    pub cuda_graphs: Option<bool>,
    #[serde(default)]
    pub cuda_graphs_off: Option<String>,
}

impl RecordedRun {
    /// The comparison.json in `out`, when there is one.
    pub fn read(out: &OutDir) -> Result<Option<RecordedRun>> {
        let path = out.json();
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let run = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a csp-tch comparison.json", path.display()))?;
        Ok(Some(run))
    }
}

/// A recipe as comparison.json's `config` holds it, key by key.
fn recipe_fields(recipe: &Recipe) -> serde_json::Map<String, serde_json::Value> {
    match serde_json::to_value(recipe) {
        Ok(serde_json::Value::Object(map)) => map,
        _ => unreachable!("a recipe serialises as an object"),
    }
}

/// The settings of `recipe` beyond those the run line names that are not the tutorial's (another
/// optimizer or its hyperparameters, a schedule, augmentation, smoothing, clipping, EMA, an eval
/// crop), each as `key value` with the value as comparison.json holds it.
fn past_the_tutorial(recipe: &Recipe) -> Vec<String> {
    let mut tutorial = Recipe::tutorial();
    tutorial.optimizer.set_lr(recipe.optimizer.lr());
    let (ours, theirs) = (recipe_fields(recipe), recipe_fields(&tutorial));
    let named = ["epochs", "batch_size", "image_size", "normalize", "seed"];
    ours.iter()
        .filter(|(k, v)| !named.contains(&k.as_str()) && theirs.get(*k) != Some(v))
        .map(|(k, v)| format!("{k} `{v}`"))
        .collect()
}

/// The run in one sentence: its recipe, data and where it ran.
pub fn run_line(config: &RunConfig, env: &RunEnvironment) -> String {
    let limit = |l: Option<usize>| l.map_or_else(|| "none".to_string(), |n| n.to_string());
    let seeds = if config.seeds.is_empty() {
        format!("seed {}", config.recipe.seed)
    } else {
        format!("seeds {}", config.seeds.iter().map(u64::to_string).collect::<Vec<_>>().join(", "))
    };
    let beyond = past_the_tutorial(&config.recipe);
    let beyond =
        if beyond.is_empty() { String::new() } else { format!(", past the tutorial's recipe: {}", beyond.join(", ")) };
    // A data-parallel run: the batch is per process, as in PyTorch; the step takes all of them.
    let batch = match config.world_size {
        1 => config.recipe.batch_size.to_string(),
        world => format!("{} per process ({} a step)", config.recipe.batch_size, config.recipe.batch_size * world),
    };
    let device = match &env.data_parallel {
        Some(p) => format!(
            "{} data-parallel processes over {} ({}){}{}",
            p.world_size,
            p.backend,
            p.devices.join(", "),
            if config.sync_bn { ", SyncBatchNorm" } else { "" },
            if p.allreduce_overlapped { ", allreduce overlapped with the backward pass" } else { "" }
        ),
        None => format!("device {} ({})", env.device, env.device_name),
    };
    format!(
        "Preset `{}`, {} px, {} epoch(s), batch {batch}, lr {}, normalize `{}`{beyond}, {seeds}; data `{}` (train \
         limit {}, test limit {}); {device}, {}, libtorch {}, csp-tch {}.",
        serde_label(&config.preset),
        config.recipe.image_size,
        config.recipe.epochs,
        config.recipe.optimizer.lr(),
        serde_label(&config.recipe.normalize),
        config.data_dir.display(),
        limit(config.train_limit),
        limit(config.test_limit),
        serde_label(&env.precision),
        env.versions.libtorch,
        env.versions.csp_tch,
    )
}

/// Every CSP model whose plain network is in the run against it: ratios of params, MACs and step
/// time, accuracy difference.
fn against_baseline(models: &IndexMap<String, ModelReport>) -> IndexMap<String, AgainstBaseline> {
    models
        .iter()
        .filter_map(|(name, r)| {
            let base_name = models::base_of(name)?;
            let base = models.get(base_name)?;
            let against = AgainstBaseline {
                baseline: base_name.into(),
                param_ratio: r.trainable_params as f64 / base.trainable_params as f64,
                mac_ratio: r.macs as f64 / base.macs as f64,
                eval_acc_difference: difference(r.final_eval_acc, base.final_eval_acc),
                train_step_time_ratio: ratio(r.mean_train_ms_per_step, base.mean_train_ms_per_step),
            };
            Some((name.clone(), against))
        })
        .collect()
}

/// The tutorial's figures beside ours, with differences.
fn tutorial_section(config: &RunConfig, models: &IndexMap<String, ModelReport>) -> TutorialSection {
    let comparable = config.comparable_to_tutorial();
    let models = models
        .iter()
        .map(|(name, report)| {
            let stated = TUTORIAL_PARAMS.iter().find(|(n, _)| n == name).map(|&(_, p)| p);
            // The tutorial states Paddle-style counts with a 1000-class head.
            let ours_1000 = models::model_info(name)
                .map_or(0, |info| models::summary(info, 1000, config.recipe.image_size).paddle_style_params);
            let epochs = TUTORIAL_EPOCHS
                .iter()
                .filter(|t| t.model == name)
                .map(|t| {
                    let ours = report.epochs.iter().find(|e| e.epoch == t.epoch).cloned();
                    let f = t.figures;
                    let difference = EpochDifferences {
                        train_acc: difference(ours.as_ref().map(|e| e.train_acc), Some(f.train_acc)),
                        eval_acc: difference(ours.as_ref().map(|e| e.eval_acc), f.eval_acc),
                        train_ms_per_step_ratio: ours.as_ref().map(|e| e.train_ms_per_step / f.train_ms_per_step),
                    };
                    TutorialEpochRow { epoch: t.epoch, tutorial: f, ours, difference }
                })
                .collect();
            let params = StatedCount { tutorial: stated, ours: ours_1000, difference: stated.map(|s| ours_1000 - s) };
            (name.clone(), TutorialModel { paddle_style_params_1000_classes: params, epochs })
        })
        .collect();
    let note = if comparable {
        "Same recipe and data as the tutorial; its timings come from one Baidu AI Studio GPU under Paddle 2.0".into()
    } else {
        let t = Recipe::tutorial();
        format!(
            "This run does not follow the tutorial's recipe (full data, {} px, {} epochs, batch {}): the tutorial's \
             figures are shown for reference only",
            t.image_size, t.epochs, t.batch_size
        )
    };
    TutorialSection { comparable, note, models }
}
