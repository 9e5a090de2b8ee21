//! The emulator's own endpoints on the plain HTTP port: `/health`, `/ca.pem`,
//! `/emulator/telemetry` (recorded D2C messages; `waitMs` long-polls for new ones),
//! `/emulator/connection-strings`, `/emulator/ftp/faults` (the FTP server's fault knobs: GET reads them,
//! PUT replaces them), `/emulator/time` (hub time: GET reads it, POST moves it forward; see
//! [`crate::hub::time`]) and `/emulator/throttle` (the tier throttle's rates and its admitted,
//! shaped and refused counts; `{"tier": null}` when throttling is off) and `/emulator/x509-cas`
//! (the CAs `certificateAuthority` devices may chain to: GET lists them, POST adds the PEM body's
//! certificates; IoT Hub's equivalent is the hub's ARM certificates).
//! None of these exist in IoT Hub; they are for tests, tools and containers. `--disable-admin-api`
//! ([`crate::HubConfig::admin_api`]) turns the `/emulator/*` ones off (they answer 404).

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{Value, json};

use crate::error::HubError;
use crate::ftp::FaultSettings;

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
    if req.method != Method::GET {
        return Err(method_not_allowed(req));
    }
    match req.route {
        Route::X509Cas => Ok(json_response(StatusCode::OK, &json!(ctx.hub.x509_cas()))),
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
            let mut map: serde_json::Map<String, Value> = ctx
                .hub
                .policies()
                .iter()
                .filter_map(|p| {
                    Some((p.name.clone(), Value::String(ctx.hub.policy_connection_string(&p.name)?)))
                })
                .collect();
            let dps = ctx.hub.dps();
            map.insert(
                crate::dps::SERVICE_POLICY.into(),
                dps.service_connection_string(ctx.hub.hostname()).into(),
            );
            map.insert("dpsIdScope".into(), dps.id_scope().into());
            Ok(json_response(StatusCode::OK, &Value::Object(map)))
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
        let notified = ctx.hub.notifier().notified();
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
