//! Stage two of scenario parsing: turns the raw file ([`super::raw`]) into a validated
//! [`ScenarioPlan`] the runner can execute without further checks. Every error names the file, the
//! key (`event[2].share`) and what is allowed.

use std::time::Duration;

use super::raw::{
    RawDistribution, RawDuration, RawEvent, RawExpect, RawFleet, RawHub, RawPackage, RawRollout, RawScenario,
};

/// A scenario error: where and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {key}: {message}")]
pub struct ScenarioError {
    /// The scenario file.
    pub file: String,
    /// The key path (`fleet.devices`, `event[2].share`), or `(file)` for the whole file.
    pub key: String,
    /// What is wrong and what is allowed.
    pub message: String,
}

/// Which hub the scenario drives.
#[derive(Debug, Clone, PartialEq)]
pub enum HubPlan {
    /// Started in the runner's process.
    Embedded {
        /// Feedback batch interval.
        feedback_interval: Duration,
        /// Default C2D time to live.
        c2d_default_ttl: Duration,
        /// IoT Hub tier throttling (`hub.tier`, `hub.units`); `None` throttles nothing.
        tier: Option<iothub_emulator::throttle::Tier>,
    },
    /// Already running elsewhere.
    External {
        /// The `iothubowner` connection string.
        connection_string: String,
        /// The CA to trust.
        ca_file: String,
        /// The plain HTTP base URL.
        http_url: String,
        /// The hub's FTP packages directory as the runner reaches it (required to run).
        packages_dir: Option<String>,
        /// AMQP (TLS) port on the connection string's host.
        amqp_port: u16,
        /// MQTT (TLS) port on that host.
        mqtt_port: u16,
        /// FTP port on that host.
        ftp_port: u16,
    },
    /// The `iothub-emulator` binary, started by the runner as a child process on free loopback
    /// ports and driven over the wire like an external hub; `hub-restart` events restart it.
    Child {
        /// The binary (default: `IOTHUB_EMULATOR_BIN`, else beside the runner's executable).
        binary: Option<String>,
        /// `--data-dir` (default: in the run's work directory).
        data_dir: Option<String>,
        /// `--persist`.
        persist: bool,
        /// Feedback batch interval (`--feedback-interval-ms`).
        feedback_interval: Duration,
    },
}

/// A device id pattern: `prefix` + zero-padded index + `suffix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdPattern {
    prefix: String,
    suffix: String,
    width: usize,
}

impl IdPattern {
    /// The id of device `index`.
    pub fn id(&self, index: u64) -> String {
        format!("{}{:0width$}{}", self.prefix, index, self.suffix, width = self.width)
    }

    /// The same ids as `fleet run --id-pattern` writes them (`fridge-{n:02}`).
    pub fn fleet_run_pattern(&self) -> String {
        format!("{}{{n:0{}}}{}", self.prefix, self.width, self.suffix)
    }
}

/// A group of devices (tagged `tags.group` in the twin).
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// Name.
    pub name: String,
    /// Share of the fleet.
    pub share: f64,
}

/// The simulated devices.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetPlan {
    /// How many.
    pub devices: u64,
    /// Their ids.
    pub ids: IdPattern,
    /// Processes the fleet is split over.
    pub shards: u32,
    /// The devices are run by `fleet run` processes elsewhere (`fleet.mode = "external"`): the
    /// runner waits for them instead of starting agents.
    pub external: bool,
    /// Time over which devices connect.
    pub connect_ramp: Duration,
    /// The version every device starts on.
    pub initial_version: String,
    /// Groups, in file order; devices are assigned to groups in index order.
    pub groups: Vec<Group>,
    /// When devices whose install failed try again (`fleet.update_retry`).
    pub update_retry: UpdateRetryPlan,
    /// How the devices reach the hub (`fleet.transport`).
    pub transport: Transport,
}

/// `fleet.transport`: how the runner's own devices reach the embedded hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Transport {
    /// Agents with an MQTT client each, over the hub's plain MQTT listener (loopback TCP).
    #[default]
    Mqtt,
    /// The same over MQTT with TLS, as devices reach a real hub on 8883.
    MqttTls,
    /// No sockets: each agent's core talks to the hub's MQTT session state machine in this
    /// process (a million devices fit); installs read the packages from memory.
    InProcess,
}

impl Transport {
    /// The name in scenario files and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Mqtt => "mqtt",
            Self::MqttTls => "mqtt-tls",
            Self::InProcess => "in-process",
        }
    }

    /// Parses a scenario file's name for it.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Mqtt, Self::MqttTls, Self::InProcess].into_iter().find(|t| t.as_str() == s)
    }
}

