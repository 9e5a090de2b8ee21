//! IoT Hub's MQTT contract as a device sees it (reference §4): client id, username, SAS password,
//! and the topics the agent publishes and subscribes to.

use iothub_emulator::sas::{SasError, make_token};

/// The api-version the agent puts in its username (the documented MQTT example's).
pub const MQTT_API_VERSION: &str = "2021-04-12";
/// The product string in the username, like the SDKs' `DeviceClientType`.
const CLIENT_TYPE: &str = "iothub-emulator-simulated-device%2F0.1";

/// The MQTT username: `{hub}/{id}/?api-version=…&DeviceClientType=…`.
pub fn username(hub_host: &str, device_id: &str) -> String {
    format!("{hub_host}/{device_id}/?api-version={MQTT_API_VERSION}&DeviceClientType={CLIENT_TYPE}")
}

/// The MQTT password: a device SAS token for `{hub}/devices/{id}`, expiring at `expiry_secs`.
/// The same token is the device's FTP password.
pub fn password(
    hub_host: &str,
    device_id: &str,
    key_b64: &str,
    expiry_secs: u64,
) -> Result<String, SasError> {
    make_token(&format!("{hub_host}/devices/{device_id}"), key_b64, None, expiry_secs)
}

/// The C2D subscription filter.
pub fn c2d_filter(device_id: &str) -> String {
    format!("devices/{device_id}/messages/devicebound/#")
}

/// True if `topic` is a C2D delivery for `device_id` (`devices/{id}/messages/devicebound/…`;
/// older hubs wrote `deviceBound`).
pub fn is_c2d_topic(device_id: &str, topic: &str) -> bool {
    topic
        .strip_prefix("devices/")
        .and_then(|t| t.strip_prefix(device_id))
        .and_then(|t| t.strip_prefix("/messages/"))
        .is_some_and(|t| t.get(..12).is_some_and(|w| w.eq_ignore_ascii_case("devicebound/")))
}

/// The message id (`$.mid`) in a C2D delivery's topic property bag, percent-decoded; `None` when
/// the message has none.
pub fn c2d_message_id(topic: &str) -> Option<String> {
    let bag = topic.rsplit_once('/')?.1;
    bag.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        let key = percent_encoding::percent_decode_str(k).decode_utf8().ok()?;
        (key == "$.mid").then(|| percent_encoding::percent_decode_str(v).decode_utf8_lossy().into_owned())
    })
}

/// Desired-property patches (reference §4.6): how a configuration (automatic device management)
/// or a service twin update reaches the device.
pub const DESIRED_PATCH_FILTER: &str = "$iothub/twin/PATCH/properties/desired/#";

/// The desired property that announces an update: an [`crate::notice::UpdateNotice`] object,
/// written by a configuration's `properties.desired.update` (or a service twin patch).
pub const DESIRED_UPDATE_KEY: &str = "update";

/// True if `topic` is a desired-properties patch.
pub fn is_desired_patch_topic(topic: &str) -> bool {
    topic.starts_with("$iothub/twin/PATCH/properties/desired/")
}

/// The update notice (JSON) in a desired-properties patch, if it announces one: the
/// [`DESIRED_UPDATE_KEY`] member when it is an object naming a version.
pub fn update_from_desired(payload: &[u8]) -> Option<Vec<u8>> {
    let patch: serde_json::Value = serde_json::from_slice(payload).ok()?;
    let update = patch.get(DESIRED_UPDATE_KEY)?;
    update.get("version")?.as_str().filter(|v| !v.is_empty())?;
    serde_json::to_vec(update).ok()
}

/// The request id of the twin GET an agent sends on every connect, to catch up with desired
/// properties (an update announced while it was offline), as the device SDKs do.
pub const DESIRED_SYNC_RID: &str = "desired-sync";

/// The twin GET topic with request id `rid`.
pub fn twin_get_topic(rid: &str) -> String {
    format!("$iothub/twin/GET/?$rid={rid}")
}

/// True if `topic` is the hub's successful answer to the agent's [`DESIRED_SYNC_RID`] GET.
pub fn is_desired_sync_response(topic: &str) -> bool {
    topic
        .strip_prefix("$iothub/twin/res/200/?")
        .is_some_and(|bag| bag.split('&').any(|kv| kv == format!("$rid={DESIRED_SYNC_RID}")))
}

