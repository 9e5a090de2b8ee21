//! The HTTP front end: IoT Hub's service REST API and device HTTP API on the HTTPS port, and the
//! same API plus the emulator's own endpoints (health, CA download, telemetry read-out) on the
//! plain port.
//!
//! Handlers translate requests into [`Hub`] calls and [`HubError`]s into IoT Hub's error
//! responses (status, `iothub-errorcode` header, legacy JSON body). They keep no state. With a
//! tier configured, every IoT Hub request first passes the tier throttle (see `admit`): shaped
//! requests wait for their turn, refused ones get 429 with `Retry-After`.

mod admin;
pub use admin::TELEMETRY_MAX_WAIT_MS;
pub mod connection;
mod device_api;
mod dps_api;
pub mod header_case;
pub mod router;
mod service_api;
pub mod websocket;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, HeaderName, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};

use crate::error::{ErrorCode, HubError};
use crate::ftp::FtpFaults;
use crate::hub::Hub;
use router::Route;

/// Largest request body read: D2C batches are at most 256 KB; bulk registry calls carry 100
/// devices. Anything larger is refused with `MessageTooLarge` before it is buffered. A body that
/// does not arrive within `timeouts.http_idle` of its head gets HTTP's own `408` (it never became
/// an IoT Hub request) and the connection is closed.
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;

/// The content type of every JSON response (Node only parses bodies whose type says JSON).
pub const JSON: &str = "application/json; charset=utf-8";

/// The response type of every handler.
pub type HttpResponse = Response<Full<Bytes>>;

/// What handlers need besides the hub.
#[derive(Debug)]
pub struct HttpContext {
    /// The hub.
    pub hub: Hub,
    /// The CA certificate, served at `/ca.pem`.
    pub ca_pem: String,
    /// Set once every listener accepts; `/health` answers 200 only then.
    pub ready: AtomicBool,
    /// The FTP server's fault knobs (`/emulator/ftp/faults`).
    pub ftp_faults: Arc<FtpFaults>,
    /// Cancelled when the hub shuts down (for connections upgraded to WebSocket).
    pub shutdown: tokio_util::sync::CancellationToken,
}

impl HttpContext {
    /// A context for `hub`, not yet ready.
    pub fn new(hub: Hub, ca_pem: String) -> Arc<Self> {
        Self::with_ftp_faults(hub, ca_pem, Arc::new(FtpFaults::new()))
    }

    /// A context for `hub` whose admin API drives `ftp_faults`.
    pub fn with_ftp_faults(hub: Hub, ca_pem: String, ftp_faults: Arc<FtpFaults>) -> Arc<Self> {
        Self::with_shutdown(hub, ca_pem, ftp_faults, tokio_util::sync::CancellationToken::new())
    }

    /// Like [`HttpContext::with_ftp_faults`], with the hub's shutdown token for upgraded connections.
    pub fn with_shutdown(
        hub: Hub,
        ca_pem: String,
        ftp_faults: Arc<FtpFaults>,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Self { hub, ca_pem, ready: AtomicBool::new(false), ftp_faults, shutdown })
    }

    /// Whether every listener accepts.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// One parsed request, body read.
#[derive(Debug)]
pub struct Req {
    /// The method.
    pub method: Method,
    /// The route.
    pub route: Route,
    /// The raw query string.
    pub query: String,
    /// Request headers.
    pub headers: HeaderMap,
    /// The body.
    pub body: Bytes,
    /// The certificate chain the TLS client presented (X.509 devices), if any.
    pub client_cert: Option<Arc<crate::x509::ClientChain>>,
    /// How the request spelled its `iothub-app-*` header names (HTTP/1 D2C and C2D sends only; see
    /// [`header_case`]); empty otherwise.
    pub app_header_spellings: Vec<String>,
}

impl Req {
    /// A header as text, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A query parameter (`top=5` → `Some("5")`; a bare `reject` → `Some("")`).
    pub fn param(&self, name: &str) -> Option<String> {
        self.query.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            k.eq_ignore_ascii_case(name)
                .then(|| percent_encoding::percent_decode_str(v).decode_utf8_lossy().into_owned())
        })
    }

    /// The header name `lower` (as `http` keeps it) as the request spelled it.
    pub fn spelled<'a>(&'a self, lower: &'a str) -> &'a str {
        self.app_header_spellings.iter().find(|s| s.eq_ignore_ascii_case(lower)).map_or(lower, String::as_str)
    }

    /// The SAS token from `Authorization`.
    pub fn token(&self) -> Result<&str, HubError> {
        self.header("authorization").filter(|t| !t.trim().is_empty()).ok_or_else(|| {
            HubError::unauthorized("the Authorization header with a SharedAccessSignature is missing")
        })
    }

    /// The body as JSON.
    pub fn json(&self) -> Result<serde_json::Value, HubError> {
        serde_json::from_slice(&self.body).map_err(|e| {
            HubError::new(ErrorCode::IotHubFormatError, format!("the request body is not valid JSON: {e}"))
        })
    }
}

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Port {
    /// The HTTPS port: IoT Hub's API only.
    Https,
    /// The plain port: IoT Hub's API plus the emulator's endpoints.
    Plain,
}

