//! The emulator's own endpoints on the plain HTTP port: `/health`, `/ca.pem`,
//! `/emulator/telemetry` (recorded D2C messages; `waitMs` long-polls for new ones),
//! `/emulator/connection-strings` (every policy's, plus the Event Hub-compatible one),
//! `/emulator/event-hub` (the built-in Event Hub-compatible endpoint's name, partitions, their
//! runtime information and the log's limits and usage), `/emulator/consumer-groups[/{name}]` (the built-in endpoint's consumer groups: list, PUT creates,
//! GET reads, DELETE removes; real IoT Hub manages them through Azure Resource Manager, whose JSON
//! shape these answers follow), `/emulator/ftp/faults` (the FTP server's fault knobs: GET reads them,
//! PUT replaces them), `/emulator/time` (hub time: GET reads it, POST moves it forward; see
//! [`crate::hub::time`]) and `/emulator/throttle` (the tier throttle's rates and its admitted,
//! shaped and refused counts; `{"tier": null}` when throttling is off) and `/emulator/x509-cas`
//! (the CAs `certificateAuthority` devices may chain to: GET lists them, POST adds the PEM body's
//! certificates; IoT Hub's equivalent is the hub's ARM certificates), and the dashboard: the page
//! at `/dashboard` (`/` redirects there; one self-contained HTML file, no external assets) and its
//! JSON at `/emulator/dashboard/overview`, `/emulator/dashboard/devices?prefix=&after=&limit=` and
//! `/emulator/dashboard/device?id=` (see [`crate::hub::dashboard`]).
//! None of these exist in IoT Hub; they are for tests, tools and containers. `--disable-admin-api`
//! ([`crate::HubConfig::admin_api`]) turns the `/emulator/*` ones off (they answer 404).

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::error::{ErrorCode, HubError};
use crate::ftp::FaultSettings;
use crate::hub::dashboard::{DEVICE_PAGE_MAX, SCENARIO_STATUS_MAX_BYTES};
use crate::hub::events::{ConsumerGroup, EventsError};

use super::router::Route;
use super::{HttpContext, HttpResponse, Req, empty, json_response, method_not_allowed, set_header};

