//! Service-facing REST routes: registry, query, bulk, statistics, twins, direct methods, scheduled
//! jobs, configurations (reference-2 §6), C2D send (an emulator extension) and purge, and feedback
//! (reference §2.2).
//!
//! Rights for jobs (reference §1.5 and §2.10; IoT Hub's exact demand is undocumented, so the
//! emulator is lenient the way twins are): reading a job or the jobs query needs RegistryRead or
//! ServiceConnect; creating or cancelling needs ServiceConnect or RegistryWrite, and a
//! `scheduleDeviceMethod` job needs ServiceConnect, like `POST /twins/{id}/methods`.

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::c2d::{AckMode, C2dMessage, FEEDBACK_CONTENT_TYPE, LockToken};
use crate::clock::{iso8601, parse_iso8601};
use crate::error::{ErrorCode, HubError};
use crate::hub::{DeviceInput, Hub, IfMatch, ModuleInput};
use crate::jobs::model::{JobType, MethodSpec};
use crate::sas::Rights;

use super::router::Route;
use super::{HttpResponse, Req, empty, json_response, method_not_allowed, set_header};

const READ: Rights = Rights::REGISTRY_READ.union(Rights::SERVICE_CONNECT);
const WRITE: Rights = Rights::REGISTRY_WRITE;
const SERVICE: Rights = Rights::SERVICE_CONNECT;

