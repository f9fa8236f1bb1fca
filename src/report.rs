//! Metric files, the comparison report and how numbers are printed.

use anyhow::{Context, Result};
use std::io::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::environment::Environment;
use crate::models;
use crate::run::RunConfig;
use crate::train::{EpochMetrics, MemoryFormat};

/// `40595178` -> `40,595,178`.
pub fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 {
        out.insert(0, '-');
    }
    out
}

/// `7108000000` -> `7.108 G` (three decimals, SI prefix).
pub fn si(n: f64) -> String {
    let (value, prefix) = match n.abs() {
        x if x >= 1e9 => (n / 1e9, "G"),
        x if x >= 1e6 => (n / 1e6, "M"),
        x if x >= 1e3 => (n / 1e3, "k"),
        _ => (n, ""),
    };
    format!("{value:.3} {prefix}")
}

/// Writes `path` through a temporary file in the same folder and a rename, so a reader never sees
/// a half-written file and an interrupted run leaves the previous version intact.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create folder {}", dir.display()))?;
    let name = path.file_name().context("output path has no file name")?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("cannot write {}", path.display()))
}

/// Files a run writes beside the per-model CSVs.
pub const REPORT_FILES: [&str; 3] = ["comparison.json", "comparison.md", "curves.svg"];
/// The baseline every other model is compared with.
pub const BASELINE: &str = "darknet53";

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

/// Where a run ran.
#[derive(Clone, Debug, Serialize)]
pub struct RunEnvironment {
    pub device: String,
    pub device_name: String,
    /// What forward passes ran in (`--amp`).
    pub precision: crate::amp::Precision,
    #[serde(flatten)]
    pub versions: Environment,
}

/// One model's entry under `models` in comparison.json.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelReport {
    pub trainable_params: i64,
    pub paddle_style_params: i64,
    /// MACs per image at the run's image size (convolutions and head).
    pub macs: i64,
    /// The layout it trained in: "contiguous" or "channels-last" (`--memory-format`, resolved).
    #[serde(default)]
    pub memory_format: String,
    pub epochs: Vec<EpochMetrics>,
    pub final_eval_acc: Option<f64>,
    pub best_eval_acc: Option<f64>,
    /// Wall time of all epochs, evaluation included.
    pub total_train_seconds: f64,
    /// Of which warm-up: the first steps' time beyond the steady rate, summed over epochs
    /// ([`EpochMetrics::warmup_seconds`]).
    #[serde(default)]
    pub warmup_seconds: f64,
    /// Whether its full batches replayed CUDA graphs (`--cuda-graphs`); unknown in a report
    /// rebuilt from the CSVs.
    #[serde(default)]
    pub cuda_graphs: Option<bool>,
    pub mean_train_ms_per_step: Option<f64>,
    pub mean_eval_ms_per_step: Option<f64>,
    /// "ok" or "failed".
    pub status: String,
    pub error: Option<String>,
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

impl ModelReport {
    /// The report of a model trained under `config`: the epochs it completed and, when it
    /// failed, the error that stopped it.
    pub fn new(
        name: &str,
        config: &RunConfig,
        epochs: Vec<EpochMetrics>,
        error: Option<anyhow::Error>,
    ) -> Result<ModelReport> {
        let error = error.map(|e| format!("{e:#}"));
        let summary = models::summary(models::model_info(name)?, config.classes, config.recipe.image_size);
        Ok(ModelReport {
            trainable_params: summary.trainable_params,
            paddle_style_params: summary.paddle_style_params,
            macs: summary.macs,
            memory_format: MemoryFormat::label(config.recipe.memory_format.channels_last(|| summary.smallest_map))
                .into(),
            final_eval_acc: epochs.last().map(|e| e.eval_acc),
            best_eval_acc: epochs.iter().map(|e| e.eval_acc).reduce(f64::max),
            total_train_seconds: epochs.iter().map(|e| e.epoch_seconds).sum(),
            warmup_seconds: epochs.iter().map(|e| e.warmup_seconds).sum(),
            cuda_graphs: None,
            mean_train_ms_per_step: mean(epochs.iter().map(|e| e.train_ms_per_step)),
            mean_eval_ms_per_step: mean(epochs.iter().map(|e| e.eval_ms_per_step)),
            status: if error.is_some() { "failed" } else { "ok" }.into(),
            error,
            epochs,
        })
    }