/// Handles an emulator endpoint.
pub fn handle(ctx: &HttpContext, req: &Req) -> Result<HttpResponse, HubError> {
    if req.route == Route::FtpFaults && req.method == Method::PUT {
        let settings = FaultSettings::from_json(&req.json()?).map_err(|e| HubError::invalid(e.0))?;
        ctx.ftp_faults.set(settings);
        return Ok(json_response(StatusCode::OK, &settings.to_json()));
    }
    if req.route == Route::Time && req.method == Method::POST {
        let ms = advance_ms(&req.json()?)?;
        ctx.hub.advance_time(ms).map_err(|e| HubError::invalid(e.to_string()))?;
        return Ok(json_response(StatusCode::OK, &time_json(&ctx.hub)));
    }
    if req.route == Route::X509Cas && req.method == Method::POST {
        let pem = std::str::from_utf8(&req.body)
            .map_err(|_| HubError::invalid("the body must be PEM text (CERTIFICATE blocks)"))?;
        let added = ctx.hub.add_x509_ca(pem)?;
        for ca in &added {
            tracing::info!(subject = %ca.subject, thumbprint = %ca.thumbprint, "trusting an X.509 device CA");
        }
        return Ok(json_response(StatusCode::CREATED, &json!(added)));
    }
    if let Route::ConsumerGroup(name) = &req.route {
        return consumer_group(ctx, req, name);
    }
    if matches!(&req.route, Route::DashboardApi(part) if part == "scenario") {
        return scenario_api(ctx, req);
    }
    if req.method != Method::GET {
        return Err(method_not_allowed(req));
    }
    match &req.route {
        Route::X509Cas => Ok(json_response(StatusCode::OK, &json!(ctx.hub.x509_cas()))),
        Route::Root => {
            let mut resp = empty(StatusCode::FOUND);
            set_header(&mut resp, "location", "/dashboard");
            Ok(resp)
        }
        Route::Dashboard => {
            let mut resp =
                http::Response::new(http_body_util::Full::new(Bytes::from_static(DASHBOARD_HTML.as_bytes())));
            set_header(&mut resp, "content-type", "text/html; charset=utf-8");
            set_header(&mut resp, "cache-control", "no-store");
            Ok(resp)
        }
        Route::DashboardApi(part) => dashboard_api(ctx, req, part),
        Route::Metrics => {
            let text = ctx.hub.prometheus_text();
            let mut resp = http::Response::new(http_body_util::Full::new(Bytes::from(text)));
            set_header(&mut resp, "content-type", crate::metrics::CONTENT_TYPE);
            set_header(&mut resp, "cache-control", "no-store");
            Ok(resp)
        }
        Route::Health => {
            let (status, state) = if ctx.is_ready() {
                (StatusCode::OK, "healthy")
            } else {
                (StatusCode::SERVICE_UNAVAILABLE, "starting")
            };
            Ok(json_response(status, &json!({ "status": state, "devices": ctx.hub.device_count() })))
        }
        Route::CaPem => {
            let mut resp = http::Response::new(http_body_util::Full::new(Bytes::from(ctx.ca_pem.clone())));
            set_header(&mut resp, "content-type", "application/x-pem-file");
            Ok(resp)
        }
        Route::Telemetry => {
            let device = req.param("deviceId");
            let after = req.param("after").and_then(|a| a.parse().ok()).unwrap_or(0);
            let limit = req.param("limit").and_then(|l| l.parse().ok()).unwrap_or(1000).min(10_000);
            let items: Vec<Value> =
                ctx.hub.read_telemetry(device.as_deref(), after, limit).iter().map(|m| m.to_json()).collect();
            Ok(json_response(StatusCode::OK, &Value::Array(items)))
        }
        Route::ConnectionStrings => {
            let hub = &ctx.hub;
            let mut map: serde_json::Map<String, Value> = hub
                .policies()
                .iter()
                .filter_map(|p| Some((p.name.clone(), Value::String(hub.policy_connection_string(&p.name)?))))
                .collect();
            if let Some(eh) = hub.event_hub_connection_string(crate::sas::OWNER_POLICY) {
                map.insert("eventHubCompatible".into(), Value::String(eh));
            }
            let (host, port) = hub.event_hub_endpoint();
            map.insert("eventHubCompatibleEndpoint".into(), Value::String(format!("sb://{host}:{port}/")));
            map.insert("eventHubCompatibleName".into(), Value::String(hub.event_hub_name().to_string()));
            let dps = ctx.hub.dps();
            map.insert(
                crate::dps::SERVICE_POLICY.into(),
                dps.service_connection_string(ctx.hub.hostname()).into(),
            );
            map.insert("dpsIdScope".into(), dps.id_scope().into());
            Ok(json_response(StatusCode::OK, &Value::Object(map)))
        }
        Route::EventHub => Ok(json_response(StatusCode::OK, &event_hub_json(&ctx.hub))),
        Route::ConsumerGroups => {
            let groups: Vec<Value> = ctx.hub.consumer_groups().iter().map(consumer_group_json).collect();
            Ok(json_response(StatusCode::OK, &json!({ "value": groups })))
        }
        Route::FtpFaults => Ok(json_response(StatusCode::OK, &ctx.ftp_faults.settings().to_json())),
        Route::Time => Ok(json_response(StatusCode::OK, &time_json(&ctx.hub))),
        Route::Throttle => {
            let stats = ctx.hub.throttle_stats();
            let body = if stats.is_null() { json!({ "tier": null }) } else { stats };
            Ok(json_response(StatusCode::OK, &body))
        }
        _ => Ok(empty(StatusCode::NOT_FOUND)),
    }
}

/// `PUT`, `GET` or `DELETE /emulator/consumer-groups/{name}`.
fn consumer_group(ctx: &HttpContext, req: &Req, name: &str) -> Result<HttpResponse, HubError> {
    let hub = &ctx.hub;
    match req.method {
        Method::PUT => {
            let (group, created) = hub.create_consumer_group(name).map_err(events_error)?;
            let status = if created { StatusCode::CREATED } else { StatusCode::OK };
            Ok(json_response(status, &consumer_group_json(&group)))
        }
        Method::GET => {
            let group = hub.require_consumer_group(name).map_err(events_error)?;
            Ok(json_response(StatusCode::OK, &consumer_group_json(&group)))
        }
        Method::DELETE => match hub.delete_consumer_group(name).map_err(events_error)? {
            true => Ok(empty(StatusCode::OK)),
            // ARM answers a delete of something absent with 204.
            false => Ok(empty(StatusCode::NO_CONTENT)),
        },
        _ => Err(method_not_allowed(req)),
    }
}

