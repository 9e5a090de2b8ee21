//! A device twin's state (tags, desired and reported properties with their versions) and the rules
//! for changing it: JSON merge patches where `null` removes a key, IoT Hub's key, depth and size
//! limits, strictly increasing `$version`s.
//!
//! The [`Twin`] lives inside its `Device`; rendering the full Twin JSON needs identity fields too, so
//! it is done by `hub::registry` with [`Twin::properties_json`] and [`Twin::etag_str`].

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Map, Value, json};

use crate::clock::{Millis, iso8601};
use crate::error::HubError;
use crate::limits::{TWIN_DESIRED_MAX_BYTES, TWIN_MAX_DEPTH, TWIN_REPORTED_MAX_BYTES, TWIN_TAGS_MAX_BYTES};

/// Which part of a twin a change is aimed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    /// `tags`: service only, invisible to devices.
    Tags,
    /// `properties.desired`: written by the service, read by the device.
    Desired,
    /// `properties.reported`: written by the device.
    Reported,
}

impl Section {
    fn name(self) -> &'static str {
        match self {
            Self::Tags => "tags",
            Self::Desired => "properties.desired",
            Self::Reported => "properties.reported",
        }
    }

    fn max_bytes(self) -> usize {
        match self {
            Self::Tags => TWIN_TAGS_MAX_BYTES,
            Self::Desired => TWIN_DESIRED_MAX_BYTES,
            Self::Reported => TWIN_REPORTED_MAX_BYTES,
        }
    }
}

/// A device twin.
#[derive(Debug, Default, Clone)]
pub struct Twin {
    /// Tags (service-only).
    pub tags: Map<String, Value>,
    /// Desired properties, without `$version`/`$metadata`.
    pub desired: Map<String, Value>,
    /// Reported properties, without `$version`/`$metadata`.
    pub reported: Map<String, Value>,
    /// `properties.desired.$version`, starting at 1.
    pub desired_version: u64,
    /// `properties.reported.$version`, starting at 1.
    pub reported_version: u64,
    /// The twin's `version`, bumped on every change; the twin etag is derived from it.
    pub version: u64,
    /// When desired last changed.
    pub desired_updated: Millis,
    /// When reported last changed.
    pub reported_updated: Millis,
}

impl Twin {
    /// A new twin created at `now`.
    pub fn new(now: Millis) -> Self {
        Self {
            desired_version: 1,
            reported_version: 1,
            version: 1,
            desired_updated: now,
            reported_updated: now,
            ..Default::default()
        }
    }

    /// The twin etag: base64 of the big-endian version, as IoT Hub writes it (`AAAAAAAAAAE=`).
    pub fn etag_str(&self) -> String {
        B64.encode(self.version.to_be_bytes())
    }

    /// Merges `patch` into `section` (a `null` value removes the key). Returns whether anything
    /// changed. Validation happens before any change, so a refused patch changes nothing.
    pub fn patch(&mut self, section: Section, patch: &Value, now: Millis) -> Result<bool, HubError> {
        let patch = as_object(section, patch)?;
        let target = self.section_mut(section);
        let mut merged = target.clone();
        merge(&mut merged, patch);
        validate_section(section, &merged)?;
        if merged == *target {
            return Ok(false);
        }
        *target = merged;
        self.bump(section, now);
        Ok(true)
    }

    /// Replaces `section` with `value` entirely. Returns whether anything changed.
    pub fn replace(&mut self, section: Section, value: &Value, now: Millis) -> Result<bool, HubError> {
        let mut fresh = Map::new();
        merge(&mut fresh, as_object(section, value)?);
        validate_section(section, &fresh)?;
        let target = self.section_mut(section);
        if fresh == *target {
            return Ok(false);
        }
        *target = fresh;
        self.bump(section, now);
        Ok(true)
    }

    fn section_mut(&mut self, section: Section) -> &mut Map<String, Value> {
        match section {
            Section::Tags => &mut self.tags,
            Section::Desired => &mut self.desired,
            Section::Reported => &mut self.reported,
        }
    }

