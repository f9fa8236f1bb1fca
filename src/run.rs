//! `run-all` and `train`: data, every requested model, and the files a run leaves in `--out`.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tch::Device;

use crate::checkpoint;
use crate::data::{self, Cifar, Source};
use crate::environment::{device_label, device_name, parse_device, peak_resident_mb, Environment};
use crate::models;
use crate::report::{self, ModelReport};
use crate::train::{self, Interrupted, Progress, Recipe, Trainer};

/// Named sets of defaults; explicit flags override them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Preset {
    /// The tutorial's recipe: full CIFAR-10, 224 px, 5 epochs, batch 64 (needs a GPU).
    Tutorial,
    /// CPU-sized: 32 px, 1500/500-image balanced subsets, 5 epochs (about 5 minutes for all models on 2 cores).
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
            Preset::Quick => {
                PresetDefaults { image_size: 32, epochs: 5, train_limit: Some(1500), test_limit: Some(500) }
            }
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
    pub classes: i64,
    pub data_dir: PathBuf,
    pub train_limit: Option<usize>,
    pub test_limit: Option<usize>,
    pub device: String,
    pub out: PathBuf,
}

impl RunConfig {
    /// Whether this run follows the tutorial's recipe on its full data, so that its numbers can be
    /// set beside the tutorial's.
    pub fn comparable_to_tutorial(&self) -> bool {
        let tutorial = Recipe {
            seed: self.recipe.seed,
            // Execution details, not part of the recipe.
            amp: self.recipe.amp,
            memory_format: self.recipe.memory_format,
            cuda_graphs: self.recipe.cuda_graphs,
            ..Recipe::tutorial()
        };
        self.recipe == tutorial && self.train_limit.is_none() && self.test_limit.is_none()
    }
}

/// Loads the data for a run: fetched when the folder is missing, checked, subset, moved to the device.
fn load_data(config: &RunConfig, source: &Source, device: Device) -> Result<Cifar> {
    data::ensure(&config.data_dir, source)?;
    let started = std::time::Instant::now();
    let cifar = data::load(&config.data_dir)?.limit(config.train_limit, config.test_limit, config.recipe.seed)?;
    eprintln!(
        "data: {} train / {} test images from {} ({:.1} s)",
        cifar.train_len(),
        cifar.test_len(),
        config.data_dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(cifar.to_device(device))
}

/// Trains and evaluates every model of `config`, writing `<model>.csv` and the model's checkpoint
/// after each epoch and comparison.json / comparison.md after each model. A model that fails is
/// recorded as failed and the others still run; the result is an error when any failed.
/// With `resume`, each model continues from its checkpoint, and finished models are not retrained.
pub fn run(config: &RunConfig, source: &Source, resume: bool) -> Result<()> {
    let device = parse_device(&config.device)?;
    for name in &config.models {
        models::model_info(name)?.check_image_size(config.recipe.image_size)?;
    }
    let data = load_data(config, source, device)?;
    let mut environment = serde_json::to_value(report::RunEnvironment {
        device: device_label(device),
        device_name: device_name(device),
        precision: config.recipe.precision(device),
        versions: Environment::detect(),
    })?;
    if resume {
        // Refuse a mismatched checkpoint before any training.
        for name in &config.models {
            let file = checkpoint::path(&config.out, name);
            if file.exists() {
                checkpoint::read_meta(&file)?.check_compatible(&run_meta(config, name, &data, &environment), &file)?;
            }
        }
    } else {
        remove_previous_outputs(&config.out)?;
    }
    train::stop_on_ctrl_c();
    let progress = Progress::detect();
    let mut reports: Vec<(String, ModelReport)> = Vec::new();
    let mut summary = Value::Null;
    for name in &config.models {
        let mut trainer = Trainer::new(name, config.classes, &config.recipe, device)?;
        let result = train_model(config, &mut trainer, &data, progress, reports.is_empty(), resume, &environment);
        if let Err(err) = &result {
            if err.is::<Interrupted>() {
                eprintln!("{}", resume_hint(config, name, trainer.history.len()));
                return result;
            }
            eprintln!("error: {name} failed: {err:#}");
        }
        let cuda_graphs = trainer.replays_cuda_graphs();
        let mut report = ModelReport::new(name, config, trainer.history, result.err())?;
        report.cuda_graphs = Some(cuda_graphs);
        reports.push((name.clone(), report));
        // Host memory only: libtorch's CUDA allocator is not visible through tch.
        environment["peak_resident_mb"] = serde_json::json!(peak_resident_mb());
        summary = report::write_comparison(&config.out, config, &environment, &reports)?;
    }
    println!("{}", report::models_markdown(&summary));
    eprintln!("results in {}", config.out.display());
    let failed: Vec<&str> = reports.iter().filter(|(_, r)| r.error.is_some()).map(|(n, _)| n.as_str()).collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} models failed ({}); see {}",
            failed.len(),
            reports.len(),
            failed.join(", "),
            config.out.join("comparison.md").display()
        );
    }
    Ok(())
}

