//! `run-all` and `train`: data, every requested model, and the files a run leaves in `--out`;
//! `report`, which rebuilds a run's report from those files.

use anyhow::{bail, Result};
use indexmap::IndexMap;
use std::rc::Rc;
use tch::Device;

use crate::config::{DataParallel, Preset, RunConfig};
use crate::data::{self, Access, Dataset};
use crate::environment::{parse_device, peak_resident_mb, RunEnvironment};
use crate::files::OutDir;
use crate::models;
use crate::report::plot::{self, ModelCurves};
use crate::report::seeds::{self, SeedsReport};
use crate::report::{self, Comparison, ModelReport, RanAs};
use crate::train::distributed::{self, Group};
use crate::train::{self, checkpoint, cuda_graph, Interrupted, Progress, Trainer};

pub mod launch;
mod rebuild;
pub use rebuild::rebuild;
use rebuild::{collect, has_results};

/// A run's settings, checked before anything is touched: what [`run`] acts on. Nothing after
/// [`Settings::check`] checks them again.
#[derive(Clone, Debug)]
pub struct Settings {
    pub config: RunConfig,
    pub device: Device,
    /// `--resume`: continue each model from its checkpoint instead of starting afresh.
    pub resume: bool,
    /// This process's place in a data-parallel run (torchrun's variables), its backend resolved.
    pub parallel: Option<DataParallel>,
}

impl Settings {
    /// Checks everything about `config` that can be known without its data: the device, each
    /// model's least input size, what `--cuda-graphs` comes to with this precision.
    /// A data-parallel rank (`parallel`) computes on CUDA device `LOCAL_RANK` under `--device auto`
    /// (where CUDA is available) or `cuda`, on the CPU under `cpu`.
    pub fn check(mut config: RunConfig, resume: bool, parallel: Option<DataParallel>) -> Result<Settings> {
        let (device, parallel) = match parallel {
            None => (parse_device(&config.device)?, None),
            Some(place) => {
                let (device, place) =
                    distributed::rank_device(&config.device, &config.execution, place, config.sync_bn)?;
                config.world_size = place.world_size;
                (device, Some(place))
            }
        };
        for name in &config.models {
            models::model_info(name)?.check_image_size(config.recipe.image_size)?;
        }
        let settings = Settings { config, device, resume, parallel };
        settings.graph_plan()?;
        Ok(settings)
    }

    /// What `--cuda-graphs` comes to for this process's steps.
    fn graph_plan(&self) -> Result<cuda_graph::GraphPlan> {
        let execution = &self.config.execution;
        cuda_graph::plan(execution.cuda_graphs, self.device, execution.precision(self.device), self.graph_obstacle())
    }

    /// Why this data-parallel rank's steps cannot be recorded, if they cannot.
    fn graph_obstacle(&self) -> Option<&'static str> {
        let place = self.parallel.as_ref()?;
        distributed::graph_obstacle(self.device, place.backend, self.config.sync_bn)
    }

    /// The single runs this one is made of: itself, or one per seed with `--seeds`.
    fn single_runs(&self) -> Vec<RunConfig> {
        match self.config.seeds.as_slice() {
            [] => vec![self.config.clone()],
            seeds => seeds.iter().map(|&seed| self.config.for_seed(seed)).collect(),
        }
    }
}