    /// Paddle-style parameters with a `classes`-way head (the tutorial's figures use 1000).
    fn paddle_style_params_with(&self, classes: i64, own_classes: i64) -> i64 {
        self.paddle_style_params + (classes - own_classes) * (models::HEAD_FEATURES + 1)
    }
}

/// One epoch of the tutorial's log (TUTORIAL.md, "The text's results").
pub struct TutorialEpoch {
    pub model: &'static str,
    pub epoch: usize,
    pub train_acc: f64,
    pub eval_acc: Option<f64>,
    pub train_ms_per_step: f64,
    pub eval_ms_per_step: Option<f64>,
    pub last_train_loss: f64,
    pub last_eval_loss: Option<f64>,
}

const fn tutorial_epoch(
    model: &'static str,
    epoch: usize,
    (train_acc, eval_acc): (f64, Option<f64>),
    (train_ms_per_step, eval_ms_per_step): (f64, Option<f64>),
    (last_train_loss, last_eval_loss): (f64, Option<f64>),
) -> TutorialEpoch {
    TutorialEpoch {
        model,
        epoch,
        train_acc,
        eval_acc,
        train_ms_per_step,
        eval_ms_per_step,
        last_train_loss,
        last_eval_loss,
    }
}

/// The tutorial's logged epochs (one GPU on Baidu AI Studio, Paddle 2.0, 224 px, batch 64).
pub const TUTORIAL_EPOCHS: [TutorialEpoch; 7] = [
    tutorial_epoch("cspdarknet53", 1, (0.4020, Some(0.4445)), (355.0, Some(187.0)), (1.0268, Some(1.5527))),
    tutorial_epoch("cspdarknet53", 2, (0.6099, None), (354.0, None), (1.2340, None)),
    tutorial_epoch("darknet53", 1, (0.3489, Some(0.4902)), (233.0, Some(169.0)), (1.4409, Some(1.5534))),
    tutorial_epoch("darknet53", 2, (0.5933, Some(0.6465)), (227.0, Some(165.0)), (0.9414, Some(1.1782))),
    tutorial_epoch("darknet53", 3, (0.7077, Some(0.6902)), (228.0, Some(181.0)), (1.2450, Some(0.9096))),
    tutorial_epoch("darknet53", 4, (0.7720, Some(0.7727)), (228.0, Some(165.0)), (0.5926, Some(0.6070))),
    tutorial_epoch("darknet53", 5, (0.8134, Some(0.8045)), (226.0, Some(167.0)), (0.1841, Some(0.3209))),
];

/// Paddle-style parameter counts (1000-class head) as the tutorial's text states them.
pub const TUTORIAL_PARAMS: [(&str, i64); 2] = [("darknet53", 41_645_640), ("cspdarknet53", 19_047_240)];

fn diff(ours: Option<f64>, theirs: Option<f64>) -> Value {
    match (ours, theirs) {
        (Some(a), Some(b)) => json!(a - b),
        _ => Value::Null,
    }
}

/// `models` beside their baseline: ratios of params, MACs and step time, accuracy difference.
fn comparison_section(reports: &[(String, ModelReport)]) -> Value {
    let Some((_, base)) = reports.iter().find(|(n, _)| n == BASELINE) else {
        return json!({});
    };
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => json!(a / b),
        _ => Value::Null,
    };
    let mut section = serde_json::Map::new();
    for (name, r) in reports.iter().filter(|(n, _)| n != BASELINE) {
        section.insert(
            name.clone(),
            json!({
                "baseline": BASELINE,
                "param_ratio": r.trainable_params as f64 / base.trainable_params as f64,
                "mac_ratio": r.macs as f64 / base.macs as f64,
                "eval_acc_difference": diff(r.final_eval_acc, base.final_eval_acc),
                "train_step_time_ratio": ratio(r.mean_train_ms_per_step, base.mean_train_ms_per_step),
            }),
        );
    }
    Value::Object(section)
}