/// `GET /emulator/event-hub`'s body.
fn event_hub_json(hub: &crate::hub::Hub) -> Value {
    let s = hub.events_status();
    let (host, port) = hub.event_hub_endpoint();
    let partitions: Vec<Value> = s
        .partitions
        .iter()
        .map(|p| {
            json!({
                "partitionId": p.id,
                "beginSequenceNumber": p.begin_sequence_number,
                "lastEnqueuedSequenceNumber": p.last_enqueued_sequence_number,
                "lastEnqueuedOffset": p.last_enqueued_offset_str(),
                "lastEnqueuedTimeUtc": crate::clock::iso8601(p.last_enqueued_time),
                "isEmpty": p.is_empty,
            })
        })
        .collect();
    json!({
        "name": s.info.name,
        "endpoint": format!("sb://{host}:{port}/"),
        "createdAt": crate::clock::iso8601(s.info.created_at),
        "partitionIds": s.info.partition_ids,
        "partitions": partitions,
        "consumerGroups": hub.consumer_groups().iter().map(|g| g.name.clone()).collect::<Vec<_>>(),
        "retentionMs": s.retention_ms,
        "memoryBudgetBytes": s.memory_budget_bytes,
        "maxEvents": (s.max_events != usize::MAX).then_some(s.max_events),
        "accountedBytes": s.accounted_bytes,
        "retainedEvents": s.retained,
        "lastTelemetrySequenceNumber": s.last_hub_sequence,
    })
}

/// A consumer group in ARM's `EventHubConsumerGroupInfo` shape.
fn consumer_group_json(g: &ConsumerGroup) -> Value {
    json!({
        "id": format!("/emulator/consumer-groups/{}", g.name),
        "name": g.name,
        "type": "Microsoft.Devices/IotHubs/EventHubEndpoints/ConsumerGroups",
        "properties": { "name": g.name, "created": crate::clock::iso8601(g.created_at) },
    })
}

/// An event log error in IoT Hub's HTTP terms.
fn events_error(e: EventsError) -> HubError {
    let code = match e {
        EventsError::ConsumerGroupNotFound { .. } => ErrorCode::NotFound,
        EventsError::TooManyConsumerGroups => ErrorCode::IotHubQuotaExceeded,
        _ => ErrorCode::ArgumentInvalid,
    };
    HubError::new(code, e.to_string())
}

/// The dashboard page: one HTML file with its CSS and script inline.
const DASHBOARD_HTML: &str = include_str!("dashboard.html");

/// `GET /emulator/dashboard/{part}`.
fn dashboard_api(ctx: &HttpContext, req: &Req, part: &str) -> Result<HttpResponse, HubError> {
    let hub = &ctx.hub;
    match part {
        "overview" => Ok(json_response(StatusCode::OK, &hub.dashboard_overview())),
        "devices" => {
            let prefix = req.param("prefix").unwrap_or_default();
            let after = req.param("after").filter(|a| !a.is_empty());
            let limit = match req.param("limit") {
                None => 50,
                Some(l) => l.parse::<usize>().map_err(|_| {
                    HubError::invalid(format!("limit '{l}' is not a number (1 to {DEVICE_PAGE_MAX})"))
                })?,
            };
            let (items, more) = hub.dashboard_devices(&prefix, after.as_deref(), limit);
            let next = more.then(|| items.last().and_then(|d| d["deviceId"].as_str()).map(str::to_string));
            Ok(json_response(
                StatusCode::OK,
                &json!({ "items": items, "next": next.flatten(), "registered": hub.device_count() }),
            ))
        }
        "device" => {
            let id =
                req.param("id").filter(|i| !i.is_empty()).ok_or_else(|| HubError::invalid("missing id"))?;
            Ok(json_response(StatusCode::OK, &hub.dashboard_device(&id)?))
        }
        _ => Ok(empty(StatusCode::NOT_FOUND)),
    }
}