/// The update notice (JSON) in a full twin (`{"desired": {...}, "reported": {...}}`), if its
/// desired properties announce one.
pub fn update_from_twin(payload: &[u8]) -> Option<Vec<u8>> {
    let twin: serde_json::Value = serde_json::from_slice(payload).ok()?;
    update_from_desired(&serde_json::to_vec(twin.get("desired")?).ok()?)
}

/// Twin responses (the agent subscribes so the hub can answer its PATCHes).
pub const TWIN_RESPONSE_FILTER: &str = "$iothub/twin/res/#";

/// The topic for a reported-properties patch with request id `rid`.
pub fn twin_patch_topic(rid: u64) -> String {
    format!("$iothub/twin/PATCH/properties/reported/?$rid={rid}")
}

/// The telemetry topic, with the property bag that marks the body as UTF-8 JSON.
pub fn telemetry_topic(device_id: &str) -> String {
    format!("devices/{device_id}/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn username_follows_the_documented_form() {
        let u = username("hub.local", "dev-1");
        assert!(u.starts_with("hub.local/dev-1/?api-version=2021-04-12&DeviceClientType="), "{u}");
    }

    #[test]
    fn recognises_c2d_topics_of_this_device_only() {
        assert!(is_c2d_topic("d1", "devices/d1/messages/devicebound/%24.mid=1&iothub-ack=full"));
        assert!(is_c2d_topic("d1", "devices/d1/messages/deviceBound/"));
        assert!(!is_c2d_topic("d1", "devices/d12/messages/devicebound/"));
        assert!(!is_c2d_topic("d1", "$iothub/twin/res/204/?$rid=1"));
        assert!(!is_c2d_topic("d1", "devices/d1/messages/events/"));
    }

    #[test]
    fn reads_the_message_id_from_the_property_bag() {
        let t = "devices/d1/messages/devicebound/%24.mid=release%2F2.0.0&%24.to=%2Fdevices%2Fd1%2Fmessages%2Fdevicebound&iothub-ack=full";
        assert_eq!(c2d_message_id(t).as_deref(), Some("release/2.0.0"));
        assert_eq!(c2d_message_id("devices/d1/messages/devicebound/iothub-ack=none"), None);
        assert_eq!(c2d_message_id("devices/d1/messages/devicebound/"), None);
    }

    #[test]
    fn reads_an_update_notice_from_a_desired_patch() {
        assert!(is_desired_patch_topic("$iothub/twin/PATCH/properties/desired/?$version=3"));
        assert!(!is_desired_patch_topic("$iothub/twin/res/200/?$rid=1"));
        let patch =
            br#"{"update":{"version":"2.0.0","url":"ftp://h/p","sha256":"ab","size":3},"$version":3}"#;
        let notice: serde_json::Value = serde_json::from_slice(&update_from_desired(patch).unwrap()).unwrap();
        assert_eq!(notice["version"], "2.0.0");
        assert_eq!(update_from_desired(br#"{"interval":5,"$version":2}"#), None);
        assert_eq!(update_from_desired(br#"{"update":null,"$version":4}"#), None);
        assert_eq!(update_from_desired(b"not json"), None);
        assert!(is_desired_sync_response("$iothub/twin/res/200/?$rid=desired-sync"));
        assert!(!is_desired_sync_response("$iothub/twin/res/204/?$rid=desired-sync&$version=2"));
        assert!(!is_desired_sync_response("$iothub/twin/res/200/?$rid=desired-sync-2"));
        let twin = br#"{"desired":{"update":{"version":"3.0.0","url":"u","sha256":"s","size":1},"$version":4},"reported":{}}"#;
        assert!(update_from_twin(twin).is_some());
        assert_eq!(update_from_twin(br#"{"desired":{"$version":1},"reported":{}}"#), None);
    }

    #[test]
    fn password_is_a_device_token_for_the_device_resource() {
        let key = iothub_emulator::hub::DEFAULT_OWNER_KEY;
        let t = password("hub.local", "d1", key, 1_000).unwrap();
        assert!(t.starts_with("SharedAccessSignature sr=hub.local%2Fdevices%2Fd1&sig="), "{t}");
        assert!(t.ends_with("&se=1000"), "{t}");
    }
}
