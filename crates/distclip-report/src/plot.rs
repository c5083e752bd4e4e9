//! Drawing one line chart (values over steps) into a PNG file.

use std::path::Path;

use plotters::backend::RGBPixel;
use plotters::prelude::*;

use crate::error::ReportError;
use crate::font::{FAMILY, ensure_registered};

/// Size of every plot, in pixels.
pub(crate) const WIDTH: u32 = 960;
/// Size of every plot, in pixels.
pub(crate) const HEIGHT: u32 = 540;

/// Line colours, in order of series (matplotlib's `tab10`, which reads well on white).
pub(crate) const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One line: `None` values (non-finite in the run) leave a gap.
#[derive(Debug, Clone)]
pub(crate) struct Series {
    pub label: String,
    pub points: Vec<(i64, Option<f64>)>,
    pub color: RGBColor,
    /// Mark every point (sparse series such as evaluations).
    pub markers: bool,
    /// Dashed (reference lines such as chance level).
    pub dashed: bool,
}

/// A chart: lines over steps.
#[derive(Debug, Clone)]
pub(crate) struct LineChart {
    pub title: String,
    pub y_desc: String,
    pub series: Vec<Series>,
    /// A fixed y range (accuracies: 0..1); otherwise the data's, padded.
    pub y_range: Option<(f64, f64)>,
}

/// Draw `chart` and write it to `path` as PNG.
pub(crate) fn write_png(chart: &LineChart, path: &Path) -> Result<(), ReportError> {
    let plot_err = |message: String| ReportError::Plot { path: path.to_path_buf(), message };
    let mut buf = vec![0u8; WIDTH as usize * HEIGHT as usize * 3];
    render(chart, &mut buf).map_err(plot_err)?;
    image::save_buffer_with_format(path, &buf, WIDTH, HEIGHT, image::ExtendedColorType::Rgb8, image::ImageFormat::Png)
        .map_err(|e| match e {
            image::ImageError::IoError(source) => ReportError::Io { action: "write", path: path.to_path_buf(), source },
            other => plot_err(other.to_string()),
        })
}

fn render(chart: &LineChart, buf: &mut [u8]) -> Result<(), String> {
    ensure_registered()?;
    let e = |e: DrawingAreaErrorKind<_>| e.to_string();
    let root = BitMapBackend::<RGBPixel>::with_buffer_and_format(buf, (WIDTH, HEIGHT))
        .map_err(|e| e.to_string())?
        .into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let (x0, x1) = x_range(&chart.series);
    let (y0, y1) = chart.y_range.unwrap_or_else(|| y_range(&chart.series));
    let mut c = ChartBuilder::on(&root)
        .caption(&chart.title, (FAMILY, 24))
        .margin(16)
        .x_label_area_size(50)
        .y_label_area_size(90)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(e)?;
    let y_fmt = |v: &f64| tick(*v);
    c.configure_mesh()
        .x_desc("step")
        .y_desc(chart.y_desc.as_str())
        .label_style((FAMILY, 15))
        .axis_desc_style((FAMILY, 17))
        .y_label_formatter(&y_fmt)
        .light_line_style(RGBColor(238, 238, 238))
        .draw()
        .map_err(e)?;
    let mut labelled = false;
    for s in &chart.series {
        let color = s.color;
        let style = color.stroke_width(2);
        let mut first = true;
        for seg in segments(&s.points) {
            let drawn = if s.dashed {
                c.draw_series(DashedLineSeries::new(seg, 8, 6, style))
            } else {
                // A lone point between gaps would be invisible as a line: mark it.
                let size = if s.markers || seg.len() == 1 { 3 } else { 0 };
                c.draw_series(LineSeries::new(seg, style).point_size(size))
            }
            .map_err(e)?;
            if first && !s.label.is_empty() {
                // The legend's mark looks like the line: two dashes for a dashed series.
                let dashed = s.dashed;
                let (gap0, gap1) = if dashed { (9, 15) } else { (12, 12) };
                drawn.label(s.label.as_str()).legend(move |(x, y)| {
                    let piece = |a, b| PathElement::new(vec![(a, 0), (b, 0)], color.stroke_width(2));
                    EmptyElement::at((x, y)) + piece(0, gap0) + piece(gap1, 24)
                });
                labelled = true;
            }
            first = false;
        }
    }
    if chart.series.iter().all(|s| s.points.iter().all(|(_, v)| v.is_none())) {
        root.draw(&Text::new("no finite values", ((WIDTH / 2 - 70) as i32, (HEIGHT / 2) as i32), (FAMILY, 20)))
            .map_err(e)?;
    }
    if labelled {
        c.configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.5))
            .label_font((FAMILY, 15))
            .draw()
            .map_err(e)?;
    }
    root.present().map_err(e)
}

/// The runs of consecutive finite points.
pub(crate) fn segments(points: &[(i64, Option<f64>)]) -> Vec<Vec<(i64, f64)>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    for &(x, y) in points {
        match y.filter(|v| v.is_finite()) {
            Some(y) => cur.push((x, y)),
            None if !cur.is_empty() => out.push(std::mem::take(&mut cur)),
            None => {}
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Steps shown: all points of all series (one step is widened so the axis has a length).
fn x_range(series: &[Series]) -> (i64, i64) {
    let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
    let (lo, hi) = xs.fold((i64::MAX, i64::MIN), |(lo, hi), x| (lo.min(x), hi.max(x)));
    if lo > hi { (0, 1) } else if lo == hi { (lo - 1, hi + 1) } else { (lo, hi) }
}

/// The finite values' range padded by 5% each side, so lines do not run along the frame; a
/// constant is given a band around it.
pub(crate) fn y_range(series: &[Series]) -> (f64, f64) {
    let ys = series.iter().flat_map(|s| s.points.iter().filter_map(|p| p.1)).filter(|v| v.is_finite());
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| (lo.min(y), hi.max(y)));
    if lo > hi {
        return (0.0, 1.0);
    }
    let span = hi - lo;
    let pad = if span > 0.0 { span * 0.05 } else if lo != 0.0 { lo.abs() * 0.1 } else { 1.0 };
    (lo - pad, hi + pad)
}

/// A tick label: plain decimals for ordinary magnitudes, scientific for learning rates and
/// the like, at most four decimals and no trailing zeros.
pub(crate) fn tick(v: f64) -> String {
    let a = v.abs();
    if a < 1e-12 {
        "0".into()
    } else if (1e-3..1e5).contains(&a) {
        let s = format!("{v:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        if s == "-0" { "0".into() } else { s.to_string() }
    } else {
        format!("{v:.2e}")
    }
}
