//! Runs on an IoT Hub tier: `testbench run --tier S1 --units 1` (or `hub.tier`/`hub.units` in the
//! scenario) throttles the embedded hub as that tier, and the report gains a `tier` section with
//! each release's *projected* duration on it, computed from the published rates (reference §5.1),
//! not measured: a scenario with a thousand devices says what a million would take.
//!
//! The projection, per release: the notices go out at the tier's C2D send rate and, when the
//! release's target is a query (`WHERE` clause, rollout phase), the targets are first read page by
//! page at the query rate:
//!
//! `duration = targeted / c2dSendsPerSec + [queried] × ceil(targeted / 1000) / queriesPerSec`
//!
//! (1,000 twins per page: the runner's query page). S1 × 1 sends 100 notices a minute, so a million
//! devices take 10,000 minutes ≈ 6.9 days; S3 × 10 sends 50,000 a minute: 20 minutes. Owns the
//! `--tier`/`--units` flags and the arithmetic; the runner itself is untouched by it.

use std::collections::HashSet;

use iothub_emulator::throttle::{Op, Sku, Tier, TierError};
use serde_json::{Value, json};

use super::metrics::Observed;
use crate::scenario::plan::{Action, HubPlan, ScenarioPlan, Target};

/// Twins per query page the runner asks for (`x-ms-max-item-count` of its service client).
pub const QUERY_PAGE_ITEMS: u64 = 1000;

/// `--tier` and `--units` of `testbench run`: override `hub.tier` / `hub.units`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TierArgs {
    /// Throttle the embedded hub as this IoT Hub tier (F1, S1, S2, S3) and project each release's
    /// duration on it in the report. Replaces `hub.tier`.
    #[arg(long, env = "IOTHUB_EMULATOR_TIER", value_parser = parse_sku)]
    pub tier: Option<Sku>,
    /// Units of `--tier` (F1: 1; S1, S2: 1 to 200; S3: 1 to 10) [default: 1].
    #[arg(long, env = "IOTHUB_EMULATOR_UNITS", requires = "tier")]
    pub units: Option<u32>,
}

fn parse_sku(s: &str) -> Result<Sku, String> {
    s.parse().map_err(|e: TierError| e.to_string())
}

impl TierArgs {
    /// Puts the flags' tier into `plan` (embedded hubs only; an external hub has its own tier).
    pub fn apply(&self, plan: &mut ScenarioPlan) -> Result<(), String> {
        let Some(sku) = self.tier else { return Ok(()) };
        let tier = Tier::new(sku, self.units.unwrap_or(1)).map_err(|e| format!("--units: {e}"))?;
        match &mut plan.hub {
            HubPlan::Embedded { tier: t, .. } => {
                *t = Some(tier);
                Ok(())
            }
            HubPlan::External { .. } | HubPlan::Child { .. } => {
                Err("--tier throttles the embedded hub; an external or child hub has its own tier".into())
            }
        }
    }
}

/// What the projection needs from the plan, taken before the run consumes it.
#[derive(Debug, Clone)]
pub struct TierInputs {
    tier: Option<Tier>,
    /// Versions whose targets the runner reads with a query (a `WHERE` target or the rollout).
    queried: HashSet<String>,
}

impl TierInputs {
    /// The tier and which releases query their targets.
    pub fn from_plan(plan: &ScenarioPlan) -> Self {
        let tier = match plan.hub {
            HubPlan::Embedded { tier, .. } => tier,
            HubPlan::External { .. } | HubPlan::Child { .. } => None,
        };
        let mut queried: HashSet<String> = plan
            .events
            .iter()
            .filter_map(|e| match &e.action {
                Action::Release { version, target: Target::Where(_), .. } => Some(version.clone()),
                _ => None,
            })
            .collect();
        queried.extend(plan.rollout.as_ref().map(|r| r.version.clone()));
        Self { tier, queried }
    }

    /// The report's tier section for the releases `observed` made; `None` without a tier.
    pub fn project(&self, observed: &Observed) -> Option<Projection> {
        let tier = self.tier?;
        let loads: Vec<ReleaseLoad> = observed
            .releases
            .iter()
            .map(|r| ReleaseLoad {
                version: r.version.clone(),
                targeted: r.devices.len() as u64,
                queried: self.queried.contains(&r.version),
            })
            .collect();
        Some(project(tier, &loads))
    }
}

