//! `report.html`: converts what a run observed ([`Observed`]) into the plain data of the
//! `testbench-report` crate ([`ReportData`]: summary rows, latency tables, CDF points, time series,
//! offline windows), which draws the plots and writes the page. Only the conversion lives here;
//! plotters stays inside that crate.

use std::time::Duration;

use testbench_report::{LatencyRow, Marker, ReportData, Row, Series, Window};

use super::metrics::{Observed, Percentiles, STAGES};

/// The most points one CDF line gets (quantiles of the sorted samples).
const CDF_POINTS: usize = 400;

fn latency_row(name: &str, p: Percentiles) -> LatencyRow {
    LatencyRow {
        name: name.to_string(),
        count: p.count,
        p50_ms: p.p50,
        p90_ms: p.p90,
        p99_ms: p.p99,
        max_ms: p.max,
    }
}

/// (latency ms, fraction at or below) at up to `max_points` quantiles of `samples`, first and
/// last sample included.
pub fn cdf_points(mut samples: Vec<u64>, max_points: usize) -> Vec<(f64, f64)> {
    samples.sort_unstable();
    let n = samples.len();
    if n == 0 || max_points == 0 {
        return Vec::new();
    }
    let m = max_points.min(n);
    let mut out: Vec<(f64, f64)> = Vec::with_capacity(m);
    for k in 0..m {
        let idx = if m == 1 { n - 1 } else { k * (n - 1) / (m - 1) };
        // The last of equal samples is where the CDF reaches its value.
        let mut j = idx;
        while j + 1 < n && samples[j + 1] == samples[idx] {
            j += 1;
        }
        let point = (samples[j] as f64, (j + 1) as f64 / n as f64);
        if out.last() != Some(&point) {
            out.push(point);
        }
    }
    out
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// The report crate's data for this run.
pub fn report_data(obs: &Observed, unmet: &[String]) -> ReportData {
    let devices = obs.device_ids.len() as u64;
    let lat = obs.latencies();
    let mut summary = vec![
        Row { label: "devices".into(), value: devices.to_string() },
        Row {
            label: "transport".into(),
            value: obs.transport.map_or("external or sharded fleet", |t| t.as_str()).to_string(),
        },
        Row {
            label: "scenario time".into(),
            value: format!(
                "{}{}",
                secs(obs.elapsed),
                if obs.timed_out { " (time limit reached)" } else { "" }
            ),
        },
        Row {
            label: "wall time".into(),
            value: match obs.time_mode {
                crate::scenario::plan::TimeMode::Real => secs(obs.wall_elapsed),
                crate::scenario::plan::TimeMode::Compressed => format!(
                    "{} (compressed: {} of waiting skipped in {} jumps)",
                    secs(obs.wall_elapsed),
                    secs(obs.skipped),
                    obs.time_jumps
                ),
            },
        },
    ];
    for r in &obs.releases {
        summary
            .push(Row { label: format!("release {} at {}", r.version, secs(r.at)), value: r.stage_counts() });
    }
    for (k, h) in obs.hub_restarts.iter().enumerate() {
        summary.push(Row {
            label: format!("hub restart {} ({}) at {}", k + 1, h.kind, secs(h.at)),
            value: format!("healthy again after {:.2} s", h.down.as_secs_f64()),
        });
    }
    let f = obs.feedback;
    summary.push(Row {
        label: "feedback".into(),
        value: format!(
            "success {}, expired {}, rejected {}, delivery count exceeded {}, purged {}",
            f.success, f.expired, f.rejected, f.delivery_count_exceeded, f.purged
        ),
    });
    summary.push(Row { label: "queue-full refusals".into(), value: obs.queue_full_rejections.to_string() });
    summary.push(Row { label: "failed devices".into(), value: obs.failed_devices().to_string() });
    let dups = obs.duplicate_installs();
    summary.push(Row { label: "duplicate installs".into(), value: dups.len().to_string() });
    let on_final: u64 = obs.series.counts().get(1..).map_or(0, |c| c.iter().sum());
    summary
        .push(Row { label: "devices that installed a released version".into(), value: on_final.to_string() });
    if let (Some(start), Some(end)) = obs.memory {
        summary.push(Row {
            label: "memory (RSS)".into(),
            value: format!(
                "start {}, peak {}, end {}",
                mib(start.rss_kib),
                mib(end.peak_kib),
                mib(end.rss_kib)
            ),
        });
    }
    let s = &obs.series;
    let t_s: Vec<f64> = s.t_ms.iter().map(|&t| t as f64 / 1000.0).collect();
    let share = |k: usize| Series {
        name: s.versions[k].clone(),
        points: t_s
            .iter()
            .zip(&s.on_version[k])
            .map(|(&t, &n)| (t, if devices > 0 { n as f64 / devices as f64 } else { 0.0 }))
            .collect(),
    };
    let mut notes = vec![format!(
        "Time series: {} samples, one every {} ms at the end of the run (the interval doubles whenever \
         {} samples are reached).",
        s.t_ms.len(),
        s.interval().as_millis(),
        super::timeseries::MAX_SAMPLES
    )];
    if obs.memory.0.is_some() {
        notes.push(if obs.hub_in_process {
            "Memory is this one process's resident set (VmRSS, peak VmHWM): in embedded mode the hub, its FTP \
             server, the fleet and the runner share it. Start is read after the hub started, before the fleet."
                .to_string()
        } else {
            "Memory is the runner process's resident set (VmRSS, peak VmHWM), the hub not included.".to_string()
        });
    }
    notes.push(
        "Offline buckets: how long the device was switched off between its notice being sent and its twin \
         reporting the version."
            .to_string(),
    );
    ReportData {
        title: obs.scenario.clone(),
        dashboard_url: obs.dashboard_url.clone(),
        description: obs.description.clone(),
        passed: unmet.is_empty(),
        unmet: unmet.to_vec(),
        summary,
        latency: vec![
            latency_row(STAGES[0].0, lat.delivery),
            latency_row(STAGES[1].0, lat.install),
            latency_row(STAGES[2].0, lat.end_to_end),
        ],
        latency_by_offline: obs
            .latency_by_offline()
            .into_iter()
            .map(|(name, p)| {
                let name = if name == "online" { name.to_string() } else { format!("offline {name}") };
                latency_row(&name, p)
            })
            .collect(),
        devices,
        duration_s: obs.elapsed.as_secs_f64(),
        version_share: (1..s.versions.len()).map(share).collect(),
        releases: obs
            .releases
            .iter()
            .map(|r| Marker { at_s: r.at.as_secs_f64(), label: format!("release {}", r.version) })
            .chain(obs.hub_restarts.iter().map(|h| Marker {
                at_s: h.at.as_secs_f64(),
                label: format!("hub {}", if h.kind == "crash" { "killed" } else { "restarted" }),
            }))
            .collect(),
        latency_cdf: STAGES
            .iter()
            .map(|&(name, stage)| Series {
                name: name.to_string(),
                points: cdf_points(obs.stage_samples(stage), CDF_POINTS),
            })
            .collect(),
        connected: t_s.iter().zip(&s.connected).map(|(&t, &c)| (t, c as f64)).collect(),
        offline_windows: obs
            .offline
            .windows
            .iter()
            .map(|w| Window {
                start_s: w.start.as_secs_f64(),
                end_s: w.end.as_secs_f64(),
                devices: w.devices,
            })
            .collect(),
        notes,
    }
}

/// `report.html` for this run.
pub fn render(obs: &Observed, unmet: &[String]) -> Result<String, testbench_report::Error> {
    testbench_report::render(&report_data(obs, unmet))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runner::metrics::{DeviceTimes, ReleaseRecord};
    use crate::runner::timeseries::TimeSeries;

    #[test]
    fn cdf_points_are_quantiles_of_the_samples() {
        assert_eq!(cdf_points(vec![], 10), vec![]);
        assert_eq!(cdf_points(vec![30, 10, 20, 20], 10), vec![(10.0, 0.25), (20.0, 0.75), (30.0, 1.0)]);
        let many = cdf_points((1..=10_000).collect(), 100);
        assert!(many.len() <= 100);
        assert_eq!(many[0], (1.0, 0.0001));
        assert_eq!(*many.last().unwrap(), (10_000.0, 1.0));
        assert!(many.windows(2).all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1));
    }

    #[test]
    fn a_run_becomes_plot_data() {
        let t = |s, r| DeviceTimes {
            sent: Some(s),
            delivered: Some(s + 10),
            installed: Some(r - 5),
            reported: Some(r),
            feedback: None,
        };
        let mut series = TimeSeries::new(2, "1.0.0");
        series.record(Duration::ZERO, 0, None);
        series.installed(0, "2.0.0");
        series.record(Duration::from_secs(2), 2, Some(2048));
        let mut obs = Observed {
            scenario: "s".into(),
            description: "d".into(),
            device_ids: vec!["a".into(), "b".into()],
            hub_start_ms: 1_000_000,
            series,
            releases: vec![ReleaseRecord {
                version: "2.0.0".into(),
                at: Duration::from_secs(1),
                devices: vec![(0, t(1_001_000, 1_001_500)), (1, t(1_001_000, 1_071_000))],
                send_failed: 0,
            }],
            elapsed: Duration::from_secs(3),
            ..Observed::default()
        };
        obs.offline.record(Duration::ZERO, &[(1, Duration::from_secs(65))]);
        let d = report_data(&obs, &["expect.x: no".into()]);
        assert!(!d.passed);
        assert_eq!(d.version_share.len(), 1, "the initial version is not a release");
        assert_eq!(d.version_share[0].points, vec![(0.0, 0.0), (2.0, 0.5)]);
        assert_eq!(d.connected, vec![(0.0, 0.0), (2.0, 2.0)]);
        assert_eq!(d.latency_cdf.iter().map(|s| s.points.len()).collect::<Vec<_>>(), [1, 2, 2]);
        assert_eq!(d.offline_windows, vec![Window { start_s: 0.0, end_s: 65.0, devices: 1 }]);
        let by_off: Vec<(&str, u64)> =
            d.latency_by_offline.iter().map(|r| (r.name.as_str(), r.count)).collect();
        assert_eq!(by_off, [("online", 1), ("offline <1m", 0), ("offline 1-5m", 1), ("offline >5m", 0)]);
        let html = render(&obs, &[]).unwrap();
        assert_eq!(html.matches("<svg").count(), 3);
    }
}
