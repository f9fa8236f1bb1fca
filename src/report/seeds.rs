//! Repeated runs (`--seeds`): what the spread over seeds says. Per model and epoch the mean, standard
//! deviation, minimum and maximum of the metrics; per CSP model against the baseline the paired
//! difference of accuracy with a 95% interval and a verdict in words; step-time ratios with their
//! spread; and whether each of the tutorial's logged figures falls inside our range.
//!
//! The interval is Student's t on the per-seed differences: seed `s` trains every model on the same
//! data, initialisation seed and shuffles, so the difference `csp(s) - baseline(s)` removes what the
//! seed does to both. Mean `d`, sample standard deviation `sd` over `n` seeds: `d ± t(0.975, n-1) sd / sqrt(n)`.

use anyhow::Result;
use indexmap::{IndexMap, IndexSet};
use serde::{Deserialize, Serialize};

use crate::config::RunConfig;
use crate::environment::RunEnvironment;
use crate::files::{write_atomic, OutDir};
use crate::models;
use crate::report::tutorial::TUTORIAL_EPOCHS;
use crate::report::{self, ModelReport, Status};
use crate::train::metrics::EpochMetrics;

/// Mean, sample standard deviation (0 for one value), minimum and maximum of `n` values.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub n: usize,
    pub mean: f64,
    pub std: f64,
    pub min: f64,
    pub max: f64,
}

impl Spread {
    /// The spread of `values`; `None` when there are none.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let n = values.len();
        if n == 0 {
            return None;
        }
        let mean = values.iter().sum::<f64>() / n as f64;
        let var = if n > 1 { values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64 } else { 0.0 };
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        Some(Spread { n, mean, std: var.sqrt(), min, max })
    }
}

/// Student's t quantile for a two-sided 95% interval with `df` degrees of freedom.
pub fn t_975(df: usize) -> f64 {
    const TABLE: [f64; 30] = [
        12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139, 2.200985,
        2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963, 2.079614, 2.073873,
        2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272,
    ];
    match df {
        0 => f64::INFINITY,
        1..=30 => TABLE[df - 1],
        // Beyond 30 degrees of freedom the normal quantile plus the first Cornish-Fisher term.
        _ => 1.959964 + (1.959964f64.powi(3) + 1.959964) / (4.0 * df as f64),
    }
}

/// A metric of one model against the baseline, seed by seed, in percentage points.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PairedDifference {
    /// The seeds where both models finished.
    pub seeds: Vec<u64>,
    /// `model - baseline` for each of those seeds, in points (accuracy x 100).
    pub differences: Vec<f64>,
    pub mean: Option<f64>,
    pub std: Option<f64>,
    /// The 95% interval of the mean difference; needs two seeds or more.
    pub interval: Option<[f64; 2]>,
    pub verdict: String,
}

impl PairedDifference {
    /// The paired difference of `(seed, model, baseline)` values (accuracies as fractions).
    pub fn of(model: &str, pairs: &[(u64, f64, f64)]) -> PairedDifference {
        let differences: Vec<f64> = pairs.iter().map(|(_, m, b)| (m - b) * 100.0).collect();
        let spread = Spread::of(&differences);
        let interval = spread.filter(|s| s.n >= 2).map(|s| {
            let half = t_975(s.n - 1) * s.std / (s.n as f64).sqrt();
            [s.mean - half, s.mean + half]
        });
        let verdict = match (spread, interval) {
            (None, _) => "no seed where both finished".to_string(),
            (Some(s), None) => {
                format!("{model} {} by {:.1} points on one seed: one run cannot tell", lead(s.mean), s.mean.abs())
            }
            (Some(s), Some([lo, hi])) if lo > 0.0 || hi < 0.0 => {
                format!("{model} {} by {:.1} points, interval {lo:.1} to {hi:.1}", lead(s.mean), s.mean.abs())
            }
            (Some(s), Some([lo, hi])) => format!(
                "no difference the runs can show ({model} {:+.1} points on average, interval {lo:.1} to {hi:.1})",
                s.mean
            ),
        };
        PairedDifference {
            seeds: pairs.iter().map(|p| p.0).collect(),
            mean: spread.map(|s| s.mean),
            std: spread.map(|s| s.std),
            differences,
            interval,
            verdict,
        }
    }
}