/// Handles a service-facing route.
pub fn handle(hub: &Hub, req: &Req) -> Result<HttpResponse, HubError> {
    let m = &req.method;
    let needed = match (&req.route, m) {
        (Route::NotImplemented(what), _) => {
            return Err(HubError::new(
                ErrorCode::NotImplemented,
                format!("the emulator does not implement IoT Hub's {what} API"),
            ));
        }
        (Route::Unknown, _) => {
            return Err(HubError::new(ErrorCode::NotFound, "no IoT Hub API at this path"));
        }
        (Route::Devices | Route::Device(_) | Route::StatsDevices, &Method::GET) => READ,
        (Route::Modules(_) | Route::Module(..), &Method::GET) => READ,
        (Route::Devices, &Method::POST)
        | (Route::Device(_) | Route::Module(..), &Method::PUT | &Method::DELETE) => WRITE,
        (Route::Query, &Method::POST) => READ,
        (Route::Job(_), &Method::GET) | (Route::JobsQuery, &Method::GET) => READ,
        (Route::Job(_), &Method::PUT) | (Route::JobCancel(_), &Method::POST) => SERVICE.union(WRITE),
        (Route::Twin(_) | Route::ModuleTwin(..), &Method::GET) => READ,
        (Route::Configurations | Route::Configuration(_), &Method::GET) => READ,
        (Route::ConfigurationTestQueries, &Method::POST) => READ,
        (Route::Configuration(_), &Method::PUT | &Method::DELETE) => WRITE,
        (Route::Twin(_) | Route::ModuleTwin(..), &Method::PATCH | &Method::PUT) => SERVICE.union(WRITE),
        (Route::StatsService, &Method::GET)
        | (Route::TwinMethods(_), &Method::POST)
        | (Route::DeviceCommands(_), &Method::DELETE)
        | (Route::DeviceBound(_), &Method::POST)
        | (Route::Feedback, &Method::GET)
        | (Route::FeedbackLock(_), &Method::DELETE)
        | (Route::FeedbackAbandon(_), &Method::POST) => SERVICE,
        _ => return Err(method_not_allowed(req)),
    };
    hub.authenticate_service(req.token()?, needed)?;
    let if_match = req.header("if-match").and_then(IfMatch::parse);
    match &req.route {
        Route::Devices if m == Method::GET => {
            let top = req.param("top").and_then(|t| t.parse().ok());
            Ok(json_response(StatusCode::OK, &Value::Array(hub.list_devices(top))))
        }
        Route::Devices => {
            let result = hub.bulk(&req.json()?)?;
            let status = if result.is_successful { StatusCode::OK } else { StatusCode::BAD_REQUEST };
            Ok(json_response(status, &result.to_json()))
        }
        Route::Device(id) if m == Method::GET => Ok(json_response(StatusCode::OK, &hub.get_device(id)?)),
        Route::Device(id) if m == Method::PUT => {
            let input = DeviceInput::from_json(&req.json()?)?;
            let (device, _created) = hub.put_device(id, input, if_match)?;
            Ok(json_response(StatusCode::OK, &device))
        }
        Route::Device(id) => {
            hub.delete_device(id, if_match)?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        Route::Modules(id) => Ok(json_response(StatusCode::OK, &Value::Array(hub.list_modules(id)?))),
        Route::Module(id, mid) if m == Method::GET => {
            Ok(json_response(StatusCode::OK, &hub.get_module(id, mid)?))
        }
        Route::Module(id, mid) if m == Method::PUT => {
            let input = ModuleInput::from_json(&req.json()?)?;
            let (module, created) = hub.put_module(id, mid, input, if_match)?;
            let status = if created { StatusCode::CREATED } else { StatusCode::OK };
            Ok(json_response(status, &module))
        }
        Route::Module(id, mid) => {
            hub.delete_module(id, mid, if_match)?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        Route::ModuleTwin(id, mid) if m == Method::GET => {
            Ok(json_response(StatusCode::OK, &hub.get_module_twin(id, mid)?))
        }
        Route::ModuleTwin(id, mid) => {
            let twin = hub.update_module_twin(id, mid, &req.json()?, if_match, m == Method::PUT)?;
            Ok(json_response(StatusCode::OK, &twin))
        }
        Route::Query => query(hub, req),
        Route::Configurations => {
            let top = req.param("top").and_then(|t| t.parse().ok());
            Ok(json_response(StatusCode::OK, &Value::Array(hub.list_configurations(top))))
        }
        Route::ConfigurationTestQueries => {
            Ok(json_response(StatusCode::OK, &hub.test_configuration_queries(&req.json()?)?))
        }
        Route::Configuration(id) if m == Method::GET => {
            Ok(json_response(StatusCode::OK, &hub.get_configuration(id)?))
        }
        Route::Configuration(id) if m == Method::PUT => {
            Ok(json_response(StatusCode::OK, &hub.put_configuration(id, &req.json()?, if_match)?))
        }
        Route::Configuration(id) => {
            hub.delete_configuration(id, if_match)?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        Route::Job(id) if m == Method::GET => Ok(json_response(StatusCode::OK, &hub.get_job(id)?)),
        Route::Job(id) => {
            let body = req.json()?;
            if body.get("type").and_then(Value::as_str) == Some(JobType::DeviceMethod.name()) {
                hub.authenticate_service(req.token()?, SERVICE)?;
            }
            Ok(json_response(StatusCode::OK, &hub.create_job(id, &body)?))
        }
        Route::JobCancel(id) => Ok(json_response(StatusCode::OK, &hub.cancel_job(id)?)),
        Route::JobsQuery => query_jobs(hub, req),
        Route::StatsDevices => {
            let s = hub.statistics();
            let body = json!({
                "totalDeviceCount": s.total,
                "enabledDeviceCount": s.enabled,
                "disabledDeviceCount": s.disabled,
            });
            Ok(json_response(StatusCode::OK, &body))
        }
        Route::StatsService => {
            let body = json!({ "connectedDeviceCount": hub.statistics().connected });
            Ok(json_response(StatusCode::OK, &body))
        }
        Route::Twin(id) if m == Method::GET => Ok(json_response(StatusCode::OK, &hub.get_twin(id)?)),
        Route::Twin(id) => {
            let (twin, _desired_patch) = hub.update_twin(id, &req.json()?, if_match, m == Method::PUT)?;
            Ok(json_response(StatusCode::OK, &twin))
        }
        Route::DeviceCommands(id) => {
            let purged = hub.purge_c2d(id)?;
            let body = json!({ "totalMessagesPurged": purged, "deviceId": id, "moduleId": null });
            Ok(json_response(StatusCode::OK, &body))
        }
        Route::DeviceBound(id) => {
            hub.send_c2d(id, c2d_from_request(req)?)?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        Route::Feedback => Ok(receive_feedback(hub)),
        Route::FeedbackLock(lock) => {
            hub.settle_feedback(parse_lock(lock)?, false)?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        Route::FeedbackAbandon(lock) => {
            hub.settle_feedback(parse_lock(lock)?, true)?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        _ => Err(method_not_allowed(req)),
    }
}

/// `POST /twins/{id}/methods` (reference §2.7), or `POST /twins/{id}/modules/{mid}/methods` for a
/// module (reference-2 §4.1): forwards the call to the device's (module's) connection and answers
/// `200 {"status","payload"}` with what it returned.
pub async fn invoke_method(hub: &Hub, req: &Req) -> Result<HttpResponse, HubError> {
    let client = match &req.route {
        Route::TwinMethods(id) => {
            hub.authenticate_service(req.token()?, SERVICE)?;
            hub.get_device(id)?;
            id.clone()
        }
        Route::ModuleMethods(id, mid) => {
            hub.authenticate_service(req.token()?, SERVICE)?;
            hub.get_module(id, mid)?;
            format!("{id}/{mid}")
        }
        _ => return Err(method_not_allowed(req)),
    };
    let spec = MethodSpec::from_json(&req.json()?, "")?;
    let reply = hub
        .invoke_method(
            &client,
            &spec.name,
            Bytes::from(spec.payload_bytes()),
            std::time::Duration::from_secs(spec.connect_timeout_secs),
            std::time::Duration::from_secs(spec.response_timeout_secs),
        )
        .await?;
    let payload = if reply.payload.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&reply.payload)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&reply.payload).into_owned()))
    };
    Ok(json_response(StatusCode::OK, &json!({ "status": reply.status, "payload": payload })))
}

/// `GET /jobs/v2/query?jobType=&jobStatus=` with `x-ms-max-item-count` / `x-ms-continuation`
/// paging, answered like the twin query: a JSON array plus `x-ms-item-type` and, while more
/// remain, `x-ms-continuation` (what the Node and C# SDKs read).
fn query_jobs(hub: &Hub, req: &Req) -> Result<HttpResponse, HubError> {
    use crate::limits::JOBS_QUERY_PAGE_MAX;
    let page_size = req
        .header("x-ms-max-item-count")
        .map(str::to_string)
        .or_else(|| req.param("pageSize"))
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|n| *n > 0)
        .unwrap_or(JOBS_QUERY_PAGE_MAX)
        .min(JOBS_QUERY_PAGE_MAX);
    let page = hub.query_jobs(
        req.param("jobType").as_deref(),
        req.param("jobStatus").as_deref(),
        req.header("x-ms-continuation")
            .map(str::to_string)
            .or_else(|| req.param("continuationToken"))
            .as_deref(),
        page_size,
    )?;
    let mut resp = json_response(StatusCode::OK, &Value::Array(page.items));
    set_header(&mut resp, "x-ms-item-type", "JobResponse");
    if let Some(c) = &page.continuation {
        set_header(&mut resp, "x-ms-continuation", c);
    }
    Ok(resp)
}