/// One release as the projection sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReleaseLoad {
    /// The version released.
    pub version: String,
    /// Devices sent a notice.
    pub targeted: u64,
    /// Whether the targets are read with a query first.
    pub queried: bool,
}

/// One release's projected duration.
#[derive(Debug, Clone, PartialEq)]
pub struct ReleaseProjection {
    /// The load.
    pub load: ReleaseLoad,
    /// Query pages read first.
    pub query_pages: u64,
    /// Seconds the query pages take at the query rate.
    pub query_secs: f64,
    /// Seconds the notices take at the C2D send rate.
    pub send_secs: f64,
}

impl ReleaseProjection {
    /// Query plus sends.
    pub fn total_secs(&self) -> f64 {
        self.query_secs + self.send_secs
    }
}

/// The projected durations of a run's releases on one tier.
#[derive(Debug, Clone, PartialEq)]
pub struct Projection {
    /// The tier.
    pub tier: Tier,
    /// C2D sends per second on it.
    pub c2d_sends_per_sec: f64,
    /// Queries per second on it.
    pub queries_per_sec: f64,
    /// Per release, in order.
    pub releases: Vec<ReleaseProjection>,
}

/// The formula, as the report states it.
pub const FORMULA: &str =
    "duration = targeted / c2dSendsPerSec + (queried ? ceil(targeted / 1000) / queriesPerSec : 0)";

/// Projects `loads` on `tier` with the published C2D send and query rates.
pub fn project(tier: Tier, loads: &[ReleaseLoad]) -> Projection {
    let c2d = tier.rate_per_sec(Op::C2dSend);
    let query = tier.rate_per_sec(Op::Query);
    let releases = loads
        .iter()
        .map(|l| {
            let query_pages = if l.queried { l.targeted.div_ceil(QUERY_PAGE_ITEMS).max(1) } else { 0 };
            ReleaseProjection {
                load: l.clone(),
                query_pages,
                query_secs: query_pages as f64 / query,
                send_secs: l.targeted as f64 / c2d,
            }
        })
        .collect();
    Projection { tier, c2d_sends_per_sec: c2d, queries_per_sec: query, releases }
}

impl Projection {
    /// Every release's projected duration added up.
    pub fn total_secs(&self) -> f64 {
        self.releases.iter().map(ReleaseProjection::total_secs).sum()
    }

    /// The report's `tier` section.
    pub fn to_json(&self) -> Value {
        let releases: Vec<Value> = self
            .releases
            .iter()
            .map(|r| {
                json!({
                    "version": r.load.version,
                    "targeted": r.load.targeted,
                    "queried": r.load.queried,
                    "queryPages": r.query_pages,
                    "querySecs": r.query_secs,
                    "sendSecs": r.send_secs,
                    "projectedSecs": r.total_secs(),
                    "projected": human(r.total_secs()),
                })
            })
            .collect();
        json!({
            "sku": self.tier.sku.name(),
            "units": self.tier.units,
            "c2dSendsPerSec": self.c2d_sends_per_sec,
            "queriesPerSec": self.queries_per_sec,
            "queryPageItems": QUERY_PAGE_ITEMS,
            "formula": FORMULA,
            "releases": releases,
            "projectedSecs": self.total_secs(),
            "projected": human(self.total_secs()),
        })
    }

    /// Lines for the terminal summary.
    pub fn summary_lines(&self) -> Vec<String> {
        let mut lines = vec![format!(
            "tier {}: C2D sends {:.2}/s, queries {:.3}/s; {FORMULA}",
            self.tier, self.c2d_sends_per_sec, self.queries_per_sec
        )];
        for r in &self.releases {
            lines.push(format!(
                "  release {}: {} targeted{} → projected {} on {}",
                r.load.version,
                r.load.targeted,
                if r.load.queried { format!(", {} query pages", r.query_pages) } else { String::new() },
                human(r.total_secs()),
                self.tier
            ));
        }
        lines
    }
}