/// Handles one request. Never fails: errors become IoT Hub error responses.
pub async fn handle<B>(ctx: Arc<HttpContext>, port: Port, req: Request<B>) -> Result<HttpResponse, Infallible>
where
    B: http_body::Body<Data = Bytes> + Send,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    if websocket::is_upgrade(&req) {
        let e = match websocket::upgrade(&ctx, req) {
            Ok(resp) => return Ok(resp),
            Err(e) => e,
        };
        return Ok(error_response(&Method::GET, websocket::WEBSOCKET_PATH, &e));
    }
    let (mut parts, body) = req.into_parts();
    let client_cert = parts.extensions.remove::<Arc<crate::x509::ClientChain>>();
    let path = parts.uri.path().to_string();
    let body_deadline = ctx.hub.config().timeouts.http_idle;
    let collected =
        tokio::time::timeout(body_deadline, Limited::new(body, MAX_REQUEST_BYTES).collect()).await;
    let body = match collected {
        Ok(Ok(b)) => b.to_bytes(),
        Err(_) => {
            tracing::info!(method = %parts.method, path, "request body not received within {body_deadline:?}; closing");
            let mut resp = empty(StatusCode::REQUEST_TIMEOUT);
            set_header(&mut resp, "connection", "close");
            return Ok(resp);
        }
        Ok(Err(_)) => {
            let e = HubError::new(
                ErrorCode::MessageTooLarge,
                format!("the request body is larger than {MAX_REQUEST_BYTES} bytes"),
            );
            return Ok(error_response(&parts.method, &path, &e));
        }
    };
    let route = router::route(&path);
    let protocol = match port {
        Port::Https => crate::metrics::Protocol::Https,
        Port::Plain => crate::metrics::Protocol::Http,
    };
    let _timer =
        crate::metrics::Timer::start(ctx.hub.metrics().latency(protocol, operation(&route, &parts.method)));
    // Only the routes that carry application properties in headers pay for the spellings.
    let carries_properties =
        matches!(route, Route::DeviceEvents(_) | Route::DeviceBound(_)) && parts.method == Method::POST;
    let app_header_spellings = if carries_properties && header_case::has_app_headers(&parts.headers) {
        header_case::request_spellings(&parts.headers, parts.extensions).await
    } else {
        Vec::new()
    };
    let req = Req {
        method: parts.method,
        route,
        query: parts.uri.query().unwrap_or_default().to_string(),
        headers: parts.headers,
        body,
        client_cert,
        app_header_spellings,
    };
    let admin_api = ctx.hub.config().admin_api;
    if ctx.hub.throttling()
        && let Err(e) = admit(&ctx.hub, &req).await
    {
        return Ok(error_response(&req.method, &path, &e));
    }
    let result = match (&req.route, port) {
        (r, Port::Plain) if !admin_api && r.is_admin_api() => Err(not_found(&path)),
        (Route::Telemetry, Port::Plain) if req.method == Method::GET && req.param("waitMs").is_some() => {
            admin::wait_telemetry(&ctx, &req).await
        }
        (r, Port::Plain) if r.is_emulator_own() => admin::handle(&ctx, &req),
        (r, Port::Https) if r.is_emulator_own() => Err(not_found(&path)),
        // A registration's answer waits for everything written so far (assignments are rare).
        (r, _) if r.is_dps() => {
            let resp = dps_api::handle(&ctx.hub, &req);
            ctx.hub.durable_all().await.map(|()| resp)
        }
        (Route::DeviceBound(_) | Route::DeviceBoundLock(..) | Route::DeviceBoundAbandon(..), _)
            if req.method != Method::POST || matches!(req.route, Route::DeviceBoundAbandon(..)) =>
        {
            device_api::handle(&ctx.hub, &req)
        }
        (Route::DeviceEvents(_), _) => device_api::handle(&ctx.hub, &req),
        (Route::TwinMethods(_) | Route::ModuleMethods(..), _) if req.method == Method::POST => {
            service_api::invoke_method(&ctx.hub, &req).await
        }
        _ => service_api::handle(&ctx.hub, &req),
    };
    // With --persist: what the handler changed is written before the answer says it was done.
    let ticket = ctx.hub.take_durability_ticket();
    let result = match ctx.hub.durable(ticket).await {
        Ok(()) => result,
        Err(e) => Err(e),
    };
    let mut resp = result.unwrap_or_else(|e| error_response(&req.method, &path, &e));
    if let Some(header_case::OriginalNames(names)) = resp.extensions_mut().remove()
        && let Some(ext) = header_case::response_extensions(&names).await
    {
        resp.extensions_mut().extend(ext);
    }
    Ok(resp)
}

