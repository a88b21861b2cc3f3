//! The SVG chart of `lockkit bench --chart`: uncontended latency (floor and lockkit) and
//! contended throughput, per backend.

use std::path::Path;

use lockkit::bench::{ms, Report};
use lockkit::BoxError;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

const FLOOR: RGBColor = RGBColor(120, 144, 176);
const LOCKKIT: RGBColor = RGBColor(214, 96, 77);
const THROUGHPUT: RGBColor = RGBColor(67, 147, 120);

fn failed(e: impl std::fmt::Display) -> BoxError {
    format!("drawing the chart: {e}").into()
}

/// Draws the chart of `reports` to `path`.
pub(crate) fn draw(path: &Path, reports: &[Report], date: &str) -> Result<(), BoxError> {
    let width = (200 + 150 * reports.len() as u32).max(900);
    let root = SVGBackend::new(path, (width, 1000)).into_drawing_area();
    root.fill(&WHITE).map_err(failed)?;
    let root = root
        .titled(
            &format!("lockkit bench, {date} (absolute times vary by machine; ratios hold)"),
            ("sans-serif", 18),
        )
        .map_err(failed)?;
    let (left, right) = root.split_vertically(480);
    latency(&left, reports)?;
    throughput(&right, reports)?;
    root.present().map_err(failed)?;
    Ok(())
}

/// One panel: `n` bar groups side by side, values up to `top`, no x axis (the bars are
/// labelled in the plot).
fn panel<'a, DB: DrawingBackend>(
    area: &'a DrawingArea<DB, plotters::coord::Shift>,
    caption: &str,
    unit: &str,
    n: f64,
    top: f64,
) -> Result<ChartContext<'a, DB, Cartesian2d<RangedCoordf64, RangedCoordf64>>, BoxError> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(10)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..n, 0.0..top)
        .map_err(failed)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .disable_x_axis()
        .y_desc(unit)
        .draw()
        .map_err(failed)?;
    Ok(chart)
}

fn latency<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    reports: &[Report],
) -> Result<(), BoxError> {
    let n = reports.len().max(1) as f64;
    let top = reports
        .iter()
        .map(|r| ms(r.uncontended.lockkit.p50).max(ms(r.uncontended.floor.p50)))
        .fold(0.0, f64::max)
        .max(0.001)
        * 1.25;
    let caption = "uncontended acquire+release, p50 (ms)";
    let mut chart = panel(area, caption, "ms", n, top)?;
    let bars = |pick: fn(&Report) -> f64, from: f64, colour: RGBColor| {
        reports.iter().enumerate().map(move |(i, r)| {
            let x = i as f64;
            Rectangle::new(
                [(x + from, 0.0), (x + from + 0.35, pick(r))],
                colour.filled(),
            )
        })
    };
    chart
        .draw_series(bars(|r| ms(r.uncontended.floor.p50), 0.1, FLOOR))
        .map_err(failed)?
        .label("fenced floor (plain client)")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], FLOOR.filled()));
    chart
        .draw_series(bars(|r| ms(r.uncontended.lockkit.p50), 0.5, LOCKKIT))
        .map_err(failed)?
        .label("lockkit")
        .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], LOCKKIT.filled()));
    chart
        .draw_series(reports.iter().enumerate().map(|(i, r)| {
            let u = &r.uncontended;
            let y = ms(u.lockkit.p50).max(ms(u.floor.p50)) + top * 0.03;
            Text::new(
                format!("{} {:.2}x", r.label, u.ratio),
                (i as f64 + 0.05, y),
                ("sans-serif", 13),
            )
        }))
        .map_err(failed)?;
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(failed)?;
    Ok(())
}

fn throughput<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    reports: &[Report],
) -> Result<(), BoxError> {
    let n = reports.len().max(1) as f64;
    let workers = reports.first().map_or(0, |r| r.contended.per_worker.len());
    let top = reports
        .iter()
        .map(|r| r.contended.per_second())
        .fold(0.0, f64::max)
        .max(1.0)
        * 1.25;
    let caption = format!("contended, {workers} clients on one name: acquisitions/s (fairness)");
    let mut chart = panel(area, &caption, "acquisitions/s", n, top)?;
    chart
        .draw_series(reports.iter().enumerate().map(|(i, r)| {
            let x = i as f64;
            Rectangle::new(
                [(x + 0.15, 0.0), (x + 0.85, r.contended.per_second())],
                THROUGHPUT.filled(),
            )
        }))
        .map_err(failed)?;
    chart
        .draw_series(reports.iter().enumerate().map(|(i, r)| {
            let c = &r.contended;
            Text::new(
                format!("{} {:.0}/s ({:.2})", r.label, c.per_second(), c.fairness()),
                (i as f64 + 0.05, c.per_second() + top * 0.03),
                ("sans-serif", 13),
            )
        }))
        .map_err(failed)?;
    Ok(())
}
