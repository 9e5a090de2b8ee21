//! IoT Hub's MQTT topic contract (reference §4.3, §4.4): which topics a device may publish to and
//! subscribe to, how property bags are parsed and encoded, and the topics the hub publishes on.
//!
//! Pure functions over strings; nothing here knows about connections or the hub.

use percent_encoding::percent_decode_str;

use crate::c2d::Delivery;
use crate::clock::iso8601;
use crate::hub::link::subscriptions;
use crate::sas::{url_encode, url_encode_into};

/// A property bag: keys and values URL-decoded, in order; `None` is a key with no `=`.
pub type PropertyBag = Vec<(String, Option<String>)>;

/// What a device's PUBLISH topic means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceTopic {
    /// `devices/{id}/messages/events/{bag}`: telemetry.
    Telemetry(PropertyBag),
    /// `$iothub/twin/GET/?$rid={rid}`.
    TwinGet {
        /// The request id to echo.
        rid: String,
    },
    /// `$iothub/twin/PATCH/properties/reported/?$rid={rid}`.
    TwinPatchReported {
        /// The request id to echo.
        rid: String,
    },
    /// `$iothub/methods/res/{status}/?$rid={rid}`.
    MethodResponse {
        /// The status the device chose.
        status: i32,
        /// The request id of the call being answered.
        rid: String,
    },
}

/// A publish topic the device may not use (IoT Hub closes the connection).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("device '{device_id}' may not publish to '{topic}': {reason}")]
pub struct TopicError {
    /// The publishing device.
    pub device_id: String,
    /// The topic it used.
    pub topic: String,
    /// Why it is refused.
    pub reason: &'static str,
}

/// Parses a property bag `k1=v1&k2&k3=` (a leading `?` is allowed). Empty pairs are skipped.
pub fn parse_bag(bag: &str) -> PropertyBag {
    let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
    bag.trim_start_matches('?')
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => (decode(k), Some(decode(v))),
            None => (decode(kv), None),
        })
        .collect()
}

/// Encodes a property bag: URL-encoded keys and values, `key` for null, `key=` for empty.
pub fn encode_bag<'a>(pairs: impl IntoIterator<Item = (&'a str, Option<&'a str>)>) -> String {
    let mut out = String::new();
    for (k, v) in pairs {
        if !out.is_empty() {
            out.push('&');
        }
        url_encode_into(&mut out, k);
        if let Some(v) = v {
            out.push('=');
            url_encode_into(&mut out, v);
        }
    }
    out
}

fn rid_of(query: &str) -> Option<String> {
    parse_bag(query).into_iter().find(|(k, _)| k == "$rid").and_then(|(_, v)| v)
}

/// The topic base of a connection's identity: `devices/{id}` for a device, `devices/{id}/modules/{mid}`
/// for a module (client id `{id}/{mid}`).
pub fn identity_base(client_id: &str) -> String {
    match crate::hub::module::split_client_id(client_id) {
        (d, Some(m)) => format!("devices/{d}/modules/{m}"),
        (d, None) => format!("devices/{d}"),
    }
}

/// Classifies a PUBLISH topic from the connection of `device_id` (a device id, or a module's
/// client id `{deviceId}/{moduleId}`, whose telemetry goes to `devices/{id}/modules/{mid}/messages/events`).
pub fn parse_publish_topic(device_id: &str, topic: &str) -> Result<DeviceTopic, TopicError> {
    let refuse = |reason| TopicError { device_id: device_id.into(), topic: topic.into(), reason };
    if let Some(rest) = topic.strip_prefix("$iothub/") {
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        let rid = || rid_of(query).ok_or_else(|| refuse("the topic has no $rid"));
        return match path.trim_end_matches('/') {
            "twin/GET" => Ok(DeviceTopic::TwinGet { rid: rid()? }),
            "twin/PATCH/properties/reported" => Ok(DeviceTopic::TwinPatchReported { rid: rid()? }),
            p => match p.strip_prefix("methods/res/") {
                Some(status) => {
                    let status = status.parse().map_err(|_| refuse("the method status is not an integer"))?;
                    Ok(DeviceTopic::MethodResponse { status, rid: rid()? })
                }
                None => Err(refuse("not an IoT Hub device topic")),
            },
        };
    }
    let prefix = format!("{}/messages/events", identity_base(device_id));
    match topic.strip_prefix(&prefix) {
        Some("") => Ok(DeviceTopic::Telemetry(Vec::new())),
        Some(rest) if rest.starts_with('/') => Ok(DeviceTopic::Telemetry(parse_bag(&rest[1..]))),
        _ if topic.starts_with("devices/") => {
            Err(refuse("devices publish only to their own messages/events"))
        }
        _ => Err(refuse("not an IoT Hub device topic")),
    }
}