/// The checkpoint metadata of `name` in this run, with `trainer`'s progress filled in by the caller.
fn run_meta(config: &RunConfig, name: &str, data: &Cifar, environment: &serde_json::Value) -> checkpoint::Meta {
    checkpoint::Meta {
        format: checkpoint::FORMAT,
        model: name.to_string(),
        config: config.clone(),
        train_size: data.train_len(),
        test_size: data.test_len(),
        epochs_done: 0,
        adam_steps: 0,
        loss_scaler: None,
        history: Vec::new(),
        environment: environment.clone(),
        cuda_graphs: None,
    }
}

/// Trains one model up to the configured epochs (from its checkpoint when resuming), writing its
/// CSV and checkpoint after every epoch; the epochs done stay in `trainer.history` either way.
fn train_model(
    config: &RunConfig,
    trainer: &mut Trainer,
    data: &Cifar,
    progress: Progress,
    first_model: bool,
    resume: bool,
    environment: &serde_json::Value,
) -> Result<()> {
    let name = trainer.name.clone();
    let file = checkpoint::path(&config.out, &name);
    let csv = config.out.join(format!("{name}.csv"));
    if resume && file.exists() {
        let meta = checkpoint::restore(&file, trainer)?;
        eprintln!("{name}: resuming after epoch {} from {}", meta.epochs_done, file.display());
        report::write_csv(&csv, &trainer.history)?;
    }
    let announce = first_model && trainer.vs.device() == Device::Cpu && config.preset == Preset::Tutorial;
    let mut first_steps = |ms_per_step: f64| announce.then(|| cpu_estimate(config, data, ms_per_step));
    let mut meta = run_meta(config, &name, data, environment);
    while trainer.history.len() < config.recipe.epochs {
        trainer.run_epoch(data, &config.recipe, progress, &mut first_steps)?;
        meta.epochs_done = trainer.history.len();
        meta.adam_steps = trainer.adam.steps();
        meta.loss_scaler = trainer.scaler.clone();
        meta.history = trainer.history.clone();
        meta.cuda_graphs = Some(trainer.replays_cuda_graphs());
        checkpoint::save(&file, trainer, &meta)?;
        report::write_csv(&csv, &trainer.history)?;
    }
    Ok(())
}

/// What to tell a user who pressed Ctrl-C.
fn resume_hint(config: &RunConfig, name: &str, epochs_done: usize) -> String {
    let mut args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--resume") {
        args.push("--resume".into());
    }
    let quoted: Vec<String> = args
        .iter()
        .map(|a| {
            if a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=,".contains(c)) {
                a.clone()
            } else {
                format!("'{a}'")
            }
        })
        .collect();
    format!(
        "stopped: {name} keeps its checkpoint after epoch {epochs_done} in {}; resume with:\n  {}",
        checkpoint::path(&config.out, name).display(),
        quoted.join(" ")
    )
}

/// On a CPU with the tutorial preset: how long the whole run will take, from the first steps.
fn cpu_estimate(config: &RunConfig, data: &Cifar, ms_per_step: f64) -> String {
    // Step time scales with a model's MACs; evaluation costs about a third of a training step.
    let macs = |name: &str| {
        let info = models::model_info(name).expect("checked");
        models::summary(info, config.classes, config.recipe.image_size).macs as f64
    };
    let first = macs(&config.models[0]);
    let relative: f64 = config.models.iter().map(|m| macs(m) / first).sum();
    let bs = config.recipe.batch_size as f64;
    let steps = (data.train_len() as f64 / bs).ceil() + (data.test_len() as f64 / bs).ceil() / 3.0;
    let minutes = ms_per_step * steps * config.recipe.epochs as f64 * relative / 6e4;
    let duration = match minutes {
        m if m < 1.5 => "a minute or less".to_string(),
        m if m < 90.0 => format!("about {m:.0} minutes"),
        m => format!("about {:.1} hours", m / 60.0),
    };
    let hint = if minutes > 15.0 {
        " The tutorial preset is meant for a GPU; for a CPU-sized run use --preset quick (about 5 minutes)."
    } else {
        ""
    };
    format!(
        "note: {} trains at {ms_per_step:.0} ms/step on this CPU; this run ({} model(s), {} epoch(s)) \
         should take {duration}.{hint}",
        config.models[0],
        config.models.len(),
        config.recipe.epochs
    )
}

/// Removes what an earlier run left in `out` (every model's CSV and checkpoint, the report files),
/// so that a folder never mixes two runs' results.
fn remove_previous_outputs(out: &Path) -> Result<()> {
    let per_model = models::model_names()
        .into_iter()
        .flat_map(|name| [out.join(format!("{name}.csv")), checkpoint::path(out, name)]);
    let reports = report::REPORT_FILES.iter().map(|f| out.join(f));
    for path in per_model.chain(reports) {
        if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}
