//! Module identities (reference-2 §4): a device's modules with their keys, etags, generation ids,
//! connection facts and module twins; the registry operations on them
//! (`/devices/{id}/modules/{mid}`, `/twins/{id}/modules/{mid}`) and how a module and its twin are
//! rendered as IoT Hub's Module and Twin JSON.
//!
//! A [`Module`] lives inside its device's boxed extra data ([`super::DeviceExtra::modules`]), so
//! it is owned by the registry shard of its device, deleted with it, and a device without
//! modules pays nothing for them. A module's connection (MQTT client id `{deviceId}/{moduleId}`)
//! is served like a device's (see `hub::link`): the connection facts below mirror the device's.
//! With `--persist` every change to what a module keeps (identity, twin, MQTT session bits, model
//! id) is journaled as the module's record under its device's shard lock (see `hub::durable`).

use serde_json::{Map, Value, json};

use crate::error::{ErrorCode, HubError};
use crate::limits::{HUB_MAX_DEVICES, MODULES_PER_DEVICE_MAX};

use super::device::{ThumbprintPair, time_or_never};
use super::registry::{DeviceInput, IfMatch};
use super::{AuthType, Device, Hub, Twin};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use std::sync::atomic::Ordering;

/// One module identity of a device.
#[derive(Debug)]
pub struct Module {
    /// Case-sensitive module id (the same character rules as device ids).
    pub id: Box<str>,
    /// Tells apart modules deleted and re-created with the same id.
    pub generation_id: u64,
    /// Identity etag counter, rendered like a device's.
    pub etag: u64,
    /// `managedBy` as the service set it (`IotEdge` for Edge modules; the emulator just keeps it).
    pub managed_by: Option<Box<str>>,
    /// How the module authenticates (only `sas` modules can connect to the emulator).
    pub auth_type: AuthType,
    /// Base64 symmetric keys (present for `sas` modules).
    pub primary_key: Option<String>,
    /// See `primary_key`.
    pub secondary_key: Option<String>,
    /// `x509Thumbprint` (primary, secondary), stored as given.
    pub thumbprints: Option<ThumbprintPair>,
    /// The Plug and Play model id the module last announced.
    pub model_id: Option<Box<str>>,
    /// Whether a module connection is open now.
    pub connected: bool,
    /// When `connected` last changed (0 = never).
    pub connection_state_updated: crate::clock::Millis,
    /// Last time the module connected or sent (0 = never).
    pub last_activity: crate::clock::Millis,
    /// The module twin.
    pub twin: Twin,
    /// The open module connection, if any (see `hub::link`).
    pub link: Option<super::link::Link>,
    /// The module's persisted MQTT subscriptions (`hub::link::subscriptions` bits).
    pub session: u8,
    /// The module configurations that target the module twin and the desired paths they wrote
    /// (see `crate::configs`; empty unless a module configuration ever targeted it).
    pub configurations: crate::configs::model::TwinConfigs,
}

impl Module {
    /// The identity etag as IoT Hub writes it.
    pub fn etag_str(&self) -> String {
        B64.encode(self.etag.to_string())
    }

    /// Renders the Module JSON of the registry API (the azure-iot-hub `Module` model's fields).
    pub fn to_json(&self, device_id: &str) -> Value {
        let (p, s) = self.thumbprints.clone().unwrap_or_default();
        json!({
            "moduleId": &*self.id,
            "managedBy": self.managed_by.as_deref(),
            "deviceId": device_id,
            "generationId": format!("{:018}", self.generation_id),
            "etag": self.etag_str(),
            "connectionState": if self.connected { "Connected" } else { "Disconnected" },
            "connectionStateUpdatedTime": time_or_never(self.connection_state_updated),
            "lastActivityTime": time_or_never(self.last_activity),
            "cloudToDeviceMessageCount": 0,
            "authentication": {
                "symmetricKey": { "primaryKey": self.primary_key, "secondaryKey": self.secondary_key },
                "x509Thumbprint": { "primaryThumbprint": p, "secondaryThumbprint": s },
                "type": self.auth_type.as_str(),
            },
        })
    }
}

