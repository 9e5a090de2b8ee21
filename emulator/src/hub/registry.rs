//! The identity registry and twins: create, read, update and delete devices, list and query them,
//! bulk operations, statistics, and twin reads and writes (reference §2.2–2.8).
//!
//! Every function here works on the sharded device map owned by [`Hub`]; C2D feedback produced by
//! lazy expiry while reading (for `cloudToDeviceMessageCount`) is handed to the feedback hub after
//! the shard lock is released.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde_json::{Map, Value, json};

use crate::c2d::{DeviceQueue, Outcome};
use crate::error::{ErrorCode, HubError};
use crate::limits::{
    BULK_MAX_DEVICES, HUB_MAX_DEVICES, QUERY_PAGE_DEFAULT, QUERY_PAGE_MAX, REGISTRY_LIST_MAX,
};
use crate::query::Query;
use crate::sas;

use super::device::time_or_never;
use super::durable::Kept;
use super::{AuthType, Device, Hub, SHARD_COUNT, Section, Shard, Status, Twin};
use std::sync::atomic::Ordering;

/// The writable parts of a Device JSON body (`PUT /devices/{id}`).
#[derive(Debug, Clone, Default)]
pub struct DeviceInput {
    /// `deviceId` in the body, if given (must equal the id in the path).
    pub device_id: Option<String>,
    /// `status`; enabled when absent.
    pub status: Option<Status>,
    /// `statusReason`.
    pub status_reason: Option<String>,
    /// `authentication.type`; `sas` when absent.
    pub auth_type: Option<AuthType>,
    /// `authentication.symmetricKey.primaryKey`; generated when empty.
    pub primary_key: Option<String>,
    /// `authentication.symmetricKey.secondaryKey`; generated when empty.
    pub secondary_key: Option<String>,
    /// `authentication.x509Thumbprint`.
    pub thumbprints: Option<(Option<String>, Option<String>)>,
    /// `capabilities.iotEdge`.
    pub iot_edge: bool,
}

fn opt_str(v: &Value, key: &str) -> Result<Option<String>, HubError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => {
            Err(HubError::new(ErrorCode::IotHubFormatError, format!("'{key}' must be a string, got {other}")))
        }
    }
}

impl DeviceInput {
    /// Reads a Device (or ExportImportDevice, which says `id`) JSON object.
    pub fn from_json(v: &Value) -> Result<Self, HubError> {
        if !v.is_object() {
            return Err(HubError::new(ErrorCode::IotHubFormatError, "the body must be a JSON object"));
        }
        let auth = v.get("authentication").cloned().unwrap_or(Value::Null);
        let keys = auth.get("symmetricKey").cloned().unwrap_or(Value::Null);
        let thumbs = auth.get("x509Thumbprint").cloned().unwrap_or(Value::Null);
        let thumbprints =
            match (opt_str(&thumbs, "primaryThumbprint")?, opt_str(&thumbs, "secondaryThumbprint")?) {
                (None, None) => None,
                pair => Some(pair),
            };
        Ok(Self {
            device_id: opt_str(v, "deviceId")?.or(opt_str(v, "id")?),
            status: opt_str(v, "status")?.map(|s| Status::parse(&s)).transpose()?,
            status_reason: opt_str(v, "statusReason")?,
            auth_type: opt_str(&auth, "type")?.map(|s| AuthType::parse(&s)).transpose()?,
            primary_key: opt_str(&keys, "primaryKey")?,
            secondary_key: opt_str(&keys, "secondaryKey")?,
            thumbprints,
            iot_edge: v.pointer("/capabilities/iotEdge").and_then(Value::as_bool).unwrap_or(false),
        })
    }

    /// `authentication.type`: as given; `selfSigned` when absent but a thumbprint is given (what
    /// Node's registry client sends); `sas` otherwise.
    pub(super) fn auth_type(&self) -> AuthType {
        match (self.auth_type, &self.thumbprints) {
            (Some(t), _) => t,
            (None, Some(_)) => AuthType::SelfSigned,
            (None, None) => AuthType::Sas,
        }
    }