/// The tutorial's figures beside ours, with differences.
fn tutorial_section(config: &RunConfig, reports: &[(String, ModelReport)]) -> Value {
    let comparable = config.comparable_to_tutorial();
    let mut models = serde_json::Map::new();
    for (name, report) in reports {
        let stated = TUTORIAL_PARAMS.iter().find(|(n, _)| n == name).map(|&(_, p)| p);
        let ours_1000 = report.paddle_style_params_with(1000, config.classes);
        let epochs: Vec<Value> = TUTORIAL_EPOCHS
            .iter()
            .filter(|t| t.model == name)
            .map(|t| {
                let ours = report.epochs.iter().find(|e| e.epoch == t.epoch);
                json!({
                    "epoch": t.epoch,
                    "tutorial": {
                        "train_acc": t.train_acc, "eval_acc": t.eval_acc,
                        "train_ms_per_step": t.train_ms_per_step, "eval_ms_per_step": t.eval_ms_per_step,
                        "last_train_loss": t.last_train_loss, "last_eval_loss": t.last_eval_loss,
                    },
                    "ours": ours,
                    "difference": {
                        "train_acc": diff(ours.map(|e| e.train_acc), Some(t.train_acc)),
                        "eval_acc": diff(ours.map(|e| e.eval_acc), t.eval_acc),
                        "train_ms_per_step_ratio": ours.map(|e| e.train_ms_per_step / t.train_ms_per_step),
                    },
                })
            })
            .collect();
        models.insert(
            name.clone(),
            json!({
                "paddle_style_params_1000_classes": {
                    "tutorial": stated,
                    "ours": ours_1000,
                    "difference": stated.map(|s| ours_1000 - s),
                },
                "epochs": epochs,
            }),
        );
    }
    json!({
        "comparable": comparable,
        "note": if comparable {
            "Same recipe and data as the tutorial; its timings come from one Baidu AI Studio GPU under Paddle 2.0"
        } else {
            "This run does not follow the tutorial's recipe (full data, 224 px, 5 epochs, batch 64): the tutorial's figures are shown for reference only"
        },
        "models": models,
    })
}

/// The whole of comparison.json.
pub fn comparison_json(config: &RunConfig, environment: &Value, reports: &[(String, ModelReport)]) -> Value {
    let models: serde_json::Map<String, Value> =
        reports.iter().map(|(n, r)| (n.clone(), serde_json::to_value(r).expect("serialisable"))).collect();
    json!({
        "config": config,
        "environment": environment,
        "models": models,
        "comparison": comparison_section(reports),
        "tutorial": tutorial_section(config, reports),
    })
}

fn opt(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "—".into(), |v| format!("{v:.digits$}"))
}

/// The models table, failures and the comparison with the baseline, as Markdown.
pub fn models_markdown(report: &Value) -> String {
    let mut md = String::new();
    md += "## Models\n\n| model | status | trainable params | Paddle-style params | MACs/image | layout | final eval acc | best eval acc | train ms/step | eval ms/step | total s | warm-up s |\n|---|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|\n";
    let models = report["models"].as_object().cloned().unwrap_or_default();
    for (name, m) in &models {
        md += &format!(
            "| {name} | {} | {} | {} | {} | {}{} | {} | {} | {} | {} | {:.1} | {:.1} |\n",
            m["status"].as_str().unwrap_or("?"),
            thousands(m["trainable_params"].as_i64().unwrap_or(0)),
            thousands(m["paddle_style_params"].as_i64().unwrap_or(0)),
            si(m["macs"].as_f64().unwrap_or(0.0)),
            m["memory_format"].as_str().filter(|s| !s.is_empty()).unwrap_or("?"),
            if m["cuda_graphs"] == true { ", CUDA graphs" } else { "" },
            opt(m["final_eval_acc"].as_f64(), 4),
            opt(m["best_eval_acc"].as_f64(), 4),
            opt(m["mean_train_ms_per_step"].as_f64(), 1),
            opt(m["mean_eval_ms_per_step"].as_f64(), 1),
            m["total_train_seconds"].as_f64().unwrap_or(0.0),
            m["warmup_seconds"].as_f64().unwrap_or(0.0),
        );
    }
    for (name, m) in models.iter().filter(|(_, m)| !m["error"].is_null()) {
        md += &format!("\n**{name} failed:** {}\n", m["error"].as_str().unwrap_or("?"));
    }
    if let Some(comparison) = report["comparison"].as_object().filter(|c| !c.is_empty()) {
        md += &format!("\n## Against {BASELINE}\n\n| model | param ratio | MAC ratio | eval acc difference | train step-time ratio |\n|---|---:|---:|---:|---:|\n");
        for (name, c) in comparison {
            md += &format!(
                "| {name} | {} | {} | {} | {} |\n",
                opt(c["param_ratio"].as_f64(), 3),
                opt(c["mac_ratio"].as_f64(), 3),
                opt(c["eval_acc_difference"].as_f64(), 4),
                opt(c["train_step_time_ratio"].as_f64(), 3),
            );
        }
    }
    md
}

