//! `csp-tch report`: a run's report rebuilt from the files its folder holds.

use anyhow::{bail, ensure, Result};
use indexmap::IndexMap;
use std::path::Path;

use super::{write_report, write_seeds_report};
use crate::config::{MemoryFormat, RunConfig};
use crate::data::DataInfo;
use crate::environment::RunEnvironment;
use crate::files::OutDir;
use crate::models;
use crate::report::{self, Comparison, ModelReport, RanAs, RecordedRun};
use crate::train::checkpoint;
use crate::train::metrics::EpochMetrics;

/// What a run's output folder holds: its configuration, environment and models.
pub(super) struct Collected {
    pub(super) config: RunConfig,
    pub(super) data: Option<DataInfo>,
    pub(super) environment: RunEnvironment,
    pub(super) models: IndexMap<String, ModelReport>,
}

/// Rebuilds comparison.json, comparison.md and curves.svg in `out` from the per-model CSVs there;
/// returns the models it found. For a multi-seed run (its comparison.json says so, or, when that
/// is gone, its `seed-<s>` folders do), each seed folder with results is rebuilt and then the
/// report over the seeds; a seed folder an interrupted run left empty is passed over. Each folder
/// is locked while it is rebuilt: one that a live run holds is refused.
pub fn rebuild(out: &Path) -> Result<Vec<String>> {
    ensure!(out.is_dir(), "{} is not a folder; point --out at a run's output folder", out.display());
    let out = OutDir::new(out);
    let _lock = out.lock()?;
    out.remove_leftovers()?;
    match multi_seed_config(&out)? {
        Some(config) => {
            let mut names = Vec::new();
            for (_, folder) in out.seed_folders().into_iter().filter(|(seed, _)| config.seeds.contains(seed)) {
                if has_results(&folder) {
                    let _lock = folder.lock()?;
                    names = rebuild_one(&folder)?;
                }
            }
            write_seeds_report(&config)?;
            Ok(names)
        }
        None => rebuild_one(&out),
    }
}

/// Rebuilds the report of the single run in `out` (locked by the caller).
fn rebuild_one(out: &OutDir) -> Result<Vec<String>> {
    let collected = collect(out)?;
    let names = collected.models.keys().cloned().collect();
    write_report(out, Comparison::new(&collected.config, &collected.environment, collected.data, collected.models))?;
    Ok(names)
}

/// Whether `folder` holds a model CSV or a report.
pub(super) fn has_results(folder: &OutDir) -> bool {
    folder.json().exists() || models::model_names().iter().any(|m| folder.csv(m).exists())
}

/// The configuration of the multi-seed run in `out`, if it is one: from its comparison.json, or
/// when that is missing, from its seed folders' reports (their seeds in order).
fn multi_seed_config(out: &OutDir) -> Result<Option<RunConfig>> {
    if let Some(recorded) = RecordedRun::read(out)? {
        let mut config = recorded.config;
        config.out = out.root().to_path_buf();
        return Ok((!config.seeds.is_empty()).then_some(config));
    }
    let seeds: Vec<(u64, OutDir)> = out.seed_folders().into_iter().filter(|(_, f)| has_results(f)).collect();
    let Some((_, first)) = seeds.first() else { return Ok(None) };
    let mut config = collect(first)?.config;
    config.out = out.root().to_path_buf();
    config.seeds = seeds.iter().map(|(seed, _)| *seed).collect();
    config.recipe.seed = config.seeds[0];
    Ok(Some(config))
}

/// Reads a run's models back from the per-model CSVs in `out`. The run's configuration, environment
/// and each model's status come from the comparison.json already there, or else from the models'
/// checkpoints. A model recorded as failed stays failed (with or without a CSV), one with a
/// non-finite metric or no epoch is failed, and one with fewer epochs than configured is incomplete.
pub(super) fn collect(out: &OutDir) -> Result<Collected> {
    let previous = RecordedRun::read(out)?;
    let mut found: IndexMap<String, (Option<Vec<EpochMetrics>>, Option<checkpoint::Meta>)> = IndexMap::new();
    for name in models::model_names() {
        let csv = out.csv(name);
        let recorded = previous.as_ref().is_some_and(|p| p.models.contains_key(name));
        if !csv.exists() && !recorded {
            continue;
        }
        let epochs = if csv.exists() { Some(report::read_csv(&csv)?) } else { None };
        let file = out.checkpoint(name);
        let meta = if file.exists() { Some(checkpoint::read_meta(&file)?) } else { None };
        found.insert(name.to_string(), (epochs, meta));
    }
    ensure!(
        !found.is_empty(),
        "{} holds no model CSV (darknet53.csv, ...) and no comparison.json; point --out at a run's output folder",
        out.root().display()
    );
    let (config, environment) = match (&previous, found.values().find_map(|(_, meta)| meta.as_ref())) {
        (Some(p), _) => (p.config.clone(), p.environment.clone()),
        (None, Some(meta)) => (meta.config.clone(), meta.environment.clone()),
        (None, None) => bail!(
            "cannot tell the run's configuration: no {} and no checkpoint in {}",
            out.json().display(),
            out.checkpoints().display()
        ),
    };
    let data = match &previous {
        Some(p) => p.data.clone(),
        None => found.values().find_map(|(_, meta)| meta.as_ref().and_then(|m| m.data.clone())),
    };
    let mut reports = IndexMap::new();
    for (name, (epochs, meta)) in found {
        let recorded = previous.as_ref().and_then(|p| p.models.get(&name));
        // What the CSV shows now comes first; then what the run recorded (a model that failed in
        // its first epoch has no CSV at all).
        let from_csv = epochs.as_deref().and_then(|epochs| match epochs {
            [] => Some(format!("{name}.csv holds no epoch: the model trained none, or the file was emptied")),
            epochs => report::non_finite(epochs),
        });
        let error = from_csv.or_else(|| recorded.and_then(|r| r.error.clone()));
        // How it ran: from its checkpoint, else from the recorded report.
        let channels_last = recorded.and_then(|r| r.memory_format.as_deref()).map(|f| f == MemoryFormat::label(true));
        let (cuda_graphs, cuda_graphs_off) = match (meta.as_ref().filter(|m| m.cuda_graphs.is_some()), recorded) {
            (Some(m), _) => (m.cuda_graphs, m.cuda_graphs_off.clone()),
            (None, Some(r)) => (r.cuda_graphs, r.cuda_graphs_off.clone()),
            (None, None) => (None, None),
        };
        let ran_as = RanAs { channels_last, cuda_graphs, cuda_graphs_off };
        let report = ModelReport::new(&name, &config, epochs.unwrap_or_default(), ran_as, error)?;
        reports.insert(name, report);
    }
    Ok(Collected { config, data, environment, models: reports })
}