/// `fleet.update_retry`: when devices whose install failed try again. The agents' own policy;
/// the runner plays `check_every` on scenario time ([`crate::runner`]'s update checks).
pub use simulated_devices::fleet::UpdateRetry as UpdateRetryPlan;

/// A package the scenario can release.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackagePlan {
    /// Version.
    pub version: String,
    /// Payload bytes.
    pub size: u64,
    /// Whether the announced sha256 is wrong on purpose.
    pub corrupt: bool,
}

/// Which devices an event is aimed at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every device.
    All,
    /// A group by name.
    Group(String),
    /// Devices whose twin matches a query `WHERE` clause.
    Where(String),
}

/// A duration, fixed or drawn per device from a distribution with the scenario's seed.
#[derive(Debug, Clone, PartialEq)]
pub enum DurationDist {
    /// Always the same.
    Fixed(Duration),
    /// Uniform between two bounds.
    Uniform {
        /// Lower bound.
        min: Duration,
        /// Upper bound.
        max: Duration,
    },
    /// Exponential with a mean.
    Exponential {
        /// The mean.
        mean: Duration,
    },
}

/// What an event does.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Release a package to the targeted devices (an update notice by C2D, ack `full`).
    Release {
        /// Package version.
        version: String,
        /// Message time to live (the hub default when absent).
        ttl: Option<Duration>,
        /// Who gets the notice.
        target: Target,
        /// Sent the release pipeline's way: ids paged through the query API, notices over AMQP
        /// (`via = "pipeline"`), instead of straight into the hub.
        pipeline: bool,
    },
    /// Switch a share of the targeted devices off (power cut), each for a drawn duration.
    Offline {
        /// Who may go offline.
        target: Target,
        /// Share of them.
        share: f64,
        /// How long each stays off.
        duration: DurationDist,
    },
    /// Drop TCP connections without an MQTT DISCONNECT, `count` times `interval` apart.
    LinkFlap {
        /// Who.
        target: Target,
        /// Share of them.
        share: f64,
        /// How many flaps.
        count: u32,
        /// Time between flaps.
        interval: Duration,
        /// Whether running FTP downloads are cut too.
        ftp: bool,
    },
    /// Switch FTP fault knobs on.
    FtpFault {
        /// Bytes per second.
        rate_limit: Option<u64>,
        /// Drop data connections after this many bytes.
        drop_after: Option<u64>,
        /// Share of logins refused.
        refuse_logins: Option<f64>,
        /// Share of sessions turned away with `421` (a busy server).
        refuse_sessions: Option<f64>,
        /// How long (until the end when absent).
        lasting: Option<Duration>,
    },
    /// Stop the child hub (`hub.mode = "child"`) and start it again on the same data directory
    /// and ports; devices reconnect on their own.
    HubRestart {
        /// SIGKILL (`crash`) or SIGTERM (`graceful`).
        kind: crate::child_hub::StopKind,
    },
    /// Send plain C2D messages (for example past the queue limit).
    Send {
        /// Who.
        target: Target,
        /// Messages per device.
        count: u32,
        /// Body text.
        body: String,
        /// Time to live.
        ttl: Option<Duration>,
    },
}

/// One timeline entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// From the start of the run.
    pub at: Duration,
    /// What happens.
    pub action: Action,
}

/// A phased rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutPlan {
    /// The version rolled out.
    pub version: String,
    /// When the first phase starts.
    pub at: Duration,
    /// Share of a phase that must install before the next starts.
    pub success_share: f64,
    /// Longest wait per phase.
    pub phase_timeout: Duration,
    /// `(name, WHERE clause)` in order.
    pub phases: Vec<(String, String)>,
    /// How the notices travel.
    pub via: RolloutVia,
}

/// How a rollout phase reaches its devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RolloutVia {
    /// An update notice per device as a C2D message (`ack: full`).
    #[default]
    C2d,
    /// One configuration (automatic device management) per phase: its target condition is the
    /// phase's `where`, its content sets `properties.desired.update` to the notice.
    Configuration,
}

/// Latency bounds (end to end: release sent → installed version reported).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LatencyBounds {
    /// Median.
    pub p50: Option<Duration>,
    /// 90th percentile.
    pub p90: Option<Duration>,
    /// 99th percentile.
    pub p99: Option<Duration>,
    /// Maximum.
    pub max: Option<Duration>,
}

/// Feedback tallies that must hold exactly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeedbackTallies {
    /// `Success`.
    pub success: Option<u64>,
    /// `Expired`.
    pub expired: Option<u64>,
    /// `Rejected`.
    pub rejected: Option<u64>,
    /// `DeliveryCountExceeded`.
    pub delivery_count_exceeded: Option<u64>,
    /// `Purged`.
    pub purged: Option<u64>,
}