/// comparison.json as readable Markdown tables.
pub fn comparison_markdown(report: &Value) -> String {
    let mut md = String::new();
    let config = &report["config"];
    let env = &report["environment"];
    md += "# csp-tch comparison\n\n";
    md += &format!(
        "Preset `{}`, {} px, {} epoch(s), batch {}, lr {}, normalize `{}`, seed {}; data `{}` \
         (train limit {}, test limit {}); device {} ({}), {}, libtorch {}, csp-tch {}.\n\n",
        config["preset"].as_str().unwrap_or("?"),
        config["image_size"],
        config["epochs"],
        config["batch_size"],
        config["adam"]["lr"],
        config["normalize"].as_str().unwrap_or("?"),
        config["seed"],
        config["data_dir"].as_str().unwrap_or("?"),
        if config["train_limit"].is_null() { "none".into() } else { config["train_limit"].to_string() },
        if config["test_limit"].is_null() { "none".into() } else { config["test_limit"].to_string() },
        env["device"].as_str().unwrap_or("?"),
        env["device_name"].as_str().unwrap_or("?"),
        env["precision"].as_str().unwrap_or("precision not recorded"),
        env["libtorch"].as_str().unwrap_or("?"),
        env["csp_tch"].as_str().unwrap_or("?"),
    );
    md += &models_markdown(report);
    let models = report["models"].as_object().cloned().unwrap_or_default();
    md += "\n## Per epoch\n\n| model | epoch | train loss | train acc | eval loss | eval acc | train ms/step | eval ms/step | images/s | epoch s |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
    for (name, m) in &models {
        for e in m["epochs"].as_array().into_iter().flatten() {
            md += &format!(
                "| {name} | {} | {:.4} | {:.4} | {:.4} | {:.4} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
                e["epoch"],
                e["train_loss"].as_f64().unwrap_or(f64::NAN),
                e["train_acc"].as_f64().unwrap_or(f64::NAN),
                e["eval_loss"].as_f64().unwrap_or(f64::NAN),
                e["eval_acc"].as_f64().unwrap_or(f64::NAN),
                e["train_ms_per_step"].as_f64().unwrap_or(f64::NAN),
                e["eval_ms_per_step"].as_f64().unwrap_or(f64::NAN),
                e["train_images_per_s"].as_f64().unwrap_or(f64::NAN),
                e["epoch_seconds"].as_f64().unwrap_or(f64::NAN),
            );
        }
    }
    let tutorial = &report["tutorial"];
    md += &format!(
        "\n## Beside the tutorial\n\n{}.\n\n| model | epoch | train acc (tutorial / ours) | eval acc (tutorial / ours) | train ms/step (tutorial / ours) |\n|---|---:|---:|---:|---:|\n",
        tutorial["note"].as_str().unwrap_or("")
    );
    for (name, t) in tutorial["models"].as_object().into_iter().flatten() {
        for e in t["epochs"].as_array().into_iter().flatten() {
            let (tut, ours) = (&e["tutorial"], &e["ours"]);
            md += &format!(
                "| {name} | {} | {} / {} | {} / {} | {} / {} |\n",
                e["epoch"],
                opt(tut["train_acc"].as_f64(), 4),
                opt(ours["train_acc"].as_f64(), 4),
                opt(tut["eval_acc"].as_f64(), 4),
                opt(ours["eval_acc"].as_f64(), 4),
                opt(tut["train_ms_per_step"].as_f64(), 0),
                opt(ours["train_ms_per_step"].as_f64(), 0),
            );
        }
    }
    md += "\n| model | Paddle-style params, 1000 classes (tutorial / ours) |\n|---|---:|\n";
    for (name, t) in tutorial["models"].as_object().into_iter().flatten() {
        let p = &t["paddle_style_params_1000_classes"];
        let stated = p["tutorial"].as_i64().map_or_else(|| "—".into(), thousands);
        md += &format!("| {name} | {stated} / {} |\n", thousands(p["ours"].as_i64().unwrap_or(0)));
    }
    md
}