/// The `operation` label a request's latency is recorded under.
fn operation(route: &Route, m: &Method) -> crate::metrics::Operation {
    use crate::metrics::Operation as O;
    match route {
        Route::Devices if m == Method::POST => O::RegistryWrite,
        Route::Devices => O::RegistryRead,
        Route::Device(_) if m == Method::GET => O::RegistryRead,
        Route::Device(_) => O::RegistryWrite,
        Route::Query => O::Query,
        Route::Twin(_) if m == Method::GET => O::TwinRead,
        Route::Twin(_) => O::TwinUpdate,
        Route::TwinMethods(_) => O::DirectMethod,
        Route::DeviceCommands(_) => O::C2dPurge,
        Route::DeviceBound(_) if m == Method::POST => O::C2dSend,
        Route::DeviceBound(_) => O::C2dReceive,
        Route::DeviceBoundLock(..) | Route::DeviceBoundAbandon(..) => O::C2dSettle,
        Route::DeviceEvents(_) => O::D2cSend,
        Route::Feedback => O::FeedbackReceive,
        Route::FeedbackLock(_) | Route::FeedbackAbandon(_) => O::FeedbackSettle,
        Route::StatsDevices | Route::StatsService => O::Statistics,
        Route::Job(_) | Route::JobCancel(_) | Route::JobsQuery => O::Jobs,
        r if r.is_dps() => O::Dps,
        r if r.is_emulator_own() => O::Emulator,
        _ => O::Other,
    }
}

/// The tier throttle's say on an IoT Hub request (reference §5.1): which operation class the
/// route is, then wait for its turn or refuse. Message sends (C2D through the REST extension, D2C
/// from devices) are also metered against the daily quota on their body size; an HTTP D2C batch
/// counts as one send. The emulator's own routes, statistics, purge, feedback and C2D settlement
/// are not throttled (the table has no row for them), and neither is a request whose token does
/// not verify: it gets its `401` from the handler without spending the hub's rate.
async fn admit(hub: &Hub, req: &Req) -> Result<(), HubError> {
    use crate::throttle::{Op, method_chunks};
    if !req.token().is_ok_and(|t| hub.authenticate(t).is_ok()) {
        return Ok(());
    }
    let m = &req.method;
    let (op, cost, message) = match &req.route {
        Route::Devices | Route::Device(_) | Route::Modules(_) | Route::Module(..) => (Op::Registry, 1, false),
        Route::Query if m == Method::POST => (Op::Query, 1, false),
        Route::Twin(_) | Route::ModuleTwin(..) if m == Method::GET => (Op::TwinRead, 1, false),
        Route::Twin(_) | Route::ModuleTwin(..) => (Op::TwinUpdate, 1, false),
        Route::TwinMethods(_) | Route::ModuleMethods(..) => {
            (Op::DirectMethod, method_chunks(req.body.len()), false)
        }
        Route::DeviceBound(_) if m == Method::POST => (Op::C2dSend, 1, true),
        Route::DeviceBound(_) if m == Method::GET => (Op::C2dReceive, 1, false),
        Route::DeviceEvents(_) if m == Method::POST => (Op::D2cSend, 1, true),
        Route::Job(_) | Route::JobCancel(_) | Route::JobsQuery => (Op::JobsOp, 1, false),
        _ => return Ok(()),
    };
    if message { hub.admit_message_wait(op, req.body.len()).await } else { hub.admit_wait(op, cost).await }
}

fn not_found(path: &str) -> HubError {
    HubError::new(ErrorCode::NotFound, format!("no IoT Hub API at '{path}'"))
}

/// `405` for a method the route does not take.
pub fn method_not_allowed(req: &Req) -> HubError {
    HubError::new(ErrorCode::MethodNotAllowed, format!("{} is not allowed on this resource", req.method))
}

/// An IoT Hub error response, logged once.
pub fn error_response(method: &Method, path: &str, e: &HubError) -> HttpResponse {
    let status = StatusCode::from_u16(e.code.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status.is_server_error() {
        tracing::error!(%method, path, code = e.code.name(), "{}", e.message);
    } else {
        tracing::info!(%method, path, status = status.as_u16(), code = e.code.name(), "{}", e.message);
    }
    let tracking = uuid::Uuid::new_v4().simple().to_string();
    let body =
        e.body(&tracking, &crate::clock::iso8601(crate::clock::Clock::now_ms(&crate::clock::SystemClock)));
    let mut resp = json_response(status, &body);
    set_header(&mut resp, "iothub-errorcode", e.code.name());
    // Throttled: when to come back, in whole seconds (urllib3, under the Python service SDK,
    // retries idempotent requests after it; the Node SDK ignores it).
    if let (Some(ms), StatusCode::TOO_MANY_REQUESTS) = (e.retry_after_ms, status) {
        set_header(&mut resp, "retry-after", &ms.div_ceil(1000).max(1).to_string());
    }
    resp
}

/// A JSON response.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> HttpResponse {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(JSON));
    resp
}

/// An empty response with `status`.
pub fn empty(status: StatusCode) -> HttpResponse {
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = status;
    resp
}

/// Sets a header, skipping values that are not valid in HTTP (they cannot be sent).
pub fn set_header(resp: &mut HttpResponse, name: &str, value: &str) {
    if let (Ok(n), Ok(v)) = (HeaderName::try_from(name), HeaderValue::from_str(value)) {
        resp.headers_mut().insert(n, v);
    }
}
