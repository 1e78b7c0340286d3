//! Horizontal bar charts as SVG: one bar per row at its median, a tick at its p99.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// One bar.
pub struct Bar {
    /// The row's label.
    pub label: String,
    /// The bar's length.
    pub value: f64,
    /// A second mark on the row (the p99), if any.
    pub tail: Option<f64>,
    /// sand's rows are drawn in one colour, the alternatives' in another.
    pub ours: bool,
}

/// Draws `bars` into an SVG at `path`; on a log axis when `log` (values must be positive).
pub fn bars(path: &Path, title: &str, unit: &str, bars: &[Bar], log: bool) -> Result<()> {
    if bars.is_empty() {
        return Ok(());
    }
    // Rows are drawn from the bottom up; reversed, the first bar is on top.
    let bars: Vec<&Bar> = bars.iter().rev().collect();
    // A log axis is drawn as a linear axis of log10(value), labelled with the values.
    let scale = |v: f64| if log { v.max(1e-9).log10() } else { v };
    let values: Vec<(f64, Option<f64>)> = bars
        .iter()
        .map(|b| (scale(b.value), b.tail.map(scale)))
        .collect();
    let top = values
        .iter()
        .map(|(v, t)| t.unwrap_or(*v).max(*v))
        .fold(f64::NEG_INFINITY, f64::max);
    let bottom = if log {
        values
            .iter()
            .map(|(v, _)| *v)
            .fold(f64::INFINITY, f64::min)
            .floor()
    } else {
        0.0
    };
    let right = if log {
        top.ceil().max(bottom + 1.0)
    } else {
        top * 1.1
    };

    let height = 90 + 36 * bars.len() as u32;
    let root = SVGBackend::new(path, (900, height)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(320)
        .build_cartesian_2d(bottom..right, (0..bars.len()).into_segmented())
        .map_err(draw_error)?;
    let x_label = |x: &f64| {
        if log {
            let v = 10f64.powf(*x);
            if v >= 1.0 {
                format!("{v:.0}")
            } else {
                format!("{v}")
            }
        } else {
            format!("{x}")
        }
    };
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc(if log {
            format!("{unit} (log scale)")
        } else {
            unit.to_owned()
        })
        .x_labels(if log {
            (right - bottom) as usize + 1
        } else {
            10
        })
        .x_label_formatter(&x_label)
        .y_label_formatter(&|row| match row {
            SegmentValue::CenterOf(i) => bars.get(*i).map(|b| b.label.clone()).unwrap_or_default(),
            _ => String::new(),
        })
        .draw()
        .map_err(draw_error)?;
    let ours = RGBColor(31, 119, 180);
    let theirs = RGBColor(214, 112, 40);
    chart
        .draw_series(
            bars.iter()
                .zip(&values)
                .enumerate()
                .map(|(i, (b, (v, _)))| {
                    let colour = if b.ours { ours } else { theirs };
                    let mut bar = Rectangle::new(
                        [
                            (bottom, SegmentValue::Exact(i)),
                            (*v, SegmentValue::Exact(i + 1)),
                        ],
                        colour.filled(),
                    );
                    bar.set_margin(6, 6, 0, 0);
                    bar
                }),
        )
        .map_err(draw_error)?;
    chart
        .draw_series(values.iter().enumerate().filter_map(|(i, (_, tail))| {
            tail.map(|t| {
                PathElement::new(
                    vec![(t, SegmentValue::Exact(i)), (t, SegmentValue::Exact(i + 1))],
                    BLACK.stroke_width(2),
                )
            })
        }))
        .map_err(draw_error)?;
    chart
        .draw_series(
            bars.iter()
                .zip(&values)
                .enumerate()
                .map(|(i, (b, (v, _)))| {
                    Text::new(
                        number(b.value),
                        (*v, SegmentValue::CenterOf(i)),
                        ("sans-serif", 13),
                    )
                }),
        )
        .map_err(draw_error)?;
    root.present().map_err(draw_error)?;
    Ok(())
}

/// A figure with three significant digits or so.
pub fn number(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn draw_error<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("cannot draw a plot: {e:?}")
}
