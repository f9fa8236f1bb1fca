//! `curves.svg`: accuracy and loss per epoch for every model with the tutorial's points overlaid
//! (over seeds: the mean with a min-max band), and a panel comparing parameters, MACs and train step
//! time. Plain SVG from plotters (text is
//! laid out with estimated glyph widths, so no system font is needed to write it).

use anyhow::{anyhow, Result};
use plotters::prelude::*;

use indexmap::{IndexMap, IndexSet};

use crate::files::{write_atomic, OutDir};
use crate::report::seeds::{ModelSpread, Spread};
use crate::report::tutorial::TUTORIAL_EPOCHS;
use crate::report::ModelReport;

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 940;
const LEGEND_HEIGHT: u32 = 40;
const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(140, 86, 75),
];

fn color(i: usize) -> RGBColor {
    PALETTE[i % PALETTE.len()]
}

fn plot_error(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("cannot draw curves.svg: {e}")
}

/// A strip above the panels: one colour per model, and what the line styles mean. Kept out of
/// the panels so that it can never cover data.
fn draw_legend<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    names: &[&str],
    over_seeds: bool,
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let font = ("sans-serif", 14).into_font();
    let mut x = 70;
    for (i, name) in names.iter().enumerate() {
        let c = color(i);
        area.draw(&PathElement::new(vec![(x, 22), (x + 24, 22)], c.stroke_width(3))).map_err(plot_error)?;
        area.draw(&Text::new(name.to_string(), (x + 30, 15), font.clone())).map_err(plot_error)?;
        x += 60 + 8 * name.len() as i32;
    }
    let styles = if over_seeds {
        "solid line: eval (mean over seeds, band: min to max)   dashed: train mean   triangles: the tutorial's"
    } else {
        "solid line: eval   dashed: train   triangles: the tutorial's logged values"
    };
    area.draw(&Text::new(styles, (x + 20, 15), font.color(&BLACK.mix(0.7)))).map_err(plot_error)?;
    Ok(())
}

/// A value per epoch and, over seeds, its range (`lo == hi` for a single run).
#[derive(Clone, Copy, Debug)]
pub struct Band {
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
}

impl Band {
    fn single(value: f64) -> Band {
        Band { value, lo: value, hi: value }
    }

    fn of(spread: Spread) -> Band {
        Band { value: spread.mean, lo: spread.min, hi: spread.max }
    }
}

/// One epoch of a model's curves.
#[derive(Clone, Debug)]
pub struct EpochBands {
    pub epoch: usize,
    pub train_acc: Band,
    pub eval_acc: Band,
    pub train_loss: Band,
    pub eval_loss: Band,
}

/// What the figure shows of one model: its curves and its costs.
#[derive(Clone, Debug)]
pub struct ModelCurves {
    pub name: String,
    pub trainable_params: i64,
    pub macs: i64,
    pub train_ms_per_step: Option<f64>,
    pub epochs: Vec<EpochBands>,
}

impl ModelCurves {
    /// A model of a single run.
    pub fn of_run(name: &str, r: &ModelReport) -> ModelCurves {
        let epochs = r
            .epochs
            .iter()
            .map(|e| EpochBands {
                epoch: e.epoch,
                train_acc: Band::single(e.train_acc),
                eval_acc: Band::single(e.eval_acc),
                train_loss: Band::single(e.train_loss),
                eval_loss: Band::single(e.eval_loss),
            })
            .collect();
        ModelCurves {
            name: name.into(),
            trainable_params: r.trainable_params,
            macs: r.macs,
            train_ms_per_step: r.mean_train_ms_per_step,
            epochs,
        }
    }

    /// A model over seeds: means with their min-max bands; costs from one seed's report `r`.
    pub fn of_seeds(name: &str, spread: &ModelSpread, r: &ModelReport) -> ModelCurves {
        let epochs = spread
            .epochs
            .iter()
            .map(|e| EpochBands {
                epoch: e.epoch,
                train_acc: Band::of(e.train_acc),
                eval_acc: Band::of(e.eval_acc),
                train_loss: Band::of(e.train_loss),
                eval_loss: Band::of(e.eval_loss),
            })
            .collect();
        ModelCurves {
            name: name.into(),
            trainable_params: r.trainable_params,
            macs: r.macs,
            train_ms_per_step: spread.mean_train_ms_per_step.map(|s| s.mean),
            epochs,
        }
    }
}

