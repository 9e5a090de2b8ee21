//! The Device Provisioning Service on the hub's host (reference-2 §2), socket-free: the enrollment
//! store (individual enrollments and enrollment groups with symmetric-key or X.509 attestation),
//! device authentication against it (a registration's SAS token signed by the enrollment key or
//! the key derived from the group key; or the TLS client certificate: an individual enrollment's
//! certificate by thumbprint, a group's signing CA by chain, CN = registration id, checked with
//! [`crate::x509`]), and the registration state machine: a register request assigns the
//! device to this hub at once (DPS clients accept `assigned` on the register response), creating
//! or updating its identity with the key it used and, on its first assignment, the enrollment's
//! initial twin; the operation id is remembered so polls (`operations/{id}`) answer the same
//! result. Per registration the store keeps one small record (operation id, device id, times,
//! etag); no task or timer.
//!
//! The wire adapters live in [`mqtt`] (the `$dps/registrations/...` topics) and the HTTP module
//! (`/{idScope}/registrations/{id}/register`, the enrollment service API). The store is owned by
//! [`Dps`] behind one mutex, never held while the hub is called.

pub mod mqtt;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use serde_json::{Value, json};
use sha2::Sha256;

use crate::clock::iso8601;
use crate::hub::{AuthType, DeviceInput, Hub, IfMatch};
use crate::sas::SasToken;
use crate::x509::{ClientChain, Thumbprints, TrustedCas};

/// The service policy the provisioning service SDKs' connection strings name.
pub const SERVICE_POLICY: &str = "provisioningserviceowner";
/// Most enrollments (individual and groups together) the store holds.
pub const MAX_ENROLLMENTS: usize = 100_000;
/// Registration ids: at most 128 characters (reference-2 §2.2).
pub const MAX_REGISTRATION_ID: usize = 128;

/// A DPS error: the HTTP status (MQTT: the status in the response topic) and DPS's numeric code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{status} {code}: {message}")]
pub struct DpsError {
    /// HTTP status.
    pub status: u16,
    /// DPS error code (`401002`, `404201`, …).
    pub code: u32,
    /// What was wrong.
    pub message: String,
}

impl DpsError {
    fn new(status: u16, code: u32, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into() }
    }
    /// `401 401002`: the token does not verify or the enrollment refuses the device.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(401, 401002, message)
    }
    /// `400 400004`: a malformed request.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, 400004, message)
    }
    /// `404 404201`-style: no such resource.
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(404, 404201, message)
    }
    /// DPS's error body (`errorCode`, `trackingId`, `message`, `timestampUtc`).
    pub fn body(&self, now_ms: u64) -> Value {
        json!({
            "errorCode": self.code,
            "trackingId": uuid::Uuid::new_v4().to_string(),
            "message": self.message,
            "timestampUtc": iso8601(now_ms),
        })
    }
}

/// How an enrollment's devices prove themselves.
#[derive(Debug, Clone)]
pub enum Attestation {
    /// Symmetric keys (base64). For a group, each device's keys derive from these.
    SymmetricKey {
        /// Primary key.
        primary: String,
        /// Secondary key.
        secondary: String,
    },
    /// X.509, individual: the device's own certificate(s) (`clientCertificates`), matched by
    /// thumbprint.
    X509Client {
        /// The certificates as given (PEM), primary first.
        pems: Vec<String>,
        /// Their thumbprints.
        thumbprints: Vec<Thumbprints>,
    },
    /// X.509, group: the signing CA certificate(s) (`signingCertificates`) devices' chains lead to.
    X509Ca {
        /// The certificates as given (PEM), primary first.
        pems: Vec<String>,
        /// The same, as the chain checker's trust store.
        cas: Arc<TrustedCas>,
    },
}

/// How the assigned device authenticates with the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceAuth {
    /// SAS with these (derived or enrollment) keys: primary, secondary.
    Keys(String, String),
    /// `selfSigned` with this SHA-256 thumbprint (an individual X.509 enrollment).
    Thumbprint(String),
    /// `certificateAuthority`, with the group's signing CA (PEM), which the hub is made to trust.
    CertificateAuthority(String),
}

