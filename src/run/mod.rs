//! `run-all` and `train`: data, every requested model, and the files a run leaves in `--out`;
//! `report`, which rebuilds a run's report from those files.

use anyhow::{bail, Context, Result};
use indexmap::IndexMap;
use std::path::Path;
use tch::Device;

use crate::config::{Preset, RunConfig};
use crate::data::{self, Cifar, Source};
use crate::environment::{parse_device, peak_resident_mb, RunEnvironment};
use crate::files::{self, OutputLock};
use crate::models;
use crate::report::plot::{self, ModelCurves};
use crate::report::seeds::{self, SeedsReport};
use crate::report::{self, Comparison, ModelReport};
use crate::train::checkpoint;
use crate::train::{self, Interrupted, Progress, Trainer};

mod rebuild;
use rebuild::collect;
pub use rebuild::rebuild;

/// Loads the data for a run (already fetched): checked, subset, moved to the device.
fn load_data(config: &RunConfig, device: Device) -> Result<Cifar> {
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

/// Runs `config`: once, or once per seed of `config.seeds` ([`run_seeds`]).
pub fn run(config: &RunConfig, source: &Source, resume: bool) -> Result<()> {
    if config.seeds.is_empty() {
        run_one(config, source, resume).map(drop)
    } else {
        run_seeds(config, source, resume)
    }
}

/// Trains and evaluates every model of `config`, writing `<model>.csv` and the model's checkpoint
/// after each epoch and the report (comparison.json / .md, curves.svg) after each model. A model that
/// fails is recorded as failed and the others still run; the result is an error when any failed.
/// With `resume`, each model continues from its checkpoint, and finished models are not retrained.
/// The output folder is locked for the whole run, and checked to be writable before any data loads.
fn run_one(config: &RunConfig, source: &Source, resume: bool) -> Result<()> {
    let device = parse_device(&config.device)?;
    for name in &config.models {
        models::model_info(name)?.check_image_size(config.recipe.image_size)?;
    }
    let _lock = OutputLock::acquire(&config.out)?;
    files::remove_leftovers(&config.out)?;
    files::remove_leftovers(&config.out.join(checkpoint::FOLDER))?;
    data::ensure(&config.data_dir, source)?;
    // From here on, the first Ctrl-C stops the run before its next step (a download before this
    // stops at once). Installed before the data loads, so that no Ctrl-C is lost in between.
    train::stop_on_ctrl_c();
    let data = load_data(config, device)?;
    let mut environment = RunEnvironment::detect(device, config.recipe.precision(device));
    eprintln!(
        "{}",
        crate::train::cuda_graph::decision_line(config.recipe.cuda_graphs, device, config.recipe.precision(device))?
    );
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
    let progress = Progress::detect();
    let mut reports: IndexMap<String, ModelReport> = IndexMap::new();
    let mut comparison = None;
    for name in &config.models {
        let mut trainer = Trainer::new(name, config.classes, &config.recipe, device)?;
        let result = train_model(config, &mut trainer, &data, progress, reports.is_empty(), resume, &environment);
        if let Err(err) = &result {
            if err.is::<Interrupted>() {
                eprintln!("{}", stop_message(config, name, trainer.history.len(), !reports.is_empty()));
                return result;
            }
            eprintln!("error: {name} failed: {err:#}");
        }
        let graphs = trainer.graph_status();
        let mut report = ModelReport::new(name, config, trainer.history, result.err().map(|e| format!("{e:#}")))?;
        report.set_graphs(Some(graphs.replayed), graphs.off_reason);
        reports.insert(name.clone(), report);
        environment.peak_resident_mb = peak_resident_mb();
        comparison = Some(write_report(&config.out, Comparison::new(config, &environment, reports.clone()))?);
    }
    if let Some(comparison) = &comparison {
        println!("{}", comparison.models_markdown());
    }
    eprintln!("results in {}", config.out.display());
    let failed: Vec<&str> = reports.iter().filter(|(_, r)| r.error.is_some()).map(|(n, _)| n.as_str()).collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} models failed ({}); see {}",
            failed.len(),
            reports.len(),
            failed.join(", "),
            config.out.join(report::MARKDOWN_FILE).display()
        );
    }
    Ok(())
}

