//! `report.html` for the scenario runner: takes a plain, serializable [`ReportData`] (no
//! dependency on the runner) and returns one self-contained HTML page — inline CSS, three inline
//! SVG plots drawn with plotters' SVG backend, no JavaScript and no external URL. Every piece of
//! scenario text is HTML-escaped. This crate owns plotters so its features (SVG only) stay apart
//! from any other user of it in the workspace (criterion pulls plotters with bitmap features).

use std::fmt::Write as _;

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

/// Width and height of every plot, in SVG user units (the page scales them to its width).
const PLOT_SIZE: (u32, u32) = (960, 380);
/// Line colours, in order: one per version or stage.
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];
/// The shading of offline windows.
const OFFLINE: RGBColor = RGBColor(255, 150, 50);
const FONT: &str = "sans-serif";

/// Why the report could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// plotters refused to draw a plot.
    #[error("drawing the {plot} plot: {message}")]
    Plot {
        /// Which plot.
        plot: &'static str,
        /// plotters' error.
        message: String,
    },
}

/// Everything the page shows. Times are seconds from the start of the run; latencies are
/// milliseconds; shares are fractions of the fleet (0..=1).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReportData {
    /// The page's title (the scenario name).
    pub title: String,
    /// The scenario's description.
    pub description: String,
    /// Every expectation met.
    pub passed: bool,
    /// Each unmet expectation, naming its key.
    pub unmet: Vec<String>,
    /// The summary table, one fact per row.
    pub summary: Vec<Row>,
    /// Latency percentiles per stage.
    pub latency: Vec<LatencyRow>,
    /// End-to-end latency percentiles by how long the device was offline, the "never offline"
    /// row first; the table is shown when any other row has samples.
    pub latency_by_offline: Vec<LatencyRow>,
    /// Fleet size (the top of the connected-devices plot).
    pub devices: u64,
    /// How long the run took.
    pub duration_s: f64,
    /// Share of the fleet on each released version over time: (s, share).
    pub version_share: Vec<Series>,
    /// Releases, drawn as markers on the version plot.
    pub releases: Vec<Marker>,
    /// Latency CDF per stage: (latency ms, fraction of samples at or below it).
    pub latency_cdf: Vec<Series>,
    /// Connected devices over time: (s, devices).
    pub connected: Vec<(f64, f64)>,
    /// Offline windows, shaded on the connected-devices plot.
    pub offline_windows: Vec<Window>,
    /// Footnotes (how memory was measured, ...).
    pub notes: Vec<String>,
    /// The hub's live dashboard (an external hub's), linked under the verdict; only `http://`
    /// and `https://` URLs are linked.
    #[serde(default)]
    pub dashboard_url: Option<String>,
}

/// One row of the summary table.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Row {
    /// What.
    pub label: String,
    /// How much.
    pub value: String,
}

/// p50/p90/p99/max of one latency, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyRow {
    /// The stage or bucket.
    pub name: String,
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_ms: u64,
    /// 90th percentile.
    pub p90_ms: u64,
    /// 99th percentile.
    pub p99_ms: u64,
    /// Maximum.
    pub max_ms: u64,
}

/// A named line.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Series {
    /// Legend text.
    pub name: String,
    /// (x, y) points in x order.
    pub points: Vec<(f64, f64)>,
}

/// A moment worth marking.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Marker {
    /// When.
    pub at_s: f64,
    /// What (for example "release 2.0.0").
    pub label: String,
}

/// Devices switched off by one `offline` event: from `start_s` until the last came back.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Window {
    /// Switched off.
    pub start_s: f64,
    /// The last one back on.
    pub end_s: f64,
    /// How many.
    pub devices: u64,
}

