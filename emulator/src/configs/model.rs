//! Sans-IO configurations (reference-2 §6): parsing and validating a `Configuration` body (device
//! configurations with `deviceContent`, module configurations with `moduleContent` and a target
//! condition over `devices.modules`), the table of configurations with their etags, and the rules
//! that decide what a twin (device or module) receives —
//! priority resolution across the configurations that target it ([`resolve`]), writing the
//! winners into the desired properties and removing what no longer applies ([`apply`]), and the
//! merge patch that tells the device ([`diff`]).
//!
//! No hub state and no I/O: `configs` (the parent module) owns the table and walks the twins.

use std::collections::BTreeMap;
use std::sync::Arc;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Map, Value, json};

use crate::clock::{Millis, iso8601};
use crate::error::{ErrorCode, HubError};
use crate::query::{Collection, Query};

/// Most configurations a hub holds (IoT Hub's paid tiers; free hubs allow 20).
pub const CONFIGURATIONS_MAX: usize = 100;
/// Most custom metric queries per configuration.
pub const CUSTOM_METRICS_MAX: usize = 5;
/// Longest configuration id.
pub const CONFIGURATION_ID_MAX: usize = 128;
/// Most `deviceContent` / `moduleContent` paths per configuration (a bound for hostile bodies; the content must
/// also fit the 32 KB of desired properties).
pub const CONTENT_PATHS_MAX: usize = 512;

/// A configuration's relation to one twin, as recorded in the twin's `configurations` (the C#
/// model's `ConfigurationStatus` serialises these in lower case).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigStatus {
    /// The target condition matches, but a higher-priority configuration set every path.
    Targeted,
    /// At least one of its paths was written into the twin.
    Applied,
}

impl ConfigStatus {
    /// As written in the twin JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Targeted => "targeted",
            Self::Applied => "applied",
        }
    }
}

/// What a twin keeps about the configurations of its kind (a device inside its rarely set
/// `DeviceExtra`, a module in its `Module`): which ones target it with their status, and which
/// desired paths the configurations wrote, so the next evaluation can take back what no longer
/// applies even after a configuration was deleted.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TwinConfigs {
    /// `(configuration id, status)`, sorted by id.
    pub statuses: Vec<(Arc<str>, ConfigStatus)>,
    /// Desired paths below `properties.desired`, segments joined with `.` (twin keys cannot
    /// contain a `.`).
    pub paths: Vec<Box<str>>,
}

impl TwinConfigs {
    /// Whether nothing is recorded.
    pub fn is_empty(&self) -> bool {
        self.statuses.is_empty() && self.paths.is_empty()
    }

    /// The twin's `configurations` object: `{"id": {"status": "applied"}}`.
    pub fn to_json(&self) -> Value {
        let map: Map<String, Value> =
            self.statuses.iter().map(|(id, s)| (id.to_string(), json!({ "status": s.as_str() }))).collect();
        Value::Object(map)
    }

    /// The status recorded for configuration `id`.
    pub fn status(&self, id: &str) -> Option<ConfigStatus> {
        self.statuses.iter().find(|(c, _)| &**c == id).map(|(_, s)| *s)
    }
}

/// Which twins a configuration writes: device twins (`content.deviceContent`, a condition over
/// `devices`) or module twins (`content.moduleContent`, a condition `FROM devices.modules WHERE …`).
/// The two kinds are resolved separately: a module twin only ever sees module configurations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigKind {
    /// Automatic device configuration.
    Device,
    /// Automatic module configuration.
    Module,
}

impl ConfigKind {
    /// The `content` member that holds this kind's paths.
    pub fn content_key(self) -> &'static str {
        match self {
            Self::Device => "deviceContent",
            Self::Module => "moduleContent",
        }
    }

    /// The query collection this kind's target condition selects from.
    pub fn collection(self) -> Collection {
        match self {
            Self::Device => Collection::Devices,
            Self::Module => Collection::Modules,
        }
    }
}