/// Every model once per seed of `config.seeds`, each seed's run in `out/seed-<s>/` exactly as a
/// single run writes it, and after each seed the report over the seeds so far in `out`. A seed whose
/// models failed does not stop the others; Ctrl-C does, and `--resume` continues where it stopped
/// (finished seeds and models are not retrained).
fn run_seeds(config: &RunConfig, source: &Source, resume: bool) -> Result<()> {
    let _lock = OutputLock::acquire(&config.out)?;
    if !resume {
        remove_previous_outputs(&config.out)?;
        remove_seed_folders(&config.out)?;
    }
    let mut failures = Vec::new();
    for &seed in &config.seeds {
        eprintln!(
            "seed {seed} ({} of {}): {}",
            seed_position(config, seed),
            config.seeds.len(),
            config.for_seed(seed).out.display()
        );
        match run_one(&config.for_seed(seed), source, resume) {
            Err(err) if err.is::<Interrupted>() => return Err(err),
            Err(err) => failures.push(format!("seed {seed}: {err:#}")),
            Ok(()) => {}
        }
        let report = write_seeds_report(config)?;
        if seed == *config.seeds.last().expect("seeds") {
            println!("{}", report.markdown());
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(())
}

fn seed_position(config: &RunConfig, seed: u64) -> usize {
    config.seeds.iter().position(|&s| s == seed).map_or(0, |i| i + 1)
}

/// Removes the seed folders an earlier multi-seed run left in `out` (their csp-tch files only).
fn remove_seed_folders(out: &Path) -> Result<()> {
    let Ok(entries) = std::fs::read_dir(out) else { return Ok(()) };
    for entry in entries.flatten().filter(|e| e.file_name().to_string_lossy().starts_with("seed-")) {
        remove_previous_outputs(&entry.path())?;
        let _ = std::fs::remove_dir(entry.path().join(checkpoint::FOLDER));
        let _ = std::fs::remove_dir(entry.path());
    }
    Ok(())
}

/// The report over the seeds of `config` that have one so far, written into `config.out`.
fn write_seeds_report(config: &RunConfig) -> Result<SeedsReport> {
    let mut runs = Vec::new();
    let mut folders = IndexMap::new();
    let mut environment = None;
    for &seed in &config.seeds {
        let child = config.for_seed(seed);
        let has_results = child.out.join(report::JSON_FILE).exists()
            || config.models.iter().any(|m| report::csv_path(&child.out, m).exists());
        if !has_results {
            continue;
        }
        let collected = collect(&child.out)?;
        environment.get_or_insert(collected.environment);
        folders.insert(seed.to_string(), format!("seed-{seed}"));
        runs.push((seed, collected.models));
    }
    let Some(environment) = environment else { bail!("no seed of {} has results yet", config.out.display()) };
    let section = seeds::aggregate(&runs);
    let curves: Vec<ModelCurves> = section
        .models
        .iter()
        .filter_map(|(name, spread)| {
            let any = runs.iter().find_map(|(_, models)| models.get(name))?;
            Some(ModelCurves::of_seeds(name, spread, any))
        })
        .collect();
    let report = SeedsReport { config: config.clone(), environment, runs: folders, seeds: section };
    report.write(&config.out)?;
    plot::write_curves(&config.out, &curves)?;
    Ok(report)
}

/// Writes comparison.json, comparison.md and curves.svg into `out`.
fn write_report(out: &Path, comparison: Comparison) -> Result<Comparison> {
    comparison.write(out)?;
    plot::write(out, &comparison.models)?;
    Ok(comparison)
}

/// The checkpoint metadata of `name` in this run, with `trainer`'s progress filled in by the caller.
fn run_meta(config: &RunConfig, name: &str, data: &Cifar, environment: &RunEnvironment) -> checkpoint::Meta {
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
        cuda_graphs_off: None,
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
    environment: &RunEnvironment,
) -> Result<()> {
    let name = trainer.name.clone();
    let file = checkpoint::path(&config.out, &name);
    let csv = report::csv_path(&config.out, &name);
    if resume && file.exists() {
        let meta = trainer.restore_checkpoint(&file)?;
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
        let graphs = trainer.graph_status();
        (meta.cuda_graphs, meta.cuda_graphs_off) = (Some(graphs.replayed), graphs.off_reason);
        trainer.save_checkpoint(&file, &meta)?;
        report::write_csv(&csv, &trainer.history)?;
    }
    Ok(())
}

/// What to tell a user who pressed Ctrl-C while `name` trained with `epochs_done` epochs
/// checkpointed; `earlier_done`: models before it in this run finished.
fn stop_message(config: &RunConfig, name: &str, epochs_done: usize, earlier_done: bool) -> String {
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
    let kept = if epochs_done > 0 {
        format!(
            "{name} keeps its checkpoint after epoch {epochs_done} in {}",
            checkpoint::path(&config.out, name).display()
        )
    } else {
        let earlier = if earlier_done { "; the models before it are finished and kept" } else { "" };
        format!("{name} had not finished an epoch, so nothing of it was saved{earlier}")
    };
    format!("stopped: {kept}; resume with:\n  {}", quoted.join(" "))
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
        " The tutorial preset is meant for a GPU; for a CPU-sized run use --preset quick (3 to 7.5 minutes on 2 cores)."
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
    let per_model =
        models::model_names().into_iter().flat_map(|name| [report::csv_path(out, name), checkpoint::path(out, name)]);
    let reports = [report::JSON_FILE, report::MARKDOWN_FILE, plot::SVG_FILE, seeds::CSV_FILE].map(|f| out.join(f));
    for path in per_model.chain(reports) {
        if path.exists() {
            std::fs::remove_file(&path).with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}