/// The subscription kind (a `hub::link::subscriptions` bit) of filter `filter` for device
/// `device_id`, or `None` when IoT Hub does not allow it. A module connection (client id
/// `{deviceId}/{moduleId}`) has the twin and method topics but no C2D (module clients have no C2D
/// API; module inputs are routed by IoT Edge, which the emulator is not).
pub fn parse_subscription(device_id: &str, filter: &str) -> Option<u8> {
    match filter {
        "$iothub/twin/res/#" => Some(subscriptions::TWIN_RESPONSES),
        "$iothub/twin/PATCH/properties/desired/#" => Some(subscriptions::DESIRED),
        "$iothub/methods/POST/#" => Some(subscriptions::METHODS),
        f if !device_id.contains('/')
            && f.strip_prefix("devices/").and_then(|r| r.strip_prefix(device_id))
                == Some("/messages/devicebound/#") =>
        {
            Some(subscriptions::C2D)
        }
        _ => None,
    }
}

/// `devices/{id}/messages/devicebound/{bag}` for a C2D delivery, with the system properties as
/// IoT Hub sends them (`%24.mid`, `%24.to`, …, `iothub-ack` always) then the application ones.
pub fn c2d_topic(device_id: &str, d: &Delivery) -> String {
    // Built in one string, once per delivery: no intermediate bag, pairs or encoded copies; the
    // keys and the fixed parts of `$.to` go in already encoded.
    let m = &d.message;
    let mut t = String::with_capacity(96 + 2 * device_id.len());
    t.push_str("devices/");
    t.push_str(device_id);
    t.push_str("/messages/devicebound/");
    let pair = |t: &mut String, encoded_key: &str, v: &str| {
        if !t.ends_with('/') {
            t.push('&');
        }
        t.push_str(encoded_key);
        t.push('=');
        url_encode_into(t, v);
    };
    for (key, v) in [
        ("%24.mid", m.message_id.as_deref()),
        ("%24.cid", m.correlation_id.as_deref()),
        ("%24.uid", m.user_id.as_deref()),
    ] {
        if let Some(v) = v {
            pair(&mut t, key, v);
        }
    }
    pair(&mut t, "%24.to", "");
    t.push_str("%2Fdevices%2F");
    url_encode_into(&mut t, device_id);
    t.push_str("%2Fmessages%2Fdevicebound");
    for (key, v) in [("%24.ct", m.content_type.as_deref()), ("%24.ce", m.content_encoding.as_deref())] {
        if let Some(v) = v {
            pair(&mut t, key, v);
        }
    }
    if let Some(exp) = m.expiry.map(iso8601) {
        pair(&mut t, "%24.exp", &exp);
    }
    // `none`, `positive`, `negative` or `full`: nothing to encode.
    t.push_str("&iothub-ack=");
    t.push_str(m.ack.as_str());
    for (k, v) in &m.properties {
        t.push('&');
        url_encode_into(&mut t, k);
        t.push('=');
        url_encode_into(&mut t, v);
    }
    t
}

/// `$iothub/twin/res/{status}/?$rid={rid}[&$version={v}]`.
pub fn twin_response_topic(status: u16, rid: &str, version: Option<u64>) -> String {
    let mut t = format!("$iothub/twin/res/{status}/?$rid={}", url_encode(rid));
    if let Some(v) = version {
        t.push_str(&format!("&$version={v}"));
    }
    t
}

/// `$iothub/twin/PATCH/properties/desired/?$version={v}`.
pub fn desired_patch_topic(version: u64) -> String {
    format!("$iothub/twin/PATCH/properties/desired/?$version={version}")
}