/// One quantity per epoch: its train and eval bands, and the tutorial's values.
struct Metric {
    title: &'static str,
    y_label: &'static str,
    train: fn(&EpochBands) -> Band,
    eval: fn(&EpochBands) -> Band,
    tutorial_train: fn(&crate::report::tutorial::TutorialEpoch) -> Option<f64>,
    tutorial_eval: fn(&crate::report::tutorial::TutorialEpoch) -> Option<f64>,
}

const ACCURACY: Metric = Metric {
    title: "Top-1 accuracy per epoch",
    y_label: "top-1 accuracy",
    train: |e| e.train_acc,
    eval: |e| e.eval_acc,
    tutorial_train: |t| Some(t.figures.train_acc),
    tutorial_eval: |t| t.figures.eval_acc,
};

const LOSS: Metric = Metric {
    title: "Loss per epoch (the tutorial's: last batch)",
    y_label: "mean cross-entropy (axis clipped at the 95th percentile)",
    train: |e| e.train_loss,
    eval: |e| e.eval_loss,
    tutorial_train: |t| Some(t.figures.last_train_loss),
    tutorial_eval: |t| t.figures.last_eval_loss,
};

fn draw_metric<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    metric: &Metric,
    models: &[ModelCurves],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let max_epoch = models.iter().map(|m| m.epochs.len()).max().unwrap_or(1).max(5) as f64;
    let mut values: Vec<f64> = models
        .iter()
        .flat_map(|m| m.epochs.iter().flat_map(|e| [(metric.train)(e).hi, (metric.eval)(e).hi]))
        .chain(TUTORIAL_EPOCHS.iter().flat_map(|t| [(metric.tutorial_train)(t), (metric.tutorial_eval)(t)]).flatten())
        .filter(|v| v.is_finite())
        .collect();
    values.sort_by(f64::total_cmp);
    // Early-epoch eval losses can be huge; clip the axis at the 95th percentile so the rest stays readable.
    let top = values.get(values.len().saturating_sub(1) * 95 / 100).copied().unwrap_or(1.0).max(1.0) * 1.05;
    let mut chart = ChartBuilder::on(area)
        .caption(metric.title, ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(0.5f64..max_epoch + 0.5, 0f64..top)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(metric.y_label)
        .x_labels(max_epoch as usize + 1)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(plot_error)?;
    let clip = |v: f64| v.min(top);
    for (i, model) in models.iter().enumerate() {
        let c = color(i);
        let points = |of: fn(&EpochBands) -> Band| -> Vec<(f64, Band)> {
            model.epochs.iter().map(|e| (e.epoch as f64, of(e))).collect()
        };
        let (eval, train) = (points(metric.eval), points(metric.train));
        // The eval range over seeds, as a shaded band (nothing for a single run).
        if eval.iter().any(|(_, b)| b.hi > b.lo) {
            let outline: Vec<(f64, f64)> = eval
                .iter()
                .map(|(x, b)| (*x, clip(b.hi)))
                .chain(eval.iter().rev().map(|(x, b)| (*x, clip(b.lo))))
                .collect();
            chart.draw_series(std::iter::once(Polygon::new(outline, c.mix(0.18).filled()))).map_err(plot_error)?;
        }
        let line = |points: &[(f64, Band)]| points.iter().map(|(x, b)| (*x, clip(b.value))).collect::<Vec<_>>();
        chart.draw_series(LineSeries::new(line(&eval), c.stroke_width(2))).map_err(plot_error)?;
        chart.draw_series(line(&eval).into_iter().map(|p| Circle::new(p, 3, c.filled()))).map_err(plot_error)?;
        chart.draw_series(DashedLineSeries::new(line(&train), 6, 4, c.stroke_width(1))).map_err(plot_error)?;
        let tutorial = TUTORIAL_EPOCHS.iter().filter(|t| t.model == model.name);
        let marks: Vec<(f64, f64)> = tutorial
            .flat_map(|t| {
                [(metric.tutorial_train)(t), (metric.tutorial_eval)(t)].map(|v| v.map(|v| (t.epoch as f64, clip(v))))
            })
            .flatten()
            .collect();
        chart
            .draw_series(marks.into_iter().map(|p| TriangleMarker::new(p, 6, c.stroke_width(2))))
            .map_err(plot_error)?;
    }
    Ok(())
}