/// A named custom metric: its query text and the parsed query.
#[derive(Debug, Clone)]
pub struct Metric {
    /// The query as given.
    pub text: String,
    /// Parsed.
    pub query: Query,
}

/// Content writes: path segments below `properties.desired`, and the value.
pub type Writes = Vec<(Vec<String>, Value)>;

/// One configuration.
#[derive(Debug, Clone)]
pub struct Configuration {
    /// Its id.
    pub id: Arc<str>,
    /// `schemaVersion` as given (`null` when absent, as IoT Hub echoes it).
    pub schema_version: Value,
    /// `labels`: string → string.
    pub labels: Map<String, Value>,
    /// Device or module twins (fixed by the content, which cannot change).
    pub kind: ConfigKind,
    /// `content` as given (echoed back).
    pub content: Value,
    /// The content's paths (segments below `properties.desired`) and their values.
    pub writes: Writes,
    /// `targetCondition` as given.
    pub target_condition: String,
    /// Parsed, over the kind's collection; `None` when the condition is empty (targets nothing).
    pub target: Option<Query>,
    /// Higher wins.
    pub priority: i64,
    /// Custom metrics by name.
    pub metrics: BTreeMap<String, Metric>,
    /// When created.
    pub created: Millis,
    /// When last changed.
    pub updated: Millis,
    /// Etag counter.
    pub etag: u64,
    /// Creation order: on equal priority the most recently created configuration wins.
    pub seq: u64,
}

impl Configuration {
    /// The etag as IoT Hub writes identity etags (base64 of the decimal counter).
    pub fn etag_str(&self) -> String {
        B64.encode(self.etag.to_string())
    }

    /// Whether the target condition selects `twin` (built with at least [`Configuration::roots`]).
    pub fn targets(&self, twin: &Value) -> bool {
        self.target.as_ref().is_some_and(|q| q.matches(twin))
    }

    /// The top-level twin properties the target condition reads.
    pub fn roots(&self) -> Vec<&str> {
        self.target.as_ref().map(Query::filter_roots).unwrap_or_default()
    }

    /// The Configuration JSON; `system` and `custom` are the metric results.
    pub fn to_json(&self, system: (usize, usize), custom: &BTreeMap<String, usize>) -> Value {
        // Module configurations: the queries over devices.modules are SDK-inferred (reference-2 §6.3).
        let (select, from) = match self.kind {
            ConfigKind::Device => ("select deviceId", "devices"),
            ConfigKind::Module => ("select deviceId, moduleId", "devices.modules"),
        };
        let condition = self.target_condition.trim();
        let target_query = if condition.is_empty() {
            String::new()
        } else if condition == "*" {
            // Every twin: a query with no WHERE (`where *` would not parse).
            format!("{select} from {from}")
        } else if starts_with_from(condition) {
            format!("{select} {condition}")
        } else {
            format!("{select} from {from} where {condition}")
        };
        let metric_queries: Map<String, Value> =
            self.metrics.iter().map(|(k, m)| (k.clone(), Value::from(m.text.as_str()))).collect();
        let metric_results: Map<String, Value> =
            custom.iter().map(|(k, n)| (k.clone(), Value::from(*n))).collect();
        json!({
            "id": &*self.id,
            "schemaVersion": self.schema_version,
            "labels": self.labels,
            "content": self.content,
            "contentType": "assignment",
            "targetCondition": self.target_condition,
            "createdTimeUtc": iso8601(self.created),
            "lastUpdatedTimeUtc": iso8601(self.updated),
            "priority": self.priority,
            "systemMetrics": {
                "results": { "targetedCount": system.0, "appliedCount": system.1 },
                "queries": {
                    "targetedCount": target_query,
                    "appliedCount": format!(
                        "{select} from {from} where configurations.[[{}]].status = 'Applied'",
                        self.id
                    ),
                },
            },
            "metrics": { "results": metric_results, "queries": metric_queries },
            "etag": self.etag_str(),
        })
    }
}

