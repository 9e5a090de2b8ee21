//! Stage one of scenario parsing: the TOML file as written, deserialized with serde into structs
//! that mirror it key for key. Nothing is checked here beyond TOML types and unknown keys
//! (`deny_unknown_fields`, so a typo is an error naming the allowed keys); meaning is checked in
//! stage two ([`super::plan`]).

use serde::Deserialize;

/// A whole scenario file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawScenario {
    /// Short name; defaults to the file stem.
    pub name: Option<String>,
    /// What the scenario shows.
    pub description: Option<String>,
    /// Seed for every random choice (device picks, offline durations).
    pub seed: Option<u64>,
    /// Hard stop for the whole run (`"10m"`), in scenario time.
    pub time_limit: Option<String>,
    /// `"real"` (default) or `"compressed"`: skip the waits where nothing happens.
    pub time: Option<String>,
    /// Which hub to drive.
    #[serde(default)]
    pub hub: RawHub,
    /// The simulated devices.
    pub fleet: RawFleet,
    /// Packages the scenario can release.
    #[serde(default, rename = "package")]
    pub packages: Vec<RawPackage>,
    /// Events at points in time.
    #[serde(default, rename = "event")]
    pub events: Vec<RawEvent>,
    /// A phased rollout instead of one release to everybody.
    pub rollout: Option<RawRollout>,
    /// What must hold at the end.
    #[serde(default)]
    pub expect: RawExpect,
}

/// `[hub]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHub {
    /// `embedded` (default), `external` or `child` (the runner starts the `iothub-emulator`
    /// binary as a child process, and may restart it: `hub-restart` events).
    pub mode: Option<String>,
    /// Child hub: run with `--persist` (default true).
    pub persist: Option<bool>,
    /// Child hub: the `iothub-emulator` binary (default: `IOTHUB_EMULATOR_BIN`, else the one
    /// beside `testbench`).
    pub binary: Option<String>,
    /// Child hub: its `--data-dir` (default: a directory in the run's work directory, removed
    /// afterwards).
    pub data_dir: Option<String>,
    /// External hub: the `iothubowner` connection string.
    pub connection_string: Option<String>,
    /// External hub: the CA file to trust.
    pub ca_file: Option<String>,
    /// External hub: the plain HTTP base URL (health, telemetry).
    pub http_url: Option<String>,
    /// External hub: its FTP packages directory as this machine sees it (a shared volume).
    pub packages_dir: Option<String>,
    /// External hub: the AMQP (TLS) port, 5671 by default.
    pub amqp_port: Option<u16>,
    /// External hub: the MQTT (TLS) port, 8883 by default.
    pub mqtt_port: Option<u16>,
    /// External hub: the FTP port, 2121 by default.
    pub ftp_port: Option<u16>,
    /// Feedback batch interval (`"15s"`, the IoT Hub default).
    pub feedback_interval: Option<String>,
    /// Default C2D time to live (`"1h"`).
    pub c2d_default_ttl: Option<String>,
    /// Embedded hub: throttle as this IoT Hub tier (`"F1"`, `"S1"`, `"S2"`, `"S3"`); off when absent.
    pub tier: Option<String>,
    /// Embedded hub: units of `tier` (default 1).
    pub units: Option<u32>,
}

/// `[fleet]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFleet {
    /// `embedded` (default: the runner runs the agents) or `external` (`fleet run` processes do).
    pub mode: Option<String>,
    /// Number of devices.
    pub devices: u64,
    /// Device id pattern with one `{n}` (zero-padded to the width of the largest index).
    pub id_pattern: Option<String>,
    /// Processes the fleet is split over (`--shard i/n`).
    pub shards: Option<u32>,
    /// Time over which devices connect (`"10s"`).
    pub connect_ramp: Option<String>,
    /// Application version every device starts on.
    pub initial_version: Option<String>,
    /// Groups of devices, tagged `tags.group = <name>` in the twin.
    #[serde(default, rename = "group")]
    pub groups: Vec<RawGroup>,
    /// When devices whose install failed try again.
    pub update_retry: Option<RawUpdateRetry>,
    /// How the runner's devices reach the embedded hub: `mqtt` (default), `mqtt-tls` or
    /// `in-process`.
    pub transport: Option<String>,
}

/// `fleet.update_retry = { on_reconnect = true, check_every = "30m" }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUpdateRetry {
    /// After a failed install, check `latest.json` again on every reconnect (default true).
    pub on_reconnect: Option<bool>,
    /// Every device checks `latest.json` once per this much scenario time (default: never).
    pub check_every: Option<String>,
}

/// `[[fleet.group]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawGroup {
    /// Group name (becomes `tags.group`).
    pub name: String,
    /// Share of the fleet in this group (0 < share ≤ 1; groups must not add up past 1).
    pub share: f64,
}

/// `[[package]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPackage {
    /// Version string (`"2.0.0"`).
    pub version: String,
    /// Payload size (`"256KiB"`, `"1MiB"`, bytes as an integer string).
    pub size: Option<String>,
    /// Announce a wrong sha256, so installs fail verification and roll back.
    #[serde(default)]
    pub corrupt: bool,
}