/// Runs `settings`: every model once, or once per seed of `--seeds` (each seed's run in
/// `out/seed-<s>/` exactly as a single run writes it, and after each seed the report over the seeds
/// so far in `out`). In this order: lock `--out`, fetch and load the data, check every seed's
/// subsets against it, and only then, unless resuming, remove the previous run's results (all or
/// nothing): a bad setting, a data problem or a Ctrl-C before training leaves `--out` as it was.
/// A model that fails is recorded as failed and the others still run (the result is then an
/// error); a signal stops the run before its next step, keeping the checkpoints.
///
/// In a data-parallel run every rank does this together: it joins the group, refuses settings that
/// differ from rank 0's, and only rank 0 locks and writes `--out` and fetches the data (the others
/// wait for it, then read it, a decoded folder from rank 0's cache).
pub fn run(settings: &Settings, access: &Access) -> Result<()> {
    let config = &settings.config;
    let out = config.out_dir();
    let group = match &settings.parallel {
        Some(place) => {
            let group = Group::join(place, settings.device)?;
            // Ranks must issue their collectives alike: an overlapped allreduce interleaves them with
            // --sync-bn's in the backward pass.
            let dist_overlap = group.place.overlap;
            group.check_same(
                "settings",
                &serde_json::json!({ "config": config, "resume": settings.resume, "dist_overlap": dist_overlap }),
            )?;
            Some(Rc::new(group))
        }
        None => None,
    };
    let writes = group.as_ref().is_none_or(|g| g.rank() == 0);
    let _lock = writes.then(|| out.lock()).transpose()?;
    if writes {
        out.remove_leftovers()?;
        data::ensure(&config.dataset, &config.data_dir, access)?;
    }
    // From here on, the first Ctrl-C or SIGTERM stops the run before its next step (a download
    // before this stops at once). Installed before the data loads, so that no signal is lost.
    train::stop_on_signals();
    let started = std::time::Instant::now();
    let load = || data::load(&config.dataset, &config.data_dir, access, config.recipe.image_size);
    let full = match &group {
        Some(group) => {
            let full = if writes { Some(load()?) } else { None };
            group.barrier("waiting for rank 0 to read the data")?;
            let full = match full {
                Some(full) => full,
                None => load()?,
            };
            let sizes = serde_json::json!({
                "train_images": full.train_len(), "test_images": full.test_len(), "classes": full.classes()
            });
            group.check_same("data", &sizes)?;
            full
        }
        None => load()?,
    };
    if full.classes() != config.classes {
        bail!(
            "{} has {} classes, the run was set up for {}; the folder changed while it loaded",
            config.data_dir.display(),
            full.classes(),
            config.classes
        );
    }
    let runs = settings
        .single_runs()
        .into_iter()
        .map(|run| {
            let subsets = full.limit(run.train_limit, run.test_limit, run.recipe.seed)?;
            Ok((run, subsets))
        })
        .collect::<Result<Vec<(RunConfig, Dataset)>>>()?;
    drop(full);
    let first_data = &runs[0].1;
    let say = |line: String| writes.then(|| eprintln!("{line}"));
    say(format!(
        "data: {} train / {} test images, {} classes, from {} ({:.1} s)",
        first_data.train_len(),
        first_data.test_len(),
        first_data.classes(),
        config.data_dir.display(),
        started.elapsed().as_secs_f64()
    ));
    if train::stop_requested() {
        eprintln!("stopped before any training: nothing in {} was changed", out.root().display());
        return Err(Interrupted.into());
    }
    let precision = config.execution.precision(settings.device);
    let mut environment = RunEnvironment::detect(settings.device, precision);
    let graph_plan = settings.graph_plan()?;
    let graph_line = cuda_graph::describe(config.execution.cuda_graphs, &graph_plan);
    match &group {
        Some(group) => {
            let parallel = group.environment(&environment)?;
            let statistics = if config.sync_bn { "over all of them (--sync-bn)" } else { "each its own" };
            let recorded = match graph_plan {
                cuda_graph::GraphPlan::Replay(_) => {
                    "; CUDA graphs record the training steps with their allreduce, evaluation steps run eagerly"
                }
                cuda_graph::GraphPlan::Eager(_) => "",
            };
            say(format!(
                "data-parallel: {} {} over {} ({}); {} images a step each, {} in all, BatchNorm statistics \
                 {statistics}; gradient allreduce {}{recorded}",
                parallel.world_size,
                if parallel.world_size == 1 { "process" } else { "processes" },
                parallel.backend,
                parallel.devices.join(", "),
                config.recipe.batch_size,
                config.recipe.batch_size * parallel.world_size,
                if parallel.allreduce_overlapped { "during the backward pass" } else { "after the backward pass" }
            ));
            say(graph_line);
            environment.data_parallel = Some(parallel);
        }
        None => eprintln!("{graph_line}"),
    }
    if settings.resume {
        // Refuse a mismatched checkpoint before any training.
        for (run, data) in &runs {
            for name in &run.models {
                let file = run.out_dir().checkpoint(name);
                if file.exists() {
                    let wanted = run_meta(run, name, data, &environment);
                    checkpoint::read_meta(&file)?.check_compatible(&wanted, &file)?;
                }
            }
        }
    } else if writes {
        out.remove_previous(&models::model_names(), !config.seeds.is_empty())?;
    }
    let context = RunContext { settings, environment: &environment, group: group.clone() };
    if config.seeds.is_empty() {
        let (run, data) = runs.into_iter().next().expect("one run");
        return run_one(&run, data, &context);
    }
    let mut failures = Vec::new();
    let count = runs.len();
    for (i, (run, data)) in runs.into_iter().enumerate() {
        let seed = run.recipe.seed;
        say(format!("seed {seed} ({} of {count}): {}", i + 1, run.out.display()));
        match run_one(&run, data, &context) {
            Err(err) if err.is::<Interrupted>() => return Err(err),
            Err(err) => failures.push(format!("seed {seed}: {err:#}")),
            Ok(()) => {}
        }
        if writes {
            let report = write_seeds_report(config)?;
            if i + 1 == count {
                println!("{}", report.markdown());
            }
        }
    }
    if !failures.is_empty() {
        bail!("{}", failures.join("; "));
    }
    Ok(())
}