impl Configuration {
    /// The Configuration JSON without metric results: what `--persist` keeps of it (with its
    /// numbers), restored by [`Configuration::restore`] through the parser the service API uses.
    pub fn stored_json(&self) -> Value {
        let mut v = self.to_json((0, 0), &BTreeMap::new());
        if let Value::Object(m) = &mut v {
            m.remove("systemMetrics");
            m.remove("metrics");
            m.remove("etag");
            m.remove("createdTimeUtc");
            m.remove("lastUpdatedTimeUtc");
            let queries: Map<String, Value> =
                self.metrics.iter().map(|(k, q)| (k.clone(), Value::from(q.text.as_str()))).collect();
            m.insert("metrics".into(), json!({ "queries": queries }));
        }
        v
    }

    /// A configuration as [`Configuration::stored_json`] wrote it, with its numbers.
    pub fn restore(
        id: &str,
        body: &Value,
        seq: u64,
        etag: u64,
        created: Millis,
        updated: Millis,
    ) -> Result<Self, HubError> {
        validate_id(id)?;
        let input = ConfigInput::parse(id, body)?;
        let (kind, content, writes) =
            input.content.ok_or_else(|| HubError::invalid("a stored configuration has no content"))?;
        Ok(Self {
            id: Arc::from(id),
            schema_version: input.schema_version,
            labels: input.labels,
            kind,
            content,
            writes,
            target_condition: input.target_condition,
            target: input.target,
            priority: input.priority,
            metrics: input.metrics,
            created,
            updated,
            etag,
            seq,
        })
    }
}

/// The parts of a `Configuration` body a client may set.
#[derive(Debug, Clone)]
pub struct ConfigInput {
    schema_version: Value,
    labels: Map<String, Value>,
    /// `None` when the body has no `content` (an update that leaves it as it is).
    content: Option<(ConfigKind, Value, Writes)>,
    target_condition: String,
    target: Option<Query>,
    priority: i64,
    metrics: BTreeMap<String, Metric>,
}

/// Checks a configuration id: 1 to 128 characters, lowercase, none of IoT Hub's forbidden
/// characters.
pub fn validate_id(id: &str) -> Result<(), HubError> {
    const FORBIDDEN: &[char] = &['&', '^', '[', ']', '{', '}', '\\', '|', '"', '<', '>', '/', ' '];
    let bad = id.is_empty()
        || id.chars().count() > CONFIGURATION_ID_MAX
        || id
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || FORBIDDEN.contains(&c) || c.is_uppercase());
    if bad {
        return Err(HubError::invalid(format!(
            "configuration id '{}' is not valid: 1 to {CONFIGURATION_ID_MAX} lowercase characters, no spaces or & ^ [ ] {{ }} \\ | \" < > /",
            id.chars().take(CONFIGURATION_ID_MAX + 1).collect::<String>()
        )));
    }
    Ok(())
}

/// Whether a target condition names its collection (`FROM devices.modules WHERE …`).
fn starts_with_from(condition: &str) -> bool {
    let mut words = condition.split_whitespace();
    words.next().is_some_and(|w| w.eq_ignore_ascii_case("from")) && words.next().is_some()
}

/// Parses a target condition into a query: a WHERE clause over device twins (`tags.env = 'x'`),
/// `*` for every device, or a condition that names its collection (`FROM devices.modules WHERE
/// moduleId = 'm'`, what module configurations use); the query's `collection` tells which.
pub fn parse_condition(condition: &str) -> Result<Option<Query>, String> {
    let c = condition.trim();
    if c.is_empty() {
        return Ok(None);
    }
    let text = if c == "*" {
        "SELECT * FROM devices".to_string()
    } else if starts_with_from(c) {
        format!("SELECT * {c}")
    } else {
        format!("SELECT * FROM devices WHERE {c}")
    };
    let q = Query::parse(&text).map_err(|e| e.to_string())?;
    Ok(Some(q))
}