/// One enrollment (individual or group).
#[derive(Debug, Clone)]
pub struct Enrollment {
    /// `registrationId` (individual) or `enrollmentGroupId` (group).
    pub id: String,
    /// Its attestation.
    pub attestation: Attestation,
    /// The device id to assign (individual only; defaults to the registration id).
    pub device_id: Option<String>,
    /// `initialTwin` as given (`tags`, `properties.desired`).
    pub initial_twin: Option<Value>,
    /// `provisioningStatus == "enabled"`.
    pub enabled: bool,
    /// `capabilities.iotEdge`.
    pub iot_edge: bool,
    etag: u64,
    created_ms: u64,
    updated_ms: u64,
}

/// Which enrollment a device authenticated against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnrollmentRef {
    /// An individual enrollment (keyed by the registration id).
    Individual(String),
    /// An enrollment group.
    Group(String),
}

/// A device that authenticated: its enrollment, how its hub identity authenticates and when its
/// credential expires.
#[derive(Debug, Clone)]
pub struct Credential {
    /// The enrollment that matched.
    pub enrollment: EnrollmentRef,
    /// The identity's authentication in the hub.
    pub auth: DeviceAuth,
    /// Token expiry, seconds since the epoch.
    pub expiry_secs: u64,
}

/// What the store keeps per registration (small: the million-device budget).
#[derive(Debug, Clone)]
struct Registration {
    operation_id: String,
    device_id: String,
    enrollment: EnrollmentRef,
    created_ms: u64,
    updated_ms: u64,
    etag: u64,
    substatus: &'static str,
}

#[derive(Debug, Default)]
struct Store {
    individuals: BTreeMap<String, Enrollment>,
    groups: BTreeMap<String, Enrollment>,
    registrations: HashMap<String, Registration>,
    counter: u64,
}

/// The provisioning service: its ID scope, service key and store.
#[derive(Debug)]
pub struct Dps {
    id_scope: String,
    service_key: String,
    store: Mutex<Store>,
}

/// `base64(HMAC-SHA256(base64decode(group_key), registration_id))` (reference-2 §2.2).
pub fn derive_device_key(group_key_b64: &str, registration_id: &str) -> Result<String, DpsError> {
    let key = STANDARD
        .decode(group_key_b64.as_bytes())
        .map_err(|_| DpsError::bad_request("the group key is not valid base64"))?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).map_err(|_| DpsError::bad_request("bad group key"))?;
    mac.update(registration_id.as_bytes());
    Ok(STANDARD.encode(mac.finalize().into_bytes()))
}

/// A fresh ID scope: `0ne` and 8 upper-case hex digits, like DPS's.
pub fn generate_id_scope() -> String {
    format!("0ne{:08X}", rand::random::<u32>())
}

/// Checks a registration id: 1..=128 of alphanumerics and `- . _ :`, case-insensitive.
pub fn validate_registration_id(id: &str) -> Result<(), DpsError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_REGISTRATION_ID
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._:".contains(&b))
        && id.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(DpsError::bad_request(format!(
            "registration id '{id}' must be 1 to 128 alphanumerics or '-', '.', '_', ':', ending in an alphanumeric or '-'"
        )))
    }
}