fn query(hub: &Hub, req: &Req) -> Result<HttpResponse, HubError> {
    let body = req.json()?;
    let text = body
        .get("query")
        .and_then(Value::as_str)
        .ok_or_else(|| HubError::invalid("the body must be {\"query\": \"SELECT ... FROM devices ...\"}"))?;
    let page_size = req.header("x-ms-max-item-count").and_then(|v| v.trim().parse().ok());
    let page = hub.query(text, req.header("x-ms-continuation"), page_size)?;
    let mut resp = json_response(StatusCode::OK, &Value::Array(page.items));
    set_header(&mut resp, "x-ms-item-type", page.item_type);
    if let Some(c) = &page.continuation {
        set_header(&mut resp, "x-ms-continuation", c);
    }
    Ok(resp)
}

/// Parses a lock token from a path segment (with or without quotes).
pub fn parse_lock(lock: &str) -> Result<LockToken, HubError> {
    lock.parse().map_err(|_| {
        HubError::new(
            ErrorCode::DeviceMessageLockLost,
            format!("lock token '{lock}' is not one this hub issued"),
        )
    })
}

/// Builds a C2D message from the emulator's REST send extension: body = payload, system
/// properties in `iothub-*` headers, application properties in `iothub-app-<name>` headers.
fn c2d_from_request(req: &Req) -> Result<C2dMessage, HubError> {
    let h = |n: &str| req.header(n).map(str::to_string);
    let ack = match req.header("iothub-ack") {
        None => AckMode::None,
        Some(a) => AckMode::parse(a).ok_or_else(|| {
            HubError::invalid(format!("iothub-ack '{a}' is not valid; use none, positive, negative or full"))
        })?,
    };
    let expiry =
        match req.header("iothub-expiry") {
            None => None,
            Some(e) => Some(parse_iso8601(e).ok_or_else(|| {
                HubError::invalid(format!("iothub-expiry '{e}' is not an ISO 8601 UTC time"))
            })?),
        };
    let properties = req
        .headers
        .iter()
        .filter_map(|(k, v)| {
            if !k.as_str().starts_with("iothub-app-") {
                return None;
            }
            // Names keep the sender's spelling (see `header_case`).
            let name = &req.spelled(k.as_str())["iothub-app-".len()..];
            Some((name.to_string(), v.to_str().ok()?.to_string()))
        })
        .collect();
    Ok(C2dMessage {
        message_id: h("iothub-messageid"),
        correlation_id: h("iothub-correlationid"),
        user_id: h("iothub-userid"),
        content_type: h("iothub-contenttype").or_else(|| h("content-type")),
        content_encoding: h("iothub-contentencoding").or_else(|| h("content-encoding")),
        ack,
        expiry,
        properties,
        body: Bytes::clone(&req.body),
    })
}

fn receive_feedback(hub: &Hub) -> HttpResponse {
    let Some(d) = hub.receive_feedback() else {
        return empty(StatusCode::NO_CONTENT);
    };
    let mut resp = http::Response::new(http_body_util::Full::new(d.message.body.clone()));
    set_header(&mut resp, "content-type", FEEDBACK_CONTENT_TYPE);
    set_header(&mut resp, "etag", &format!("\"{}\"", d.lock_token));
    set_header(&mut resp, "iothub-enqueuedtime", &iso8601(d.enqueued_at));
    set_header(&mut resp, "iothub-expiry", &iso8601(d.expires_at));
    set_header(&mut resp, "iothub-deliverycount", &d.delivery_count.to_string());
    set_header(&mut resp, "iothub-sequencenumber", &d.sequence_number.to_string());
    if let Some(u) = &d.message.user_id {
        set_header(&mut resp, "iothub-userid", u);
    }
    resp
}