/// `$iothub/methods/POST/{name}/?$rid={rid}`.
pub fn method_request_topic(name: &str, rid: &str) -> String {
    format!("$iothub/methods/POST/{name}/?$rid={}", url_encode(rid))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::c2d::{AckMode, C2dMessage, LockToken};

    #[test]
    fn telemetry_topics_with_and_without_bags() {
        assert_eq!(
            parse_publish_topic("d1", "devices/d1/messages/events/"),
            Ok(DeviceTopic::Telemetry(vec![]))
        );
        assert_eq!(
            parse_publish_topic("d1", "devices/d1/messages/events"),
            Ok(DeviceTopic::Telemetry(vec![]))
        );
        let t = parse_publish_topic(
            "d1",
            "devices/d1/messages/events/%24.mid=m%201&$.ct=application%2Fjson&k&e=",
        )
        .unwrap();
        assert_eq!(
            t,
            DeviceTopic::Telemetry(vec![
                ("$.mid".into(), Some("m 1".into())),
                ("$.ct".into(), Some("application/json".into())),
                ("k".into(), None),
                ("e".into(), Some(String::new())),
            ])
        );
    }

    #[test]
    fn other_devices_and_unknown_topics_are_refused() {
        assert!(parse_publish_topic("d1", "devices/d2/messages/events/").is_err());
        assert!(parse_publish_topic("d1", "devices/d1x/messages/events/").is_err());
        assert!(parse_publish_topic("d1", "devices/d1/messages/devicebound/").is_err());
        assert!(parse_publish_topic("d1", "some/topic").is_err());
        assert!(parse_publish_topic("d1", "$iothub/twin/GET/").is_err(), "no $rid");
        assert!(parse_publish_topic("d1", "$iothub/methods/res/abc/?$rid=1").is_err());
        assert!(parse_publish_topic("d1", "$iothub/credentials/POST/x/?$rid=1").is_err());
    }

    #[test]
    fn twin_and_method_topics() {
        assert_eq!(
            parse_publish_topic("d", "$iothub/twin/GET/?$rid=42"),
            Ok(DeviceTopic::TwinGet { rid: "42".into() })
        );
        assert_eq!(
            parse_publish_topic("d", "$iothub/twin/PATCH/properties/reported/?$rid=a-b"),
            Ok(DeviceTopic::TwinPatchReported { rid: "a-b".into() })
        );
        assert_eq!(
            parse_publish_topic("d", "$iothub/methods/res/200/?$rid=7"),
            Ok(DeviceTopic::MethodResponse { status: 200, rid: "7".into() })
        );
        assert_eq!(
            parse_publish_topic("d", "$iothub/methods/res/-3/?%24rid=7"),
            Ok(DeviceTopic::MethodResponse { status: -3, rid: "7".into() })
        );
    }

    #[test]
    fn subscriptions_only_to_own_topics() {
        assert_eq!(parse_subscription("d1", "devices/d1/messages/devicebound/#"), Some(subscriptions::C2D));
        assert_eq!(parse_subscription("d1", "devices/d2/messages/devicebound/#"), None);
        assert_eq!(parse_subscription("d1", "devices/+/messages/devicebound/#"), None);
        assert_eq!(parse_subscription("d1", "#"), None);
        assert_eq!(parse_subscription("d1", "$iothub/twin/res/#"), Some(subscriptions::TWIN_RESPONSES));
        assert_eq!(
            parse_subscription("d1", "$iothub/twin/PATCH/properties/desired/#"),
            Some(subscriptions::DESIRED)
        );
        assert_eq!(parse_subscription("d1", "$iothub/methods/POST/#"), Some(subscriptions::METHODS));
        assert_eq!(parse_subscription("d1", "$iothub/#"), None);
    }

    #[test]
    fn bags_encode_null_empty_and_dollar() {
        assert_eq!(encode_bag([("a", None), ("b", Some("")), ("c", Some("a string"))]), "a&b=&c=a%20string");
        assert_eq!(encode_bag([("$.mid", Some("x/y"))]), "%24.mid=x%2Fy");
        let round = parse_bag(&encode_bag([("k&=", Some("v&=%"))]));
        assert_eq!(round, vec![("k&=".to_string(), Some("v&=%".to_string()))]);
    }

    #[test]
    fn c2d_topic_carries_system_and_app_properties() {
        let msg = C2dMessage {
            message_id: Some("m-1".into()),
            correlation_id: Some("c 1".into()),
            content_type: Some("application/json".into()),
            ack: AckMode::Full,
            properties: vec![("seq".into(), "1".into())],
            ..Default::default()
        };
        let d = Delivery {
            message: Arc::new(msg),
            sequence_number: 1,
            enqueued_at: 0,
            expires_at: 0,
            delivery_count: 0,
            lock_token: LockToken(1),
            locked_until: 0,
        };
        assert_eq!(
            c2d_topic("dev", &d),
            "devices/dev/messages/devicebound/%24.mid=m-1&%24.cid=c%201&%24.to=%2Fdevices%2Fdev%2Fmessages%2Fdevicebound\
             &%24.ct=application%2Fjson&iothub-ack=full&seq=1"
        );
        // Every system property, and characters to escape in the device id, keys and values:
        // the same topic as the property bag encoder makes.
        let msg = C2dMessage {
            message_id: Some("m/1&".into()),
            correlation_id: Some("".into()),
            user_id: Some("ü".into()),
            content_type: Some("text/plain".into()),
            content_encoding: Some("utf-8".into()),
            expiry: Some(1_700_000_000_123),
            ack: AckMode::Negative,
            properties: vec![("k=&".into(), "v%2F".into()), ("e".into(), "".into())],
            ..Default::default()
        };
        let id = "dev-#.:+%";
        let d = Delivery { message: Arc::new(msg), ..d };
        let m = &d.message;
        let to = format!("/devices/{id}/messages/devicebound");
        let exp = iso8601(1_700_000_000_123);
        let mut pairs = vec![
            ("$.mid", Some("m/1&")),
            ("$.cid", Some("")),
            ("$.uid", Some("ü")),
            ("$.to", Some(to.as_str())),
            ("$.ct", Some("text/plain")),
            ("$.ce", Some("utf-8")),
            ("$.exp", Some(exp.as_str())),
            ("iothub-ack", Some(m.ack.as_str())),
        ];
        pairs.extend(m.properties.iter().map(|(k, v)| (k.as_str(), Some(v.as_str()))));
        assert_eq!(c2d_topic(id, &d), format!("devices/{id}/messages/devicebound/{}", encode_bag(pairs)));
    }

    #[test]
    fn response_topics() {
        assert_eq!(twin_response_topic(204, "r1", Some(3)), "$iothub/twin/res/204/?$rid=r1&$version=3");
        assert_eq!(twin_response_topic(200, "r1", None), "$iothub/twin/res/200/?$rid=r1");
        assert_eq!(desired_patch_topic(5), "$iothub/twin/PATCH/properties/desired/?$version=5");
        assert_eq!(method_request_topic("reboot", "1"), "$iothub/methods/POST/reboot/?$rid=1");
    }

    #[test]
    fn module_connections_publish_on_their_own_telemetry_topic_and_have_no_c2d() {
        assert_eq!(identity_base("d1/m1"), "devices/d1/modules/m1");
        assert_eq!(identity_base("d1"), "devices/d1");
        assert_eq!(
            parse_publish_topic("d1/m1", "devices/d1/modules/m1/messages/events/a=1").unwrap(),
            DeviceTopic::Telemetry(vec![("a".into(), Some("1".into()))])
        );
        assert_eq!(
            parse_publish_topic("d1/m1", "devices/d1/modules/m1/messages/events").unwrap(),
            DeviceTopic::Telemetry(Vec::new())
        );
        assert!(parse_publish_topic("d1/m1", "devices/d1/messages/events/").is_err());
        assert!(parse_publish_topic("d1/m1", "devices/d1/modules/m2/messages/events/").is_err());
        assert!(parse_publish_topic("d1", "devices/d1/modules/m1/messages/events/").is_err());
        assert_eq!(
            parse_publish_topic("d1/m1", "$iothub/twin/GET/?$rid=3").unwrap(),
            DeviceTopic::TwinGet { rid: "3".into() }
        );
        assert_eq!(parse_subscription("d1/m1", "$iothub/methods/POST/#"), Some(subscriptions::METHODS));
        assert_eq!(parse_subscription("d1/m1", "devices/d1/m1/messages/devicebound/#"), None);
        assert_eq!(parse_subscription("d1/m1", "devices/d1/modules/m1/inputs/#"), None);
        assert_eq!(parse_subscription("d1", "devices/d1/messages/devicebound/#"), Some(subscriptions::C2D));
    }
}