/// What must hold at the end of the run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Expectations {
    /// Every targeted device installed within this time of its release.
    pub all_installed_within: Option<Duration>,
    /// The version every device ends on.
    pub final_version: Option<String>,
    /// No device installs a version twice.
    pub no_duplicate_installs: bool,
    /// Every release notice the hub acknowledged is accounted for (its device reported a state,
    /// its twin is on the version, or the hub sent feedback about it): nothing accepted was lost,
    /// across hub restarts too.
    pub no_lost_messages: bool,
    /// Expired messages.
    pub expired: Option<u64>,
    /// Devices ending `failed` / `rolled-back`.
    pub failed: Option<u64>,
    /// Latency bounds.
    pub latency: LatencyBounds,
    /// Feedback tallies.
    pub feedback: FeedbackTallies,
    /// Sends refused because a queue was full.
    pub queue_full_rejections: Option<u64>,
}

/// How scenario time passes (`time`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TimeMode {
    /// Scenario time is wall time since the timeline started.
    #[default]
    Real,
    /// Whenever nothing is in flight (no delivery, download or install, every powered-on device
    /// connected and idle), the runner jumps hub time and the timeline to the next timed event.
    Compressed,
}

impl TimeMode {
    /// The scenario key's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Real => "real",
            Self::Compressed => "compressed",
        }
    }
}

/// A validated scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioPlan {
    /// Name.
    pub name: String,
    /// Description.
    pub description: String,
    /// Seed for every random choice.
    pub seed: u64,
    /// Hard stop, in scenario time.
    pub time_limit: Duration,
    /// How scenario time passes.
    pub time: TimeMode,
    /// The hub.
    pub hub: HubPlan,
    /// The fleet.
    pub fleet: FleetPlan,
    /// Packages.
    pub packages: Vec<PackagePlan>,
    /// Timeline, sorted by time (file order among equal times).
    pub events: Vec<Event>,
    /// Phased rollout.
    pub rollout: Option<RolloutPlan>,
    /// Expectations.
    pub expect: Expectations,
}

/// Defaults for keys a file may leave out.
const DEFAULT_TIME_LIMIT: Duration = Duration::from_secs(600);
const DEFAULT_ID_PATTERN: &str = "device-{n}";
const DEFAULT_INITIAL_VERSION: &str = "1.0.0";
const DEFAULT_PACKAGE_SIZE: u64 = 64 * 1024;
const MAX_DEVICES: u64 = 1_000_000;
/// An external hub's ports on its host name (the ports every IoT Hub SDK dials).
pub const DEFAULT_AMQP_PORT: u16 = 5671;
/// See [`DEFAULT_AMQP_PORT`].
pub const DEFAULT_MQTT_PORT: u16 = 8883;
/// The emulator's FTP package server port.
pub const DEFAULT_FTP_PORT: u16 = 2121;
const ACTIONS: &str = "release, offline, link-flap, ftp-fault, send, hub-restart";

/// Validation context: the file name for error messages.
struct Ctx<'a> {
    file: &'a str,
}

impl Ctx<'_> {
    /// The first of `keys` that is set, refused with `message`.
    fn refuse_set(&self, keys: &[(&str, bool)], message: &str) -> Result<(), ScenarioError> {
        match keys.iter().find(|(_, set)| *set) {
            Some((key, _)) => Err(self.err(*key, message)),
            None => Ok(()),
        }
    }

    fn err(&self, key: impl Into<String>, message: impl Into<String>) -> ScenarioError {
        ScenarioError { file: self.file.to_string(), key: key.into(), message: message.into() }
    }

    fn duration(&self, key: &str, text: &str) -> Result<Duration, ScenarioError> {
        humantime::parse_duration(text.trim()).map_err(|e| {
            self.err(
                key,
                format!(
                    "'{text}' is not a duration ({e}); write it like \"500ms\", \"30s\", \"5m\" or \"1h\""
                ),
            )
        })
    }

    fn opt_duration(&self, key: &str, text: &Option<String>) -> Result<Option<Duration>, ScenarioError> {
        text.as_deref().map(|t| self.duration(key, t)).transpose()
    }

    fn size(&self, key: &str, text: &str) -> Result<u64, ScenarioError> {
        parse_size(text).ok_or_else(|| {
            self.err(
                key,
                format!("'{text}' is not a size; write bytes (\"1000\") or \"64KiB\", \"1MiB\", \"2GiB\""),
            )
        })
    }

    fn share(&self, key: &str, value: f64) -> Result<f64, ScenarioError> {
        if value > 0.0 && value <= 1.0 {
            Ok(value)
        } else {
            Err(self.err(key, format!("{value} is not a share; use a number greater than 0 and at most 1")))
        }
    }
}