/// What every single run of a [`run`] shares.
struct RunContext<'a> {
    settings: &'a Settings,
    environment: &'a RunEnvironment,
    /// In a data-parallel run, its group: only rank 0 writes files and reports.
    group: Option<Rc<Group>>,
}

impl RunContext<'_> {
    /// Whether this process writes the run's files and reports (rank 0, or a single process).
    fn writes(&self) -> bool {
        self.group.as_ref().is_none_or(|g| g.rank() == 0)
    }
}

/// Trains and evaluates every model of the single run `config` on `data` (its subsets), writing
/// `<model>.csv` and the model's checkpoint after each epoch and the report (comparison.json / .md,
/// curves.svg) after each model. Its folder is locked meanwhile (a seed folder of a multi-seed run
/// has its own lock).
fn run_one(config: &RunConfig, data: Dataset, context: &RunContext) -> Result<()> {
    let (settings, writes) = (context.settings, context.writes());
    let out = config.out_dir();
    let _lock = match config.out != settings.config.out && writes {
        true => {
            let lock = out.lock()?;
            out.remove_leftovers()?;
            Some(lock)
        }
        false => None,
    };
    let device = settings.device;
    let (data, placed) = crate::train::place(data, device, config.execution.data_on);
    if let Some(line) = placed.filter(|_| writes) {
        eprintln!("{line}");
    }
    let mut environment = context.environment.clone();
    let progress = Progress::shown_if(writes);
    let mut reports: IndexMap<String, ModelReport> = IndexMap::new();
    let mut comparison = None;
    for name in &config.models {
        let mut trainer = Trainer::new(name, config.classes, &config.recipe, &config.execution, device)?;
        let result = train_model(config, &mut trainer, &data, progress, reports.is_empty(), context, &environment);
        if let Err(err) = &result {
            if err.is::<Interrupted>() {
                if writes {
                    eprintln!("{}", stop_message(config, &trainer, !reports.is_empty(), context.group.is_some()));
                }
                return result;
            }
            // A failed collective leaves the group unusable: the run ends here on every rank.
            if context.group.is_some() {
                return result;
            }
            eprintln!("error: {name} failed: {err:#}");
        }
        let graphs = trainer.graph_status();
        let ran_as = RanAs {
            channels_last: Some(trainer.model.is_channels_last()),
            cuda_graphs: Some(graphs.replayed),
            cuda_graphs_off: graphs.off_reason,
        };
        let report = ModelReport::new(name, config, trainer.history, ran_as, result.err().map(|e| format!("{e:#}")))?;
        reports.insert(name.clone(), report);
        environment.peak_resident_mb = peak_resident_mb();
        if writes {
            let comparison_now = Comparison::new(config, &environment, Some(data.info.clone()), reports.clone());
            comparison = Some(write_report(&out, comparison_now)?);
        }
    }
    if !writes {
        return Ok(());
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
            out.markdown().display()
        );
    }
    Ok(())
}