/// The module twin of `m` on device `d` with only the top-level properties in `only` (all when
/// `None`), as `GET /twins/{id}/modules/{mid}` and `FROM devices.modules` return it.
pub(super) fn module_twin_parts(d: &Device, m: &Module, only: Option<&[&str]>) -> Value {
    let mut twin = Map::new();
    let mut put = |key: &str, value: &dyn Fn() -> Value| {
        if only.is_none_or(|keys| keys.contains(&key)) {
            twin.insert(key.to_string(), value());
        }
    };
    put("deviceId", &|| Value::from(d.id.as_str()));
    put("moduleId", &|| Value::from(&*m.id));
    put("modelId", &|| Value::from(m.model_id.as_deref().unwrap_or("")));
    put("etag", &|| Value::from(m.twin.etag_str()));
    put("deviceEtag", &|| Value::from(m.etag_str()));
    put("status", &|| Value::from(d.status.as_str()));
    put("statusUpdateTime", &|| Value::from(time_or_never(d.status_updated)));
    put("connectionState", &|| Value::from(if m.connected { "Connected" } else { "Disconnected" }));
    put("lastActivityTime", &|| Value::from(time_or_never(m.last_activity)));
    put("cloudToDeviceMessageCount", &|| Value::from(0));
    put("authenticationType", &|| Value::from(m.auth_type.as_str()));
    put("x509Thumbprint", &|| {
        let (p, s) = m.thumbprints.clone().unwrap_or_default();
        json!({ "primaryThumbprint": p, "secondaryThumbprint": s })
    });
    put("version", &|| Value::from(m.twin.version));
    put("tags", &|| Value::Object(m.twin.tags.clone()));
    put("properties", &|| m.twin.properties_json());
    if !m.configurations.statuses.is_empty() && only.is_none_or(|keys| keys.contains(&"configurations")) {
        twin.insert("configurations".into(), m.configurations.to_json());
    }
    Value::Object(twin)
}

/// Checks a module id: the device id rules (1 to 128 ASCII letters, digits and
/// `- . + % _ # * ? ! ( ) , = @ $ ' :`).
pub fn validate_module_id(id: &str) -> Result<(), HubError> {
    super::validate_device_id(id)
        .map_err(|e| HubError::new(e.code, e.message.replacen("DeviceId", "ModuleId", 1)))
}

/// Splits a connection's client identity, `{deviceId}` or `{deviceId}/{moduleId}` (neither id may
/// contain `/`), into its device and module ids.
pub fn split_client_id(client_id: &str) -> (&str, Option<&str>) {
    match client_id.split_once('/') {
        Some((d, m)) => (d, Some(m)),
        None => (client_id, None),
    }
}

/// The writable parts of a Module JSON body (`PUT /devices/{id}/modules/{mid}`).
#[derive(Debug, Clone, Default)]
pub struct ModuleInput {
    /// `moduleId` in the body, if given (must equal the id in the path).
    pub module_id: Option<String>,
    /// `managedBy`.
    pub managed_by: Option<String>,
    /// The device-like parts: `deviceId` and `authentication`.
    pub identity: DeviceInput,
}

impl ModuleInput {
    /// Reads a Module JSON object.
    pub fn from_json(v: &Value) -> Result<Self, HubError> {
        let identity = DeviceInput::from_json(v)?;
        let text = |key: &str| -> Result<Option<String>, HubError> {
            match v.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(HubError::new(
                    ErrorCode::IotHubFormatError,
                    format!("'{key}' must be a string, got {}", super::twin::json_kind(other)),
                )),
            }
        };
        Ok(Self { module_id: text("moduleId")?, managed_by: text("managedBy")?, identity })
    }
}

impl Hub {
    /// Device and module identities registered, against IoT Hub's per-hub cap.
    pub(super) fn identity_count(&self) -> usize {
        self.shared.device_count.load(Ordering::Relaxed) + self.shared.module_count.load(Ordering::Relaxed)
    }