/// Parses `"64KiB"`, `"1MiB"`, `"2GiB"`, `"10kB"` or plain bytes.
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit.trim() {
        "" | "B" => 1,
        "kB" | "KB" => 1000,
        "KiB" => 1024,
        "MB" => 1_000_000,
        "MiB" => 1024 * 1024,
        "GB" => 1_000_000_000,
        "GiB" => 1024 * 1024 * 1024,
        _ => return None,
    };
    n.checked_mul(mult)
}

/// Validates `raw` (read from `file`, whose stem names the scenario by default).
pub fn plan(file: &str, raw: RawScenario) -> Result<ScenarioPlan, ScenarioError> {
    let cx = Ctx { file };
    let stem = std::path::Path::new(file).file_stem().and_then(|s| s.to_str()).unwrap_or("scenario");
    let fleet = fleet(&cx, raw.fleet)?;
    let packages = packages(&cx, raw.packages)?;
    let known = |v: &str| v == fleet.initial_version || packages.iter().any(|p| p.version == v);
    let mut events = Vec::with_capacity(raw.events.len());
    for (i, e) in raw.events.into_iter().enumerate() {
        events.push(event(&cx, i, e, &fleet, &packages)?);
    }
    events.sort_by_key(|e| e.at);
    let rollout = raw.rollout.map(|r| rollout(&cx, r, &packages)).transpose()?;
    let expect = expect(&cx, raw.expect)?;
    if let Some(v) = &expect.final_version
        && !known(v)
    {
        return Err(cx.err(
            "expect.final_version",
            format!("'{v}' is neither fleet.initial_version nor a [[package]] version"),
        ));
    }
    Ok(ScenarioPlan {
        name: raw.name.unwrap_or_else(|| stem.to_string()),
        description: raw.description.unwrap_or_default(),
        seed: raw.seed.unwrap_or(1),
        time_limit: cx.opt_duration("time_limit", &raw.time_limit)?.unwrap_or(DEFAULT_TIME_LIMIT),
        time: match raw.time.as_deref() {
            None | Some("real") => TimeMode::Real,
            Some("compressed") => TimeMode::Compressed,
            Some(other) => {
                return Err(
                    cx.err("time", format!("'{other}' is not a time mode; use \"real\" or \"compressed\""))
                );
            }
        },
        hub: hub(&cx, raw.hub)?,
        fleet,
        packages,
        events,
        rollout,
        expect,
    })
}

/// `hub.tier` and `hub.units`: a tier the emulator can throttle as, with units it allows.
fn hub_tier(
    cx: &Ctx<'_>,
    tier: Option<&str>,
    units: Option<u32>,
) -> Result<Option<iothub_emulator::throttle::Tier>, ScenarioError> {
    use iothub_emulator::throttle::{Sku, Tier};
    let Some(name) = tier else {
        return match units {
            Some(_) => Err(cx.err("hub.units", "units need a tier; set hub.tier (F1, S1, S2 or S3)")),
            None => Ok(None),
        };
    };
    let sku: Sku =
        name.parse().map_err(|e: iothub_emulator::throttle::TierError| cx.err("hub.tier", e.to_string()))?;
    Tier::new(sku, units.unwrap_or(1)).map(Some).map_err(|e| cx.err("hub.units", e.to_string()))
}