/// `[[event]]`: one thing that happens at `at`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEvent {
    /// When, from the start of the run (`"30s"`).
    pub at: String,
    /// `release`, `offline`, `link-flap`, `ftp-fault` or `send`.
    pub action: String,
    /// release: the package version.
    pub version: Option<String>,
    /// release / send: message time to live (`"10m"`).
    pub ttl: Option<String>,
    /// Which devices: `all` (default), a group name, or a query `WHERE` clause.
    pub target: Option<String>,
    /// offline / link-flap: share of the targeted devices (0 < share ≤ 1).
    pub share: Option<f64>,
    /// offline: how long each device stays off.
    pub duration: Option<RawDuration>,
    /// link-flap / send: how many times.
    pub count: Option<u32>,
    /// link-flap: time between flaps.
    pub interval: Option<String>,
    /// link-flap: also cut the devices' FTP connections (default true).
    pub ftp: Option<bool>,
    /// ftp-fault: bytes per second (`"64KiB"`).
    pub rate_limit: Option<String>,
    /// ftp-fault: drop data connections after this many bytes.
    pub drop_after: Option<String>,
    /// ftp-fault: share of logins refused.
    pub refuse_logins: Option<f64>,
    /// ftp-fault: share of FTP sessions turned away with `421` at connect.
    pub refuse_sessions: Option<f64>,
    /// ftp-fault: how long the fault lasts (until the end when absent).
    pub lasting: Option<String>,
    /// send: the message body (plain text).
    pub body: Option<String>,
    /// release: `runner` (default: the runner puts the notices straight into the hub) or
    /// `pipeline` (the seed pipeline's way: device ids paged through the query API, notices sent
    /// by a service client over AMQP).
    pub via: Option<String>,
    /// hub-restart: `crash` (SIGKILL) or `graceful` (SIGTERM).
    pub kind: Option<String>,
}

/// A duration: a fixed string (`"60s"`) or a distribution table.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawDuration {
    /// `"60s"`.
    Fixed(String),
    /// `{ distribution = "uniform", min = "30s", max = "300s" }` or `{ distribution = "exponential", mean = "2m" }`.
    Drawn(RawDistribution),
}

/// A distribution of durations.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDistribution {
    /// `uniform` or `exponential`.
    pub distribution: String,
    /// uniform: lower bound.
    pub min: Option<String>,
    /// uniform: upper bound.
    pub max: Option<String>,
    /// exponential: mean.
    pub mean: Option<String>,
}

/// `[rollout]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRollout {
    /// The version rolled out.
    pub version: String,
    /// When the first phase starts.
    pub at: Option<String>,
    /// Share of a phase that must be installed before the next starts (default 0.95).
    pub success_share: Option<f64>,
    /// Longest wait for a phase to reach the success share before the rollout halts.
    pub phase_timeout: Option<String>,
    /// How each phase's notice travels: `"c2d"` (default, a C2D message per device) or
    /// `"configuration"` (one IoT Hub configuration per phase whose `properties.desired.update`
    /// carries the notice to the twins its `where` selects).
    pub via: Option<String>,
    /// Phases in order.
    #[serde(rename = "phase")]
    pub phases: Vec<RawPhase>,
}

/// `[[rollout.phase]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPhase {
    /// Phase name for reports.
    pub name: String,
    /// The devices: a query `WHERE` clause over twins (`"tags.group = 'canary'"`).
    #[serde(rename = "where")]
    pub condition: String,
}

/// `[expect]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExpect {
    /// Every targeted device installed the release within this time of the release.
    pub all_installed_within: Option<String>,
    /// The version every device must end on.
    pub final_version: Option<String>,
    /// No device installs the same version twice.
    pub no_duplicate_installs: Option<bool>,
    /// Every release notice the hub acknowledged reaches its device.
    pub no_lost_messages: Option<bool>,
    /// Exactly this many messages expire.
    pub expired: Option<u64>,
    /// Exactly this many devices end in `failed` or `rolled-back`.
    pub failed: Option<u64>,
    /// Bounds on end-to-end latency percentiles (`p50`, `p90`, `p99`, `max`).
    pub latency: Option<RawLatency>,
    /// Feedback tallies by status.
    pub feedback: Option<RawFeedback>,
    /// Sends refused with `DeviceMaximumQueueDepthExceeded`.
    pub queue_full_rejections: Option<u64>,
}

/// `[expect.latency]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLatency {
    /// Median bound.
    pub p50: Option<String>,
    /// 90th percentile bound.
    pub p90: Option<String>,
    /// 99th percentile bound.
    pub p99: Option<String>,
    /// Maximum bound.
    pub max: Option<String>,
}

/// `[expect.feedback]`: exact counts per status.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFeedback {
    /// `Success` records.
    pub success: Option<u64>,
    /// `Expired` records.
    pub expired: Option<u64>,
    /// `Rejected` records.
    pub rejected: Option<u64>,
    /// `DeliveryCountExceeded` records.
    pub delivery_count_exceeded: Option<u64>,
    /// `Purged` records.
    pub purged: Option<u64>,
}