/// Escapes text for HTML element content and quoted attributes.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const CSS: &str = "body{font-family:sans-serif;margin:24px auto;max-width:1000px;color:#222;padding:0 16px}\
h1{margin-bottom:4px}h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}\
.desc{color:#555;margin-top:0}\
.verdict{padding:10px 14px;border-radius:6px;font-weight:bold}\
.met{background:#e6f4ea;color:#1e6b34;border:1px solid #9fd3ad}\
.unmet{background:#fdecea;color:#a3221a;border:1px solid #f0a7a0}\
.verdict ul{margin:6px 0 0 0;font-weight:normal}\
table{border-collapse:collapse;margin:8px 0}td,th{padding:4px 12px;border-bottom:1px solid #eee;text-align:left}\
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}\
figure{margin:16px 0}figure svg{width:100%;height:auto;border:1px solid #eee}\
figcaption{color:#555;font-size:14px;margin-top:4px}.notes{color:#555;font-size:14px}";

/// The whole page.
pub fn render(data: &ReportData) -> Result<String, Error> {
    let share = plot("version share", |svg| share_plot(data, svg))?;
    let cdf = plot("latency CDF", |svg| cdf_plot(data, svg))?;
    let connected = plot("connected devices", |svg| connected_plot(data, svg))?;
    let title = escape(&data.title);
    let mut h = String::new();
    // `write!` to a String cannot fail.
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title} — testbench report</title>\
         <style>{CSS}</style></head><body>\n<h1>{title}</h1>\n"
    );
    if !data.description.is_empty() {
        let _ = writeln!(h, "<p class=\"desc\">{}</p>", escape(&data.description));
    }
    if data.passed {
        h.push_str("<div class=\"verdict met\">Verdict: every expectation met</div>\n");
    } else {
        h.push_str("<div class=\"verdict unmet\">Verdict: expectations not met<ul>");
        for u in &data.unmet {
            let _ = write!(h, "<li>{}</li>", escape(u));
        }
        h.push_str("</ul></div>\n");
    }
    if let Some(url) =
        data.dashboard_url.as_deref().filter(|u| u.starts_with("http://") || u.starts_with("https://"))
    {
        let url = escape(url);
        let _ = writeln!(h, "<p class=\"desc\">The hub's live dashboard: <a href=\"{url}\">{url}</a></p>");
    }
    h.push_str("<h2>Summary</h2>\n<table>");
    for r in &data.summary {
        let _ = write!(h, "<tr><th>{}</th><td>{}</td></tr>", escape(&r.label), escape(&r.value));
    }
    h.push_str("</table>\n<h2>Latency (ms)</h2>\n");
    latency_table(&mut h, "stage", &data.latency);
    if data.latency_by_offline.iter().skip(1).any(|r| r.count > 0) {
        h.push_str("<p>End to end, by how long the device was offline while its update was pending:</p>\n");
        latency_table(&mut h, "offline", &data.latency_by_offline);
    }
    h.push_str("<h2>Plots</h2>\n");
    figure(&mut h, &share, "Share of the fleet on each released version over time (dashed lines: releases).");
    figure(
        &mut h,
        &cdf,
        "Latency CDF per stage (log scale): delivery is notice sent → device took it; install is \
         took it → installed; end to end is sent → the twin reports the version.",
    );
    figure(
        &mut h,
        &connected,
        "Connected devices over time; shaded: offline windows (devices switched off).",
    );
    if !data.offline_windows.is_empty() {
        h.push_str("<table><tr><th>offline window</th><th class=\"n\">from (s)</th><th class=\"n\">to (s)</th><th class=\"n\">devices</th></tr>");
        for (i, w) in data.offline_windows.iter().enumerate() {
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"n\">{:.1}</td><td class=\"n\">{:.1}</td><td class=\"n\">{}</td></tr>",
                i + 1,
                w.start_s,
                w.end_s,
                w.devices
            );
        }
        h.push_str("</table>\n");
    }
    if !data.notes.is_empty() {
        h.push_str("<div class=\"notes\">");
        for n in &data.notes {
            let _ = write!(h, "<p>{}</p>", escape(n));
        }
        h.push_str("</div>\n");
    }
    h.push_str("</body></html>\n");
    Ok(h)
}

fn latency_table(h: &mut String, first: &str, rows: &[LatencyRow]) {
    let _ = write!(
        h,
        "<table><tr><th>{first}</th><th class=\"n\">n</th><th class=\"n\">p50</th><th class=\"n\">p90</th>\
         <th class=\"n\">p99</th><th class=\"n\">max</th></tr>"
    );
    for r in rows {
        let _ = write!(
            h,
            "<tr><td>{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td><td class=\"n\">{}</td>\
             <td class=\"n\">{}</td><td class=\"n\">{}</td></tr>",
            escape(&r.name),
            r.count,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.max_ms
        );
    }
    h.push_str("</table>\n");
}

fn figure(h: &mut String, svg: &str, caption: &str) {
    let _ = writeln!(h, "<figure>{svg}<figcaption>{}</figcaption></figure>", escape(caption));
}

type DrawResult = Result<(), Box<dyn std::error::Error>>;

/// Runs `draw` on a fresh SVG string; drops the `xmlns` URL (inline SVG in HTML needs none).
fn plot(name: &'static str, draw: impl FnOnce(&mut String) -> DrawResult) -> Result<String, Error> {
    let mut svg = String::new();
    draw(&mut svg).map_err(|e| Error::Plot { plot: name, message: e.to_string() })?;
    Ok(svg.replacen(" xmlns=\"http://www.w3.org/2000/svg\"", "", 1))
}

/// The right end of the time axis: the run's length, or the last point when later.
fn time_axis(data: &ReportData) -> f64 {
    let last = |pts: &[(f64, f64)]| pts.last().map_or(0.0, |p| p.0);
    let mut end = data.duration_s.max(last(&data.connected));
    for s in &data.version_share {
        end = end.max(last(&s.points));
    }
    for w in &data.offline_windows {
        end = end.max(w.end_s);
    }
    if end.is_finite() && end > 0.0 { end } else { 1.0 }
}

fn legend_line(c: RGBColor) -> impl Fn((i32, i32)) -> PathElement<(i32, i32)> {
    move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c.stroke_width(3))
}

fn empty_note(root: &DrawingArea<SVGBackend, plotters::coord::Shift>, text: &str) -> DrawResult {
    let (w, h) = root.dim_in_pixel();
    let style = TextStyle::from((FONT, 18).into_font()).color(&RGBColor(120, 120, 120)).pos(
        plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Center,
        ),
    );
    root.draw_text(text, &style, (w as i32 / 2, h as i32 / 2))?;
    Ok(())
}