fn hub(cx: &Ctx<'_>, raw: RawHub) -> Result<HubPlan, ScenarioError> {
    if raw.mode.as_deref() != Some("child") {
        for (key, set) in [
            ("hub.persist", raw.persist.is_some()),
            ("hub.binary", raw.binary.is_some()),
            ("hub.data_dir", raw.data_dir.is_some()),
        ] {
            if set {
                return Err(
                    cx.err(key, "only a child hub takes this key; set hub.mode = \"child\" or remove it")
                );
            }
        }
    }
    match raw.mode.as_deref().unwrap_or("embedded") {
        "embedded" => {
            cx.refuse_set(
                &[
                    ("hub.connection_string", raw.connection_string.is_some()),
                    ("hub.ca_file", raw.ca_file.is_some()),
                    ("hub.http_url", raw.http_url.is_some()),
                    ("hub.packages_dir", raw.packages_dir.is_some()),
                    ("hub.amqp_port", raw.amqp_port.is_some()),
                    ("hub.mqtt_port", raw.mqtt_port.is_some()),
                    ("hub.ftp_port", raw.ftp_port.is_some()),
                ],
                "only an external hub takes this key; set hub.mode = \"external\" or remove it",
            )?;
            Ok(HubPlan::Embedded {
                feedback_interval: cx
                    .opt_duration("hub.feedback_interval", &raw.feedback_interval)?
                    .unwrap_or(Duration::from_secs(15)),
                c2d_default_ttl: cx
                    .opt_duration("hub.c2d_default_ttl", &raw.c2d_default_ttl)?
                    .unwrap_or(Duration::from_secs(3600)),
                tier: hub_tier(cx, raw.tier.as_deref(), raw.units)?,
            })
        }
        "external" => {
            let need =
                |key: &str, v: Option<String>| v.ok_or_else(|| cx.err(key, "an external hub needs this key"));
            cx.refuse_set(
                &[
                    ("hub.feedback_interval", raw.feedback_interval.is_some()),
                    ("hub.c2d_default_ttl", raw.c2d_default_ttl.is_some()),
                    ("hub.tier", raw.tier.is_some()),
                    ("hub.units", raw.units.is_some()),
                ],
                "only an embedded hub takes this key (an external hub has its own settings); remove it",
            )?;
            let port = |key: &str, v: Option<u16>, default: u16| match v {
                Some(0) => Err(cx.err(key, "0 is not a port; use 1 to 65535")),
                Some(p) => Ok(p),
                None => Ok(default),
            };
            Ok(HubPlan::External {
                connection_string: need("hub.connection_string", raw.connection_string)?,
                ca_file: need("hub.ca_file", raw.ca_file)?,
                http_url: need("hub.http_url", raw.http_url)?,
                packages_dir: raw.packages_dir,
                amqp_port: port("hub.amqp_port", raw.amqp_port, DEFAULT_AMQP_PORT)?,
                mqtt_port: port("hub.mqtt_port", raw.mqtt_port, DEFAULT_MQTT_PORT)?,
                ftp_port: port("hub.ftp_port", raw.ftp_port, DEFAULT_FTP_PORT)?,
            })
        }
        "child" => {
            cx.refuse_set(
                &[
                    ("hub.connection_string", raw.connection_string.is_some()),
                    ("hub.ca_file", raw.ca_file.is_some()),
                    ("hub.http_url", raw.http_url.is_some()),
                    ("hub.packages_dir", raw.packages_dir.is_some()),
                    ("hub.amqp_port", raw.amqp_port.is_some()),
                    ("hub.mqtt_port", raw.mqtt_port.is_some()),
                    ("hub.ftp_port", raw.ftp_port.is_some()),
                    ("hub.c2d_default_ttl", raw.c2d_default_ttl.is_some()),
                    ("hub.tier", raw.tier.is_some()),
                    ("hub.units", raw.units.is_some()),
                ],
                "a child hub (hub.mode = \"child\") takes persist, binary, data_dir and \
                         feedback_interval only (it picks its own ports); remove this key",
            )?;
            Ok(HubPlan::Child {
                binary: raw.binary,
                data_dir: raw.data_dir,
                persist: raw.persist.unwrap_or(true),
                feedback_interval: cx
                    .opt_duration("hub.feedback_interval", &raw.feedback_interval)?
                    .unwrap_or(Duration::from_secs(15)),
            })
        }
        other => Err(cx.err(
            "hub.mode",
            format!("'{other}' is not a hub mode; use \"embedded\", \"external\" or \"child\""),
        )),
    }
}