    fn bump(&mut self, section: Section, now: Millis) {
        self.version += 1;
        match section {
            Section::Tags => {}
            Section::Desired => {
                self.desired_version += 1;
                self.desired_updated = now;
            }
            Section::Reported => {
                self.reported_version += 1;
                self.reported_updated = now;
            }
        }
    }

    /// `properties.desired` as sent to devices and services, with `$metadata` and `$version`.
    pub fn desired_json(&self) -> Value {
        section_json(&self.desired, self.desired_updated, self.desired_version, true)
    }

    /// `properties.reported` with `$metadata` and `$version`.
    pub fn reported_json(&self) -> Value {
        section_json(&self.reported, self.reported_updated, self.reported_version, false)
    }

    /// `{"desired": …, "reported": …}`: the `properties` object of the twin JSON, and also the
    /// body of a device's MQTT twin GET.
    pub fn properties_json(&self) -> Value {
        json!({ "desired": self.desired_json(), "reported": self.reported_json() })
    }
}

fn section_json(map: &Map<String, Value>, updated: Millis, version: u64, desired: bool) -> Value {
    let mut out = map.clone();
    let mut meta = Map::new();
    meta.insert("$lastUpdated".into(), Value::String(iso8601(updated)));
    if desired {
        meta.insert("$lastUpdatedVersion".into(), Value::from(version));
    }
    out.insert("$metadata".into(), Value::Object(meta));
    out.insert("$version".into(), Value::from(version));
    Value::Object(out)
}

fn as_object(section: Section, v: &Value) -> Result<&Map<String, Value>, HubError> {
    match v {
        Value::Object(m) => Ok(m),
        Value::Null => Err(HubError::invalid(format!("{} must be a JSON object, not null", section.name()))),
        other => Err(HubError::invalid(format!(
            "{} must be a JSON object, got {}",
            section.name(),
            json_kind(other)
        ))),
    }
}

/// What kind of JSON value `v` is, for error messages that must not echo a large body.
pub(crate) fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// JSON merge: objects merge recursively, `null` removes, anything else replaces. Read-only
/// `$`-prefixed keys in the patch (`$version`, `$metadata`) are ignored.
fn merge(target: &mut Map<String, Value>, patch: &Map<String, Value>) {
    for (k, v) in patch {
        if k.starts_with('$') {
            continue;
        }
        match v {
            Value::Null => {
                target.remove(k);
            }
            Value::Object(p) => {
                let entry = target.entry(k.clone()).or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(t) = entry {
                    merge(t, p);
                } else {
                    let mut fresh = Map::new();
                    merge(&mut fresh, p);
                    *entry = Value::Object(fresh);
                }
            }
            other => {
                target.insert(k.clone(), other.clone());
            }
        }
    }
}

/// Largest and smallest integers a twin may hold.
const TWIN_INT_MAX: i64 = 4_503_599_627_370_495;

fn validate_section(section: Section, map: &Map<String, Value>) -> Result<(), HubError> {
    let size = validate_map(section, map, 1)?;
    if size > section.max_bytes() {
        return Err(HubError::invalid(format!(
            "{} would be {size} bytes; IoT Hub allows at most {}",
            section.name(),
            section.max_bytes()
        )));
    }
    Ok(())
}

/// Validates keys and values at `depth` and returns the size IoT Hub counts (key and value
/// lengths; numbers 8 bytes, booleans 4).
fn validate_map(section: Section, map: &Map<String, Value>, depth: usize) -> Result<usize, HubError> {
    if depth > TWIN_MAX_DEPTH {
        return Err(HubError::invalid(format!(
            "{} is nested deeper than {TWIN_MAX_DEPTH} levels",
            section.name()
        )));
    }
    let mut size = 0;
    for (k, v) in map {
        validate_key(section, k)?;
        size += k.len() + validate_value(section, k, v, depth)?;
    }
    Ok(size)
}