fn share_plot(data: &ReportData, svg: &mut String) -> DrawResult {
    let root = SVGBackend::with_string(svg, PLOT_SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let x_end = time_axis(data);
    let mut chart = ChartBuilder::on(&root)
        .caption("Share of the fleet on each released version", (FONT, 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x_end, 0f64..100f64)?;
    chart
        .configure_mesh()
        .x_desc("time since start (s)")
        .x_label_formatter(&|v| time_label(*v, x_end))
        .y_desc("fleet on version (%)")
        .y_label_formatter(&|v| format!("{v:.0}%"))
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .draw()?;
    let grey = RGBColor(110, 110, 110);
    let mut labelled = false;
    for (k, m) in data.releases.iter().enumerate() {
        let s = chart.draw_series(DashedLineSeries::new(
            [(m.at_s, 0.0), (m.at_s, 100.0)],
            6,
            5,
            grey.stroke_width(1),
        ))?;
        if k == 0 {
            s.label("release").legend(legend_line(grey));
        }
    }
    for (k, s) in data.version_share.iter().enumerate() {
        let c = COLOURS[k % COLOURS.len()];
        chart
            .draw_series(LineSeries::new(s.points.iter().map(|&(x, y)| (x, y * 100.0)), c.stroke_width(2)))?
            .label(s.name.as_str())
            .legend(legend_line(c));
        labelled = true;
    }
    if labelled || !data.releases.is_empty() {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((FONT, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .draw()?;
    }
    if !labelled {
        empty_note(&root, "nothing was released in this run")?;
    }
    root.present()?;
    Ok(())
}

/// The smallest 1, 2 or 5 times a power of ten at or above `v` (> 0).
fn nice_above(v: f64) -> f64 {
    let p = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * p).find(|&n| n >= v * (1.0 - 1e-9)).unwrap_or(10.0 * p)
}

/// True for 1, 2 or 5 times a power of ten (the log axis labels only those).
fn one_two_five(v: f64) -> bool {
    if !(v.is_finite() && v > 0.0) {
        return false;
    }
    let m = v / 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0, 10.0].iter().any(|t| (m - t).abs() < 1e-6)
}

/// "250 ms", "1.5 s", "2 min": a latency tick label.
fn duration_label(secs: f64) -> String {
    if secs < 1.0 {
        format!("{} ms", (secs * 1000.0).round())
    } else if secs < 600.0 {
        format!("{} s", (secs * 10.0).round() / 10.0)
    } else {
        format!("{} min", (secs / 6.0).round() / 10.0)
    }
}

fn cdf_plot(data: &ReportData, svg: &mut String) -> DrawResult {
    let root = SVGBackend::with_string(svg, PLOT_SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let xs = data.latency_cdf.iter().flat_map(|s| s.points.iter().map(|p| p.0 / 1000.0));
    let (lo, hi) =
        xs.filter(|x| x.is_finite() && *x > 0.0).fold((f64::MAX, 0f64), |(a, b), x| (a.min(x), b.max(x)));
    let (lo, hi) = if hi > 0.0 {
        // A power of ten on the left (plotters' log ticks start at one); 1, 2 or 5 on the right.
        let (lo, hi) = (10f64.powf(lo.log10().floor()), nice_above(hi));
        let hi = if hi > lo { hi } else { lo * 10.0 };
        // A hair wider than the decades so rounding keeps both ends' ticks.
        (lo * 0.999, hi * 1.001)
    } else {
        (0.001, 1.0)
    };
    let mut chart = ChartBuilder::on(&root)
        .caption("Latency CDF per stage", (FONT, 22))
        .margin(14)
        .margin_right(36)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d((lo..hi).log_scale(), 0f64..100f64)?;
    chart
        .configure_mesh()
        .x_desc("latency (log scale)")
        .y_desc("samples at or below (%)")
        // Up to 9 ticks a decade when few decades; only 1, 2 and 5 get a label.
        .x_labels(30)
        .x_label_formatter(&|v| if one_two_five(*v) { duration_label(*v) } else { String::new() })
        // Those ticks already grid each decade; light lines in between would only crowd it.
        .light_line_style(WHITE)
        .y_label_formatter(&|v| format!("{v:.0}%"))
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .draw()?;
    let mut any = false;
    for (k, s) in data.latency_cdf.iter().enumerate() {
        if s.points.is_empty() {
            continue;
        }
        let c = COLOURS[k % COLOURS.len()];
        // The CDF is 0 below the first sample.
        let first = s.points.first().map(|&(ms, _)| ((ms / 1000.0).max(lo), 0.0));
        let pts = first.into_iter().chain(s.points.iter().map(|&(ms, f)| ((ms / 1000.0).max(lo), f * 100.0)));
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))?
            .label(s.name.as_str())
            .legend(legend_line(c));
        any = true;
    }
    if any {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .label_font((FONT, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .draw()?;
    } else {
        empty_note(&root, "no latency samples in this run")?;
    }
    root.present()?;
    Ok(())
}

/// "950", "12k", "1.2M": a device-count tick label.
fn count_label(v: f64) -> String {
    if v >= 1e6 {
        format!("{}M", (v / 1e5).round() / 10.0)
    } else if v >= 1e4 {
        format!("{}k", (v / 1e3).round())
    } else if v.fract() == 0.0 {
        format!("{v}")
    } else {
        format!("{v:.1}")
    }
}

/// Seconds on a time axis ending at `end`: whole seconds unless the run was short.
fn time_label(v: f64, end: f64) -> String {
    if end >= 10.0 { format!("{v:.0}") } else { format!("{v:.1}") }
}

fn connected_plot(data: &ReportData, svg: &mut String) -> DrawResult {
    let root = SVGBackend::with_string(svg, PLOT_SIZE).into_drawing_area();
    root.fill(&WHITE)?;
    let x_end = time_axis(data);
    let top = data.connected.iter().fold(data.devices as f64, |m, p| m.max(p.1)).max(1.0);
    let mut chart = ChartBuilder::on(&root)
        .caption("Connected devices", (FONT, 22))
        .margin(14)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..x_end, 0f64..top * 1.05)?;
    chart
        .configure_mesh()
        .x_desc("time since start (s)")
        .x_label_formatter(&|v| time_label(*v, x_end))
        .y_desc("devices connected")
        .y_labels(((top * 1.05) as usize + 1).clamp(2, 11))
        .y_label_formatter(&|v| count_label(*v))
        .label_style((FONT, 15))
        .axis_desc_style((FONT, 17))
        .draw()?;
    if !data.offline_windows.is_empty() {
        let shade = OFFLINE.mix(0.22).filled();
        let switched_off: u64 = data.offline_windows.iter().map(|w| w.devices).sum();
        chart
            .draw_series(
                data.offline_windows
                    .iter()
                    .map(|w| Rectangle::new([(w.start_s, 0.0), (w.end_s, top * 1.05)], shade)),
            )?
            .label(format!("offline windows ({switched_off} devices switched off)"))
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 18, y + 6)], OFFLINE.mix(0.4).filled()));
    }
    let c = COLOURS[0];
    chart
        .draw_series(LineSeries::new(data.connected.iter().copied(), c.stroke_width(2)))?
        .label("connected")
        .legend(legend_line(c));
    let devices = data.devices as f64;
    let grey = RGBColor(110, 110, 110);
    chart
        .draw_series(DashedLineSeries::new([(0.0, devices), (x_end, devices)], 6, 5, grey.stroke_width(1)))?
        .label(format!("fleet size ({})", data.devices))
        .legend(legend_line(grey));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .draw()?;
    if data.connected.is_empty() {
        empty_note(&root, "no samples")?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ReportData {
        ReportData {
            title: "offline-fridges".into(),
            description: "1,000 fridges, 30% offline".into(),
            passed: true,
            summary: vec![Row { label: "devices".into(), value: "1000".into() }],
            latency: vec![LatencyRow {
                name: "end to end".into(),
                count: 3,
                p50_ms: 900,
                p90_ms: 60_000,
                p99_ms: 61_000,
                max_ms: 61_000,
            }],
            devices: 3,
            duration_s: 90.0,
            version_share: vec![Series {
                name: "2.0.0".into(),
                points: vec![(0.0, 0.0), (30.0, 0.66), (90.0, 1.0)],
            }],
            releases: vec![Marker { at_s: 20.0, label: "release 2.0.0".into() }],
            latency_cdf: vec![
                Series {
                    name: "delivery".into(),
                    points: vec![(15.0, 0.33), (500.0, 0.66), (60_000.0, 1.0)],
                },
                Series { name: "install".into(), points: vec![] },
            ],
            connected: vec![(0.0, 0.0), (10.0, 3.0), (20.0, 2.0), (80.0, 3.0)],
            offline_windows: vec![Window { start_s: 15.0, end_s: 75.0, devices: 1 }],
            ..ReportData::default()
        }
    }

    #[test]
    fn the_page_has_three_svg_plots_and_no_script_or_external_url() {
        let html = render(&sample()).unwrap();
        assert_eq!(html.matches("<svg").count(), 3, "{html}");
        assert!(html.contains("Verdict: every expectation met"));
        assert!(html.contains("\n2.0.0\n"), "the legend names the version");
        assert!(html.contains("offline windows (1 devices switched off)"));
        assert!(!html.contains("<script"));
        assert!(!html.contains("http://") && !html.contains("https://"), "{html}");
    }

    #[test]
    fn scenario_text_is_escaped() {
        let data = ReportData {
            title: "<b>t</b>".into(),
            description: "<script>alert(1)</script> & more".into(),
            passed: false,
            unmet: vec!["expect.failed: expected 0, got <3>".into()],
            version_share: vec![Series { name: "<img src=x>".into(), points: vec![(1.0, 0.5)] }],
            ..sample()
        };
        let html = render(&data).unwrap();
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; more"));
        assert!(!html.contains("<b>t</b>") && html.contains("&lt;b&gt;t&lt;/b&gt;"));
        assert!(html.contains("<li>expect.failed: expected 0, got &lt;3&gt;</li>"));
        assert!(!html.contains("<img"), "series names in the SVG are escaped too");
    }

    #[test]
    fn a_run_with_nothing_released_and_no_samples_still_renders() {
        let html = render(&ReportData { title: "empty".into(), ..ReportData::default() }).unwrap();
        assert!(!html.contains("live dashboard"), "no dashboard, no link");
        let linked = ReportData {
            dashboard_url: Some("http://hub:8080/dashboard?a=1&b=\"2\"".into()),
            ..ReportData::default()
        };
        let page = render(&linked).unwrap();
        assert!(page.contains("<a href=\"http://hub:8080/dashboard?a=1&amp;b=&quot;2&quot;\">"), "{page}");
        let script =
            ReportData { dashboard_url: Some("javascript:alert(1)".into()), ..ReportData::default() };
        assert!(!render(&script).unwrap().contains("javascript:"), "only http(s) URLs are linked");
        assert_eq!(html.matches("<svg").count(), 3);
        assert!(html.contains("nothing was released in this run"));
        assert!(html.contains("no latency samples in this run"));
        assert!(html.contains("Verdict: expectations not met"), "passed defaults to false");
    }

    #[test]
    fn degenerate_values_do_not_panic() {
        let data = ReportData {
            duration_s: f64::NAN,
            latency_cdf: vec![Series { name: "one".into(), points: vec![(1.0, 1.0)] }],
            connected: vec![(0.0, 0.0)],
            offline_windows: vec![Window { start_s: 5.0, end_s: 5.0, devices: 0 }],
            ..ReportData::default()
        };
        let html = render(&data).unwrap();
        assert_eq!(html.matches("<svg").count(), 3);
    }

    #[test]
    fn tick_labels_read_as_units() {
        assert!(one_two_five(0.02) && one_two_five(5.0) && one_two_five(100.0));
        assert!(!one_two_five(0.03) && !one_two_five(7.0) && !one_two_five(0.0));
        assert_eq!(duration_label(0.25), "250 ms");
        assert_eq!(duration_label(1.5), "1.5 s");
        assert_eq!(duration_label(300.0), "300 s");
        assert_eq!(duration_label(1200.0), "20 min");
        assert_eq!(nice_above(0.03), 0.05);
        assert_eq!(nice_above(294.4), 500.0);
        assert_eq!(nice_above(1.0), 1.0);
        assert_eq!(nice_above(0.7), 1.0);
        assert_eq!(count_label(950.0), "950");
        assert_eq!(count_label(2.5), "2.5");
        assert_eq!(time_label(20.0, 90.0), "20");
        assert_eq!(time_label(0.5, 2.0), "0.5");
        assert_eq!(count_label(12_000.0), "12k");
        assert_eq!(count_label(1_200_000.0), "1.2M");
    }
}