    /// The thumbprints to store for `auth` (as given): a `selfSigned` device needs a primary
    /// thumbprint, each SHA-1 (40 hex digits) or SHA-256 (64), both of one length (reference-2
    /// §3.1); other types keep none.
    pub(super) fn resolved_thumbprints(
        &self,
        auth: AuthType,
    ) -> Result<Option<super::device::ThumbprintPair>, HubError> {
        if auth != AuthType::SelfSigned {
            return Ok(None);
        }
        let Some((primary, secondary)) = &self.thumbprints else {
            return Err(HubError::invalid(
                "a selfSigned device needs authentication.x509Thumbprint.primaryThumbprint",
            ));
        };
        let Some(p) = primary else {
            return Err(HubError::invalid(
                "a selfSigned device needs authentication.x509Thumbprint.primaryThumbprint",
            ));
        };
        let p_len = crate::x509::normalize_thumbprint(p).map_err(HubError::invalid)?.len();
        if let Some(s) = secondary {
            let s_len = crate::x509::normalize_thumbprint(s).map_err(HubError::invalid)?.len();
            if s_len != p_len {
                return Err(HubError::invalid(
                    "primaryThumbprint and secondaryThumbprint must both be SHA-1 or both SHA-256",
                ));
            }
        }
        Ok(Some((primary.clone(), secondary.clone())))
    }

    pub(super) fn resolved_keys(&self, auth: AuthType) -> Result<(Option<String>, Option<String>), HubError> {
        if auth != AuthType::Sas {
            return Ok((None, None));
        }
        let check = |k: &Option<String>, which: &str| -> Result<String, HubError> {
            match k {
                None => Ok(sas::generate_key()),
                Some(k) => sas::decode_key(k).map(|_| k.clone()).map_err(|e| {
                    HubError::invalid(format!(
                        "authentication.symmetricKey.{which} is not valid: {e} (keys are base64 of 16 to 64 bytes)"
                    ))
                }),
            }
        };
        Ok((Some(check(&self.primary_key, "primaryKey")?), Some(check(&self.secondary_key, "secondaryKey")?)))
    }
}

/// An `If-Match` precondition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfMatch {
    /// `*`: whatever the current etag.
    Any,
    /// A specific etag, quotes and `W/` stripped.
    Etag(String),
}

impl IfMatch {
    /// Parses an `If-Match` header value; `None` for an empty one.
    pub fn parse(header: &str) -> Option<Self> {
        let v = header.trim();
        let v = v.strip_prefix("W/").unwrap_or(v).trim_matches('"').trim();
        match v {
            "" => None,
            "*" => Some(Self::Any),
            etag => Some(Self::Etag(etag.to_string())),
        }
    }

    pub(crate) fn check(&self, current: &str) -> Result<(), HubError> {
        match self {
            Self::Any => Ok(()),
            Self::Etag(e) if e == current => Ok(()),
            Self::Etag(e) => Err(HubError::new(
                ErrorCode::PreconditionFailed,
                format!("etag '{e}' does not match the current etag '{current}'"),
            )),
        }
    }
}

/// One page of query results.
#[derive(Debug, Clone)]
pub struct QueryPage {
    /// The items (twins, projections or a count row).
    pub items: Vec<Value>,
    /// `x-ms-continuation` for the next page, while more remain.
    pub continuation: Option<String>,
    /// `x-ms-item-type`.
    pub item_type: &'static str,
}

/// Registry totals for `GET /statistics/devices`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RegistryStats {
    /// All devices.
    pub total: usize,
    /// Enabled devices.
    pub enabled: usize,
    /// Disabled devices.
    pub disabled: usize,
    /// Devices with an open connection.
    pub connected: usize,
}

/// The outcome of a bulk `POST /devices`.
#[derive(Debug, Clone)]
pub struct BulkResult {
    /// Whether every operation succeeded.
    pub is_successful: bool,
    /// One entry per failed operation.
    pub errors: Vec<Value>,
}

impl BulkResult {
    /// IoT Hub's `BulkRegistryOperationResult` JSON.
    pub fn to_json(&self) -> Value {
        json!({ "isSuccessful": self.is_successful, "errors": self.errors, "warnings": [] })
    }
}

/// Full Twin JSON for `device` (reference §2.8).
fn twin_json(d: &Device, c2d_count: usize) -> Value {
    twin_parts(d, c2d_count, None)
}