/// Checks that a target condition selects the twins of `kind`: module configurations need a
/// condition `FROM devices.modules WHERE …` (as the Azure CLI enforces), device configurations
/// one over device twins.
fn check_target(kind: ConfigKind, target: Option<&Query>) -> Result<(), HubError> {
    match (kind, target.map(|q| q.collection)) {
        (_, None) => Ok(()),
        (kind, Some(c)) if c == kind.collection() => Ok(()),
        (ConfigKind::Module, Some(_)) => Err(HubError::invalid(
            "the targetCondition of a module configuration (content.moduleContent) must start with 'FROM devices.modules WHERE'",
        )),
        (ConfigKind::Device, Some(_)) => Err(HubError::invalid(
            "a device configuration (content.deviceContent) cannot target module twins (FROM devices.modules); put the content in content.moduleContent",
        )),
    }
}

/// Parses a custom metric query (`SELECT deviceId FROM devices WHERE …`, or over
/// `devices.modules` for module twins).
pub fn parse_metric(text: &str) -> Result<Query, String> {
    Query::parse(text).map_err(|e| e.to_string())
}

fn str_map(v: Option<&Value>, what: &str) -> Result<Map<String, Value>, HubError> {
    match v {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => {
            if let Some((k, _)) = m.iter().find(|(_, v)| !v.is_string()) {
                return Err(HubError::invalid(format!("{what}.{k} must be a string")));
            }
            Ok(m.clone())
        }
        Some(_) => Err(HubError::invalid(format!("{what} must be a JSON object of strings"))),
    }
}

/// Parses `deviceContent` or `moduleContent` (`what`) into writes: keys are
/// `properties.desired[.a.b…]`.
fn parse_content(content: &Map<String, Value>, what: &str) -> Result<Writes, HubError> {
    let mut writes: Writes = Vec::new();
    for (key, value) in content {
        let rest = key
            .strip_prefix("properties.desired")
            .filter(|r| r.is_empty() || r.starts_with('.'))
            .ok_or_else(|| {
                HubError::invalid(format!(
                    "{what} key '{key}' is not a twin path under properties.desired (such as properties.desired.firmware)"
                ))
            })?;
        if rest.is_empty() {
            let Value::Object(section) = value else {
                return Err(HubError::invalid(format!("{what} 'properties.desired' must be a JSON object")));
            };
            for (k, v) in section {
                writes.push((vec![k.clone()], v.clone()));
            }
            continue;
        }
        let segments: Vec<String> = rest[1..].split('.').map(str::to_string).collect();
        if let Some(s) = segments.iter().find(|s| s.is_empty() || s.starts_with('$')) {
            return Err(HubError::invalid(format!(
                "{what} key '{key}' has an invalid segment '{s}' (empty or starting with '$')"
            )));
        }
        writes.push((segments, value.clone()));
    }
    if writes.len() > CONTENT_PATHS_MAX {
        return Err(HubError::invalid(format!("{what} sets more than {CONTENT_PATHS_MAX} paths")));
    }
    for (i, (a, _)) in writes.iter().enumerate() {
        if let Some((b, _)) = writes[..i].iter().find(|(b, _)| overlaps(a, b)) {
            return Err(HubError::invalid(format!(
                "{what} paths properties.desired.{} and properties.desired.{} overlap",
                b.join("."),
                a.join(".")
            )));
        }
    }
    // Values must be what a twin accepts: write them all into an empty desired section.
    let mut probe = crate::hub::Twin::new(0);
    let mut section = Map::new();
    for (path, value) in &writes {
        set_path(&mut section, path, value);
    }
    probe.replace(crate::hub::Section::Desired, &Value::Object(section), 0)?;
    Ok(writes)
}