    /// `PUT /devices/{id}/modules/{mid}`: creates the module (no `If-Match`), or updates it
    /// (`If-Match` `*` or its etag; `moduleId` and `generationId` stay). Keys are generated when
    /// absent, as for devices. Returns the Module JSON and whether it was created.
    pub fn put_module(
        &self,
        device_id: &str,
        module_id: &str,
        input: ModuleInput,
        if_match: Option<IfMatch>,
    ) -> Result<(Value, bool), HubError> {
        validate_module_id(module_id)?;
        if let Some(body) = &input.module_id
            && body != module_id
        {
            return Err(HubError::invalid(format!(
                "moduleId '{body}' in the body does not match '{module_id}' in the path"
            )));
        }
        if let Some(body) = &input.identity.device_id
            && body != device_id
        {
            return Err(HubError::invalid(format!(
                "deviceId '{body}' in the body does not match '{device_id}' in the path"
            )));
        }
        let auth_type = input.identity.auth_type();
        let (pk, sk) = input.identity.resolved_keys(auth_type)?;
        let thumbprints = input.identity.resolved_thumbprints(auth_type)?;
        let now = self.now();
        let full = self.identity_count() >= HUB_MAX_DEVICES;
        let (generation_id, etag) = (self.next_counter(), self.next_counter());
        let result = self.with_device(device_id, |d| {
            let index = d.modules().binary_search_by(|m| (*m.id).cmp(module_id));
            match (index, if_match) {
                (Ok(_), None) => Err(HubError::new(
                    ErrorCode::ModuleAlreadyExistsOnDevice,
                    format!("A module with ID '{module_id}' already exists on device '{device_id}'"),
                )),
                (Err(_), Some(_)) => Err(HubError::module_not_found(device_id, module_id)),
                (Ok(i), Some(cond)) => {
                    let extra = d.extra.as_deref_mut().expect("a device with modules has extra data");
                    let m = &mut extra.modules[i];
                    cond.check(&m.etag_str())?;
                    m.managed_by = input.managed_by.map(String::into_boxed_str);
                    m.auth_type = auth_type;
                    m.primary_key = pk;
                    m.secondary_key = sk;
                    m.thumbprints = thumbprints;
                    m.etag = etag;
                    let json = m.to_json(device_id);
                    self.record_module(d, module_id);
                    Ok((json, false))
                }
                (Err(i), None) => {
                    if d.modules().len() >= MODULES_PER_DEVICE_MAX {
                        return Err(HubError::new(
                            ErrorCode::TooManyModulesOnDevice,
                            format!(
                                "device '{device_id}' has {MODULES_PER_DEVICE_MAX} modules, IoT Hub's maximum"
                            ),
                        ));
                    }
                    if full {
                        return Err(HubError::new(
                            ErrorCode::IotHubQuotaExceeded,
                            format!("the hub holds {HUB_MAX_DEVICES} device and module identities, IoT Hub's maximum"),
                        ));
                    }
                    let m = Module {
                        id: module_id.into(),
                        generation_id,
                        etag,
                        managed_by: input.managed_by.map(String::into_boxed_str),
                        auth_type,
                        primary_key: pk,
                        secondary_key: sk,
                        thumbprints,
                        model_id: None,
                        connected: false,
                        connection_state_updated: 0,
                        last_activity: 0,
                        twin: Twin::new(now),
                        link: None,
                        session: 0,
                        configurations: Default::default(),
                    };
                    let json = m.to_json(device_id);
                    d.update_extra(|e| e.modules.insert(i, m));
                    self.record_module(d, module_id);
                    Ok((json, true))
                }
            }
        });
        if matches!(result, Ok((_, true))) {
            self.shared.module_count.fetch_add(1, Ordering::Relaxed);
        }
        if result.is_ok() {
            self.config_touch(device_id);
        }
        result
    }

    /// `GET /devices/{id}/modules/{mid}`.
    pub fn get_module(&self, device_id: &str, module_id: &str) -> Result<Value, HubError> {
        self.with_device(device_id, |d| {
            d.module(module_id)
                .map(|m| m.to_json(device_id))
                .ok_or_else(|| HubError::module_not_found(device_id, module_id))
        })
    }

    /// `GET /devices/{id}/modules`: every module of the device, ordered by id.
    pub fn list_modules(&self, device_id: &str) -> Result<Vec<Value>, HubError> {
        self.with_device(device_id, |d| Ok(d.modules().iter().map(|m| m.to_json(device_id)).collect()))
    }

