//! A small IoT Hub *service* client over the REST API: what the release command, the fleet's bulk
//! seeding, self-registering agents and the scenario runner need, and nothing more.
//!
//! It owns no state beyond an HTTP connection pool and the policy credentials; every call signs a
//! fresh SAS token with [`iothub_emulator::sas`]. Operations: device get/create and bulk create
//! (`POST /devices`, at most 100 per call), a query that follows `x-ms-continuation` to the end,
//! C2D send through the emulator's REST extension (`POST /devices/{id}/messages/deviceBound`),
//! and feedback receive/complete (`/messages/serviceBound/feedback`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use iothub_emulator::sas::{ConnectionString, SasError, url_encode};
use reqwest::{Method, RequestBuilder, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The REST api-version the client sends (the Node and Python service SDKs' version).
pub const API_VERSION: &str = "2021-04-12";
/// How long each signed token lives.
const TOKEN_LIFETIME_SECS: u64 = 3600;
/// IoT Hub's limit on devices per bulk registry call (reference §2.6).
pub const BULK_MAX_DEVICES: usize = 100;
/// Page size asked for on queries (IoT Hub's default page is 1,000).
const QUERY_PAGE_SIZE: usize = 1000;
/// Every REST call gives up after this long.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Errors from the service client.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The connection string is not a usable service (policy) connection string.
    #[error("bad service connection string: {0}")]
    ConnectionString(#[from] SasError),
    /// The request could not be sent or its response not read.
    #[error("{op}: request failed: {source}")]
    Transport {
        /// The operation.
        op: &'static str,
        /// The cause.
        source: reqwest::Error,
    },
    /// The hub answered with an error status.
    #[error("{op}: the hub answered {status}: {body}")]
    Status {
        /// The operation.
        op: &'static str,
        /// The HTTP status.
        status: StatusCode,
        /// The response body (IoT Hub's error JSON).
        body: String,
    },
    /// The hub answered with a body this client cannot read.
    #[error("{op}: unexpected response: {reason}")]
    Protocol {
        /// The operation.
        op: &'static str,
        /// What was wrong.
        reason: String,
    },
    /// The CA certificate given to trust could not be used.
    #[error("cannot use the CA certificate: {0}")]
    Ca(String),
    /// An AMQP operation failed (see [`crate::amqp_client`]).
    #[error(transparent)]
    Amqp(#[from] crate::amqp_client::AmqpError),
}

/// A C2D message to send.
#[derive(Debug, Clone, Default)]
pub struct C2dSend {
    /// The body.
    pub body: Vec<u8>,
    /// `iothub-messageid`: needed to correlate feedback.
    pub message_id: String,
    /// `iothub-ack`: `none`, `positive`, `negative` or `full`.
    pub ack: &'static str,
    /// The content type (`application/json` for update notices).
    pub content_type: Option<String>,
    /// When the message expires (Unix milliseconds); `None`: the hub's default time to live.
    pub expiry_ms: Option<u64>,
}

/// One feedback record (reference §3.4).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct FeedbackRecord {
    /// The `iothub-messageid` of the C2D message this record is about.
    pub original_message_id: String,
    /// `Success`, `Expired`, `DeliveryCountExceeded`, `Rejected` or `Purged`.
    pub status_code: String,
    /// The device the message was for.
    pub device_id: String,
}

/// One received feedback batch, to be completed with [`ServiceClient::complete_feedback`].
#[derive(Debug, Clone)]
pub struct FeedbackBatch {
    /// The lock token (the response's `ETag`, quotes stripped).
    pub lock_token: String,
    /// The records in the batch.
    pub records: Vec<FeedbackRecord>,
}

/// A device identity as the client needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceIdentity {
    /// The device id.
    pub device_id: String,
    /// Its primary symmetric key (base64).
    pub primary_key: String,
}

/// An IoT Hub service client for one hub and one shared access policy.
#[derive(Debug, Clone)]
pub struct ServiceClient {
    http: reqwest::Client,
    /// Where requests go: `https://host:port` or `http://host:port` (no trailing slash).
    endpoint: String,
    /// The policy credentials; `HostName` is the SAS audience.
    credentials: ConnectionString,
}

impl ServiceClient {
    /// A client for the policy in `connection_string`, sending requests to `endpoint` (e.g.
    /// `https://localhost:443`; the emulator's plain HTTP port works too). `ca_pem` is added to
    /// the trusted roots (the emulator's CA).
    pub fn new(connection_string: &str, endpoint: &str, ca_pem: Option<&str>) -> Result<Self, ServiceError> {
        let credentials = ConnectionString::parse(connection_string)?;
        if credentials.shared_access_key_name.is_none() || credentials.device_id.is_some() {
            return Err(ServiceError::ConnectionString(SasError::MissingKey("SharedAccessKeyName")));
        }
        let mut builder = reqwest::Client::builder().timeout(REQUEST_TIMEOUT);
        if let Some(pem) = ca_pem {
            let cert = reqwest::Certificate::from_pem(pem.as_bytes())
                .map_err(|e| ServiceError::Ca(e.to_string()))?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder.build().map_err(|e| ServiceError::Ca(e.to_string()))?;
        Ok(Self { http, endpoint: endpoint.trim_end_matches('/').to_string(), credentials })
    }

    /// The hub's host name (the SAS audience, and the MQTT username's first part).
    pub fn hub_host(&self) -> &str {
        &self.credentials.host_name
    }

    /// The policy's name and key: what an X.509 fleet signs its agents' FTP tokens with
    /// (see [`crate::agent::AgentAuth::X509`]).
    pub fn policy(&self) -> Option<(String, String)> {
        let c = &self.credentials;
        Some((c.shared_access_key_name.clone()?, c.shared_access_key.clone()?))
    }

    /// A fresh service SAS token for the policy (also what AMQP's CBS put-token carries).
    pub fn token(&self) -> Result<String, ServiceError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Ok(self.credentials.token(now + TOKEN_LIFETIME_SECS)?)
    }

    fn request(&self, method: Method, path: &str) -> Result<RequestBuilder, ServiceError> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = format!("{}{path}{sep}api-version={API_VERSION}", self.endpoint);
        Ok(self.http.request(method, url).header("authorization", self.token()?))
    }

    /// Sends `req` and turns a non-success status into [`ServiceError::Status`].
    async fn send(op: &'static str, req: RequestBuilder) -> Result<Response, ServiceError> {
        let resp = req.send().await.map_err(|source| ServiceError::Transport { op, source })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        Err(ServiceError::Status { op, status, body })
    }

    async fn json(op: &'static str, resp: Response) -> Result<Value, ServiceError> {
        resp.json().await.map_err(|e| ServiceError::Protocol { op, reason: e.to_string() })
    }

    /// The device's identity, or `None` when it is not registered.
    pub async fn get_device(&self, device_id: &str) -> Result<Option<DeviceIdentity>, ServiceError> {
        const OP: &str = "get device";
        let req = self.request(Method::GET, &format!("/devices/{}", url_encode(device_id)))?;
        match Self::send(OP, req).await {
            Ok(resp) => identity_from_json(OP, &Self::json(OP, resp).await?).map(Some),
            Err(ServiceError::Status { status: StatusCode::NOT_FOUND, .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Registers `device_id` with `primary_key` (create only: 409 if it exists).
    pub async fn create_device(
        &self,
        device_id: &str,
        primary_key: &str,
    ) -> Result<DeviceIdentity, ServiceError> {
        const OP: &str = "create device";
        let body = json!({
            "deviceId": device_id,
            "authentication": {"type": "sas", "symmetricKey": {"primaryKey": primary_key, "secondaryKey": primary_key}},
        });
        let req = self.request(Method::PUT, &format!("/devices/{}", url_encode(device_id)))?.json(&body);
        identity_from_json(OP, &Self::json(OP, Self::send(OP, req).await?).await?)
    }

    /// Creates up to [`BULK_MAX_DEVICES`] devices in one `POST /devices` call with
    /// `importMode: createOrUpdate`: devices that already exist get the given key, so seeding is
    /// idempotent.
    pub async fn bulk_upsert(&self, devices: &[DeviceIdentity]) -> Result<(), ServiceError> {
        const OP: &str = "bulk registry";
        let body: Vec<Value> = devices
            .iter()
            .map(|d| {
                json!({
                    "id": d.device_id,
                    "importMode": "createOrUpdate",
                    "status": "enabled",
                    "authentication": {"type": "sas", "symmetricKey": {"primaryKey": d.primary_key, "secondaryKey": d.primary_key}},
                })
            })
            .collect();
        self.bulk(OP, &body).await
    }

    /// Creates or updates up to [`BULK_MAX_DEVICES`] `certificateAuthority` devices (X.509, a
    /// certificate with `CN={id}` from a CA the hub trusts) in one `POST /devices` call.
    pub async fn bulk_upsert_ca_signed(&self, ids: &[String]) -> Result<(), ServiceError> {
        const OP: &str = "bulk registry (X.509)";
        let body: Vec<Value> = ids
            .iter()
            .map(|id| {
                json!({
                    "id": id,
                    "importMode": "createOrUpdate",
                    "status": "enabled",
                    "authentication": {"type": "certificateAuthority"},
                })
            })
            .collect();
        self.bulk(OP, &body).await
    }

    /// Makes the emulator trust the CA certificate(s) in `pem` for `certificateAuthority` devices
    /// (`POST /emulator/x509-cas`, an emulator extension served on its plain HTTP port only).
    pub async fn trust_x509_ca(&self, pem: &str) -> Result<(), ServiceError> {
        const OP: &str = "trust X.509 CA";
        let req = self.request(Method::POST, "/emulator/x509-cas")?.body(pem.to_string());
        Self::send(OP, req).await.map(drop)
    }

    /// Creates or replaces the symmetric-key enrollment group `group_id` with `group_key` on the
    /// Device Provisioning Service the emulator serves on the hub's host (`PUT /enrollmentGroups/{id}`).
    /// Its `provisioningserviceowner` key derives from the owner key (as the emulator derives it),
    /// so this client's policy must be `iothubowner`.
    pub async fn put_enrollment_group(&self, group_id: &str, group_key: &str) -> Result<(), ServiceError> {
        const OP: &str = "put enrollment group";
        let c = &self.credentials;
        let owner_key = match (c.shared_access_key_name.as_deref(), c.shared_access_key.as_deref()) {
            (Some("iothubowner"), Some(k)) => k,
            _ => {
                return Err(ServiceError::ConnectionString(SasError::MissingKey(
                    "iothubowner's SharedAccessKey",
                )));
            }
        };
        let dps_key = iothub_emulator::sas::policy::derive_key(
            owner_key,
            &format!("{}/primary", iothub_emulator::dps::SERVICE_POLICY),
        );
        let token = iothub_emulator::sas::make_token(
            &c.host_name,
            &dps_key,
            Some(iothub_emulator::dps::SERVICE_POLICY),
            now_secs() + TOKEN_LIFETIME_SECS,
        )?;
        let body = json!({
            "enrollmentGroupId": group_id,
            "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": group_key, "secondaryKey": group_key}},
            "provisioningStatus": "enabled",
        });
        let url =
            format!("{}/enrollmentGroups/{}?api-version=2021-10-01", self.endpoint, url_encode(group_id));
        let req = self.http.put(url).header("authorization", token).json(&body);
        Self::send(OP, req).await.map(drop)
    }

    /// Provisions `registration_id` through the emulator's DPS over HTTPS
    /// (`PUT /{idScope}/registrations/{id}/register`), signing with `device_key` (the key derived
    /// from its enrollment group's key): the identity DPS assigned, with that key.
    pub async fn dps_register(
        &self,
        id_scope: &str,
        registration_id: &str,
        device_key: &str,
    ) -> Result<DeviceIdentity, ServiceError> {
        const OP: &str = "DPS register";
        let token = iothub_emulator::sas::make_token(
            &format!("{id_scope}/registrations/{registration_id}"),
            device_key,
            Some("registration"),
            now_secs() + TOKEN_LIFETIME_SECS,
        )?;
        let url = format!(
            "{}/{}/registrations/{}/register?api-version=2021-06-01",
            self.endpoint,
            url_encode(id_scope),
            url_encode(registration_id)
        );
        let req = self
            .http
            .put(url)
            .header("authorization", token)
            .json(&json!({"registrationId": registration_id}));
        let v = Self::json(OP, Self::send(OP, req).await?).await?;
        let device_id = v
            .pointer("/registrationState/deviceId")
            .and_then(Value::as_str)
            .filter(|_| v["status"] == "assigned")
            .ok_or_else(|| ServiceError::Protocol { op: OP, reason: format!("not assigned: {v}") })?;
        Ok(DeviceIdentity { device_id: device_id.to_string(), primary_key: device_key.to_string() })
    }

    /// Merges `tags` into each device's twin in bulk (`POST /devices`, `importMode: updateTwin`),
    /// [`BULK_MAX_DEVICES`] at most per call: `(device id, tags object)`.
    pub async fn bulk_update_tags(&self, devices: &[(String, Value)]) -> Result<(), ServiceError> {
        const OP: &str = "bulk twin tags";
        let body: Vec<Value> = devices
            .iter()
            .map(|(id, tags)| json!({"id": id, "importMode": "updateTwin", "tags": tags}))
            .collect();
        self.bulk(OP, &body).await
    }

    /// One bulk registry call (`POST /devices`) with `body`'s operations; nothing to do for none,
    /// refused before sending for more than [`BULK_MAX_DEVICES`].
    async fn bulk(&self, op: &'static str, body: &[Value]) -> Result<(), ServiceError> {
        if body.is_empty() {
            return Ok(());
        }
        if body.len() > BULK_MAX_DEVICES {
            return Err(ServiceError::Protocol {
                op,
                reason: format!("{} devices in one call; the limit is {BULK_MAX_DEVICES}", body.len()),
            });
        }
        let req = self.request(Method::POST, "/devices")?.json(body);
        let resp = match Self::send(op, req).await {
            Ok(resp) => resp,
            Err(ServiceError::Status { status: StatusCode::BAD_REQUEST, body, .. }) => {
                return Err(ServiceError::Protocol { op, reason: body });
            }
            Err(e) => return Err(e),
        };
        let result = Self::json(op, resp).await?;
        if result.get("isSuccessful").and_then(Value::as_bool) == Some(false) {
            return Err(ServiceError::Protocol { op, reason: result["errors"].to_string() });
        }
        Ok(())
    }

    /// Runs `query` (e.g. `SELECT * FROM devices WHERE …`) and returns every item of every page,
    /// following `x-ms-continuation` until the hub stops sending one.
    pub async fn query_all(&self, query: &str) -> Result<Vec<Value>, ServiceError> {
        const OP: &str = "query";
        let mut items = Vec::new();
        let mut continuation: Option<String> = None;
        loop {
            let mut req = self
                .request(Method::POST, "/devices/query")?
                .header("x-ms-max-item-count", QUERY_PAGE_SIZE.to_string())
                .json(&json!({ "query": query }));
            if let Some(c) = &continuation {
                req = req.header("x-ms-continuation", c);
            }
            let resp = Self::send(OP, req).await?;
            continuation = resp
                .headers()
                .get("x-ms-continuation")
                .and_then(|v| v.to_str().ok())
                .filter(|v| !v.is_empty())
                .map(str::to_string);
            match Self::json(OP, resp).await? {
                Value::Array(page) => items.extend(page),
                other => {
                    return Err(ServiceError::Protocol {
                        op: OP,
                        reason: format!("not a JSON array: {other}"),
                    });
                }
            }
            if continuation.is_none() {
                return Ok(items);
            }
        }
    }

    /// The ids of every device matching `where_clause` (all devices when `None`).
    pub async fn device_ids(&self, where_clause: Option<&str>) -> Result<Vec<String>, ServiceError> {
        let query = match where_clause {
            // Only the ids: the hub renders (and the client parses) no twins for them.
            Some(w) if !w.trim().is_empty() => format!("SELECT deviceId FROM devices WHERE {w}"),
            _ => "SELECT deviceId FROM devices".to_string(),
        };
        let items = self.query_all(&query).await?;
        items
            .iter()
            .map(|t| {
                t.get("deviceId").and_then(Value::as_str).map(str::to_string).ok_or_else(|| {
                    ServiceError::Protocol { op: "query", reason: format!("an item has no deviceId: {t}") }
                })
            })
            .collect()
    }

    /// Sends a C2D message to `device_id` through the REST extension.
    pub async fn send_c2d(&self, device_id: &str, msg: &C2dSend) -> Result<(), ServiceError> {
        let mut req = self
            .request(Method::POST, &format!("/devices/{}/messages/deviceBound", url_encode(device_id)))?
            .header("iothub-messageid", &msg.message_id)
            .header("iothub-ack", msg.ack)
            .body(msg.body.clone());
        if let Some(ct) = &msg.content_type {
            req = req.header("iothub-contenttype", ct);
        }
        if let Some(at) = msg.expiry_ms {
            req = req.header("iothub-expiry", iothub_emulator::clock::iso8601(at));
        }
        Self::send("send C2D", req).await.map(drop)
    }

    /// Receives one feedback batch, or `None` when there is none (204).
    pub async fn receive_feedback(&self) -> Result<Option<FeedbackBatch>, ServiceError> {
        const OP: &str = "receive feedback";
        let resp = Self::send(OP, self.request(Method::GET, "/messages/serviceBound/feedback")?).await?;
        if resp.status() == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let lock_token = resp
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim_matches('"').to_string())
            .ok_or_else(|| ServiceError::Protocol { op: OP, reason: "no ETag (lock token)".into() })?;
        let records: Vec<FeedbackRecord> =
            resp.json().await.map_err(|e| ServiceError::Protocol { op: OP, reason: e.to_string() })?;
        Ok(Some(FeedbackBatch { lock_token, records }))
    }

    /// Completes (deletes) a received feedback batch.
    pub async fn complete_feedback(&self, lock_token: &str) -> Result<(), ServiceError> {
        let path = format!("/messages/serviceBound/feedback/{}", url_encode(lock_token));
        Self::send("complete feedback", self.request(Method::DELETE, &path)?).await.map(drop)
    }

    /// Creates configuration `id` (automatic device management, `PUT /configurations/{id}`
    /// without `If-Match`) from its Configuration JSON; returns the hub's answer.
    pub async fn create_configuration(&self, id: &str, body: &Value) -> Result<Value, ServiceError> {
        const OP: &str = "create configuration";
        let req = self.request(Method::PUT, &format!("/configurations/{}", url_encode(id)))?.json(body);
        Self::json(OP, Self::send(OP, req).await?).await
    }

    /// Configuration `id` with its metrics (`GET /configurations/{id}`).
    pub async fn get_configuration(&self, id: &str) -> Result<Value, ServiceError> {
        const OP: &str = "get configuration";
        let req = self.request(Method::GET, &format!("/configurations/{}", url_encode(id)))?;
        Self::json(OP, Self::send(OP, req).await?).await
    }

    /// The device's twin JSON.
    pub async fn get_twin(&self, device_id: &str) -> Result<Value, ServiceError> {
        const OP: &str = "get twin";
        let req = self.request(Method::GET, &format!("/twins/{}", url_encode(device_id)))?;
        Self::json(OP, Self::send(OP, req).await?).await
    }
}

fn identity_from_json(op: &'static str, v: &Value) -> Result<DeviceIdentity, ServiceError> {
    let device_id = v.get("deviceId").and_then(Value::as_str);
    let key = v.pointer("/authentication/symmetricKey/primaryKey").and_then(Value::as_str);
    match (device_id, key) {
        (Some(d), Some(k)) => Ok(DeviceIdentity { device_id: d.to_string(), primary_key: k.to_string() }),
        _ => Err(ServiceError::Protocol { op, reason: format!("no deviceId or primary key in {v}") }),
    }
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_device_connection_strings() {
        let cs = "HostName=h;DeviceId=d;SharedAccessKey=SG9zdGVkIGxvY2FsbHk6IGlvdGh1Yi1lbXVsYXRvciE=";
        assert!(matches!(
            ServiceClient::new(cs, "http://127.0.0.1:1", None),
            Err(ServiceError::ConnectionString(_))
        ));
    }

    #[test]
    fn reads_identity_json() {
        let v = json!({"deviceId": "d1", "authentication": {"symmetricKey": {"primaryKey": "k"}}});
        let id = identity_from_json("t", &v).unwrap();
        assert_eq!(id, DeviceIdentity { device_id: "d1".into(), primary_key: "k".into() });
        assert!(identity_from_json("t", &json!({"deviceId": "d1"})).is_err());
    }
}