fn lock(m: &Mutex<Store>) -> std::sync::MutexGuard<'_, Store> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn str_field<'a>(v: &'a Value, ptr: &str) -> Option<&'a str> {
    v.pointer(ptr).and_then(Value::as_str).filter(|s| !s.is_empty())
}

impl Dps {
    /// A provisioning service with `id_scope`, its service policy key derived from the hub's
    /// owner key.
    pub fn new(id_scope: String, owner_key: &str) -> Self {
        let service_key = crate::sas::policy::derive_key(owner_key, &format!("{SERVICE_POLICY}/primary"));
        Self { id_scope, service_key, store: Mutex::default() }
    }

    /// The ID scope devices name.
    pub fn id_scope(&self) -> &str {
        &self.id_scope
    }

    /// The `provisioningserviceowner` key.
    pub fn service_key(&self) -> &str {
        &self.service_key
    }

    /// The service connection string for host `hostname`.
    pub fn service_connection_string(&self, hostname: &str) -> String {
        format!(
            "HostName={hostname};SharedAccessKeyName={SERVICE_POLICY};SharedAccessKey={}",
            self.service_key
        )
    }

    /// Verifies a service token: signed with the service key under `skn=provisioningserviceowner`,
    /// not expired.
    pub fn authenticate_service(&self, token: &str, now_secs: u64, skew: u64) -> Result<(), DpsError> {
        let t = SasToken::parse(token).map_err(|e| DpsError::unauthorized(e.to_string()))?;
        if t.key_name.as_deref() != Some(SERVICE_POLICY) {
            return Err(DpsError::unauthorized(format!("the token must name skn={SERVICE_POLICY}")));
        }
        if t.is_expired(now_secs, skew) {
            return Err(DpsError::unauthorized("the token has expired"));
        }
        if !t.verify(&self.service_key) {
            return Err(DpsError::unauthorized("the token's signature does not verify"));
        }
        Ok(())
    }

    /// Authenticates registration `reg` by a SAS token for `{idScope}/registrations/{reg}` (with
    /// `skn=registration` or none): its individual enrollment's key, else the first enrollment
    /// group whose derived key verifies. Groups are tried in id order, two HMACs each: the cost grows with
    /// the number of symmetric-key groups (a handful in practice), not with the fleet. A disabled enrollment still authenticates here; the
    /// register request is refused ([`Dps::register`]), as DPS answers it.
    pub fn authenticate_device(
        &self,
        reg: &str,
        token: &str,
        now_secs: u64,
        skew: u64,
    ) -> Result<Credential, DpsError> {
        validate_registration_id(reg)?;
        let t = SasToken::parse(token).map_err(|e| DpsError::unauthorized(e.to_string()))?;
        let expected = format!("{}/registrations/{reg}", self.id_scope);
        if !t.resource.eq_ignore_ascii_case(&expected) {
            return Err(DpsError::unauthorized(format!(
                "the token's resource '{}' is not '{expected}'",
                t.resource
            )));
        }
        if t.key_name.as_deref().is_some_and(|k| k != "registration") {
            return Err(DpsError::unauthorized("a registration token names skn=registration or no skn"));
        }
        if t.is_expired(now_secs, skew) {
            return Err(DpsError::unauthorized("the token has expired"));
        }
        let store = lock(&self.store);
        let verify = |p: &str, s: &str| {
            (t.verify(p) || t.verify(s)).then(|| DeviceAuth::Keys(p.to_string(), s.to_string()))
        };
        if let Some(e) = store.individuals.get(reg) {
            let Attestation::SymmetricKey { primary, secondary } = &e.attestation else {
                return Err(DpsError::unauthorized(format!(
                    "the enrollment of '{reg}' attests with X.509: present its certificate"
                )));
            };
            return verify(primary, secondary)
                .map(|auth| Credential {
                    enrollment: EnrollmentRef::Individual(reg.into()),
                    auth,
                    expiry_secs: t.expiry_secs,
                })
                .ok_or_else(|| DpsError::unauthorized("the token is not signed by the enrollment's key"));
        }
        for g in store.groups.values() {
            let Attestation::SymmetricKey { primary, secondary } = &g.attestation else {
                continue;
            };
            let (Ok(p), Ok(s)) = (derive_device_key(primary, reg), derive_device_key(secondary, reg)) else {
                continue;
            };
            if let Some(auth) = verify(&p, &s) {
                return Ok(Credential {
                    enrollment: EnrollmentRef::Group(g.id.clone()),
                    auth,
                    expiry_secs: t.expiry_secs,
                });
            }
        }
        Err(DpsError::unauthorized(format!(
            "no enrollment for registration '{reg}' accepts the token (individual key or group-derived key)"
        )))
    }

    /// Authenticates registration `reg` by the certificate chain its TLS client presented (the TLS
    /// layer checked validity and links): the leaf's CN must be `reg`; an individual X.509
    /// enrollment for `reg` matches by the leaf's thumbprint, otherwise the first X.509 group whose
    /// signing certificate the chain leads to. The credential lasts until the leaf's `notAfter`.
    pub fn authenticate_device_x509(&self, reg: &str, chain: &ClientChain) -> Result<Credential, DpsError> {
        validate_registration_id(reg)?;
        let leaf =
            chain.leaf().ok_or_else(|| DpsError::unauthorized("no client certificate was presented"))?;
        let leaf = crate::x509::leaf_identity(leaf).map_err(|e| DpsError::unauthorized(e.to_string()))?;
        if leaf.common_name.as_deref() != Some(reg) {
            return Err(DpsError::unauthorized(format!(
                "the certificate's subject CN ({}) is not the registration id '{reg}'",
                leaf.common_name.as_deref().unwrap_or("none")
            )));
        }
        let expiry_secs = u64::try_from(leaf.not_after_secs).unwrap_or(0);
        let store = lock(&self.store);
        if let Some(e) = store.individuals.get(reg) {
            let Attestation::X509Client { thumbprints, .. } = &e.attestation else {
                return Err(DpsError::unauthorized(format!(
                    "the enrollment of '{reg}' attests with a symmetric key, not a certificate"
                )));
            };
            if !thumbprints.contains(&leaf.thumbprints) {
                return Err(DpsError::unauthorized(format!(
                    "the certificate (SHA-256 {}) is not the enrollment's",
                    leaf.thumbprints.sha256_hex()
                )));
            }
            return Ok(Credential {
                enrollment: EnrollmentRef::Individual(reg.into()),
                auth: DeviceAuth::Thumbprint(leaf.thumbprints.sha256_hex()),
                expiry_secs,
            });
        }
        for g in store.groups.values() {
            if let Attestation::X509Ca { pems, cas } = &g.attestation
                && cas.anchor(&chain.0).is_some()
            {
                return Ok(Credential {
                    enrollment: EnrollmentRef::Group(g.id.clone()),
                    auth: DeviceAuth::CertificateAuthority(pems.join("\n")),
                    expiry_secs,
                });
            }
        }
        Err(DpsError::unauthorized(format!(
            "no enrollment for '{reg}' accepts the certificate (individual thumbprint or a group's signing CA)"
        )))
    }

    /// A register request from authenticated registration `reg` with the request `payload`
    /// (`{"modelId": …}`, a DTMI, sets the device's model id; anything else there is a 400).
    /// Assigns the device to `hub` at once and returns the operation status JSON (`status: assigned`). A second registration keeps the
    /// device's identity and twin (the hub does not change): `substatus` is `initialAssignment`
    /// when the device was created, `deviceDataMigrated` when it already existed.
    pub fn register(
        &self,
        hub: &Hub,
        reg: &str,
        cred: &Credential,
        payload: Option<&Value>,
    ) -> Result<Value, DpsError> {
        let model_id = match payload.and_then(|p| p.get("modelId")) {
            None | Some(Value::Null) => None,
            Some(Value::String(m)) => {
                let encoded: String =
                    percent_encoding::utf8_percent_encode(m, percent_encoding::NON_ALPHANUMERIC).to_string();
                crate::mqtt::session::model_id(&format!("model-id={encoded}"))
                    .map_err(|e| DpsError::bad_request(format!("payload.modelId: {e}")))?
            }
            Some(other) => {
                return Err(DpsError::bad_request(format!("payload.modelId must be a string, not {other}")));
            }
        };
        let enrollment = {
            let store = lock(&self.store);
            match &cred.enrollment {
                EnrollmentRef::Individual(id) => store.individuals.get(id).cloned(),
                EnrollmentRef::Group(id) => store.groups.get(id).cloned(),
            }
        }
        .ok_or_else(|| DpsError::unauthorized("the enrollment was deleted"))?;
        if !enrollment.enabled {
            return Err(DpsError::unauthorized(format!("the enrollment '{}' is disabled", enrollment.id)));
        }
        let device_id = enrollment.device_id.clone().unwrap_or_else(|| reg.to_string());
        let input = || {
            let base = DeviceInput { iot_edge: enrollment.iot_edge, ..DeviceInput::default() };
            match &cred.auth {
                DeviceAuth::Keys(p, s) => {
                    DeviceInput { primary_key: Some(p.clone()), secondary_key: Some(s.clone()), ..base }
                }
                DeviceAuth::Thumbprint(t) => DeviceInput {
                    auth_type: Some(AuthType::SelfSigned),
                    thumbprints: Some((Some(t.clone()), None)),
                    ..base
                },
                DeviceAuth::CertificateAuthority(_) => {
                    DeviceInput { auth_type: Some(AuthType::CertificateAuthority), ..base }
                }
            }
        };
        if let DeviceAuth::CertificateAuthority(pem) = &cred.auth {
            // The device will chain to the group's CA when it connects to the hub.
            hub.add_x509_ca(pem)
                .map_err(|e| DpsError::new(500, 500000, format!("trusting the group's CA: {e}")))?;
        }
        // The hub's refusal (a bad device id, the device quota) in DPS's terms: its status, and
        // the status × 1000 as the code.
        let hub_error = |e: crate::error::HubError| {
            let status = e.code.http_status();
            DpsError::new(status, u32::from(status) * 1000, format!("assigning device '{device_id}': {e}"))
        };
        let created = match hub.put_device(&device_id, input(), None) {
            Ok(_) => true,
            Err(e) if e.code == crate::error::ErrorCode::DeviceAlreadyExists => {
                hub.put_device(&device_id, input(), Some(IfMatch::Any)).map_err(hub_error)?;
                false
            }
            Err(e) => return Err(hub_error(e)),
        };
        if created && let Some(twin) = &enrollment.initial_twin {
            hub.update_twin(&device_id, twin, None, false)
                .map_err(|e| DpsError::bad_request(format!("the enrollment's initialTwin: {e}")))?;
        }
        if let Some(model) = &model_id {
            hub.announce_model_id(&device_id, model);
        }
        let now = hub.now();
        let mut store = lock(&self.store);
        store.counter += 1;
        let counter = store.counter;
        let operation_id = format!("{counter}.{:016x}.{}", now, uuid::Uuid::new_v4());
        let previous = store.registrations.get(reg).map(|r| r.created_ms);
        let record = Registration {
            operation_id,
            device_id,
            enrollment: cred.enrollment.clone(),
            created_ms: previous.unwrap_or(now),
            updated_ms: now,
            etag: counter,
            substatus: if created { "initialAssignment" } else { "deviceDataMigrated" },
        };
        let status = self.status_json(hub, reg, &record);
        store.registrations.insert(reg.to_string(), record);
        Ok(status)
    }

    /// A poll for operation `operation_id` of registration `reg`.
    pub fn operation_status(&self, hub: &Hub, reg: &str, operation_id: &str) -> Result<Value, DpsError> {
        let store = lock(&self.store);
        match store.registrations.get(reg) {
            Some(r) if r.operation_id == operation_id => Ok(self.status_json(hub, reg, r)),
            _ => Err(DpsError::not_found(format!("operation '{operation_id}' of '{reg}' is not known"))),
        }
    }

    fn status_json(&self, hub: &Hub, reg: &str, r: &Registration) -> Value {
        json!({
            "operationId": r.operation_id,
            "status": "assigned",
            "registrationState": self.registration_state(hub, reg, r),
        })
    }

    fn registration_state(&self, hub: &Hub, reg: &str, r: &Registration) -> Value {
        let mut state = json!({
            "registrationId": reg,
            "createdDateTimeUtc": iso8601(r.created_ms),
            "assignedHub": hub.hostname(),
            "deviceId": r.device_id,
            "status": "assigned",
            "substatus": r.substatus,
            "lastUpdatedDateTimeUtc": iso8601(r.updated_ms),
            "etag": STANDARD.encode(format!("\"{}\"", r.etag)),
        });
        if let EnrollmentRef::Group(g) = &r.enrollment {
            state["enrollmentGroupId"] = json!(g);
        }
        state
    }

    /// `GET /registrations/{id}` (service API): the device registration state.
    pub fn get_registration(&self, hub: &Hub, reg: &str) -> Result<Value, DpsError> {
        let store = lock(&self.store);
        let r = store
            .registrations
            .get(reg)
            .ok_or_else(|| DpsError::not_found(format!("registration '{reg}' is not known")))?;
        Ok(self.registration_state(hub, reg, r))
    }

    /// `DELETE /registrations/{id}`: forgets the registration (the device stays in the hub).
    pub fn delete_registration(&self, reg: &str) -> Result<(), DpsError> {
        lock(&self.store)
            .registrations
            .remove(reg)
            .map(|_| ())
            .ok_or_else(|| DpsError::not_found(format!("registration '{reg}' is not known")))
    }

    /// `PUT /enrollments/{id}` or `/enrollmentGroups/{id}`: creates or replaces; returns the
    /// stored enrollment's JSON.
    pub fn put_enrollment(
        &self,
        group: bool,
        id: &str,
        body: &Value,
        now_ms: u64,
    ) -> Result<Value, DpsError> {
        if group {
            if id.is_empty() || id.len() > MAX_REGISTRATION_ID {
                return Err(DpsError::bad_request("the enrollment group id must be 1 to 128 characters"));
            }
        } else {
            validate_registration_id(id)?;
        }
        let key_field = if group { "enrollmentGroupId" } else { "registrationId" };
        if let Some(b) = str_field(body, &format!("/{key_field}"))
            && b != id
        {
            return Err(DpsError::bad_request(format!(
                "{key_field} '{b}' in the body is not '{id}' in the path"
            )));
        }
        let attestation = match str_field(body, "/attestation/type") {
            Some("symmetricKey") => {
                let key = |k: &str| -> Result<String, DpsError> {
                    match str_field(body, &format!("/attestation/symmetricKey/{k}")) {
                        Some(s) => crate::sas::decode_key(s)
                            .map(|_| s.to_string())
                            .map_err(|e| DpsError::bad_request(format!("attestation.symmetricKey.{k}: {e}"))),
                        None => Ok(crate::sas::generate_key()),
                    }
                };
                Attestation::SymmetricKey { primary: key("primaryKey")?, secondary: key("secondaryKey")? }
            }
            Some("x509") => x509_attestation(group, body)?,
            Some(other) => {
                return Err(DpsError::bad_request(format!(
                    "attestation type '{other}' is not supported by the emulator (symmetricKey and x509 are)"
                )));
            }
            None => return Err(DpsError::bad_request("attestation.type is required")),
        };
        let enabled = match str_field(body, "/provisioningStatus") {
            None | Some("enabled") => true,
            Some("disabled") => false,
            Some(other) => return Err(DpsError::bad_request(format!("provisioningStatus '{other}'"))),
        };
        let initial_twin = body.get("initialTwin").filter(|v| !v.is_null()).cloned();
        if initial_twin.as_ref().is_some_and(|t| !t.is_object()) {
            return Err(DpsError::bad_request("initialTwin must be an object"));
        }
        let mut store = lock(&self.store);
        let exists = if group { store.groups.contains_key(id) } else { store.individuals.contains_key(id) };
        if !exists && store.individuals.len() + store.groups.len() >= MAX_ENROLLMENTS {
            return Err(DpsError::new(429, 429001, format!("the store holds {MAX_ENROLLMENTS} enrollments")));
        }
        store.counter += 1;
        let etag = store.counter;
        let map = if group { &mut store.groups } else { &mut store.individuals };
        let created_ms = map.get(id).map_or(now_ms, |e| e.created_ms);
        let e = Enrollment {
            id: id.to_string(),
            attestation,
            device_id: if group { None } else { str_field(body, "/deviceId").map(str::to_string) },
            initial_twin,
            enabled,
            iot_edge: body.pointer("/capabilities/iotEdge").and_then(Value::as_bool).unwrap_or(false),
            etag,
            created_ms,
            updated_ms: now_ms,
        };
        let json = enrollment_json(group, &e);
        map.insert(id.to_string(), e);
        Ok(json)
    }

    /// `GET /enrollments/{id}` or `/enrollmentGroups/{id}`.
    pub fn get_enrollment(&self, group: bool, id: &str) -> Result<Value, DpsError> {
        let store = lock(&self.store);
        let map = if group { &store.groups } else { &store.individuals };
        map.get(id)
            .map(|e| enrollment_json(group, e))
            .ok_or_else(|| DpsError::not_found(format!("enrollment '{id}' does not exist")))
    }

    /// `DELETE /enrollments/{id}` or `/enrollmentGroups/{id}`.
    pub fn delete_enrollment(&self, group: bool, id: &str) -> Result<(), DpsError> {
        let mut store = lock(&self.store);
        let map = if group { &mut store.groups } else { &mut store.individuals };
        map.remove(id)
            .map(|_| ())
            .ok_or_else(|| DpsError::not_found(format!("enrollment '{id}' does not exist")))
    }

    /// `POST /enrollments/query` or `/enrollmentGroups/query`: every enrollment (the query
    /// `*` is the only one DPS supports), at most `top`.
    pub fn query_enrollments(&self, group: bool, top: usize) -> Value {
        let store = lock(&self.store);
        let map = if group { &store.groups } else { &store.individuals };
        Value::Array(map.values().take(top).map(|e| enrollment_json(group, e)).collect())
    }
}

/// Reads a PEM or base64-DER certificate into (PEM, DER).
fn certificate(text: &str, field: &str) -> Result<(String, Vec<u8>), DpsError> {
    let bad = |why: String| DpsError::bad_request(format!("{field}: {why}"));
    if text.contains("-----BEGIN") {
        let der = rustls_pemfile::certs(&mut text.as_bytes())
            .next()
            .ok_or_else(|| bad("no CERTIFICATE block".into()))?
            .map_err(|e| bad(e.to_string()))?;
        return Ok((text.to_string(), der.to_vec()));
    }
    let der =
        STANDARD.decode(text.trim().as_bytes()).map_err(|_| bad("neither PEM nor base64 DER".into()))?;
    crate::x509::leaf_identity(&der).map_err(|e| bad(e.to_string()))?;
    let b64 = STANDARD.encode(&der);
    let lines: Vec<&str> =
        b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap_or_default()).collect();
    Ok((format!("-----BEGIN CERTIFICATE-----\n{}\n-----END CERTIFICATE-----\n", lines.join("\n")), der))
}

