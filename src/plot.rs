//! `curves.svg`: accuracy and loss per epoch for every model with the tutorial's points overlaid,
//! and a panel comparing parameters, MACs and train step time. Plain SVG from plotters (text is
//! laid out with estimated glyph widths, so no system font is needed to write it).

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

use crate::report::{ModelReport, BASELINE, TUTORIAL_EPOCHS};

const WIDTH: u32 = 1200;
const HEIGHT: u32 = 900;
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
    title: "Accuracy (solid: eval, dashed: train, triangles: the tutorial)",
    y_label: "top-1 accuracy",
    train: |e| e.train_acc,
    eval: |e| e.eval_acc,
    tutorial_train: |t| Some(t.train_acc),
    tutorial_eval: |t| t.eval_acc,
};

const LOSS: Metric = Metric {
    title: "Loss (solid: eval, dashed: train, triangles: the tutorial's)",
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
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc(metric.y_label)
        .x_labels(max_epoch as usize + 1)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let clip = |v: f64| v.min(top);
    for (i, (name, report)) in reports.iter().enumerate() {
        let c = color(i);
        let eval: Vec<(f64, f64)> = report.epochs.iter().map(|e| (e.epoch as f64, clip((metric.eval)(e)))).collect();
        let train: Vec<(f64, f64)> = report.epochs.iter().map(|e| (e.epoch as f64, clip((metric.train)(e)))).collect();
        chart
            .draw_series(LineSeries::new(eval.clone(), c.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2)));
        chart.draw_series(eval.iter().map(|&p| Circle::new(p, 3, c.filled()))).map_err(|e| anyhow!("{e}"))?;
        chart
            .draw_series(DashedLineSeries::new(train, 6, 4, c.stroke_width(1)))
            .map_err(|e| anyhow!("{e}"))?;
        let tutorial = TUTORIAL_EPOCHS.iter().filter(|t| t.model == name);
        let marks: Vec<(f64, f64)> = tutorial
            .flat_map(|t| [(metric.tutorial_train)(t), (metric.tutorial_eval)(t)].map(|v| v.map(|v| (t.epoch as f64, clip(v)))))
            .flatten()
            .collect();
        chart
            .draw_series(marks.into_iter().map(|p| TriangleMarker::new(p, 6, c.stroke_width(2))))
            .map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
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
    let groups: [(&str, fn(&ModelReport) -> Option<f64>); 3] = [
        ("trainable params", |r| Some(r.trainable_params as f64)),
        ("MACs per image", |r| Some(r.macs as f64)),
        ("train ms/step", |r| r.mean_train_ms_per_step),
    ];
    let ratios: Vec<Vec<Option<f64>>> = reports
        .iter()
        .map(|(_, r)| groups.iter().map(|(_, f)| Some(f(r)? / f(base)?)).collect())
        .collect();
    let top = ratios.iter().flatten().flatten().fold(1.0f64, |a, &b| a.max(b)) * 1.15;
    let base_name = reports.iter().find(|(n, _)| n == BASELINE).map_or(reports[0].0.as_str(), |(n, _)| n);
    let mut chart = ChartBuilder::on(area)
        .caption(format!("Cost relative to {base_name} (= 1.0)"), ("sans-serif", 15))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(0f64..groups.len() as f64, 0f64..top)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = (x - 0.5).round();
            if (x - 0.5 - i).abs() < 1e-6 && i >= 0.0 { groups.get(i as usize).map_or(String::new(), |g| g.0.to_string()) } else { String::new() }
        })
        .y_desc("ratio")
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    let width = 0.8 / reports.len() as f64;
    for (i, ((name, _), row)) in reports.iter().zip(&ratios).enumerate() {
        let c = color(i);
        let bars = row.iter().enumerate().filter_map(|(g, v)| {
            let x0 = g as f64 + 0.1 + i as f64 * width;
            v.map(|v| Rectangle::new([(x0, 0.0), (x0 + width * 0.9, v)], c.filled()))
        });
        chart
            .draw_series(bars)
            .map_err(|e| anyhow!("{e}"))?
            .label(name.as_str())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], c.filled()));
        let labels = row.iter().enumerate().filter_map(|(g, v)| {
            let x0 = g as f64 + 0.1 + i as f64 * width;
            v.map(|v| Text::new(format!("{v:.2}"), (x0, v + top * 0.02), ("sans-serif", 11)))
        });
        chart.draw_series(labels).map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.4))
        .label_font(("sans-serif", 13))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// The SVG text of the figure.
pub fn render(reports: &[(String, ModelReport)]) -> Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
        let (top, bottom) = root.split_vertically(HEIGHT / 2);
        let (left, right) = top.split_horizontally(WIDTH / 2);
        draw_metric(&left, &ACCURACY, reports)?;
        draw_metric(&right, &LOSS, reports)?;
        if !reports.is_empty() {
            draw_costs(&bottom, reports)?;
        }
        root.present().map_err(|e| anyhow!("{e}"))?;
    }
    Ok(svg)
}

/// Writes `curves.svg` into `out`.
pub fn write(out: &Path, reports: &[(String, ModelReport)]) -> Result<()> {
    crate::report::write_atomic(&out.join("curves.svg"), render(reports)?.as_bytes())
}
