//! `csp-tch report`: a run's report rebuilt from the files its folder holds.

use anyhow::{bail, ensure, Result};
use indexmap::IndexMap;
use std::path::Path;

use super::{write_report, write_seeds_report};
use crate::config::RunConfig;
use crate::environment::RunEnvironment;
use crate::models;
use crate::report::{self, Comparison, ModelReport, RecordedRun};
use crate::train::checkpoint;
use crate::train::metrics::EpochMetrics;

/// What a run's output folder holds: its configuration, environment and models.
pub(super) struct Collected {
    pub(super) config: RunConfig,
    pub(super) environment: RunEnvironment,
    pub(super) models: IndexMap<String, ModelReport>,
}

/// Rebuilds comparison.json, comparison.md and curves.svg in `out` from the per-model CSVs there;
/// returns the models it found. For a multi-seed run, each seed's folder is rebuilt and then the
/// report over the seeds.
pub fn rebuild(out: &Path) -> Result<Vec<String>> {
    if let Some(recorded) = RecordedRun::read(out)?.filter(|r| !r.config.seeds.is_empty()) {
        let mut config = recorded.config;
        config.out = out.to_path_buf();
        let mut names = Vec::new();
        for &seed in &config.seeds {
            let folder = config.for_seed(seed).out;
            if folder.exists() {
                names = rebuild(&folder)?;
            }
        }
        write_seeds_report(&config)?;
        return Ok(names);
    }
    let collected = collect(out)?;
    let names = collected.models.keys().cloned().collect();
    write_report(out, Comparison::new(&collected.config, &collected.environment, collected.models))?;
    Ok(names)
}

/// Reads a run's models back from the per-model CSVs in `out`. The run's configuration, environment
/// and each model's status come from the comparison.json already there, or else from the models'
/// checkpoints. A model recorded as failed stays failed (with or without a CSV), one with a
/// non-finite metric or no epoch is failed, and one with fewer epochs than configured is incomplete.
pub(super) fn collect(out: &Path) -> Result<Collected> {
    let previous = RecordedRun::read(out)?;
    let mut found: IndexMap<String, (Option<Vec<EpochMetrics>>, Option<checkpoint::Meta>)> = IndexMap::new();
    for name in models::model_names() {
        let csv = report::csv_path(out, name);
        let recorded = previous.as_ref().is_some_and(|p| p.models.contains_key(name));
        if !csv.exists() && !recorded {
            continue;
        }
        let epochs = if csv.exists() { Some(report::read_csv(&csv)?) } else { None };
        let file = checkpoint::path(out, name);
        let meta = if file.exists() { Some(checkpoint::read_meta(&file)?) } else { None };
        found.insert(name.to_string(), (epochs, meta));
    }
    ensure!(
        !found.is_empty(),
        "{} holds no model CSV (darknet53.csv, ...) and no comparison.json; point --out at a run's output folder",
        out.display()
    );
    let (config, environment) = match (&previous, found.values().find_map(|(_, meta)| meta.as_ref())) {
        (Some(p), _) => (p.config.clone(), p.environment.clone()),
        (None, Some(meta)) => (meta.config.clone(), meta.environment.clone()),
        (None, None) => bail!(
            "cannot tell the run's configuration: no {} and no checkpoint in {}",
            out.join(report::JSON_FILE).display(),
            out.join(checkpoint::FOLDER).display()
        ),
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
        let mut report = ModelReport::new(&name, &config, epochs.unwrap_or_default(), error)?;
        match (meta.as_ref().filter(|m| m.cuda_graphs.is_some()), recorded) {
            (Some(m), _) => report.set_graphs(m.cuda_graphs, m.cuda_graphs_off.clone()),
            (None, Some(r)) => report.set_graphs(r.cuda_graphs, r.cuda_graphs_off.clone()),
            (None, None) => {}
        }
        reports.insert(name, report);
    }
    Ok(Collected { config, environment, models: reports })
}