/// The Twin JSON of `device` with only the top-level properties in `only` (all when `None`):
/// queries build just what their `WHERE` reads, which keeps scans over a million twins cheap.
pub(super) fn twin_parts(d: &Device, c2d_count: usize, only: Option<&[&str]>) -> Value {
    let mut twin = Map::new();
    let mut put = |key: &str, value: &dyn Fn() -> Value| {
        if only.is_none_or(|keys| keys.contains(&key)) {
            twin.insert(key.to_string(), value());
        }
    };
    put("deviceId", &|| Value::from(d.id.as_str()));
    put("modelId", &|| Value::from(d.model_id().unwrap_or("")));
    put("etag", &|| Value::from(d.twin.etag_str()));
    put("deviceEtag", &|| Value::from(d.etag_str()));
    put("status", &|| Value::from(d.status.as_str()));
    put("statusReason", &|| json!(d.status_reason));
    put("statusUpdateTime", &|| Value::from(time_or_never(d.status_updated)));
    put("connectionState", &|| Value::from(if d.connected { "Connected" } else { "Disconnected" }));
    put("lastActivityTime", &|| Value::from(time_or_never(d.last_activity)));
    put("cloudToDeviceMessageCount", &|| Value::from(c2d_count));
    put("authenticationType", &|| Value::from(d.auth_type.as_str()));
    put("x509Thumbprint", &|| {
        let (p, s) = d.thumbprints();
        json!({ "primaryThumbprint": p, "secondaryThumbprint": s })
    });
    put("capabilities", &|| json!({ "iotEdge": d.iot_edge }));
    put("version", &|| Value::from(d.twin.version));
    put("tags", &|| Value::Object(d.twin.tags.clone()));
    put("properties", &|| d.twin.properties_json());
    if let Some(e) = d.extra.as_deref().filter(|e| !e.configurations.statuses.is_empty())
        && only.is_none_or(|keys| keys.contains(&"configurations"))
    {
        twin.insert("configurations".into(), e.configurations.to_json());
    }
    Value::Object(twin)
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Continuation {
    /// Shard to resume in.
    s: usize,
    /// Last device id returned from that shard.
    k: Option<String>,
    /// Results still allowed by `TOP`, if any.
    r: Option<usize>,
}

impl Hub {
    /// Lazily expires `d`'s queue and returns its pending count, collecting feedback into `out`.
    fn pending_c2d(&self, d: &mut Device, now: u64, out: &mut Vec<(String, u64, Outcome)>) -> usize {
        self.c2d_visit(d, out, |q, t| q.pending(now, &self.config().c2d, t))
    }

    /// `PUT /devices/{id}`: creates the device (no `If-Match`), or updates it (`If-Match` `*` or
    /// its etag). Returns the Device JSON and whether it was created.
    pub fn put_device(
        &self,
        id: &str,
        input: DeviceInput,
        if_match: Option<IfMatch>,
    ) -> Result<(Value, bool), HubError> {
        super::validate_device_id(id)?;
        if let Some(body_id) = &input.device_id
            && body_id != id
        {
            return Err(HubError::invalid(format!(
                "deviceId '{body_id}' in the body does not match '{id}' in the path"
            )));
        }
        let auth_type = input.auth_type();
        let now = self.now();
        let mut fb = Vec::new();
        let result = {
            let mut shard = self.shard_for(id);
            match (shard.devices.get_mut(id), if_match) {
                (Some(_), None) => Err(HubError::new(
                    ErrorCode::DeviceAlreadyExists,
                    format!("A device with ID '{id}' is already registered"),
                )),
                (None, Some(_)) => Err(HubError::device_not_found(id)),
                (Some(d), Some(cond)) => {
                    cond.check(&d.etag_str())?;
                    let (pk, sk) = input.resolved_keys(auth_type)?;
                    let thumbprints = input.resolved_thumbprints(auth_type)?;
                    let status = input.status.unwrap_or(Status::Enabled);
                    if status != d.status {
                        d.status = status;
                        d.status_updated = now;
                        // A disabled device loses its open connection (dropping the link kicks it).
                        if status == Status::Disabled {
                            if d.link.take().is_some() {
                                self.set_connected(d, false, now);
                            }
                            // Its modules' connections close too.
                            for m in d.extra.as_deref_mut().map_or(&mut [][..], |e| &mut e.modules[..]) {
                                if m.link.take().is_some() {
                                    m.connected = false;
                                    m.connection_state_updated = now;
                                }
                            }
                        }
                    }
                    d.status_reason = input.status_reason;
                    d.auth_type = auth_type;
                    d.primary_key = pk;
                    d.secondary_key = sk;
                    d.update_extra(|e| e.thumbprints = thumbprints);
                    d.iot_edge = input.iot_edge;
                    d.etag = self.next_counter();
                    self.record(&super::durable::device_record(d));
                    let n = self.pending_c2d(d, now, &mut fb);
                    Ok((d.to_json(n), false))
                }
                (None, None) => {
                    if self.identity_count() >= HUB_MAX_DEVICES {
                        return Err(HubError::new(
                            ErrorCode::IotHubQuotaExceeded,
                            format!("the hub holds {HUB_MAX_DEVICES} devices, IoT Hub's maximum"),
                        ));
                    }
                    let d = self.new_device(id, input, auth_type, now)?;
                    let json = d.to_json(0);
                    self.record(&super::durable::device_record(&d));
                    self.record_twin(&d);
                    shard.devices.insert(id.to_string(), d);
                    self.shared.device_count.fetch_add(1, Ordering::Relaxed);
                    Ok((json, true))
                }
            }
        };
        self.emit_feedback(fb);
        if result.is_ok() {
            self.config_touch(id);
        }
        result
    }

    fn new_device(
        &self,
        id: &str,
        input: DeviceInput,
        auth_type: AuthType,
        now: u64,
    ) -> Result<Device, HubError> {
        let (pk, sk) = input.resolved_keys(auth_type)?;
        let thumbprints = input.resolved_thumbprints(auth_type)?;
        let status = input.status.unwrap_or(Status::Enabled);
        let extra =
            thumbprints.map(|t| Box::new(super::DeviceExtra { thumbprints: Some(t), ..Default::default() }));
        Ok(Device {
            id: id.to_string(),
            generation_id: self.next_counter(),
            etag: self.next_counter(),
            status,
            status_reason: input.status_reason,
            status_updated: 0,
            auth_type,
            primary_key: pk,
            secondary_key: sk,
            extra,
            iot_edge: input.iot_edge,
            connected: false,
            connection_state_updated: 0,
            last_activity: 0,
            twin: Twin::new(now),
            c2d: DeviceQueue::default(),
            link: None,
            session: 0,
        })
    }

    /// Records the Plug and Play model id device `id` announced when it connected (reference-2
    /// §5): its twin's `modelId` until it announces another. Unknown devices are ignored.
    /// `id` may also be a module connection's `{deviceId}/{moduleId}` (the module twin's `modelId`).
    pub fn announce_model_id(&self, id: &str, model_id: &str) {
        let (id, module) = super::module::split_client_id(id);
        let mut shard = self.shard_for(id);
        let Some(d) = shard.devices.get_mut(id) else { return };
        match module {
            Some(mid) => {
                if let Some(m) = d.module_mut(mid)
                    && m.model_id.as_deref() != Some(model_id)
                {
                    m.model_id = Some(model_id.into());
                    self.record_endpoint(d, module, Kept::Identity);
                }
            }
            None if d.model_id() != Some(model_id) => {
                d.update_extra(|e| e.model_id = Some(model_id.into()));
                self.record(&super::durable::device_record(d));
            }
            None => {}
        }
    }

    /// `GET /devices/{id}`.
    pub fn get_device(&self, id: &str) -> Result<Value, HubError> {
        let now = self.now();
        let mut fb = Vec::new();
        let r = self.with_device(id, |d| {
            let n = self.pending_c2d(d, now, &mut fb);
            Ok(d.to_json(n))
        });
        self.emit_feedback(fb);
        r
    }

    /// The device's primary key, for tools that build connection strings.
    pub fn device_primary_key(&self, id: &str) -> Result<Option<String>, HubError> {
        self.with_device(id, |d| Ok(d.primary_key.clone()))
    }

    /// `DELETE /devices/{id}`: without `If-Match`, or with `*`, unconditional.
    pub fn delete_device(&self, id: &str, if_match: Option<IfMatch>) -> Result<(), HubError> {
        let mut shard = self.shard_for(id);
        let d = shard.devices.get(id).ok_or_else(|| HubError::device_not_found(id))?;
        if let Some(cond) = if_match {
            cond.check(&d.etag_str())?;
        }
        let removed = crate::persist::records::Record::DeviceRemoved { id, generation: d.generation_id };
        self.record(&removed);
        if let Some(d) = shard.devices.remove(id) {
            if d.connected {
                self.shared.connected_count.fetch_sub(1, Ordering::Relaxed);
            }
            // Its modules go with it (dropping their links closes their connections).
            self.shared.module_count.fetch_sub(d.modules().len(), Ordering::Relaxed);
            self.metrics().c2d_depth_moved(d.c2d.len(), 0);
        }
        self.shared.device_count.fetch_sub(1, Ordering::Relaxed);
        Ok(())
    }

    /// `GET /devices?top=N`: at most 1000 devices (`top` outside 1..=1000 counts as 1000).
    pub fn list_devices(&self, top: Option<usize>) -> Vec<Value> {
        let limit = match top {
            Some(n) if (1..=REGISTRY_LIST_MAX).contains(&n) => n,
            _ => REGISTRY_LIST_MAX,
        };
        let now = self.now();
        let mut fb = Vec::new();
        let mut out = Vec::new();
        for i in 0..SHARD_COUNT {
            let mut shard = self.shard(i);
            for d in shard.devices.values_mut() {
                if out.len() == limit {
                    break;
                }
                let n = self.pending_c2d(d, now, &mut fb);
                out.push(d.to_json(n));
            }
        }
        self.emit_feedback(fb);
        out
    }

    /// `POST /devices/query`: one page of results. `continuation` is the token from the previous
    /// page; `page_size` is `x-ms-max-item-count`.
    pub fn query(
        &self,
        text: &str,
        continuation: Option<&str>,
        page_size: Option<usize>,
    ) -> Result<QueryPage, HubError> {
        let query = Query::parse(text).map_err(|e| HubError::invalid(e.to_string()))?;
        let now = self.now();
        let mut fb = Vec::new();
        if query.is_count() {
            let mut n = 0;
            for i in 0..SHARD_COUNT {
                let mut shard = self.shard(i);
                n += self.scan_shard(&mut shard, None, usize::MAX, &query, now, &mut fb, |_| ()).0;
            }
            self.emit_feedback(fb);
            return Ok(QueryPage {
                items: vec![query.count_row(n)],
                continuation: None,
                item_type: query.item_type(),
            });
        }
        let mut cont = match continuation.filter(|c| !c.is_empty()) {
            Some(token) => decode_continuation(token)?,
            None => Continuation { s: 0, k: None, r: query.top },
        };
        let page = page_size.filter(|n| *n > 0).unwrap_or(QUERY_PAGE_DEFAULT).min(QUERY_PAGE_MAX);
        let mut items = Vec::new();
        while cont.s < SHARD_COUNT {
            let budget = page.saturating_sub(items.len()).min(cont.r.unwrap_or(usize::MAX));
            if budget == 0 {
                break;
            }
            let mut shard = self.shard(cont.s);
            let (taken, last, exhausted) =
                self.scan_shard(&mut shard, cont.k.as_deref(), budget, &query, now, &mut fb, |v| {
                    items.push(v)
                });
            drop(shard);
            cont.r = cont.r.map(|r| r - taken);
            if exhausted {
                cont.s += 1;
                cont.k = None;
            } else {
                cont.k = last;
            }
        }
        self.emit_feedback(fb);
        let more = cont.s < SHARD_COUNT && cont.r != Some(0);
        let continuation = more.then(|| encode_continuation(&cont));
        Ok(QueryPage { items, continuation, item_type: query.item_type() })
    }

    /// Scans `shard` after key `after`, passing up to `budget` matches to `sink`. Returns how many
    /// matched, the last id visited, and whether the shard was exhausted.
    #[allow(clippy::too_many_arguments)]
    fn scan_shard(
        &self,
        shard: &mut Shard,
        after: Option<&str>,
        budget: usize,
        query: &Query,
        now: u64,
        fb: &mut Vec<(String, u64, Outcome)>,
        mut sink: impl FnMut(Value),
    ) -> (usize, Option<String>, bool) {
        use std::ops::Bound::{Excluded, Unbounded};
        if query.collection == crate::query::Collection::Modules {
            return scan_shard_modules(shard, after, budget, query, sink);
        }
        let start = after.map_or(Unbounded, Excluded);
        let mut taken = 0;
        let mut last = None;
        let filter_roots = query.filter_roots();
        let select_roots = query.select_roots();
        for (id, d) in shard.devices.range_mut(start) {
            if taken == budget {
                return (taken, last, false);
            }
            let n = self.pending_c2d(d, now, fb);
            last = Some(id.to_string());
            if query.matches(&twin_parts(d, n, Some(&filter_roots))) {
                taken += 1;
                if !query.is_count() {
                    sink(query.project(&twin_parts(d, n, select_roots.as_deref())));
                }
            }
        }
        (taken, last, true)
    }

    /// Registry totals (and connected devices for `/statistics/service`).
    pub fn statistics(&self) -> RegistryStats {
        let mut s = RegistryStats::default();
        for i in 0..SHARD_COUNT {
            let shard = self.shard(i);
            for d in shard.devices.values() {
                s.total += 1;
                match d.status {
                    Status::Enabled => s.enabled += 1,
                    Status::Disabled => s.disabled += 1,
                }
                s.connected += usize::from(d.connected);
            }
        }
        s
    }

    /// `GET /twins/{id}`.
    pub fn get_twin(&self, id: &str) -> Result<Value, HubError> {
        let now = self.now();
        let mut fb = Vec::new();
        let r = self.with_device(id, |d| {
            let n = self.pending_c2d(d, now, &mut fb);
            Ok(twin_json(d, n))
        });
        self.emit_feedback(fb);
        r
    }

    /// One reported property of `id`'s twin (`None`: no such device or property), without
    /// rendering the twin: for callers that watch many twins for one value.
    pub fn reported_property(&self, id: &str, name: &str) -> Option<Value> {
        self.with_device(id, |d| Ok(d.twin.reported.get(name).cloned())).ok().flatten()
    }

    /// The twin's `properties` as a device sees them (`{"desired":…,"reported":…}`); `id` may
    /// also be a module connection's `{deviceId}/{moduleId}` (its module twin).
    pub fn device_twin_properties(&self, id: &str) -> Result<Value, HubError> {
        self.with_endpoint(id, |d| Ok(d.twin.properties_json()))
    }

    /// `PATCH /twins/{id}` (merge) or `PUT /twins/{id}` (replace `replace == true`): tags and
    /// desired properties from a Twin JSON body. Returns the new twin and the desired patch that
    /// devices should be told about (with `$version`), if desired changed.
    pub fn update_twin(
        &self,
        id: &str,
        body: &Value,
        if_match: Option<IfMatch>,
        replace: bool,
    ) -> Result<(Value, Option<Value>), HubError> {
        let (tags, desired) = twin_update_parts(body)?;
        let now = self.now();
        let mut fb = Vec::new();
        let r = self.with_device(id, |d| {
            if let Some(cond) = &if_match {
                cond.check(&d.twin.etag_str())?;
            }
            let notice = apply_twin_update(&mut d.twin, tags, desired, replace, now)?;
            self.record_twin(d);
            let n = self.pending_c2d(d, now, &mut fb);
            Ok((twin_json(d, n), notice))
        });
        self.emit_feedback(fb);
        if let Ok((_, Some(patch))) = &r {
            self.notify_desired(id, patch.clone());
        }
        if r.is_ok() {
            self.config_touch(id);
        }
        r
    }

    /// A device's reported-properties patch (MQTT `$iothub/twin/PATCH/properties/reported`);
    /// `id` may also be a module connection's `{deviceId}/{moduleId}`. Returns the new reported
    /// `$version`.
    pub fn patch_reported(&self, id: &str, patch: &Value) -> Result<u64, HubError> {
        let now = self.now();
        let version = self.with_endpoint_kept(id, |d| {
            let changed = d.twin.patch(Section::Reported, patch, now)?;
            *d.last_activity = now;
            Ok((d.twin.reported_version, if changed { Kept::Twin } else { Kept::Nothing }))
        })?;
        // A module's reported properties may move it in or out of a module configuration's scope.
        self.config_touch(super::module::split_client_id(id).0);
        Ok(version)
    }

    /// Bulk `POST /devices`: up to 100 create/update/delete operations, each independent.
    pub fn bulk(&self, body: &Value) -> Result<BulkResult, HubError> {
        let ops = body.as_array().ok_or_else(|| {
            HubError::new(
                ErrorCode::IotHubFormatError,
                "the body must be a JSON array of ExportImportDevice objects",
            )
        })?;
        if ops.is_empty() || ops.len() > BULK_MAX_DEVICES {
            return Err(HubError::new(
                ErrorCode::TooManyDevices,
                format!("a bulk request holds 1 to {BULK_MAX_DEVICES} devices; got {}", ops.len()),
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for op in ops {
            let id = op.get("id").or_else(|| op.get("deviceId")).and_then(Value::as_str).unwrap_or_default();
            if !seen.insert(id) {
                return Err(HubError::new(
                    ErrorCode::DeviceDefinedMultipleTimes,
                    format!("device '{id}' appears more than once in the request"),
                ));
            }
        }
        let mut errors = Vec::new();
        for op in ops {
            let mode = op.get("importMode").and_then(Value::as_str).unwrap_or("createOrUpdate");
            let id = op.get("id").or_else(|| op.get("deviceId")).and_then(Value::as_str).unwrap_or_default();
            if let Err(e) = self.bulk_one(id, mode, op) {
                errors.push(json!({
                    "deviceId": id,
                    "moduleId": null,
                    "errorCode": e.code.name(),
                    "errorStatus": e.message,
                    "operation": mode,
                }));
            }
        }
        Ok(BulkResult { is_successful: errors.is_empty(), errors })
    }

    fn bulk_one(&self, id: &str, mode: &str, op: &Value) -> Result<(), HubError> {
        let etag = || op.get("eTag").and_then(Value::as_str).and_then(IfMatch::parse);
        let twin_etag = || op.get("twinETag").and_then(Value::as_str).and_then(IfMatch::parse);
        let exists = || self.with_device(id, |_| Ok(())).is_ok();
        let input = || DeviceInput::from_json(op);
        match mode.to_ascii_lowercase().as_str() {
            "create" => self.put_device(id, input()?, None).map(drop)?,
            "update" => self.put_device(id, input()?, Some(IfMatch::Any)).map(drop)?,
            "updateifmatchetag" => {
                let cond = etag().ok_or_else(|| HubError::invalid("updateIfMatchETag needs eTag"))?;
                self.put_device(id, input()?, Some(cond)).map(drop)?
            }
            "createorupdate" => {
                let cond = exists().then_some(IfMatch::Any);
                self.put_device(id, input()?, cond).map(drop)?
            }
            "delete" => self.delete_device(id, None)?,
            "deleteifmatchetag" => {
                let cond = etag().ok_or_else(|| HubError::invalid("deleteIfMatchETag needs eTag"))?;
                self.delete_device(id, Some(cond))?
            }
            "updatetwin" | "updatetwinifmatchetag" => {
                let cond = if mode.eq_ignore_ascii_case("updateTwinIfMatchETag") {
                    Some(
                        twin_etag()
                            .ok_or_else(|| HubError::invalid("updateTwinIfMatchETag needs twinETag"))?,
                    )
                } else {
                    None
                };
                self.update_twin(id, op, cond, false).map(drop)?
            }
            other => {
                return Err(HubError::invalid(format!(
                    "importMode '{other}' is not valid; use create, update, updateIfMatchETag, createOrUpdate, delete, deleteIfMatchETag, updateTwin or updateTwinIfMatchETag"
                )));
            }
        }
        if matches!(
            mode.to_ascii_lowercase().as_str(),
            "create" | "update" | "createorupdate" | "updateifmatchetag"
        ) && (op.get("tags").is_some() || op.pointer("/properties/desired").is_some())
        {
            self.update_twin(id, op, None, false)?;
        }
        Ok(())
    }
}

/// The tags and desired properties a service twin update (`PATCH`/`PUT /twins/...`) carries,
/// checked: a JSON object whose `properties` is an object and which writes no reported property.
pub(super) fn twin_update_parts(body: &Value) -> Result<(Option<&Value>, Option<&Value>), HubError> {
    if !body.is_object() {
        return Err(HubError::invalid(format!(
            "the twin must be a JSON object with tags and/or properties.desired, not {}",
            super::twin::json_kind(body)
        )));
    }
    if let Some(p) = body.get("properties").filter(|p| !p.is_null() && !p.is_object()) {
        return Err(HubError::invalid(format!(
            "properties must be a JSON object, not {}",
            super::twin::json_kind(p)
        )));
    }
    let tags = body.get("tags").filter(|v| !v.is_null());
    let desired = body.pointer("/properties/desired").filter(|v| !v.is_null());
    if body
        .pointer("/properties/reported")
        .is_some_and(|v| !v.is_null() && v.as_object().is_some_and(|m| m.keys().any(|k| !k.starts_with('$'))))
    {
        return Err(HubError::invalid("reported properties are written by the device, not the service"));
    }
    Ok((tags, desired))
}

/// Applies a service twin update to `twin` (all or nothing): merges (`replace == false`) or
/// replaces tags and desired properties. Returns the desired patch the device or module should be
/// told about (with `$version`), if desired changed.
pub(super) fn apply_twin_update(
    twin: &mut Twin,
    tags: Option<&Value>,
    desired: Option<&Value>,
    replace: bool,
    now: u64,
) -> Result<Option<Value>, HubError> {
    let mut staged = twin.clone();
    let empty = Value::Object(Map::new());
    let mut desired_changed = false;
    if replace {
        staged.replace(Section::Tags, tags.unwrap_or(&empty), now)?;
        desired_changed = staged.replace(Section::Desired, desired.unwrap_or(&empty), now)?;
    } else {
        if let Some(t) = tags {
            staged.patch(Section::Tags, t, now)?;
        }
        if let Some(p) = desired {
            desired_changed = staged.patch(Section::Desired, p, now)?;
        }
    }
    *twin = staged;
    Ok(desired_changed.then(|| {
        let mut patch = if replace {
            twin.desired.clone()
        } else {
            desired.and_then(Value::as_object).cloned().unwrap_or_default()
        };
        patch.insert("$version".into(), Value::from(twin.desired_version));
        Value::Object(patch)
    }))
}

/// [`Hub::scan_shard`] for `FROM devices.modules`: the module twins of the shard's devices, in
/// device then module order; the continuation key is the last module visited, `{deviceId}/{moduleId}`.
fn scan_shard_modules(
    shard: &mut Shard,
    after: Option<&str>,
    budget: usize,
    query: &Query,
    mut sink: impl FnMut(Value),
) -> (usize, Option<String>, bool) {
    use std::ops::Bound::{Excluded, Included, Unbounded};
    let (after_device, after_module) = match after {
        Some(k) => {
            let (d, m) = super::module::split_client_id(k);
            (Some(d), m)
        }
        None => (None, None),
    };
    let start = match (after_device, after_module) {
        (None, _) => Unbounded,
        (Some(d), Some(_)) => Included(d),
        (Some(d), None) => Excluded(d),
    };
    let mut taken = 0;
    let mut last = None;
    let filter_roots = query.filter_roots();
    let select_roots = query.select_roots();
    for (id, d) in shard.devices.range(start) {
        for m in d.modules() {
            if Some(id) == after_device && after_module.is_some_and(|a| *m.id <= *a) {
                continue;
            }
            if taken == budget {
                return (taken, last, false);
            }
            last = Some(format!("{id}/{}", m.id));
            if query.matches(&super::module::module_twin_parts(d, m, Some(&filter_roots))) {
                taken += 1;
                if !query.is_count() {
                    sink(query.project(&super::module::module_twin_parts(d, m, select_roots.as_deref())));
                }
            }
        }
    }
    (taken, last, true)
}

fn encode_continuation(c: &Continuation) -> String {
    B64URL.encode(serde_json::to_vec(c).unwrap_or_default())
}

fn decode_continuation(token: &str) -> Result<Continuation, HubError> {
    B64URL
        .decode(token.trim())
        .ok()
        .and_then(|b| serde_json::from_slice::<Continuation>(&b).ok())
        .filter(|c| c.s <= SHARD_COUNT)
        .ok_or_else(|| HubError::invalid("x-ms-continuation is not a token this hub issued"))
}