/// `attestation.x509`: `clientCertificates` (individual) or `signingCertificates` (group), each
/// `{primary: {certificate}, secondary: {certificate}}`. `caReferences` (CAs uploaded to DPS) are
/// not supported.
fn x509_attestation(group: bool, body: &Value) -> Result<Attestation, DpsError> {
    let kind = if group { "signingCertificates" } else { "clientCertificates" };
    let mut pems = Vec::new();
    let mut ders = Vec::new();
    for slot in ["primary", "secondary"] {
        let ptr = format!("/attestation/x509/{kind}/{slot}/certificate");
        if let Some(text) = str_field(body, &ptr) {
            let (pem, der) = certificate(text, &format!("attestation.x509.{kind}.{slot}.certificate"))?;
            pems.push(pem);
            ders.push(der);
        }
    }
    if pems.is_empty() {
        return Err(DpsError::bad_request(format!(
            "an x509 {} needs attestation.x509.{kind}.primary.certificate (caReferences are not supported)",
            if group { "enrollment group" } else { "individual enrollment" }
        )));
    }
    if group {
        let cas = TrustedCas::default();
        for pem in &pems {
            cas.add_pem(pem).map_err(|e| DpsError::bad_request(format!("signing certificate: {e}")))?;
        }
        Ok(Attestation::X509Ca { pems, cas: Arc::new(cas) })
    } else {
        Ok(Attestation::X509Client { pems, thumbprints: ders.iter().map(|d| Thumbprints::of(d)).collect() })
    }
}