/// Grouped bars: params, MACs and train ms/step of each model relative to its plain network (a
/// plain network is 1.0; a CSP model whose plain network is not in the run has no bars).
fn draw_costs<DB: DrawingBackend>(area: &DrawingArea<DB, plotters::coord::Shift>, models: &[ModelCurves]) -> Result<()>
where
    DB::ErrorType: 'static,
{
    fn base_of<'a>(m: &'a ModelCurves, models: &'a [ModelCurves]) -> Option<&'a ModelCurves> {
        match crate::models::base_of(&m.name) {
            None => Some(m),
            Some(base) => models.iter().find(|b| b.name == base),
        }
    }
    type Measure = fn(&ModelCurves) -> Option<f64>;
    let groups: [(&str, Measure); 3] = [
        ("trainable params", |m| Some(m.trainable_params as f64)),
        ("MACs per image", |m| Some(m.macs as f64)),
        ("train ms/step", |m| m.train_ms_per_step),
    ];
    let ratios: Vec<Vec<Option<f64>>> =
        models.iter().map(|m| groups.iter().map(|(_, f)| Some(f(m)? / f(base_of(m, models)?)?)).collect()).collect();
    let top = ratios.iter().flatten().flatten().fold(1.0f64, |a, &b| a.max(b)) * 1.15;
    // Each plain network once, in the order the models name them.
    let bases: Vec<&str> = models
        .iter()
        .filter_map(|m| base_of(m, models))
        .map(|b| b.name.as_str())
        .collect::<IndexSet<_>>()
        .into_iter()
        .collect();
    let mut chart = ChartBuilder::on(area)
        .caption(
            format!("Cost relative to each model's plain network ({} = 1.0)", bases.join(", ")),
            ("sans-serif", 15),
        )
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(0f64..groups.len() as f64, 0f64..top)
        .map_err(plot_error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = (x - 0.5).round();
            if (x - 0.5 - i).abs() < 1e-6 && i >= 0.0 {
                groups.get(i as usize).map_or(String::new(), |g| g.0.to_string())
            } else {
                String::new()
            }
        })
        .y_desc("ratio")
        .draw()
        .map_err(plot_error)?;
    let width = 0.8 / models.len() as f64;
    for (i, row) in ratios.iter().enumerate() {
        let c = color(i);
        let bars = row.iter().enumerate().filter_map(|(g, v)| {
            let x0 = g as f64 + 0.1 + i as f64 * width;
            v.map(|v| Rectangle::new([(x0, 0.0), (x0 + width * 0.9, v)], c.filled()))
        });
        chart.draw_series(bars).map_err(plot_error)?;
        let labels = row.iter().enumerate().filter_map(|(g, v)| {
            let x0 = g as f64 + 0.1 + i as f64 * width;
            v.map(|v| Text::new(format!("{v:.2}"), (x0, v + top * 0.05), ("sans-serif", 11)))
        });
        chart.draw_series(labels).map_err(plot_error)?;
    }
    Ok(())
}

/// The SVG text of the figure.
pub fn render(models: &[ModelCurves]) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let (legend, panels) = root.split_vertically(LEGEND_HEIGHT);
        let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
        let over_seeds = models.iter().flat_map(|m| &m.epochs).any(|e| e.eval_acc.hi > e.eval_acc.lo);
        draw_legend(&legend, &names, over_seeds)?;
        let (top, bottom) = panels.split_vertically((HEIGHT - LEGEND_HEIGHT) / 2);
        let (left, right) = top.split_horizontally(WIDTH / 2);
        draw_metric(&left, &ACCURACY, models)?;
        draw_metric(&right, &LOSS, models)?;
        if !models.is_empty() {
            draw_costs(&bottom, models)?;
        }
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

/// Writes `curves.svg` of a single run's models into `out`.
pub fn write(out: &OutDir, models: &IndexMap<String, ModelReport>) -> Result<()> {
    let curves: Vec<ModelCurves> = models.iter().map(|(name, r)| ModelCurves::of_run(name, r)).collect();
    write_curves(out, &curves)
}

/// Writes `curves.svg` of `models` into `out`.
pub fn write_curves(out: &OutDir, models: &[ModelCurves]) -> Result<()> {
    write_atomic(&out.svg(), render(models)?.as_bytes())
}