/// The report over the seeds of `config` that have one so far, written into `config.out`.
fn write_seeds_report(config: &RunConfig) -> Result<SeedsReport> {
    let mut runs = Vec::new();
    let mut folders = IndexMap::new();
    let mut environment = None;
    for &seed in &config.seeds {
        let child = config.out_dir().seed(seed);
        if !has_results(&child) {
            continue;
        }
        let collected = collect(&child)?;
        environment.get_or_insert(collected.environment);
        folders.insert(seed.to_string(), OutDir::seed_name(seed));
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
    report.write(&config.out_dir())?;
    plot::write_curves(&config.out_dir(), &curves)?;
    Ok(report)
}

/// Writes comparison.json, comparison.md and curves.svg into `out`.
fn write_report(out: &OutDir, comparison: Comparison) -> Result<Comparison> {
    comparison.write(out)?;
    plot::write(out, &comparison.models)?;
    Ok(comparison)
}

/// The checkpoint metadata of `name` in this run, before any progress (the trainer fills its own in).
fn run_meta(config: &RunConfig, name: &str, data: &Dataset, environment: &RunEnvironment) -> checkpoint::Meta {
    checkpoint::Meta {
        format: checkpoint::FORMAT,
        model: name.to_string(),
        config: config.clone(),
        train_size: data.train_len(),
        test_size: data.test_len(),
        data: Some(data.info.clone()),
        epochs_done: 0,
        optimizer_steps: 0,
        loss_scaler: None,
        history: Vec::new(),
        environment: environment.clone(),
        cuda_graphs: None,
        cuda_graphs_off: None,
        epoch_progress: None,
    }
}

/// Trains one model up to the configured epochs (from its checkpoint when resuming), writing its
/// CSV and checkpoint after every epoch; the epochs done stay in `trainer.history` either way.
fn train_model(
    config: &RunConfig,
    trainer: &mut Trainer,
    data: &Dataset,
    progress: Progress,
    first_model: bool,
    context: &RunContext,
    environment: &RunEnvironment,
) -> Result<()> {
    let name = trainer.name.clone();
    let file = config.out_dir().checkpoint(&name);
    let csv = config.out_dir().csv(&name);
    let writes = context.writes();
    if context.settings.resume && file.exists() {
        let meta = trainer.restore_checkpoint(&file)?;
        match &trainer.epoch_progress {
            _ if !writes => {}
            Some(place) => eprintln!(
                "{name}: resuming in epoch {} after step {} from {}",
                place.epoch,
                place.steps,
                file.display()
            ),
            None => eprintln!("{name}: resuming after epoch {} from {}", meta.epochs_done, file.display()),
        }
        if writes {
            report::write_csv(&csv, &trainer.history)?;
        }
    }
    if let Some(group) = &context.group {
        trainer.distribute(group.clone(), config.sync_bn)?;
    }
    let announce = writes && first_model && trainer.vs.device() == Device::Cpu && config.preset == Preset::Tutorial;
    let mut first_steps = |ms_per_step: f64| announce.then(|| cpu_estimate(config, data, ms_per_step));
    let meta = run_meta(config, &name, data, environment);
    while trainer.history.len() < config.recipe.epochs {
        let epoch = trainer.run_epoch(data, &config.recipe, progress, &mut first_steps);
        if let Err(err) = epoch {
            // Stopped by a signal inside an epoch: save the place, so that --resume goes on from it.
            if writes && err.is::<Interrupted>() && trainer.epoch_progress.as_ref().is_some_and(|p| p.steps > 0) {
                trainer.save_checkpoint(&file, &meta)?;
            }
            return Err(err);
        }
        if writes {
            trainer.save_checkpoint(&file, &meta)?;
            report::write_csv(&csv, &trainer.history)?;
        }
    }
    Ok(())
}

/// What to tell a user who pressed Ctrl-C while `name` trained with `epochs_done` epochs
/// checkpointed; `earlier_done`: models before it in this run finished.
/// `parallel`: one rank of a data-parallel run, started by `--nproc-per-node` (whose flag the command
/// gets back) or by torchrun (whose own command the user repeats).
fn stop_message(config: &RunConfig, trainer: &Trainer, earlier_done: bool, parallel: bool) -> String {
    let (name, epochs_done) = (&trainer.name, trainer.history.len());
    let mut args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--resume") {
        args.push("--resume".into());
    }
    let launcher = std::env::var(launch::WORKERS_ENV).ok();
    if let Some(workers) = &launcher {
        args.extend(["--nproc-per-node".to_string(), workers.clone()]);
    }
    let how = match (parallel, &launcher) {
        (true, None) => "resume by starting every rank as before (the same torchrun command) with:",
        _ => "resume with:",
    };
    let quoted: Vec<String> = args.iter().map(|a| shell_quote(a)).collect();
    let checkpoint = config.out_dir().checkpoint(name);
    let kept = match &trainer.epoch_progress {
        Some(place) if place.steps > 0 => format!(
            "{name} saved its place in epoch {} (after step {}) in {}",
            place.epoch,
            place.steps,
            checkpoint.display()
        ),
        _ if epochs_done > 0 => {
            format!("{name} keeps its checkpoint after epoch {epochs_done} in {}", checkpoint.display())
        }
        _ => {
            let earlier = if earlier_done { "; the models before it are finished and kept" } else { "" };
            format!("{name} had not taken a step, so nothing of it was saved{earlier}")
        }
    };
    format!("stopped: {kept}; {how}\n  {}", quoted.join(" "))
}

/// `arg` as a POSIX shell reads it back: as it is when it holds only safe characters, else in
/// single quotes, each `'` inside closed, escaped and reopened.
pub fn shell_quote(arg: &str) -> String {
    if !arg.is_empty() && arg.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=,".contains(c)) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

/// On a CPU with the tutorial preset: how long the whole run will take, from the first steps.
fn cpu_estimate(config: &RunConfig, data: &Dataset, ms_per_step: f64) -> String {
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