fn fleet(cx: &Ctx<'_>, raw: RawFleet) -> Result<FleetPlan, ScenarioError> {
    if raw.devices == 0 || raw.devices > MAX_DEVICES {
        return Err(cx.err("fleet.devices", format!("{} devices; use 1 to {MAX_DEVICES}", raw.devices)));
    }
    let pattern = raw.id_pattern.unwrap_or_else(|| DEFAULT_ID_PATTERN.to_string());
    let Some((prefix, suffix)) = pattern.split_once("{n}").filter(|(_, s)| !s.contains("{n}")) else {
        return Err(cx.err(
            "fleet.id_pattern",
            format!("'{pattern}' must contain exactly one {{n}}, as in \"fridge-{{n}}\""),
        ));
    };
    let ids = IdPattern {
        prefix: prefix.into(),
        suffix: suffix.into(),
        width: (raw.devices - 1).to_string().len(),
    };
    for sample in [ids.id(0), ids.id(raw.devices - 1)] {
        iothub_emulator::hub::validate_device_id(&sample).map_err(|e| {
            cx.err(
                "fleet.id_pattern",
                format!("it makes ids like '{sample}', which IoT Hub refuses: {}", e.message),
            )
        })?;
    }
    let external = match raw.mode.as_deref().unwrap_or("embedded") {
        "embedded" => false,
        "external" => true,
        other => {
            return Err(cx.err(
                "fleet.mode",
                format!("'{other}' is not a fleet mode; use \"embedded\" or \"external\""),
            ));
        }
    };
    let shards = raw.shards.unwrap_or(1);
    if shards == 0 || u64::from(shards) > raw.devices {
        return Err(cx.err("fleet.shards", format!("{shards} shards; use 1 to the number of devices")));
    }
    let transport = match raw.transport.as_deref() {
        None => Transport::default(),
        Some(t) => Transport::parse(t).ok_or_else(|| {
            cx.err(
                "fleet.transport",
                format!("'{t}' is not a transport; use \"mqtt\", \"mqtt-tls\" or \"in-process\""),
            )
        })?,
    };
    if transport != Transport::default() && (external || shards > 1) {
        return Err(cx.err(
            "fleet.transport",
            "only the runner's own fleet (fleet.mode = \"embedded\", fleet.shards = 1) takes a transport; \
             external and shard processes connect over MQTT with TLS",
        ));
    }
    let mut groups = Vec::new();
    let mut total = 0.0;
    for (i, g) in raw.groups.into_iter().enumerate() {
        let share = cx.share(&format!("fleet.group[{i}].share"), g.share)?;
        if groups.iter().any(|x: &Group| x.name == g.name) {
            return Err(
                cx.err(format!("fleet.group[{i}].name"), format!("group '{}' is defined twice", g.name))
            );
        }
        total += share;
        groups.push(Group { name: g.name, share });
    }
    if total > 1.0 + 1e-9 {
        return Err(
            cx.err("fleet.group", format!("group shares add up to {total}; they may add up to at most 1"))
        );
    }
    let update_retry = match raw.update_retry {
        None => UpdateRetryPlan::default(),
        Some(r) => {
            let key = "fleet.update_retry.check_every";
            let check_every = cx.opt_duration(key, &r.check_every)?;
            if check_every.is_some_and(|d| d.is_zero()) {
                return Err(cx.err(key, "a period of 0; leave check_every out for no periodic check"));
            }
            UpdateRetryPlan { on_reconnect: r.on_reconnect.unwrap_or(true), check_every }
        }
    };
    Ok(FleetPlan {
        devices: raw.devices,
        ids,
        shards,
        external,
        connect_ramp: cx.opt_duration("fleet.connect_ramp", &raw.connect_ramp)?.unwrap_or_default(),
        initial_version: raw.initial_version.unwrap_or_else(|| DEFAULT_INITIAL_VERSION.to_string()),
        groups,
        update_retry,
        transport,
    })
}

fn packages(cx: &Ctx<'_>, raw: Vec<RawPackage>) -> Result<Vec<PackagePlan>, ScenarioError> {
    let mut out: Vec<PackagePlan> = Vec::new();
    for (i, p) in raw.into_iter().enumerate() {
        if out.iter().any(|x| x.version == p.version) {
            return Err(
                cx.err(format!("package[{i}].version"), format!("version '{}' is defined twice", p.version))
            );
        }
        let size = match &p.size {
            Some(s) => cx.size(&format!("package[{i}].size"), s)?,
            None => DEFAULT_PACKAGE_SIZE,
        };
        out.push(PackagePlan { version: p.version, size, corrupt: p.corrupt });
    }
    Ok(out)
}

fn target(cx: &Ctx<'_>, key: &str, raw: &Option<String>, fleet: &FleetPlan) -> Result<Target, ScenarioError> {
    match raw.as_deref().map(str::trim) {
        None | Some("all") => Ok(Target::All),
        Some(t) if fleet.groups.iter().any(|g| g.name == t) => Ok(Target::Group(t.to_string())),
        Some(t) if t.contains(['=', '<', '>']) || t.to_ascii_uppercase().contains("IS_DEFINED") => {
            let query = format!("SELECT * FROM devices WHERE {t}");
            iothub_emulator::query::Query::parse(&query)
                .map_err(|e| cx.err(key, format!("'{t}' is not a valid WHERE clause: {e}")))?;
            Ok(Target::Where(t.to_string()))
        }
        Some(t) => {
            let groups: Vec<&str> = fleet.groups.iter().map(|g| g.name.as_str()).collect();
            Err(cx
                .err(key, format!("'{t}' is not \"all\", a group ({}) or a WHERE clause", groups.join(", "))))
        }
    }
}

/// Keys each action takes; any other key set on the event is an error.
fn allowed_keys(action: &str) -> &'static [&'static str] {
    match action {
        "release" => &["version", "ttl", "target", "via"],
        "offline" => &["target", "share", "duration"],
        "link-flap" => &["target", "share", "count", "interval", "ftp"],
        "ftp-fault" => &["rate_limit", "drop_after", "refuse_logins", "refuse_sessions", "lasting"],
        "send" => &["target", "count", "body", "ttl"],
        "hub-restart" => &["kind"],
        _ => &[],
    }
}

