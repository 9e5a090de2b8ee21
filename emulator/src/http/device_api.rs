//! Device-facing HTTP routes (reference §3.6–3.7): receive a C2D message with a lock, complete,
//! reject or abandon it, and send D2C telemetry (single or batched).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::Value;

use crate::clock::iso8601;
use crate::error::{ErrorCode, HubError};
use crate::hub::{D2cMessage, Hub, messaging::Settlement};
use crate::limits::{C2D_LOCK_TIMEOUT_MS, D2C_MAX_MESSAGE_BYTES};

use super::router::Route;
use super::service_api::parse_lock;
use super::{HttpResponse, Req, empty, method_not_allowed, set_header};

/// The content type of a D2C batch.
const BATCH_CONTENT_TYPE: &str = "application/vnd.microsoft.iothub.json";

/// Handles a device-facing route.
pub fn handle(hub: &Hub, req: &Req) -> Result<HttpResponse, HubError> {
    let id = match &req.route {
        Route::DeviceBound(id) | Route::DeviceBoundLock(id, _) | Route::DeviceBoundAbandon(id, _) => id,
        Route::DeviceEvents(id) => id,
        _ => return Err(method_not_allowed(req)),
    };
    hub.authenticate_device(req.token()?, id)?;
    match (&req.route, &req.method) {
        (Route::DeviceBound(id), &Method::GET) => receive(hub, id),
        (Route::DeviceBoundLock(id, lock), &Method::DELETE) => {
            let how = if req.param("reject").is_some() { Settlement::Reject } else { Settlement::Complete };
            hub.settle_c2d(id, parse_lock(lock)?, how)?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        (Route::DeviceBoundAbandon(id, lock), &Method::POST) => {
            hub.settle_c2d(id, parse_lock(lock)?, Settlement::Abandon)?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        (Route::DeviceEvents(id), &Method::POST) => {
            let batch = req.header("content-type").is_some_and(|c| c.starts_with(BATCH_CONTENT_TYPE));
            let messages = if batch { batch_messages(id, req)? } else { vec![single_message(id, req)?] };
            for m in messages {
                hub.record_telemetry(m);
            }
            Ok(empty(StatusCode::NO_CONTENT))
        }
        _ => Err(method_not_allowed(req)),
    }
}

fn receive(hub: &Hub, id: &str) -> Result<HttpResponse, HubError> {
    let Some(d) = hub.receive_c2d(id, C2D_LOCK_TIMEOUT_MS)? else {
        return Ok(empty(StatusCode::NO_CONTENT));
    };
    let m = &d.message;
    let mut resp = http::Response::new(http_body_util::Full::new(m.body.clone()));
    set_header(&mut resp, "etag", &format!("\"{}\"", d.lock_token));
    set_header(&mut resp, "iothub-sequencenumber", &d.sequence_number.to_string());
    set_header(&mut resp, "iothub-to", &format!("/devices/{id}/messages/deviceBound"));
    set_header(&mut resp, "iothub-expiry", &iso8601(d.expires_at));
    set_header(&mut resp, "iothub-enqueuedtime", &iso8601(d.enqueued_at));
    set_header(&mut resp, "iothub-deliverycount", &d.delivery_count.to_string());
    set_header(&mut resp, "iothub-ack", m.ack.as_str());
    let optional = [
        ("iothub-messageid", &m.message_id),
        ("iothub-correlationid", &m.correlation_id),
        ("iothub-userid", &m.user_id),
        ("contenttype", &m.content_type),
        ("contentencoding", &m.content_encoding),
    ];
    for (name, value) in optional {
        if let Some(v) = value {
            set_header(&mut resp, name, v);
        }
    }
    let mut spellings = Vec::new();
    for (k, v) in &m.properties {
        let name = format!("iothub-app-{k}");
        set_header(&mut resp, &name, v);
        if k.bytes().any(|b| b.is_ascii_uppercase()) {
            spellings.push(name);
        }
    }
    if !spellings.is_empty() {
        // Written with these spellings on HTTP/1 (see `header_case`).
        resp.extensions_mut().insert(super::header_case::OriginalNames(spellings));
    }
    Ok(resp)
}

fn too_large(size: usize) -> HubError {
    HubError::new(
        ErrorCode::MessageTooLarge,
        format!("the message is {size} bytes; D2C messages are at most {D2C_MAX_MESSAGE_BYTES}"),
    )
}

fn single_message(id: &str, req: &Req) -> Result<D2cMessage, HubError> {
    if req.body.len() > D2C_MAX_MESSAGE_BYTES {
        return Err(too_large(req.body.len()));
    }
    let mut system = Vec::new();
    let mut properties = Vec::new();
    for (k, v) in &req.headers {
        let (Some(v), name) = (v.to_str().ok(), k.as_str()) else { continue };
        if name.starts_with("iothub-app-") {
            // IoT Hub never modifies application properties: keep the name as the device spelled it.
            let app = &req.spelled(name)["iothub-app-".len()..];
            properties.push((app.to_string(), v.to_string()));
        } else if let Some(sys) = name.strip_prefix("iothub-")
            && sys != "to"
        {
            system.push((system_property_name(sys).to_string(), v.to_string()));
        }
    }
    Ok(D2cMessage {
        device_id: id.to_string(),
        system_properties: system,
        properties,
        body: req.body.clone(),
        ..D2cMessage::default()
    })
}

/// The AMQP name of a D2C system property sent as an `iothub-<suffix>` header, so telemetry read
/// back names properties the same way whichever protocol the device used (MQTT maps `$.mid` etc.
/// to the same names).
fn system_property_name(suffix: &str) -> &str {
    match suffix {
        "messageid" => "message-id",
        "correlationid" => "correlation-id",
        "userid" => "user-id",
        "contenttype" => "content-type",
        "contentencoding" => "content-encoding",
        "expiry" => "absolute-expiry-time",
        "creationtimeutc" => "creation-time",
        other => other,
    }
}

fn batch_messages(id: &str, req: &Req) -> Result<Vec<D2cMessage>, HubError> {
    if req.body.len() > D2C_MAX_MESSAGE_BYTES {
        return Err(too_large(req.body.len()));
    }
    let items = match req.json()? {
        Value::Array(items) => items,
        _ => return Err(HubError::new(ErrorCode::IotHubFormatError, "a D2C batch must be a JSON array")),
    };
    items
        .iter()
        .map(|item| {
            let body = item.get("body").and_then(Value::as_str).unwrap_or_default();
            let body = B64.decode(body).map_err(|_| {
                HubError::new(ErrorCode::IotHubFormatError, "each batch item's body must be base64")
            })?;
            let properties = item
                .get("properties")
                .and_then(Value::as_object)
                .map(|props| {
                    props
                        .iter()
                        .filter_map(|(k, v)| {
                            let name = k.strip_prefix("iothub-app-").unwrap_or(k);
                            Some((name.to_string(), v.as_str()?.to_string()))
                        })
                        .collect()
                })
                .unwrap_or_default();
            Ok(D2cMessage {
                device_id: id.to_string(),
                properties,
                body: Bytes::from(body),
                ..D2cMessage::default()
            })
        })
        .collect()
}
