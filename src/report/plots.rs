//! Training curves as inline SVG, drawn with plotters' SVG backend: one
//! small chart per numeric field of a metrics log.
//!
//! plotters cannot attach attributes to an element, so the curve is drawn
//! in a colour nothing else in the chart uses and its `<polyline>` is then
//! tagged `class="curve" data-series="STAGE/OUTPUT/FIELD"`, which lets
//! readers (and tests) find each series.

use plotters::prelude::*;

use super::escape::esc;
use super::ReportError;

const WIDTH: u32 = 440;
const HEIGHT: u32 = 250;
/// The curve's colour; axes, grid and labels are black or grey.
const CURVE: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
/// `CURVE` as plotters' SVG backend writes it.
const CURVE_SVG: &str = "stroke=\"#1F77B4\"";
/// Up to this many points, each also gets a dot (a one-point series, such
/// as a final held-out evaluation line, is otherwise invisible).
const MAX_MARKERS: usize = 60;

/// The SVG of `field` against `x_label`; `series` names it (`stage/output/field`).
pub fn curve_svg(
    series: &str,
    field: &str,
    x_label: &str,
    points: &[(f64, f64)],
) -> Result<String, ReportError> {
    let plot_err = |e: &dyn std::fmt::Display| ReportError::Plot {
        series: series.to_string(),
        message: e.to_string(),
    };
    let (x_range, y_range) = ranges(points);
    let (x_span, y_span) = (x_range.end - x_range.start, y_range.end - y_range.start);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_err(&e))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(field, ("sans-serif", 15))
            .margin(10)
            .x_label_area_size(34)
            .y_label_area_size(64)
            .build_cartesian_2d(x_range, y_range)
            .map_err(|e| plot_err(&e))?;
        chart
            .configure_mesh()
            .x_desc(x_label)
            .x_labels(6)
            .y_labels(5)
            .x_label_formatter(&|v| number(*v, x_span))
            .y_label_formatter(&|v| number(*v, y_span))
            .light_line_style(RGBColor(0xee, 0xee, 0xee))
            .bold_line_style(RGBColor(0xdd, 0xdd, 0xdd))
            .draw()
            .map_err(|e| plot_err(&e))?;
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                CURVE.stroke_width(2),
            ))
            .map_err(|e| plot_err(&e))?;
        if points.len() <= MAX_MARKERS {
            chart
                .draw_series(points.iter().map(|&p| Circle::new(p, 3, CURVE.filled())))
                .map_err(|e| plot_err(&e))?;
        }
        root.present().map_err(|e| plot_err(&e))?;
    }
    Ok(tag_curves(&svg, series))
}

/// Axis ranges covering every point with a margin; a constant or single
/// value gets a range around it.
fn ranges(points: &[(f64, f64)]) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let span = |values: &mut dyn Iterator<Item = f64>, pad: f64| {
        let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
        if !lo.is_finite() {
            return 0.0..1.0;
        }
        if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
            let d = (lo.abs() * 0.1).max(0.5);
            return (lo - d)..(hi + d);
        }
        let d = (hi - lo) * pad;
        (lo - d)..(hi + d)
    };
    (
        span(&mut points.iter().map(|p| p.0), 0.02),
        span(&mut points.iter().map(|p| p.1), 0.08),
    )
}

/// A short axis label: 4 significant digits, scientific when very small or
/// large; a tick within rounding noise of zero on an axis of length `span`
/// is `0`, not `-5.55e-17`.
fn number(v: f64, span: f64) -> String {
    let a = v.abs();
    if a <= span * 1e-9 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.2e}")
    } else {
        let s = format!("{v:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        s.to_string()
    }
}

/// Adds the curve's class and series name to the polylines drawn in [`CURVE`].
fn tag_curves(svg: &str, series: &str) -> String {
    let mut out = String::with_capacity(svg.len() + 64);
    let attrs = format!("<polyline class=\"curve\" data-series=\"{}\"", esc(series));
    for (n, piece) in svg.split("<polyline").enumerate() {
        if n == 0 {
            out.push_str(piece);
            continue;
        }
        let tag_end = piece.find('>').unwrap_or(piece.len());
        if piece[..tag_end].contains(CURVE_SVG) {
            out.push_str(&attrs);
        } else {
            out.push_str("<polyline");
        }
        out.push_str(piece);
    }
    out
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// The points of every tagged curve in `svg`, in SVG coordinates.
    pub(in crate::report) fn points_of(svg: &str) -> Vec<Vec<(i64, i64)>> {
        svg.split("<polyline")
            .skip(1)
            .filter(|p| p[..p.find('>').unwrap()].contains("class=\"curve\""))
            .map(|p| {
                let start = p.find("points=\"").unwrap() + 8;
                let end = start + p[start..].find('"').unwrap();
                p[start..end]
                    .split_whitespace()
                    .map(|xy| {
                        let (x, y) = xy.split_once(',').unwrap();
                        (x.parse().unwrap(), y.parse().unwrap())
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn one_tagged_curve_with_a_point_per_value_rising_where_the_values_rise() {
        let pts: Vec<(f64, f64)> = (0..10).map(|i| (i as f64 * 5.0, (i * i) as f64)).collect();
        let svg = curve_svg("a/metrics/<x>", "x & y", "step", &pts).unwrap();
        assert!(svg.contains("data-series=\"a/metrics/&lt;x&gt;\""), "{svg}");
        assert!(svg.contains("x &amp; y"), "caption escaped");
        let curves = points_of(&svg);
        assert_eq!(curves.len(), 1, "{svg}");
        let c = &curves[0];
        assert_eq!(c.len(), 10);
        assert!(c.windows(2).all(|w| w[0].0 < w[1].0), "x increases: {c:?}");
        // SVG y grows downwards: a rising value moves up.
        assert!(c.windows(2).all(|w| w[0].1 >= w[1].1), "y rises: {c:?}");
    }

    #[test]
    fn constant_and_single_point_series_still_draw() {
        let svg = curve_svg("s", "lr", "step", &[(1.0, 3e-4), (2.0, 3e-4)]).unwrap();
        assert_eq!(points_of(&svg)[0].len(), 2);
        let svg = curve_svg("s", "eval", "step", &[(7.0, 0.5)]).unwrap();
        assert!(svg.contains("<circle"), "a dot marks a lone point");
    }

    #[test]
    fn labels_are_short() {
        assert_eq!(number(0.5, 1.0), "0.5");
        assert_eq!(number(3e-4, 1e-4), "3.00e-4");
        assert_eq!(number(120.0, 100.0), "120");
        assert_eq!(number(0.0, 1.0), "0");
        assert_eq!(number(-5.55e-17, 1.0), "0");
        assert_eq!(number(2e-7, 1e-6), "2.00e-7");
    }
}
