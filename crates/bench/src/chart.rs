//! The latency–throughput curve as a PNG: p50, p99 and p99.9 against the rate, for the pipeline
//! (solid) and the bare client (dashed), on a log scale. Drawn with plotters and the metric
//! service's embedded DejaVu Sans, so it looks the same on any machine.

use crate::curve::CurvePoint;
use crate::latency::Summary;
use anyhow::{Context as _, ensure};
use plotters::element::DashedPathElement;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};
use std::path::Path;

/// The metric service's font (license beside it).
static FONT: &[u8] = include_bytes!("../../metric/assets/DejaVuSans.ttf");

/// One line of the chart: its name, colour, whether dashed, and how to read it off a point.
type Series = (&'static str, RGBColor, bool, fn(&CurvePoint) -> Option<f64>);

fn pick(summary: Option<Summary>, quantile: fn(&Summary) -> f64) -> Option<f64> {
    summary.map(|s| quantile(&s))
}

const SERIES: [Series; 6] = [
    ("pipeline p50", RGBColor(86, 140, 196), false, |p| {
        pick(p.pipeline.per_sample, |s| s.p50_ms)
    }),
    ("pipeline p99", RGBColor(213, 94, 0), false, |p| {
        pick(p.pipeline.per_sample, |s| s.p99_ms)
    }),
    ("pipeline p99.9", RGBColor(120, 40, 120), false, |p| {
        pick(p.pipeline.per_sample, |s| s.p999_ms)
    }),
    ("bare client p50", RGBColor(86, 140, 196), true, |p| {
        pick(p.bare.latency, |s| s.p50_ms)
    }),
    ("bare client p99", RGBColor(213, 94, 0), true, |p| {
        pick(p.bare.latency, |s| s.p99_ms)
    }),
    ("bare client p99.9", RGBColor(120, 40, 120), true, |p| {
        pick(p.bare.latency, |s| s.p999_ms)
    }),
];

/// Draws the curve to `path` (PNG, 960x540).
pub fn draw(points: &[CurvePoint], path: &Path) -> anyhow::Result<()> {
    ensure!(!points.is_empty(), "no curve points to draw");
    // Registering twice is harmless; a font that does not parse is an error.
    register_font("sans-serif", FontStyle::Normal, FONT)
        .map_err(|_| anyhow::anyhow!("the embedded font DejaVuSans.ttf cannot be parsed"))?;
    let values: Vec<f64> = points
        .iter()
        .flat_map(|p| SERIES.iter().filter_map(|s| (s.3)(p)))
        .filter(|v| v.is_finite() && *v > 0.0)
        .collect();
    let low = values
        .iter()
        .copied()
        .fold(f64::INFINITY, f64::min)
        .max(0.05)
        / 1.5;
    let high = values.iter().copied().fold(0.0, f64::max).max(low * 10.0) * 1.5;
    let max_rate = points.iter().map(|p| p.rate).fold(0.0, f64::max) * 1.05;

    let root = BitMapBackend::new(path, (960, 540)).into_drawing_area();
    let draw_err = |err| anyhow::anyhow!("cannot draw {}: {err:?}", path.display());
    root.fill(&WHITE).map_err(draw_err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "End-to-end latency against load: pipeline (solid) vs bare client (dashed)",
            ("sans-serif", 20),
        )
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0.0..max_rate, (low..high).log_scale())
        .map_err(draw_err)?;
    chart
        .configure_mesh()
        .x_desc("samples per second")
        .x_label_formatter(&|rate| format!("{rate:.0}"))
        .y_label_formatter(&|ms| format!("{ms}"))
        .y_desc("latency, ms (log scale)")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(draw_err)?;
    for (name, color, dashed, value) in SERIES {
        let line: Vec<(f64, f64)> = points
            .iter()
            .filter_map(|p| Some((p.rate, value(p)?)))
            .collect();
        let style = color.stroke_width(2);
        if dashed {
            chart
                .draw_series(std::iter::once(DashedPathElement::new(
                    line.clone(),
                    6,
                    4,
                    style,
                )))
                .map_err(draw_err)?
                .label(name)
                .legend(move |(x, y)| {
                    DashedPathElement::new(vec![(x, y), (x + 20, y)], 4, 3, style)
                });
        } else {
            chart
                .draw_series(std::iter::once(PathElement::new(line.clone(), style)))
                .map_err(draw_err)?
                .label(name)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
        }
        chart
            .draw_series(line.iter().map(|&at| Circle::new(at, 3, color.filled())))
            .map_err(draw_err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(draw_err)?;
    root.present()
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}