impl ConfigInput {
    /// Parses a `Configuration` body for id `id`.
    pub fn parse(id: &str, body: &Value) -> Result<Self, HubError> {
        let Value::Object(b) = body else {
            return Err(HubError::invalid("the body must be a Configuration JSON object"));
        };
        if let Some(body_id) = b.get("id").and_then(Value::as_str)
            && body_id != id
        {
            return Err(HubError::invalid(format!(
                "id '{body_id}' in the body does not match '{id}' in the path"
            )));
        }
        let schema_version = match b.get("schemaVersion") {
            None | Some(Value::Null) => Value::Null,
            Some(v @ Value::String(_)) => v.clone(),
            Some(_) => return Err(HubError::invalid("schemaVersion must be a string")),
        };
        let labels = str_map(b.get("labels"), "labels")?;
        let content = match b.get("content") {
            None | Some(Value::Null) => None,
            Some(Value::Object(c)) => Some(parse_content_member(c)?),
            Some(_) => return Err(HubError::invalid("content must be a JSON object")),
        };
        let target_condition = match b.get("targetCondition") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(HubError::invalid("targetCondition must be a string")),
        };
        let target = parse_condition(&target_condition)
            .map_err(|e| HubError::invalid(format!("targetCondition is not valid: {e}")))?;
        if let Some((kind, _, _)) = &content {
            check_target(*kind, target.as_ref())?;
        }
        let priority = match b.get("priority") {
            None | Some(Value::Null) => 0,
            Some(v) => v
                .as_i64()
                .filter(|p| *p >= 0 && *p <= i64::from(i32::MAX))
                .ok_or_else(|| HubError::invalid("priority must be a non-negative integer"))?,
        };
        let mut metrics = BTreeMap::new();
        if let Some(queries) = b.get("metrics").and_then(|m| m.get("queries")).filter(|q| !q.is_null()) {
            let queries = str_map(Some(queries), "metrics.queries")?;
            if queries.len() > CUSTOM_METRICS_MAX {
                return Err(HubError::invalid(format!(
                    "metrics.queries holds {} queries; IoT Hub allows at most {CUSTOM_METRICS_MAX}",
                    queries.len()
                )));
            }
            for (name, text) in queries {
                let text = text.as_str().unwrap_or_default().to_string();
                let query = parse_metric(&text)
                    .map_err(|e| HubError::invalid(format!("metric query '{name}' is not valid: {e}")))?;
                metrics.insert(name, Metric { text, query });
            }
        }
        Ok(Self { schema_version, labels, content, target_condition, target, priority, metrics })
    }
}

/// Reads `content`: exactly one of `deviceContent` and `moduleContent` (the C# SDK sends all
/// three members, the unused ones as empty objects, so empty ones do not count). `modulesContent`
/// (IoT Edge deployments) answers 501. Returns the kind, the content to echo and its writes.
fn parse_content_member(c: &Map<String, Value>) -> Result<(ConfigKind, Value, Writes), HubError> {
    let present = |k: &str| c.get(k).is_some_and(|v| !v.is_null() && v != &json!({}));
    if present("modulesContent") {
        return Err(HubError::new(
            ErrorCode::NotImplemented,
            "IoT Edge deployments (content.modulesContent) are not supported by this emulator; use content.deviceContent or content.moduleContent",
        ));
    }
    let kind = match (present("deviceContent"), present("moduleContent")) {
        (true, true) => {
            return Err(HubError::invalid(
                "a configuration holds content.deviceContent or content.moduleContent, not both",
            ));
        }
        (false, true) => ConfigKind::Module,
        _ => ConfigKind::Device,
    };
    let key = kind.content_key();
    let empty = Map::new();
    let paths = match c.get(key) {
        Some(Value::Object(d)) => d,
        None | Some(Value::Null) => &empty,
        Some(_) => {
            return Err(HubError::invalid(format!(
                "content.{key} must be an object of twin paths (properties.desired.…) to values"
            )));
        }
    };
    let writes = parse_content(paths, key)?;
    let mut echoed = Map::new();
    echoed.insert(key.to_string(), Value::Object(paths.clone()));
    Ok((kind, Value::Object(echoed), writes))
}