fn lead(mean: f64) -> &'static str {
    if mean >= 0.0 {
        "ahead"
    } else {
        "behind"
    }
}

/// One epoch of one model over the seeds that reached it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochSpread {
    pub epoch: usize,
    pub eval_acc: Spread,
    pub eval_loss: Spread,
    pub train_acc: Spread,
    pub train_loss: Spread,
}

/// One model over seeds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelSpread {
    /// The seeds where it finished all its epochs (the others are left out of every figure).
    pub seeds: Vec<u64>,
    pub epochs: Vec<EpochSpread>,
    pub final_eval_acc: Option<Spread>,
    pub best_eval_acc: Option<Spread>,
    pub mean_train_ms_per_step: Option<Spread>,
}

/// A CSP model against its plain network over seeds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgainstBaseline {
    pub baseline: String,
    pub final_eval_acc: PairedDifference,
    pub best_eval_acc: PairedDifference,
    /// `model / baseline` mean train ms/step, per seed.
    pub train_step_time_ratio: Option<Spread>,
}

/// A figure of the tutorial's log against our range over seeds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TutorialCheck {
    pub model: String,
    pub epoch: usize,
    /// `train_acc` or `eval_acc`.
    pub metric: String,
    pub tutorial: f64,
    /// Ours over seeds.
    pub ours: Spread,
    pub inside: bool,
    /// How far outside `[min, max]` the tutorial's figure is (0 inside).
    pub outside_by: f64,
}

/// comparison.json's `seeds` section.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SeedsSection {
    pub seeds: Vec<u64>,
    pub models: IndexMap<String, ModelSpread>,
    pub against_baseline: IndexMap<String, AgainstBaseline>,
    pub tutorial: Vec<TutorialCheck>,
}

/// What the seeds' reports say together; `runs` holds each seed's models.
pub fn aggregate(runs: &[(u64, IndexMap<String, ModelReport>)]) -> SeedsSection {
    let names: IndexSet<&String> = runs.iter().flat_map(|(_, models)| models.keys()).collect();
    let finished = |name: &str| -> Vec<(u64, &ModelReport)> {
        runs.iter()
            .filter_map(|(seed, models)| models.get(name).filter(|r| r.status == Status::Ok).map(|r| (*seed, r)))
            .collect()
    };
    let models: IndexMap<String, ModelSpread> =
        names.iter().map(|name| ((*name).clone(), model_spread(&finished(name)))).collect();
    let mut against_baseline = IndexMap::new();
    for name in &names {
        let Some(base_name) = models::base_of(name).filter(|b| names.iter().any(|n| n == b)) else { continue };
        let base: IndexMap<u64, &ModelReport> = finished(base_name).into_iter().collect();
        let pairs: Vec<(u64, &ModelReport, &ModelReport)> =
            finished(name).into_iter().filter_map(|(seed, r)| Some((seed, r, *base.get(&seed)?))).collect();
        let paired = |metric: fn(&ModelReport) -> Option<f64>| {
            let values: Vec<(u64, f64, f64)> =
                pairs.iter().filter_map(|(s, r, b)| Some((*s, metric(r)?, metric(b)?))).collect();
            PairedDifference::of(name, &values)
        };
        let ratios: Vec<f64> =
            pairs.iter().filter_map(|(_, r, b)| Some(r.mean_train_ms_per_step? / b.mean_train_ms_per_step?)).collect();
        against_baseline.insert(
            (*name).clone(),
            AgainstBaseline {
                baseline: base_name.into(),
                final_eval_acc: paired(|r| r.final_eval_acc),
                best_eval_acc: paired(|r| r.best_eval_acc),
                train_step_time_ratio: Spread::of(&ratios),
            },
        );
    }
    SeedsSection {
        seeds: runs.iter().map(|(seed, _)| *seed).collect(),
        tutorial: tutorial_checks(&models),
        models,
        against_baseline,
    }
}