/// A duration for people: seconds, minutes, hours or days with one decimal.
pub fn human(secs: f64) -> String {
    match secs {
        s if s < 90.0 => format!("{s:.1} s"),
        s if s < 90.0 * 60.0 => format!("{:.1} min", s / 60.0),
        s if s < 36.0 * 3600.0 => format!("{:.1} h", s / 3600.0),
        s => format!("{:.1} days", s / 86_400.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(targeted: u64, queried: bool) -> ReleaseLoad {
        ReleaseLoad { version: "2.0.0".into(), targeted, queried }
    }

    #[test]
    fn a_million_devices_on_s1_take_the_published_100_per_minute() {
        let p = project(Tier::new(Sku::S1, 1).unwrap(), &[load(1_000_000, false)]);
        // 100 C2D sends a minute per unit: 10,000 minutes.
        assert!((p.total_secs() - 600_000.0).abs() < 1e-6, "{}", p.total_secs());
        assert_eq!(human(p.total_secs()), "6.9 days");
        assert_eq!(p.to_json()["projected"], "6.9 days");
    }

    #[test]
    fn s3_times_ten_takes_twenty_minutes_and_queries_add_their_pages() {
        let s3 = Tier::new(Sku::S3, 10).unwrap();
        let p = project(s3, &[load(1_000_000, false)]);
        assert!((p.total_secs() - 1200.0).abs() < 1e-6);
        assert_eq!(human(p.total_secs()), "20.0 min");
        // 1,000 pages at 1,000 queries a minute per unit × 10: 6 s more.
        let q = project(s3, &[load(1_000_000, true)]);
        assert_eq!(q.releases[0].query_pages, 1000);
        assert!((q.releases[0].query_secs - 6.0).abs() < 1e-6);
        // S1 × 2: twice the send rate; 20 queries a minute per unit.
        let s1 = project(Tier::new(Sku::S1, 2).unwrap(), &[load(1000, true), load(500, false)]);
        assert!((s1.releases[0].send_secs - 300.0).abs() < 1e-6);
        assert!((s1.releases[0].query_secs - 1.5).abs() < 1e-6);
        assert!((s1.total_secs() - 451.5).abs() < 1e-6);
        assert_eq!(s1.summary_lines().len(), 3);
    }

    #[test]
    fn the_flags_reach_the_embedded_hub_plan_and_refuse_an_external_one() {
        let text = "[fleet]\ndevices = 10\n[[package]]\nversion = \"2.0.0\"\n[[event]]\nat = \"1s\"\naction = \"release\"\nversion = \"2.0.0\"\ntarget = \"tags.group = 'a'\"\n";
        let mut plan = crate::scenario::parse_str("t.toml", text).unwrap();
        let args = TierArgs { tier: Some(Sku::S2), units: Some(3) };
        args.apply(&mut plan).unwrap();
        assert!(
            matches!(plan.hub, HubPlan::Embedded { tier: Some(t), .. } if t == Tier::new(Sku::S2, 3).unwrap())
        );
        let inputs = TierInputs::from_plan(&plan);
        assert!(inputs.queried.contains("2.0.0"));
        assert!(
            TierArgs { tier: Some(Sku::F1), units: Some(2) }
                .apply(&mut plan)
                .unwrap_err()
                .contains("F1 takes 1")
        );
    }

    #[test]
    fn hub_tier_and_units_are_scenario_keys_for_the_embedded_hub() {
        let base = "[fleet]\ndevices = 10\n";
        let parse = |hub: &str| crate::scenario::parse_str("t.toml", &format!("[hub]\n{hub}\n{base}"));
        let plan = parse("tier = \"s1\"\nunits = 2").unwrap();
        assert!(
            matches!(plan.hub, HubPlan::Embedded { tier: Some(t), .. } if t == Tier::new(Sku::S1, 2).unwrap())
        );
        let plan = parse("tier = \"S3\"").unwrap();
        assert!(matches!(plan.hub, HubPlan::Embedded { tier: Some(t), .. } if t.units == 1));
        assert!(matches!(parse("").unwrap().hub, HubPlan::Embedded { tier: None, .. }));
        for (hub, key, words) in [
            ("units = 2", "hub.units", "need a tier"),
            ("tier = \"B1\"", "hub.tier", "not one of F1, S1, S2, S3"),
            ("tier = \"F1\"\nunits = 2", "hub.units", "F1 takes 1 to 1 units"),
            (
                "mode = \"external\"\nconnection_string = \"x\"\nca_file = \"c\"\nhttp_url = \"h\"\ntier = \"S1\"",
                "hub.tier",
                "only an embedded hub",
            ),
        ] {
            let e = parse(hub).unwrap_err();
            assert_eq!(e.key, key, "{hub}: {e:?}");
            assert!(e.message.contains(words), "{hub}: {e:?}");
        }
    }
}
