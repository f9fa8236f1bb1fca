//! `curves.svg`: accuracy and loss per epoch for every model with the tutorial's points overlaid,
//! and a panel comparing parameters, MACs and train step time. Plain SVG from plotters (text is
//! laid out with estimated glyph widths, so no system font is needed to write it).

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

use crate::report::{ModelReport, BASELINE, TUTORIAL_EPOCHS};

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
fn draw_legend<DB: DrawingBackend>(area: &DrawingArea<DB, plotters::coord::Shift>, names: &[&str]) -> Result<()>
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
    let styles = "solid line: eval   dashed: train   triangles: the tutorial's logged values";
    area.draw(&Text::new(styles, (x + 20, 15), font.color(&BLACK.mix(0.7)))).map_err(plot_error)?;
    Ok(())
}

/// One quantity per epoch: (label, value of an epoch, tutorial value of an epoch).
struct Metric {
    title: &'static str,
    y_label: &'static str,
    train: fn(&crate::train::EpochMetrics) -> f64,
    eval: fn(&crate::train::EpochMetrics) -> f64,
    tutorial_train: fn(&crate::report::TutorialEpoch) -> Option<f64>,
    tutorial_eval: fn(&crate::report::TutorialEpoch) -> Option<f64>,
}

const ACCURACY: Metric = Metric {
    title: "Top-1 accuracy per epoch",
    y_label: "top-1 accuracy",
    train: |e| e.train_acc,
    eval: |e| e.eval_acc,
    tutorial_train: |t| Some(t.train_acc),
    tutorial_eval: |t| t.eval_acc,
};

const LOSS: Metric = Metric {
    title: "Loss per epoch (the tutorial's: last batch)",
    y_label: "mean cross-entropy (axis clipped at the 95th percentile)",
    train: |e| e.train_loss,
    eval: |e| e.eval_loss,
    tutorial_train: |t| Some(t.last_train_loss),
    tutorial_eval: |t| t.last_eval_loss,
};

fn draw_metric<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    metric: &Metric,
    reports: &[(String, ModelReport)],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let max_epoch = reports.iter().map(|(_, r)| r.epochs.len()).max().unwrap_or(1).max(5) as f64;
    let mut values: Vec<f64> = reports
        .iter()
        .flat_map(|(_, r)| r.epochs.iter().flat_map(|e| [(metric.train)(e), (metric.eval)(e)]))
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
    for (i, (name, report)) in reports.iter().enumerate() {
        let c = color(i);
        let eval: Vec<(f64, f64)> = report.epochs.iter().map(|e| (e.epoch as f64, clip((metric.eval)(e)))).collect();
        let train: Vec<(f64, f64)> = report.epochs.iter().map(|e| (e.epoch as f64, clip((metric.train)(e)))).collect();
        chart.draw_series(LineSeries::new(eval.clone(), c.stroke_width(2))).map_err(plot_error)?;
        chart.draw_series(eval.iter().map(|&p| Circle::new(p, 3, c.filled()))).map_err(plot_error)?;
        chart.draw_series(DashedLineSeries::new(train, 6, 4, c.stroke_width(1))).map_err(plot_error)?;
        let tutorial = TUTORIAL_EPOCHS.iter().filter(|t| t.model == name);
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

/// Grouped bars: params, MACs and train ms/step of each model relative to the baseline.
fn draw_costs<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    reports: &[(String, ModelReport)],
) -> Result<()>
where
    DB::ErrorType: 'static,
{
    let base = reports.iter().find(|(n, _)| n == BASELINE).map(|(_, r)| r).unwrap_or(&reports[0].1);
    type Measure = fn(&ModelReport) -> Option<f64>;
    let groups: [(&str, Measure); 3] = [
        ("trainable params", |r| Some(r.trainable_params as f64)),
        ("MACs per image", |r| Some(r.macs as f64)),
        ("train ms/step", |r| r.mean_train_ms_per_step),
    ];
    let ratios: Vec<Vec<Option<f64>>> =
        reports.iter().map(|(_, r)| groups.iter().map(|(_, f)| Some(f(r)? / f(base)?)).collect()).collect();
    let top = ratios.iter().flatten().flatten().fold(1.0f64, |a, &b| a.max(b)) * 1.15;
    let base_name = reports.iter().find(|(n, _)| n == BASELINE).map_or(reports[0].0.as_str(), |(n, _)| n);
    let mut chart = ChartBuilder::on(area)
        .caption(format!("Cost relative to {base_name} (= 1.0)"), ("sans-serif", 15))
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
    let width = 0.8 / reports.len() as f64;
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
pub fn render(reports: &[(String, ModelReport)]) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_error)?;
        let (legend, panels) = root.split_vertically(LEGEND_HEIGHT);
        let names: Vec<&str> = reports.iter().map(|(n, _)| n.as_str()).collect();
        draw_legend(&legend, &names)?;
        let (top, bottom) = panels.split_vertically((HEIGHT - LEGEND_HEIGHT) / 2);
        let (left, right) = top.split_horizontally(WIDTH / 2);
        draw_metric(&left, &ACCURACY, reports)?;
        draw_metric(&right, &LOSS, reports)?;
        if !reports.is_empty() {
            draw_costs(&bottom, reports)?;
        }
        root.present().map_err(plot_error)?;
    }
    Ok(svg)
}

/// Writes `curves.svg` into `out`.
pub fn write(out: &Path, reports: &[(String, ModelReport)]) -> Result<()> {
    crate::report::write_atomic(&out.join("curves.svg"), render(reports)?.as_bytes())
}