/// `/emulator/dashboard/scenario`: what an external scenario runner publishes for the page (the
/// embedded runner calls `Hub::set_scenario_status` in process). GET reads it (`null`: none), PUT
/// replaces it, DELETE clears it.
fn scenario_api(ctx: &HttpContext, req: &Req) -> Result<HttpResponse, HubError> {
    let hub = &ctx.hub;
    match req.method {
        Method::GET => {
            let status = hub.scenario_status().map_or(Value::Null, |s| (*s).clone());
            Ok(json_response(StatusCode::OK, &status))
        }
        Method::PUT => {
            hub.set_scenario_status(Some(scenario_status(&req.body)?));
            Ok(empty(StatusCode::NO_CONTENT))
        }
        Method::DELETE => {
            hub.set_scenario_status(None);
            Ok(empty(StatusCode::NO_CONTENT))
        }
        _ => Err(method_not_allowed(req)),
    }
}

/// A `PUT /emulator/dashboard/scenario` body: a JSON object of at most
/// [`SCENARIO_STATUS_MAX_BYTES`] (it is cloned into every overview the page polls).
fn scenario_status(body: &[u8]) -> Result<Value, HubError> {
    if body.len() > SCENARIO_STATUS_MAX_BYTES {
        return Err(HubError::new(
            ErrorCode::MessageTooLarge,
            format!("the scenario status is {} bytes; at most {SCENARIO_STATUS_MAX_BYTES}", body.len()),
        ));
    }
    match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) => Ok(v),
        Ok(_) => Err(HubError::invalid("the scenario status must be a JSON object")),
        Err(e) => Err(HubError::invalid(format!("the scenario status is not JSON: {e}"))),
    }
}

/// `GET /emulator/time`'s body: hub time, the wall clock, and the offset between them.
fn time_json(hub: &crate::hub::Hub) -> Value {
    let (now, wall) = (hub.now(), hub.wall_now());
    json!({
        "now": crate::clock::iso8601(now),
        "nowMs": now,
        "wallClock": crate::clock::iso8601(wall),
        "offsetMs": hub.time_offset_ms(),
    })
}

/// How far a `POST /emulator/time` body moves hub time: exactly one of `"advance"` (a duration
/// such as `"2h"`, `"1day 3h"`, `"90s"`) or `"advanceMs"` (a non-negative integer).
fn advance_ms(body: &Value) -> Result<u64, HubError> {
    let invalid = |m: String| HubError::invalid(m);
    let obj = body.as_object().ok_or_else(|| invalid("the body must be a JSON object".into()))?;
    if let Some(key) = obj.keys().find(|k| *k != "advance" && *k != "advanceMs") {
        return Err(invalid(format!("unknown field '{key}'; allowed: advance, advanceMs")));
    }
    match (obj.get("advance"), obj.get("advanceMs")) {
        (Some(Value::String(s)), None) => humantime::parse_duration(s)
            .map(|d| d.as_millis().min(u128::from(u64::MAX)) as u64)
            .map_err(|e| invalid(format!("advance: '{s}' is not a duration such as \"2h\" ({e})"))),
        (None, Some(v)) => v.as_u64().ok_or_else(|| {
            invalid(format!("advanceMs must be a non-negative integer (time never goes backwards); got {v}"))
        }),
        (Some(_), Some(_)) => Err(invalid("give either advance or advanceMs, not both".into())),
        (Some(v), None) => Err(invalid(format!("advance must be a duration string such as \"2h\"; got {v}"))),
        (None, None) => Err(invalid("missing advance (e.g. \"2h\") or advanceMs".into())),
    }
}

/// Longest `waitMs` a telemetry read may ask for.
pub const TELEMETRY_MAX_WAIT_MS: u64 = 30_000;

/// `GET /emulator/telemetry?deviceId=&after=&waitMs=`: like the plain read, but when nothing newer
/// than `after` is recorded yet, waits up to `waitMs` (at most [`TELEMETRY_MAX_WAIT_MS`]) for it.
pub async fn wait_telemetry(ctx: &HttpContext, req: &Req) -> Result<HttpResponse, HubError> {
    let wait_ms = req.param("waitMs").and_then(|w| w.parse().ok()).unwrap_or(0).min(TELEMETRY_MAX_WAIT_MS);
    let device = req.param("deviceId");
    let after = req.param("after").and_then(|a| a.parse().ok()).unwrap_or(0);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_millis(wait_ms);
    loop {
        let notified = ctx.hub.events_notifier().notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if !ctx.hub.read_telemetry(device.as_deref(), after, 1).is_empty() {
            break;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            break;
        }
    }
    handle(ctx, req)
}