/// The hub's configurations, keyed by id.
#[derive(Debug, Default)]
pub struct ConfigTable {
    configs: BTreeMap<Arc<str>, Arc<Configuration>>,
    next_seq: u64,
}

/// What a successful write changed, so the caller knows whether twins must be re-evaluated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Written {
    /// Created (true) or updated.
    pub created: bool,
    /// Whether the target condition or priority changed (twins need a sweep).
    pub retarget: bool,
}

impl ConfigTable {
    /// How many configurations exist.
    pub fn len(&self) -> usize {
        self.configs.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.configs.is_empty()
    }

    /// `PUT`: creates (no `if_match`) or updates (`if_match` given) configuration `id`.
    /// `etag` is the new etag counter value.
    pub fn put(
        &mut self,
        id: &str,
        input: ConfigInput,
        if_match: Option<&crate::hub::IfMatch>,
        now: Millis,
        etag: u64,
    ) -> Result<(Arc<Configuration>, Written), HubError> {
        validate_id(id)?;
        match (self.configs.get(id), if_match) {
            (Some(_), None) => Err(HubError::new(
                ErrorCode::ConfigurationAlreadyExists,
                format!("Configuration '{id}' already exists; update it with an If-Match etag (or '*')"),
            )),
            (None, Some(_)) => Err(not_found(id)),
            (Some(old), Some(cond)) => {
                cond.check(&old.etag_str())?;
                let (content, writes) = match input.content {
                    None => (old.content.clone(), old.writes.clone()),
                    Some((k, c, w)) if k == old.kind && w == old.writes => (c, w),
                    Some(_) => {
                        return Err(HubError::invalid(format!(
                            "the content of configuration '{id}' cannot be updated; only targetCondition, priority, labels and metrics can"
                        )));
                    }
                };
                check_target(old.kind, input.target.as_ref())?;
                let retarget =
                    old.target_condition != input.target_condition || old.priority != input.priority;
                let new = Arc::new(Configuration {
                    id: old.id.clone(),
                    kind: old.kind,
                    schema_version: input.schema_version,
                    labels: input.labels,
                    content,
                    writes,
                    target_condition: input.target_condition,
                    target: input.target,
                    priority: input.priority,
                    metrics: input.metrics,
                    created: old.created,
                    updated: now,
                    etag,
                    seq: old.seq,
                });
                self.configs.insert(new.id.clone(), new.clone());
                Ok((new, Written { created: false, retarget }))
            }
            (None, None) => {
                if self.configs.len() >= CONFIGURATIONS_MAX {
                    return Err(HubError::new(
                        ErrorCode::IotHubQuotaExceeded,
                        format!("the hub holds {CONFIGURATIONS_MAX} configurations, IoT Hub's maximum"),
                    ));
                }
                let (kind, content, writes) = input.content.ok_or_else(|| {
                    HubError::invalid(
                        "a new configuration needs content.deviceContent or content.moduleContent",
                    )
                })?;
                self.next_seq += 1;
                let id: Arc<str> = Arc::from(id);
                let new = Arc::new(Configuration {
                    id: id.clone(),
                    kind,
                    schema_version: input.schema_version,
                    labels: input.labels,
                    content,
                    writes,
                    target_condition: input.target_condition,
                    target: input.target,
                    priority: input.priority,
                    metrics: input.metrics,
                    created: now,
                    updated: now,
                    etag,
                    seq: self.next_seq,
                });
                self.configs.insert(id, new.clone());
                Ok((new, Written { created: true, retarget: true }))
            }
        }
    }

    /// Configuration `id`.
    pub fn get(&self, id: &str) -> Result<Arc<Configuration>, HubError> {
        self.configs.get(id).cloned().ok_or_else(|| not_found(id))
    }

    /// `DELETE`: removes configuration `id` (checking `if_match` when given).
    pub fn delete(&mut self, id: &str, if_match: Option<&crate::hub::IfMatch>) -> Result<(), HubError> {
        let c = self.configs.get(id).ok_or_else(|| not_found(id))?;
        if let Some(cond) = if_match {
            cond.check(&c.etag_str())?;
        }
        self.configs.remove(id);
        Ok(())
    }