fn set_keys(e: &RawEvent) -> Vec<&'static str> {
    let present = [
        ("version", e.version.is_some()),
        ("ttl", e.ttl.is_some()),
        ("target", e.target.is_some()),
        ("share", e.share.is_some()),
        ("duration", e.duration.is_some()),
        ("count", e.count.is_some()),
        ("interval", e.interval.is_some()),
        ("ftp", e.ftp.is_some()),
        ("rate_limit", e.rate_limit.is_some()),
        ("drop_after", e.drop_after.is_some()),
        ("refuse_logins", e.refuse_logins.is_some()),
        ("refuse_sessions", e.refuse_sessions.is_some()),
        ("lasting", e.lasting.is_some()),
        ("body", e.body.is_some()),
        ("via", e.via.is_some()),
        ("kind", e.kind.is_some()),
    ];
    present.into_iter().filter(|(_, set)| *set).map(|(k, _)| k).collect()
}

fn event(
    cx: &Ctx<'_>,
    i: usize,
    e: RawEvent,
    fleet: &FleetPlan,
    packages: &[PackagePlan],
) -> Result<Event, ScenarioError> {
    let key = |k: &str| format!("event[{i}].{k}");
    let at = cx.duration(&key("at"), &e.at)?;
    let allowed = allowed_keys(&e.action);
    if allowed.is_empty() {
        return Err(cx.err(key("action"), format!("'{}' is not an action; use one of {ACTIONS}", e.action)));
    }
    if let Some(extra) = set_keys(&e).into_iter().find(|k| !allowed.contains(k)) {
        return Err(cx.err(
            key(extra),
            format!("action '{}' does not take {extra}; it takes {}", e.action, allowed.join(", ")),
        ));
    }
    let need = |k: &str, present: bool| {
        if present { Ok(()) } else { Err(cx.err(key(k), format!("action '{}' needs {k}", e.action))) }
    };
    let tgt = target(cx, &key("target"), &e.target, fleet)?;
    let action = match e.action.as_str() {
        "release" => {
            need("version", e.version.is_some())?;
            let version = e.version.unwrap_or_default();
            if !packages.iter().any(|p| p.version == version) {
                let known: Vec<&str> = packages.iter().map(|p| p.version.as_str()).collect();
                return Err(cx.err(
                    key("version"),
                    format!("no [[package]] has version '{version}' (known: {})", known.join(", ")),
                ));
            }
            let pipeline = match e.via.as_deref() {
                None | Some("runner") => false,
                Some("pipeline") => true,
                Some(other) => {
                    return Err(cx.err(
                        key("via"),
                        format!("'{other}' is not a way to release; use \"runner\" or \"pipeline\""),
                    ));
                }
            };
            Action::Release { version, ttl: cx.opt_duration(&key("ttl"), &e.ttl)?, target: tgt, pipeline }
        }
        "offline" => {
            need("share", e.share.is_some())?;
            need("duration", e.duration.is_some())?;
            let duration = match e.duration {
                Some(d) => duration_dist(cx, &key("duration"), d)?,
                None => DurationDist::Fixed(Duration::ZERO),
            };
            Action::Offline { target: tgt, share: cx.share(&key("share"), e.share.unwrap_or(0.0))?, duration }
        }
        "link-flap" => Action::LinkFlap {
            target: tgt,
            share: cx.share(&key("share"), e.share.unwrap_or(1.0))?,
            count: e.count.unwrap_or(1).max(1),
            interval: cx.opt_duration(&key("interval"), &e.interval)?.unwrap_or(Duration::from_secs(1)),
            ftp: e.ftp.unwrap_or(true),
        },
        "ftp-fault" => {
            let refuse = e.refuse_logins.map(|r| cx.share(&key("refuse_logins"), r)).transpose()?;
            let busy = e.refuse_sessions.map(|r| cx.share(&key("refuse_sessions"), r)).transpose()?;
            let fault = Action::FtpFault {
                rate_limit: e.rate_limit.as_deref().map(|s| cx.size(&key("rate_limit"), s)).transpose()?,
                drop_after: e.drop_after.as_deref().map(|s| cx.size(&key("drop_after"), s)).transpose()?,
                refuse_logins: refuse,
                refuse_sessions: busy,
                lasting: cx.opt_duration(&key("lasting"), &e.lasting)?,
            };
            if let Action::FtpFault {
                rate_limit: None,
                drop_after: None,
                refuse_logins: None,
                refuse_sessions: None,
                ..
            } = fault
            {
                return Err(cx.err(
                    key("action"),
                    "an ftp-fault needs at least one of rate_limit, drop_after, refuse_logins, refuse_sessions",
                ));
            }
            fault
        }
        "hub-restart" => Action::HubRestart {
            kind: match e.kind.as_deref() {
                None | Some("crash") => crate::child_hub::StopKind::Crash,
                Some("graceful") => crate::child_hub::StopKind::Graceful,
                Some(other) => {
                    return Err(cx.err(
                        key("kind"),
                        format!("'{other}' is not a restart kind; use \"crash\" (SIGKILL) or \"graceful\" (SIGTERM)"),
                    ));
                }
            },
        },
        _ => Action::Send {
            target: tgt,
            count: e.count.unwrap_or(1).max(1),
            body: e.body.unwrap_or_else(|| "update available".to_string()),
            ttl: cx.opt_duration(&key("ttl"), &e.ttl)?,
        },
    };
    Ok(Event { at, action })
}