fn model_spread(finished: &[(u64, &ModelReport)]) -> ModelSpread {
    let epochs_of = |epoch: usize| -> Vec<&EpochMetrics> {
        finished.iter().filter_map(|(_, r)| r.epochs.iter().find(|e| e.epoch == epoch)).collect()
    };
    let last_epoch = finished.iter().map(|(_, r)| r.epochs.len()).max().unwrap_or(0);
    let epochs = (1..=last_epoch)
        .filter_map(|epoch| {
            let rows = epochs_of(epoch);
            let spread =
                |metric: fn(&EpochMetrics) -> f64| Spread::of(&rows.iter().map(|e| metric(e)).collect::<Vec<_>>());
            Some(EpochSpread {
                epoch,
                eval_acc: spread(|e| e.eval_acc)?,
                eval_loss: spread(|e| e.eval_loss)?,
                train_acc: spread(|e| e.train_acc)?,
                train_loss: spread(|e| e.train_loss)?,
            })
        })
        .collect();
    let over = |metric: fn(&ModelReport) -> Option<f64>| {
        Spread::of(&finished.iter().filter_map(|(_, r)| metric(r)).collect::<Vec<_>>())
    };
    ModelSpread {
        seeds: finished.iter().map(|(seed, _)| *seed).collect(),
        epochs,
        final_eval_acc: over(|r| r.final_eval_acc),
        best_eval_acc: over(|r| r.best_eval_acc),
        mean_train_ms_per_step: over(|r| r.mean_train_ms_per_step),
    }
}

/// Each of the tutorial's logged accuracies against our range over seeds at the same epoch.
fn tutorial_checks(models: &IndexMap<String, ModelSpread>) -> Vec<TutorialCheck> {
    let mut checks = Vec::new();
    for t in &TUTORIAL_EPOCHS {
        let Some(ours) = models.get(t.model).and_then(|m| m.epochs.iter().find(|e| e.epoch == t.epoch)) else {
            continue;
        };
        let figures =
            [("train_acc", Some(t.figures.train_acc), ours.train_acc), ("eval_acc", t.figures.eval_acc, ours.eval_acc)];
        for (metric, tutorial, ours) in figures {
            let Some(tutorial) = tutorial else { continue };
            let outside_by = (ours.min - tutorial).max(tutorial - ours.max).max(0.0);
            checks.push(TutorialCheck {
                model: t.model.into(),
                epoch: t.epoch,
                metric: metric.into(),
                tutorial,
                ours,
                inside: outside_by == 0.0,
                outside_by,
            });
        }
    }
    checks
}

/// A multi-seed run's comparison.json: the run, where each seed's own report is, and the `seeds` section.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SeedsReport {
    pub config: RunConfig,
    pub environment: RunEnvironment,
    /// Each seed's output folder, relative to this one (`seed-<s>`).
    pub runs: IndexMap<String, String>,
    pub seeds: SeedsSection,
}

/// One row of seeds.csv.
#[derive(Serialize)]
struct CsvRow<'a> {
    model: &'a str,
    /// The epoch, or empty for a figure over the whole run.
    epoch: Option<usize>,
    metric: &'a str,
    n: usize,
    mean: f64,
    std: f64,
    min: f64,
    max: f64,
}

impl SeedsReport {
    /// Writes comparison.json, comparison.md and seeds.csv into `out`.
    pub fn write(&self, out: &OutDir) -> Result<()> {
        write_atomic(&out.json(), serde_json::to_string_pretty(self)?.as_bytes())?;
        write_atomic(&out.markdown(), self.markdown().as_bytes())?;
        write_atomic(&out.seeds_csv(), &self.csv()?)
    }

    fn csv(&self) -> Result<Vec<u8>> {
        let mut writer = csv::Writer::from_writer(Vec::new());
        for (model, m) in &self.seeds.models {
            let mut row = |epoch: Option<usize>, metric: &str, s: &Spread| {
                let Spread { n, mean, std, min, max } = *s;
                writer.serialize(CsvRow { model, epoch, metric, n, mean, std, min, max })
            };
            for e in &m.epochs {
                for (metric, s) in [
                    ("eval_acc", &e.eval_acc),
                    ("eval_loss", &e.eval_loss),
                    ("train_acc", &e.train_acc),
                    ("train_loss", &e.train_loss),
                ] {
                    row(Some(e.epoch), metric, s)?;
                }
            }
            for (metric, s) in [
                ("final_eval_acc", &m.final_eval_acc),
                ("best_eval_acc", &m.best_eval_acc),
                ("mean_train_ms_per_step", &m.mean_train_ms_per_step),
            ] {
                if let Some(s) = s {
                    row(None, metric, s)?;
                }
            }
        }
        Ok(writer.into_inner()?)
    }