    /// All configurations, by id; at most `top`.
    pub fn list(&self, top: Option<usize>) -> Vec<Arc<Configuration>> {
        self.configs.values().take(top.unwrap_or(usize::MAX)).cloned().collect()
    }

    /// A snapshot for evaluating twins.
    pub fn snapshot(&self) -> Arc<[Arc<Configuration>]> {
        self.configs.values().cloned().collect()
    }

    /// Puts back a configuration recovered from the state files (replacing one of the same id);
    /// later creations are ordered after it.
    pub fn restore(&mut self, config: Configuration) {
        self.next_seq = self.next_seq.max(config.seq);
        self.configs.insert(config.id.clone(), Arc::new(config));
    }

    /// Removes configuration `id` if it is there (recovery).
    pub fn restore_removed(&mut self, id: &str) {
        self.configs.remove(id);
    }

    /// The table's own `Arc` of id `id` when it holds that configuration (devices' records then
    /// share it instead of holding copies).
    pub fn shared_id(&self, id: &str) -> Option<Arc<str>> {
        self.configs.get_key_value(id).map(|(k, _)| k.clone())
    }
}

fn not_found(id: &str) -> HubError {
    HubError::new(ErrorCode::ConfigurationNotFound, format!("Configuration '{id}' not found"))
}

/// Whether one path is a prefix of the other (they write the same subtree).
fn overlaps(a: &[String], b: &[String]) -> bool {
    let n = a.len().min(b.len());
    a[..n] == b[..n]
}

/// The outcome of priority resolution for one twin.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolution<'a> {
    /// Every targeting configuration with its status, sorted by id.
    pub statuses: Vec<(Arc<str>, ConfigStatus)>,
    /// The winning writes: path segments and value.
    pub writes: Vec<(&'a [String], &'a Value)>,
}

/// Priority resolution (reference-2 §6.3): among the configurations that target a twin, for
/// every path the highest `priority` wins, and on a tie the most recently created one. A path
/// that overlaps a path already won (one is a prefix of the other) loses as a whole. A
/// configuration with at least one winning path is `applied` ("which can include partial
/// modifications"), one with none is `targeted`.
pub fn resolve<'a>(matching: &[&'a Configuration]) -> Resolution<'a> {
    let mut order: Vec<&'a Configuration> = matching.to_vec();
    order.sort_by(|a, b| b.priority.cmp(&a.priority).then(b.seq.cmp(&a.seq)));
    let mut writes: Vec<(&'a [String], &'a Value)> = Vec::new();
    let mut statuses = Vec::with_capacity(order.len());
    for c in order {
        let mut applied = false;
        for (path, value) in &c.writes {
            if writes.iter().any(|(p, _)| overlaps(p, path)) {
                continue;
            }
            writes.push((path.as_slice(), value));
            applied = true;
        }
        let status = if applied { ConfigStatus::Applied } else { ConfigStatus::Targeted };
        statuses.push((c.id.clone(), status));
    }
    statuses.sort_by(|a, b| a.0.cmp(&b.0));
    Resolution { statuses, writes }
}

/// Sets `value` at `path` in `map`, creating (or replacing non-object) parents; `null` removes.
pub fn set_path(map: &mut Map<String, Value>, path: &[String], value: &Value) {
    let Some((last, parents)) = path.split_last() else { return };
    let mut cur = map;
    for seg in parents {
        if value.is_null() && !cur.get(seg).is_some_and(Value::is_object) {
            return;
        }
        let entry = cur.entry(seg.clone()).or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        let Value::Object(next) = entry else { unreachable!("made an object above") };
        cur = next;
    }
    if value.is_null() {
        cur.remove(last);
    } else {
        cur.insert(last.clone(), strip_nulls(value));
    }
}

