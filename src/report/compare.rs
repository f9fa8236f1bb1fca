//! `csp-tch compare A B`: whether a rerun reproduced a run, in the terms it can. A run's losses and
//! accuracies are a function of its settings and of how its kernels round, which depends on the
//! device (CPU family, GPU), the thread count and libtorch's version: in the same environment a
//! rerun agrees to the last digit; in another one only to rounding, which training then amplifies.

use anyhow::{ensure, Result};
use serde::Serialize;

use super::{read_csv, recipe_fields, RecordedRun};
use crate::config::RunConfig;
use crate::environment::RunEnvironment;
use crate::files::OutDir;
use crate::models;
use crate::train::metrics::EpochMetrics;

/// What rounding depends on, as a run records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rounding {
    pub device: String,
    pub device_name: String,
    pub cpu: String,
    pub cpu_threads: i32,
    pub libtorch: String,
}

impl Rounding {
    fn of(env: &RunEnvironment) -> Rounding {
        Rounding {
            device: env.device.clone(),
            device_name: env.device_name.clone(),
            cpu: env.versions.cpu.clone(),
            cpu_threads: env.versions.cpu_threads,
            libtorch: env.versions.libtorch.clone(),
        }
    }
}

/// One model of one seed in both runs.
#[derive(Clone, Debug, Serialize)]
pub struct ModelDifference {
    pub model: String,
    pub seed: Option<u64>,
    pub identical: bool,
    /// The first differing value: epoch, metric, in A, in B.
    pub first_difference: Option<(usize, &'static str, f64, f64)>,
    /// Largest `|a - b| / max(|a|, 1e-12)` over every epoch and metric (epochs of one run only count
    /// as infinitely different).
    pub max_relative: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RunComparison {
    pub a: Rounding,
    pub b: Rounding,
    pub same_rounding: bool,
    /// Each setting of what the runs compute (recipe, data, limits; seeds are paired) in which they
    /// differ, as `key: A against B`: runs of different recipes are not reruns of one another.
    pub recipe_differences: Vec<String>,
    pub models: Vec<ModelDifference>,
}

impl RunComparison {
    /// Whether B reproduced A as far as their environments allow: the same recipe, and to the last
    /// digit in the same environment; in different ones, any result is what rounding can give.
    pub fn reproduced(&self) -> bool {
        self.recipe_differences.is_empty() && (!self.same_rounding || self.models.iter().all(|m| m.identical))
    }

    pub fn text(&self) -> String {
        if !self.recipe_differences.is_empty() {
            return format!(
                "different recipes ({}): these runs compute different things, so neither is a rerun of the other \
                 and their numbers differ by design; compare them as two experiments (over seeds), not digit by digit\n",
                self.recipe_differences.join("; ")
            );
        }
        let mut text = if self.same_rounding {
            format!(
                "same environment ({}, {} threads, libtorch {}): a rerun must agree to the last digit\n",
                label(&self.a),
                self.a.cpu_threads,
                self.a.libtorch
            )
        } else {
            format!(
                "different environments ({}, {} threads, libtorch {} against {}, {} threads, libtorch {}): kernels \
                 round differently there, so the runs agree only to rounding, which training amplifies epoch by \
                 epoch; compare them over seeds (`--seeds`), not digit by digit\n",
                label(&self.a),
                self.a.cpu_threads,
                self.a.libtorch,
                label(&self.b),
                self.b.cpu_threads,
                self.b.libtorch
            )
        };
        for m in &self.models {
            let seed = m.seed.map_or(String::new(), |s| format!(" seed {s}"));
            text += &match m.first_difference {
                None => format!("  {}{seed}: identical\n", m.model),
                Some((epoch, metric, a, b)) => format!(
                    "  {}{seed}: differs from epoch {epoch} ({metric} {a} against {b}); largest relative difference {:.1e}\n",
                    m.model, m.max_relative
                ),
            };
        }
        text
    }
}

fn label(r: &Rounding) -> String {
    if r.device == "cpu" {
        r.cpu.clone()
    } else {
        format!("{} {}", r.device, r.device_name)
    }
}

/// The metrics a run's rounding decides (timings aside).
fn metrics(e: &EpochMetrics) -> [(&'static str, f64); 6] {
    [
        ("train_loss", e.train_loss),
        ("train_acc", e.train_acc),
        ("eval_loss", e.eval_loss),
        ("eval_acc", e.eval_acc),
        ("last_train_loss", e.last_train_loss),
        ("last_eval_loss", e.last_eval_loss),
    ]
}

fn difference(model: &str, seed: Option<u64>, a: &[EpochMetrics], b: &[EpochMetrics]) -> ModelDifference {
    let mut first = None;
    let mut max_relative: f64 = if a.len() == b.len() { 0.0 } else { f64::INFINITY };
    for (x, y) in a.iter().zip(b) {
        for ((metric, u), (_, v)) in metrics(x).into_iter().zip(metrics(y)) {
            if u.to_bits() != v.to_bits() {
                first.get_or_insert((x.epoch, metric, u, v));
                max_relative = max_relative.max((u - v).abs() / u.abs().max(1e-12));
            }
        }
    }
    if first.is_none() && a.len() != b.len() {
        let epoch = a.len().min(b.len()) + 1;
        first = Some((epoch, "epochs", a.len() as f64, b.len() as f64));
    }
    ModelDifference {
        model: model.to_string(),
        seed,
        identical: first.is_none(),
        first_difference: first,
        max_relative,
    }
}

/// The single runs of a run folder with their seeds: itself (its recorded seed), or its seed
/// folders; so that a single run compares with the seed folder of its seed in a multi-seed run.
fn single_runs(out: &OutDir) -> Vec<(Option<u64>, OutDir)> {
    match out.seed_folders() {
        seeds if seeds.is_empty() => {
            let seed = RecordedRun::read(out).ok().flatten().map(|r| r.config.recipe.seed);
            vec![(seed, out.clone())]
        }
        seeds => seeds.into_iter().map(|(seed, dir)| (Some(seed), dir)).collect(),
    }
}

/// The record of one single run of `out` (a seed's, for a multi-seed run).
fn recorded(out: &OutDir) -> Result<RecordedRun> {
    let recorded = single_runs(out).into_iter().find_map(|(_, dir)| RecordedRun::read(&dir).ok().flatten());
    match recorded {
        Some(run) => Ok(run),
        None => RecordedRun::read(out)?.ok_or_else(|| {
            anyhow::anyhow!("{} holds no comparison.json; point at a run's output folder", out.root().display())
        }),
    }
}

/// What a run computes, as a flat JSON object: the recipe (its seed aside: seeds are paired run by
/// run), the dataset, the class count and the limits.
fn computes(config: &RunConfig) -> serde_json::Map<String, serde_json::Value> {
    let mut what = recipe_fields(&config.recipe);
    what.remove("seed");
    let data = serde_json::json!({
        "dataset": config.dataset,
        "classes": config.classes,
        "train_limit": config.train_limit,
        "test_limit": config.test_limit,
    });
    what.extend(data.as_object().cloned().unwrap_or_default());
    what
}

/// The settings in which runs `a` and `b` compute differently, as `key: A against B`.
pub fn recipe_differences(a: &RunConfig, b: &RunConfig) -> Vec<String> {
    let (a, b) = (computes(a), computes(b));
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let show = |v: Option<&serde_json::Value>| v.map_or("(none)".to_string(), ToString::to_string);
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .map(|k| format!("{k}: {} against {}", show(a.get(k)), show(b.get(k))))
        .collect()
}

/// Compares the runs in `a` and `b`: every model of every seed found in both.
pub fn compare(a: &OutDir, b: &OutDir) -> Result<RunComparison> {
    let (run_a, run_b) = (recorded(a)?, recorded(b)?);
    let (ra, rb) = (Rounding::of(&run_a.environment), Rounding::of(&run_b.environment));
    let recipe_differences = recipe_differences(&run_a.config, &run_b.config);
    let runs_b = single_runs(b);
    let mut models = Vec::new();
    for (seed, dir_a) in single_runs(a) {
        let Some((_, dir_b)) = runs_b.iter().find(|(s, _)| *s == seed) else { continue };
        for name in models::model_names() {
            let (csv_a, csv_b) = (dir_a.csv(name), dir_b.csv(name));
            if csv_a.exists() && csv_b.exists() {
                models.push(difference(name, seed, &read_csv(&csv_a)?, &read_csv(&csv_b)?));
            }
        }
    }
    ensure!(
        !models.is_empty(),
        "{} and {} have no model CSV of the same seed in common",
        a.root().display(),
        b.root().display()
    );
    Ok(RunComparison { same_rounding: ra == rb, a: ra, b: rb, recipe_differences, models })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch(epoch: usize, loss: f64) -> EpochMetrics {
        EpochMetrics {
            epoch,
            train_loss: loss,
            train_acc: 0.5,
            eval_loss: 1.0,
            eval_acc: 0.5,
            train_ms_per_step: epoch as f64,
            eval_ms_per_step: 1.0,
            epoch_seconds: 1.0,
            train_images_per_s: 1.0,
            last_train_loss: 1.0,
            last_eval_loss: 1.0,
            warmup_seconds: 0.0,
            ..Default::default()
        }
    }

    #[test]
    fn timings_never_count_and_the_first_difference_is_named() {
        let a = [epoch(1, 2.7196), epoch(2, 2.0)];
        let mut b = a.clone();
        b[0].train_ms_per_step = 99.0;
        assert!(difference("m", None, &a, &b).identical, "timings differ from run to run");
        b[0].train_loss = 2.7267;
        let d = difference("m", Some(0), &a, &b);
        assert!(!d.identical);
        assert_eq!(d.first_difference, Some((1, "train_loss", 2.7196, 2.7267)));
        assert!((d.max_relative - 0.0071 / 2.7196).abs() < 1e-9);
        let short = difference("m", None, &a, &a[..1]);
        assert_eq!(short.first_difference, Some((2, "epochs", 2.0, 1.0)));
    }
}