/// Writes comparison.json, comparison.md and curves.svg into `out`; returns the report.
pub fn write_comparison(
    out: &Path,
    config: &RunConfig,
    environment: &Value,
    reports: &[(String, ModelReport)],
) -> Result<Value> {
    let report = comparison_json(config, environment, reports);
    write_atomic(&out.join(REPORT_FILES[0]), serde_json::to_string_pretty(&report)?.as_bytes())?;
    write_atomic(&out.join(REPORT_FILES[1]), comparison_markdown(&report).as_bytes())?;
    crate::plot::write(out, reports)?;
    Ok(report)
}

/// Rebuilds comparison.json, comparison.md and curves.svg in `out` from the per-model CSVs there.
/// The run's configuration and environment, and whether each model replayed CUDA graphs, come from
/// the models' checkpoint metadata, or else from the comparison.json already there.
pub fn rebuild(out: &Path) -> Result<Vec<String>> {
    let mut found = Vec::new();
    let mut source: Option<(RunConfig, Value)> = None;
    for name in models::model_names() {
        let csv = out.join(format!("{name}.csv"));
        if !csv.exists() {
            continue;
        }
        let epochs = read_csv(&csv)?;
        let checkpoint = crate::checkpoint::path(out, name);
        let meta = if checkpoint.exists() { Some(crate::checkpoint::read_meta(&checkpoint)?) } else { None };
        let cuda_graphs = meta.as_ref().and_then(|m| m.cuda_graphs);
        if let (None, Some(meta)) = (&source, meta) {
            source = Some((meta.config, meta.environment));
        }
        found.push((name.to_string(), epochs, cuda_graphs));
    }
    anyhow::ensure!(
        !found.is_empty(),
        "{} holds no model CSV (darknet53.csv, ...); point --out at a run's output folder",
        out.display()
    );
    let previous_path = out.join(REPORT_FILES[0]);
    let previous: Option<Value> = match std::fs::read_to_string(&previous_path) {
        Ok(text) => {
            Some(serde_json::from_str(&text).with_context(|| format!("{} is not JSON", previous_path.display()))?)
        }
        Err(_) => None,
    };
    let (config, environment) = match (source, &previous) {
        (Some(found), _) => found,
        (None, Some(json)) => {
            let config = serde_json::from_value(json["config"].clone())
                .with_context(|| format!("{} has no readable config", previous_path.display()))?;
            (config, json["environment"].clone())
        }
        (None, None) => anyhow::bail!(
            "cannot tell the run's configuration: no checkpoint in {} and no {}",
            out.join("checkpoints").display(),
            previous_path.display()
        ),
    };
    let names: Vec<String> = found.iter().map(|(n, _, _)| n.clone()).collect();
    let reports = found
        .into_iter()
        .map(|(name, epochs, cuda_graphs)| {
            let mut report = ModelReport::new(&name, &config, epochs, None)?;
            report.cuda_graphs = cuda_graphs
                .or_else(|| previous.as_ref().and_then(|json| json["models"][name.as_str()]["cuda_graphs"].as_bool()));
            Ok((name, report))
        })
        .collect::<Result<Vec<_>>>()?;
    write_comparison(out, &config, &environment, &reports)?;
    Ok(names)
}
