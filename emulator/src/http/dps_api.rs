//! The Device Provisioning Service's HTTPS routes (reference-2 §2.4, §2.6): the device API
//! (`PUT /{idScope}/registrations/{id}/register`, `GET …/operations/{operationId}`, authenticated
//! by the registration's SAS token, or by the TLS client certificate when there is no
//! `Authorization` header) and the enrollment service API (`/enrollments/{id}`,
//! `/enrollmentGroups/{id}`, their `query`, `/registrations/{id}`, authenticated by a
//! `provisioningserviceowner` token). Errors carry DPS's body (`errorCode`, `trackingId`,
//! `message`, `timestampUtc`) and `x-ms-error-code`. The logic is in [`crate::dps`].

use http::{Method, StatusCode};
use serde_json::Value;

use crate::dps::DpsError;
use crate::hub::Hub;

use super::router::Route;
use super::{HttpResponse, Req, empty, json_response, set_header};

/// Most enrollments one query page returns (`x-ms-max-item-count` may ask for fewer).
const QUERY_PAGE_MAX: usize = 1000;

/// Handles a DPS route; never fails (errors become DPS error responses).
pub fn handle(hub: &Hub, req: &Req) -> HttpResponse {
    match route(hub, req) {
        Ok(resp) => resp,
        Err(e) => {
            tracing::info!(method = %req.method, status = e.status, code = e.code, "DPS: {}", e.message);
            let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let mut resp = json_response(status, &e.body(hub.wall_now()));
            set_header(&mut resp, "x-ms-error-code", &e.code.to_string());
            resp
        }
    }
}

fn token(req: &Req) -> Result<&str, DpsError> {
    req.header("authorization").filter(|t| !t.trim().is_empty()).ok_or_else(|| {
        DpsError::unauthorized("the Authorization header with a SharedAccessSignature is missing")
    })
}

fn json_body(req: &Req) -> Result<Option<Value>, DpsError> {
    if req.body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(&req.body)
        .map(Some)
        .map_err(|e| DpsError::bad_request(format!("the request body is not valid JSON: {e}")))
}

fn not_allowed(req: &Req) -> DpsError {
    DpsError { status: 405, code: 405000, message: format!("{} is not allowed on this resource", req.method) }
}

fn route(hub: &Hub, req: &Req) -> Result<HttpResponse, DpsError> {
    let dps = hub.dps();
    let now_secs = hub.wall_now() / 1000;
    let skew = hub.config().sas_skew_secs;
    let m = &req.method;
    match &req.route {
        Route::DpsRegister(scope, reg) | Route::DpsOperation(scope, reg, _) => {
            if scope != dps.id_scope() {
                return Err(DpsError::unauthorized(format!("'{scope}' is not this service's ID scope")));
            }
            let cred = match (&req.client_cert, req.header("authorization")) {
                (Some(chain), None) => dps.authenticate_device_x509(reg, chain)?,
                _ => dps.authenticate_device(reg, token(req)?, now_secs, skew)?,
            };
            let status = match &req.route {
                Route::DpsRegister(..) if m == Method::PUT => {
                    let payload = crate::dps::mqtt::parse_register_body(&req.body, reg)?;
                    dps.register(hub, reg, &cred, payload.as_ref())?
                }
                Route::DpsOperation(_, _, op) if m == Method::GET => dps.operation_status(hub, reg, op)?,
                _ => return Err(not_allowed(req)),
            };
            Ok(json_response(StatusCode::OK, &status))
        }
        _ => {
            dps.authenticate_service(token(req)?, now_secs, skew)?;
            service(hub, req)
        }
    }
}

fn service(hub: &Hub, req: &Req) -> Result<HttpResponse, DpsError> {
    let dps = hub.dps();
    let m = &req.method;
    match &req.route {
        Route::DpsEnrollment { group, id } if m == Method::PUT => {
            let body =
                json_body(req)?.ok_or_else(|| DpsError::bad_request("the enrollment body is missing"))?;
            Ok(json_response(StatusCode::OK, &dps.put_enrollment(*group, id, &body, hub.now())?))
        }
        Route::DpsEnrollment { group, id } if m == Method::GET => {
            Ok(json_response(StatusCode::OK, &dps.get_enrollment(*group, id)?))
        }
        Route::DpsEnrollment { group, id } if m == Method::DELETE => {
            dps.delete_enrollment(*group, id)?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        Route::DpsEnrollmentQuery { group } if m == Method::POST => {
            let top = req
                .header("x-ms-max-item-count")
                .and_then(|v| v.parse().ok())
                .unwrap_or(QUERY_PAGE_MAX)
                .min(QUERY_PAGE_MAX);
            Ok(json_response(StatusCode::OK, &dps.query_enrollments(*group, top)))
        }
        Route::DpsRegistration(reg) if m == Method::GET => {
            Ok(json_response(StatusCode::OK, &dps.get_registration(hub, reg)?))
        }
        Route::DpsRegistration(reg) if m == Method::DELETE => {
            dps.delete_registration(reg)?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        _ => Err(not_allowed(req)),
    }
}