    /// The report as Markdown tables.
    pub fn markdown(&self) -> String {
        let seeds = &self.seeds;
        let list = seeds.seeds.iter().map(u64::to_string).collect::<Vec<_>>().join(", ");
        let mut md = format!(
            "# csp-tch comparison over {} seeds ({list})\n\n{}\n\nEach seed's own report: {}.\n\n",
            seeds.seeds.len(),
            report::run_line(&self.config, &self.environment),
            self.runs.values().map(|dir| format!("`{dir}/comparison.md`")).collect::<Vec<_>>().join(", ")
        );
        md += "## Models\n\nMean ± standard deviation over the seeds where the model finished, [min, max].\n\n\
               | model | seeds | final eval acc | best eval acc | train ms/step |\n|---|---|---:|---:|---:|\n";
        for (name, m) in &seeds.models {
            md += &format!(
                "| {name} | {} | {} | {} | {} |\n",
                m.seeds.iter().map(u64::to_string).collect::<Vec<_>>().join(", "),
                spread_cell(m.final_eval_acc, 4),
                spread_cell(m.best_eval_acc, 4),
                spread_cell(m.mean_train_ms_per_step, 1),
            );
        }
        if !seeds.against_baseline.is_empty() {
            md += "\n## Against the plain networks, paired by seed\n\nDifferences in percentage points of \
                   accuracy; the interval is the 95% interval of the mean difference (Student's t over the \
                   seeds).\n\n| model | against | final eval acc | best eval acc | train step-time ratio |\n\
                   |---|---|---|---|---:|\n";
            for (name, a) in &seeds.against_baseline {
                md += &format!(
                    "| {name} | {} | {} | {} | {} |\n",
                    a.baseline,
                    a.final_eval_acc.verdict,
                    a.best_eval_acc.verdict,
                    spread_cell(a.train_step_time_ratio, 3)
                );
            }
        }
        md += "\n## Per epoch\n\n| model | epoch | seeds | eval acc | eval loss | train acc |\n|---|---:|---:|---:|---:|---:|\n";
        for (name, m) in &seeds.models {
            for e in &m.epochs {
                md += &format!(
                    "| {name} | {} | {} | {} | {} | {} |\n",
                    e.epoch,
                    e.eval_acc.n,
                    spread_cell(Some(e.eval_acc), 4),
                    spread_cell(Some(e.eval_loss), 4),
                    spread_cell(Some(e.train_acc), 4),
                );
            }
        }
        if !seeds.tutorial.is_empty() {
            md += &format!(
                "\n## The tutorial's figures against our range\n\n{}\n\n| model | epoch | figure | tutorial | ours [min, max] \
                 | |\n|---|---:|---|---:|---|---|\n",
                if self.config.comparable_to_tutorial() {
                    "Same recipe and data as the tutorial."
                } else {
                    "This run does not follow the tutorial's recipe on its full data: for reference only."
                }
            );
            for t in &seeds.tutorial {
                let verdict = if t.inside { "inside".to_string() } else { format!("outside by {:.4}", t.outside_by) };
                md += &format!(
                    "| {} | {} | {} | {:.4} | {:.4} [{:.4}, {:.4}] | {verdict} |\n",
                    t.model, t.epoch, t.metric, t.tutorial, t.ours.mean, t.ours.min, t.ours.max
                );
            }
        }
        md
    }
}

/// `0.2540 ± 0.0120 [0.2400, 0.2660]`, or a dash.
fn spread_cell(spread: Option<Spread>, digits: usize) -> String {
    spread.map_or_else(
        || "—".into(),
        |s| format!("{:.digits$} ± {:.digits$} [{:.digits$}, {:.digits$}]", s.mean, s.std, s.min, s.max),
    )
}