fn duration_dist(cx: &Ctx<'_>, key: &str, raw: RawDuration) -> Result<DurationDist, ScenarioError> {
    match raw {
        RawDuration::Fixed(s) => Ok(DurationDist::Fixed(cx.duration(key, &s)?)),
        RawDuration::Drawn(RawDistribution { distribution, min, max, mean }) => match distribution.as_str() {
            "uniform" => {
                let (Some(lo), Some(hi), None) = (min, max, &mean) else {
                    return Err(cx.err(key, "a uniform distribution takes min and max (and no mean)"));
                };
                let (lo, hi) =
                    (cx.duration(&format!("{key}.min"), &lo)?, cx.duration(&format!("{key}.max"), &hi)?);
                if lo > hi {
                    return Err(cx.err(key, "min is greater than max"));
                }
                Ok(DurationDist::Uniform { min: lo, max: hi })
            }
            "exponential" => match (mean, min, max) {
                (Some(m), None, None) => {
                    Ok(DurationDist::Exponential { mean: cx.duration(&format!("{key}.mean"), &m)? })
                }
                _ => Err(cx.err(key, "an exponential distribution takes mean only")),
            },
            other => Err(cx.err(
                format!("{key}.distribution"),
                format!("'{other}' is not a distribution; use \"uniform\" or \"exponential\""),
            )),
        },
    }
}

fn rollout(cx: &Ctx<'_>, raw: RawRollout, packages: &[PackagePlan]) -> Result<RolloutPlan, ScenarioError> {
    if !packages.iter().any(|p| p.version == raw.version) {
        return Err(cx.err("rollout.version", format!("no [[package]] has version '{}'", raw.version)));
    }
    if raw.phases.is_empty() {
        return Err(cx.err("rollout.phase", "a rollout needs at least one [[rollout.phase]]"));
    }
    let mut phases = Vec::new();
    for (i, p) in raw.phases.into_iter().enumerate() {
        iothub_emulator::query::Query::parse(&format!("SELECT * FROM devices WHERE {}", p.condition))
            .map_err(|e| {
                cx.err(format!("rollout.phase[{i}].where"), format!("not a valid WHERE clause: {e}"))
            })?;
        phases.push((p.name, p.condition));
    }
    let via = match raw.via.as_deref() {
        None | Some("c2d") => RolloutVia::C2d,
        Some("configuration") => RolloutVia::Configuration,
        Some(other) => {
            return Err(cx.err(
                "rollout.via",
                format!("'{other}' is not a way to roll out; use \"c2d\" or \"configuration\""),
            ));
        }
    };
    Ok(RolloutPlan {
        via,
        version: raw.version,
        at: cx.opt_duration("rollout.at", &raw.at)?.unwrap_or_default(),
        success_share: cx.share("rollout.success_share", raw.success_share.unwrap_or(0.95))?,
        phase_timeout: cx
            .opt_duration("rollout.phase_timeout", &raw.phase_timeout)?
            .unwrap_or(Duration::from_secs(300)),
        phases,
    })
}

fn expect(cx: &Ctx<'_>, raw: RawExpect) -> Result<Expectations, ScenarioError> {
    let latency = match raw.latency {
        None => LatencyBounds::default(),
        Some(l) => LatencyBounds {
            p50: cx.opt_duration("expect.latency.p50", &l.p50)?,
            p90: cx.opt_duration("expect.latency.p90", &l.p90)?,
            p99: cx.opt_duration("expect.latency.p99", &l.p99)?,
            max: cx.opt_duration("expect.latency.max", &l.max)?,
        },
    };
    let feedback = raw
        .feedback
        .map(|f| FeedbackTallies {
            success: f.success,
            expired: f.expired,
            rejected: f.rejected,
            delivery_count_exceeded: f.delivery_count_exceeded,
            purged: f.purged,
        })
        .unwrap_or_default();
    Ok(Expectations {
        all_installed_within: cx.opt_duration("expect.all_installed_within", &raw.all_installed_within)?,
        final_version: raw.final_version,
        no_duplicate_installs: raw.no_duplicate_installs.unwrap_or(false),
        no_lost_messages: raw.no_lost_messages.unwrap_or(false),
        expired: raw.expired,
        failed: raw.failed,
        latency,
        feedback,
        queue_full_rejections: raw.queue_full_rejections,
    })
}