    /// `DELETE /devices/{id}/modules/{mid}`: without `If-Match`, or with `*`, unconditional. An
    /// open module connection is closed.
    pub fn delete_module(
        &self,
        device_id: &str,
        module_id: &str,
        if_match: Option<IfMatch>,
    ) -> Result<(), HubError> {
        self.with_device(device_id, |d| {
            let m = d.module(module_id).ok_or_else(|| HubError::module_not_found(device_id, module_id))?;
            if let Some(cond) = if_match {
                cond.check(&m.etag_str())?;
            }
            self.record_module_removed(d, m);
            d.update_extra(|e| e.modules.retain(|m| &*m.id != module_id));
            Ok(())
        })?;
        self.shared.module_count.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }

    /// `GET /twins/{id}/modules/{mid}`.
    pub fn get_module_twin(&self, device_id: &str, module_id: &str) -> Result<Value, HubError> {
        self.with_device(device_id, |d| {
            let m = d.module(module_id).ok_or_else(|| HubError::module_not_found(device_id, module_id))?;
            Ok(module_twin_parts(d, m, None))
        })
    }

    /// `PATCH /twins/{id}/modules/{mid}` (merge) or `PUT` (`replace`): tags and desired properties,
    /// with the device twin's rules; a desired change reaches the module's connection.
    pub fn update_module_twin(
        &self,
        device_id: &str,
        module_id: &str,
        body: &Value,
        if_match: Option<IfMatch>,
        replace: bool,
    ) -> Result<Value, HubError> {
        let (tags, desired) = super::registry::twin_update_parts(body)?;
        let now = self.now();
        let (twin, notice) = self.with_device(device_id, |d| {
            let m =
                d.module_mut(module_id).ok_or_else(|| HubError::module_not_found(device_id, module_id))?;
            if let Some(cond) = &if_match {
                cond.check(&m.twin.etag_str())?;
            }
            let notice = super::registry::apply_twin_update(&mut m.twin, tags, desired, replace, now)?;
            self.record_module(d, module_id);
            let m = d.module(module_id).expect("just updated");
            Ok((module_twin_parts(d, m, None), notice))
        })?;
        if let Some(patch) = notice {
            self.notify_desired(&format!("{device_id}/{module_id}"), patch);
        }
        self.config_touch(device_id);
        Ok(twin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::HubConfig;

    fn hub() -> Hub {
        let hub = Hub::new(HubConfig::default());
        hub.put_device("d1", DeviceInput::default(), None).unwrap();
        hub
    }

    #[test]
    fn module_crud_keys_etags_and_errors() {
        let hub = hub();
        let (m, created) = hub.put_module("d1", "m1", ModuleInput::default(), None).unwrap();
        assert!(created);
        assert_eq!(m["moduleId"], "m1");
        assert_eq!(m["deviceId"], "d1");
        assert_eq!(m["managedBy"], Value::Null);
        assert_eq!(m["connectionState"], "Disconnected");
        assert_eq!(m["authentication"]["type"], "sas");
        let key = m["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap();
        assert!(crate::sas::decode_key(key).is_ok(), "a key is generated: {key}");
        assert_eq!(m["generationId"].as_str().unwrap().len(), 18);
        let e = hub.put_module("d1", "m1", ModuleInput::default(), None).unwrap_err();
        assert_eq!(e.code, ErrorCode::ModuleAlreadyExistsOnDevice);
        assert_eq!(e.code.number(), 409301);
        let e = hub.put_module("d1", "nope", ModuleInput::default(), Some(IfMatch::Any)).unwrap_err();
        assert_eq!(e.code, ErrorCode::ModuleNotFound);
        let e = hub.put_module("d2", "m1", ModuleInput::default(), None).unwrap_err();
        assert_eq!(e.code, ErrorCode::DeviceNotFound);
        assert!(hub.put_module("d1", "bad/id", ModuleInput::default(), None).is_err());

        let stale = IfMatch::Etag("nope".into());
        let input = ModuleInput { managed_by: Some("me".into()), ..Default::default() };
        let e = hub.put_module("d1", "m1", input.clone(), Some(stale)).unwrap_err();
        assert_eq!(e.code, ErrorCode::PreconditionFailed);
        let etag = IfMatch::Etag(m["etag"].as_str().unwrap().into());
        let (u, created) = hub.put_module("d1", "m1", input, Some(etag)).unwrap();
        assert!(!created);
        assert_eq!(u["managedBy"], "me");
        assert_eq!(u["generationId"], m["generationId"], "an update keeps the generation id");
        assert_ne!(u["etag"], m["etag"]);

        hub.put_module("d1", "a0", ModuleInput::default(), None).unwrap();
        let ids: Vec<_> = hub.list_modules("d1").unwrap().iter().map(|m| m["moduleId"].clone()).collect();
        assert_eq!(ids, [json!("a0"), json!("m1")]);
        hub.delete_module("d1", "a0", None).unwrap();
        assert_eq!(hub.get_module("d1", "a0").unwrap_err().code, ErrorCode::ModuleNotFound);
        assert_eq!(hub.identity_count(), 2);
        hub.delete_device("d1", None).unwrap();
        assert_eq!(hub.identity_count(), 0, "deleting a device deletes its modules");
        hub.put_device("d1", DeviceInput::default(), None).unwrap();
        assert!(hub.list_modules("d1").unwrap().is_empty());
    }

    #[test]
    fn a_device_holds_at_most_fifty_modules_and_loses_the_box_without_them() {
        let hub = hub();
        for i in 0..MODULES_PER_DEVICE_MAX {
            hub.put_module("d1", &format!("m{i:02}"), ModuleInput::default(), None).unwrap();
        }
        let e = hub.put_module("d1", "one-more", ModuleInput::default(), None).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooManyModulesOnDevice);
        assert_eq!(e.code.number(), 413003);
        for i in 0..MODULES_PER_DEVICE_MAX {
            hub.delete_module("d1", &format!("m{i:02}"), None).unwrap();
        }
        assert!(hub.with_device("d1", |d| Ok(d.extra.is_none())).unwrap());
    }

    #[test]
    fn module_twins_patch_and_replace_like_device_twins() {
        let hub = hub();
        hub.put_module("d1", "m1", ModuleInput::default(), None).unwrap();
        let t = hub.get_module_twin("d1", "m1").unwrap();
        assert_eq!((t["deviceId"].clone(), t["moduleId"].clone()), (json!("d1"), json!("m1")));
        assert_eq!(t["properties"]["desired"]["$version"], 1);
        let patch = json!({"tags": {"a": 1}, "properties": {"desired": {"x": 1}}});
        let t = hub.update_module_twin("d1", "m1", &patch, None, false).unwrap();
        assert_eq!(t["tags"]["a"], 1);
        assert_eq!(t["properties"]["desired"]["x"], 1);
        assert_eq!(t["properties"]["desired"]["$version"], 2);
        let stale = Some(IfMatch::Etag("AAAAAAAAAAE=".into()));
        assert_eq!(
            hub.update_module_twin("d1", "m1", &patch, stale, false).unwrap_err().code,
            ErrorCode::PreconditionFailed
        );
        let t = hub
            .update_module_twin("d1", "m1", &json!({"properties": {"desired": {"y": 2}}}), None, true)
            .unwrap();
        assert_eq!(t["properties"]["desired"].get("x"), None);
        assert_eq!(t["tags"], json!({}));
        hub.patch_reported("d1/m1", &json!({"r": true})).unwrap();
        assert_eq!(hub.get_module_twin("d1", "m1").unwrap()["properties"]["reported"]["r"], true);
        assert_eq!(
            hub.get_twin("d1").unwrap()["properties"]["reported"].get("r"),
            None,
            "the device twin is apart"
        );
    }

    #[test]
    fn queries_over_devices_modules_page_through_module_twins() {
        let hub = hub();
        for d in ["d2", "d3"] {
            hub.put_device(d, DeviceInput::default(), None).unwrap();
        }
        for (d, m) in [("d1", "a"), ("d1", "b"), ("d2", "a"), ("d3", "c"), ("d3", "d")] {
            hub.put_module(d, m, ModuleInput::default(), None).unwrap();
        }
        hub.patch_reported("d3/c", &json!({"state": "on"})).unwrap();
        let page = hub
            .query("SELECT * FROM devices.modules WHERE properties.reported.state = 'on'", None, None)
            .unwrap();
        assert_eq!(page.items.len(), 1);
        assert_eq!(
            (page.items[0]["deviceId"].clone(), page.items[0]["moduleId"].clone()),
            (json!("d3"), json!("c"))
        );
        assert_eq!(page.item_type, "Twin");
        let count = hub.query("SELECT COUNT() AS n FROM devices.modules", None, None).unwrap();
        assert_eq!(count.items, [json!({"n": 5})]);
        let mut seen = Vec::new();
        let mut cont = None;
        loop {
            let page = hub
                .query("SELECT deviceId, moduleId FROM devices.modules", cont.as_deref(), Some(2))
                .unwrap();
            assert!(page.items.len() <= 2);
            seen.extend(
                page.items.iter().map(|i| {
                    format!("{}/{}", i["deviceId"].as_str().unwrap(), i["moduleId"].as_str().unwrap())
                }),
            );
            match page.continuation {
                Some(c) => cont = Some(c),
                None => break,
            }
        }
        seen.sort();
        assert_eq!(seen, ["d1/a", "d1/b", "d2/a", "d3/c", "d3/d"], "every module once across pages");
        let devices = hub.query("SELECT COUNT() AS n FROM devices", None, None).unwrap();
        assert_eq!(devices.items, [json!({"n": 3})], "FROM devices still counts devices");
    }

    #[test]
    fn module_tokens_name_the_module_and_verify_with_its_key_only() {
        use crate::hub::Principal;
        use crate::sas::make_token;
        let hub = hub();
        let (m, _) = hub.put_module("d1", "m1", ModuleInput::default(), None).unwrap();
        hub.put_module("d1", "m2", ModuleInput::default(), None).unwrap();
        let mkey = m["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap();
        let skey = m["authentication"]["symmetricKey"]["secondaryKey"].as_str().unwrap();
        let dkey = hub.device_primary_key("d1").unwrap().unwrap();
        let exp = hub.wall_now() / 1000 + 600;
        let token = |sr: &str, key: &str, skn: Option<&str>| make_token(sr, key, skn, exp).unwrap();
        let sr = "localhost/devices/d1/modules/m1";

        for key in [mkey, skey] {
            let auth = hub.authenticate(&token(sr, key, None)).unwrap();
            assert_eq!(auth.principal, Principal::Module { device_id: "d1".into(), module_id: "m1".into() });
        }
        let auth = hub.authenticate_client(&token(sr, mkey, None), "d1/m1").unwrap();
        assert_eq!(auth.resource, sr);
        let refused = |t: String, client: &str| hub.authenticate_client(&t, client).unwrap_err().code;
        assert_eq!(
            refused(token(sr, &dkey, None), "d1/m1"),
            ErrorCode::IotHubUnauthorizedAccess,
            "device key"
        );
        assert_eq!(refused(token(sr, mkey, None), "d1/m2"), ErrorCode::IotHubUnauthorized, "other module");
        assert_eq!(
            refused(token(sr, mkey, None), "d1"),
            ErrorCode::IotHubUnauthorized,
            "module acting as its device"
        );
        assert_eq!(
            refused(token("localhost/devices/d1", &dkey, None), "d1/m1"),
            ErrorCode::IotHubUnauthorized,
            "a device token does not cover its modules"
        );
        assert_eq!(
            refused(token("localhost/devices/d1/modules/nope", mkey, None), "d1/nope"),
            ErrorCode::IotHubUnauthorizedAccess
        );
        let device_policy = hub.policies().iter().find(|p| p.name == "device").unwrap().primary_key.clone();
        hub.authenticate_client(&token(sr, &device_policy, Some("device")), "d1/m1").unwrap();
        hub.authenticate_client(&token("localhost", &device_policy, Some("device")), "d1/m2").unwrap();
        assert_eq!(
            refused(token("localhost", &device_policy, Some("device")), "d1/nope"),
            ErrorCode::IotHubUnauthorizedAccess,
            "a policy cannot connect a module that does not exist"
        );
        let service = hub.policies().iter().find(|p| p.name == "service").unwrap().primary_key.clone();
        assert_eq!(refused(token(sr, &service, Some("service")), "d1/m1"), ErrorCode::IotHubUnauthorized);
    }

    #[test]
    fn client_ids_split_at_the_slash() {
        assert_eq!(split_client_id("d1"), ("d1", None));
        assert_eq!(split_client_id("d1/m1"), ("d1", Some("m1")));
    }
}