fn attestation_json(a: &Attestation, group: bool) -> Value {
    let certs = |pems: &[String]| {
        let mut v = json!({"primary": {"certificate": pems[0]}});
        if let Some(s) = pems.get(1) {
            v["secondary"] = json!({"certificate": s});
        }
        v
    };
    match a {
        Attestation::SymmetricKey { primary, secondary } => {
            json!({"type": "symmetricKey", "symmetricKey": {"primaryKey": primary, "secondaryKey": secondary}})
        }
        Attestation::X509Client { pems, .. } | Attestation::X509Ca { pems, .. } => {
            let kind = if group { "signingCertificates" } else { "clientCertificates" };
            json!({"type": "x509", "x509": {kind: certs(pems)}})
        }
    }
}

fn enrollment_json(group: bool, e: &Enrollment) -> Value {
    let mut v = json!({
        "attestation": attestation_json(&e.attestation, group),
        "capabilities": {"iotEdge": e.iot_edge},
        "provisioningStatus": if e.enabled { "enabled" } else { "disabled" },
        "reprovisionPolicy": {"updateHubAssignment": true, "migrateDeviceData": true},
        "allocationPolicy": "hashed",
        "etag": STANDARD.encode(format!("\"{}\"", e.etag)),
        "createdDateTimeUtc": iso8601(e.created_ms),
        "lastUpdatedDateTimeUtc": iso8601(e.updated_ms),
    });
    if let Some(t) = &e.initial_twin {
        v["initialTwin"] = t.clone();
    }
    if group {
        v["enrollmentGroupId"] = json!(e.id);
    } else {
        v["registrationId"] = json!(e.id);
        v["deviceId"] = json!(e.device_id.clone().unwrap_or_else(|| e.id.clone()));
    }
    v
}

#[cfg(test)]
mod tests;