/// A copy of `v` with `null` members of objects dropped (a `null` in content means "absent").
fn strip_nulls(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), strip_nulls(v))).collect(),
        ),
        other => other.clone(),
    }
}

/// Removes the value at `path`, then every parent object the removal left empty.
fn remove_path(map: &mut Map<String, Value>, path: &[String]) {
    let Some((first, rest)) = path.split_first() else { return };
    if rest.is_empty() {
        map.remove(first);
        return;
    }
    if let Some(Value::Object(child)) = map.get_mut(first) {
        remove_path(child, rest);
        if child.is_empty() {
            map.remove(first);
        }
    }
}

/// The desired properties after applying `writes`, having first removed the paths configurations
/// wrote before (`old_paths`) that no winning write covers any more. Also returns the paths now
/// written (to record in [`TwinConfigs::paths`]).
pub fn apply(
    desired: &Map<String, Value>,
    old_paths: &[Box<str>],
    writes: &[(&[String], &Value)],
) -> (Map<String, Value>, Vec<Box<str>>) {
    let mut out = desired.clone();
    for old in old_paths {
        let segs: Vec<String> = old.split('.').map(str::to_string).collect();
        if !writes.iter().any(|(p, _)| *p == segs.as_slice()) {
            remove_path(&mut out, &segs);
        }
    }
    let mut paths = Vec::with_capacity(writes.len());
    for (path, value) in writes {
        set_path(&mut out, path, value);
        paths.push(path.join(".").into_boxed_str());
    }
    paths.sort();
    (out, paths)
}

/// The JSON merge patch that turns `old` into `new` (keys gone become `null`).
pub fn diff(old: &Map<String, Value>, new: &Map<String, Value>) -> Map<String, Value> {
    let mut patch = Map::new();
    for k in old.keys() {
        if !new.contains_key(k) {
            patch.insert(k.clone(), Value::Null);
        }
    }
    for (k, v) in new {
        match (old.get(k), v) {
            (Some(o), v) if o == v => {}
            (Some(Value::Object(o)), Value::Object(n)) => {
                patch.insert(k.clone(), Value::Object(diff(o, n)));
            }
            _ => {
                patch.insert(k.clone(), v.clone());
            }
        }
    }
    patch
}

/// Counts for `systemMetrics.results` of configuration `id` over the devices' records:
/// (targeted, applied).
pub fn count_statuses<'a>(id: &str, devices: impl IntoIterator<Item = &'a TwinConfigs>) -> (usize, usize) {
    let mut targeted = 0;
    let mut applied = 0;
    for d in devices {
        match d.status(id) {
            Some(ConfigStatus::Applied) => {
                targeted += 1;
                applied += 1;
            }
            Some(ConfigStatus::Targeted) => targeted += 1,
            None => {}
        }
    }
    (targeted, applied)
}

/// `POST /configurations/testQueries`: `{targetConditionError, customMetricQueryErrors}`.
pub fn test_queries(body: &Value) -> Result<Value, HubError> {
    if !body.is_object() {
        return Err(HubError::invalid(
            "the body must be {\"targetCondition\": …, \"customMetricQueries\": {…}}",
        ));
    }
    let condition = body.get("targetCondition").and_then(Value::as_str).unwrap_or("");
    let target_error = match parse_condition(condition) {
        Ok(_) => String::new(),
        Err(e) => e,
    };
    let mut errors = Map::new();
    if let Some(Value::Object(q)) = body.get("customMetricQueries") {
        for (name, text) in q.iter().take(CUSTOM_METRICS_MAX * 4) {
            let Some(text) = text.as_str() else {
                errors.insert(name.clone(), Value::from("the query must be a string"));
                continue;
            };
            if let Err(e) = parse_metric(text) {
                errors.insert(name.clone(), Value::from(e));
            }
        }
    }
    Ok(json!({ "targetConditionError": target_error, "customMetricQueryErrors": errors }))
}

#[cfg(test)]
#[path = "model_tests.rs"]
mod tests;