fn validate_key(section: Section, k: &str) -> Result<(), HubError> {
    let bad = k.is_empty()
        || k.len() > 1024
        || k.chars().any(|c| c.is_control() || c == '.' || c == ' ' || c == '$');
    if bad {
        return Err(HubError::invalid(format!(
            "key '{k}' in {} is not allowed: keys are 1 to 1024 bytes with no '.', '$', space or control characters",
            section.name()
        )));
    }
    Ok(())
}

fn validate_value(section: Section, k: &str, v: &Value, depth: usize) -> Result<usize, HubError> {
    match v {
        Value::Null => Ok(0),
        Value::Bool(_) => Ok(4),
        Value::Number(n) => {
            if let Some(i) = n.as_i64()
                && !(-TWIN_INT_MAX - 1..=TWIN_INT_MAX).contains(&i)
            {
                return Err(HubError::invalid(format!(
                    "value of '{k}' in {} is outside the integer range IoT Hub allows",
                    section.name()
                )));
            }
            Ok(8)
        }
        Value::String(s) => {
            if s.len() > 4096 {
                return Err(HubError::invalid(format!(
                    "value of '{k}' in {} is {} bytes; strings are at most 4096",
                    section.name(),
                    s.len()
                )));
            }
            Ok(s.len())
        }
        Value::Array(items) => {
            let mut size = 0;
            for item in items {
                size += validate_value(section, k, item, depth + 1)?;
            }
            Ok(size)
        }
        Value::Object(m) => validate_map(section, m, depth + 1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_merges_and_bumps_versions() {
        let mut t = Twin::new(1000);
        assert_eq!(t.etag_str(), "AAAAAAAAAAE=");
        let changed = t
            .patch(Section::Desired, &json!({"fw": {"version": "1.0", "url": "x"}, "$version": 99}), 2000)
            .unwrap();
        assert!(changed);
        assert_eq!(t.desired_version, 2);
        assert_eq!(t.version, 2);
        t.patch(Section::Desired, &json!({"fw": {"url": null}}), 3000).unwrap();
        assert_eq!(t.desired, *json!({"fw": {"version": "1.0"}}).as_object().unwrap());
        assert_eq!(t.desired_version, 3);
        assert!(!t.patch(Section::Desired, &json!({"fw": {"version": "1.0"}}), 4000).unwrap());
        assert_eq!(t.desired_version, 3, "a no-op patch keeps the version");
        let d = t.desired_json();
        assert_eq!(d["$version"], 3);
        assert!(d["$metadata"]["$lastUpdated"].is_string());
    }

    #[test]
    fn tags_do_not_touch_property_versions() {
        let mut t = Twin::new(0);
        t.patch(Section::Tags, &json!({"site": "a"}), 1).unwrap();
        assert_eq!((t.desired_version, t.reported_version, t.version), (1, 1, 2));
        t.replace(Section::Tags, &json!({"other": 1}), 2).unwrap();
        assert_eq!(t.tags, *json!({"other": 1}).as_object().unwrap());
    }

    #[test]
    fn refused_patches_change_nothing() {
        let mut t = Twin::new(0);
        assert!(t.patch(Section::Reported, &json!({"a.b": 1}), 1).is_err());
        assert!(t.patch(Section::Reported, &json!({"a b": 1}), 1).is_err());
        assert!(t.patch(Section::Reported, &json!([1]), 1).is_err());
        assert!(t.patch(Section::Reported, &json!({"s": "x".repeat(4097)}), 1).is_err());
        let mut deep = json!(1);
        for _ in 0..11 {
            deep = json!({ "k": deep });
        }
        assert!(t.patch(Section::Reported, &deep, 1).is_err());
        let big: Map<String, Value> =
            (0..10).map(|i| (format!("k{i}"), Value::String("x".repeat(4000)))).collect();
        let e = t.patch(Section::Tags, &Value::Object(big), 1).unwrap_err();
        assert!(e.message.contains("at most 8192"), "{}", e.message);
        assert_eq!(t.version, 1);
        assert!(t.reported.is_empty());
    }
}
