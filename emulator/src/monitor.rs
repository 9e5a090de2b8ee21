//! The client side of `iothub-emulator monitor`, the emulator's `az iot hub monitor-events`: prints
//! device telemetry as it arrives, optionally from one device only.
//!
//! It reads the hub's telemetry log through the plain port's `/emulator/telemetry` long poll (one
//! blocking HTTP/1.1 exchange at a time, each bounded by a deadline), not through the built-in
//! Event Hub-compatible AMQP endpoint: both read the same log. It owns nothing but its position
//! (the hub-wide `sequenceNumber` it has printed up to). [`event_json`] is the sans-IO part: one
//! read-out item in `az iot hub monitor-events`' shape.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use serde_json::{Map, Value, json};

use crate::http::TELEMETRY_MAX_WAIT_MS;

/// Largest answer read (a page of 1,000 messages of up to 256 KB would be more: pages are asked
/// for accordingly, see [`PAGE`]).
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;
/// Messages asked for per read.
const PAGE: usize = 100;
/// How much longer than the long poll a read may take before the hub counts as unresponsive.
const READ_GRACE: Duration = Duration::from_secs(10);

/// What went wrong talking to the hub.
#[derive(Debug, thiserror::Error)]
pub enum MonitorError {
    /// Nothing answered, or the exchange broke or stalled.
    #[error("cannot read telemetry from http://{addr}: {source}")]
    Io {
        /// Where the monitor dialled.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The hub answered something else than the JSON asked for.
    #[error("http://{addr}{path} answered {detail}")]
    Answer {
        /// Where the monitor dialled.
        addr: SocketAddr,
        /// What it asked for.
        path: String,
        /// What was wrong with the answer.
        detail: String,
    },
    /// Printing failed (stdout closed).
    #[error("cannot print: {0}")]
    Output(std::io::Error),
}

/// What to print and for how long.
#[derive(Debug, Clone, Default)]
pub struct MonitorOptions {
    /// Only this device's messages.
    pub device: Option<String>,
    /// Include system and application properties and IoT Hub's annotations.
    pub properties: bool,
    /// Everything the log retains first, instead of only what arrives from now on.
    pub from_start: bool,
    /// Stop after this long (`None`: until the process is stopped).
    pub timeout: Option<Duration>,
    /// Stop after this many messages.
    pub max_events: Option<u64>,
}

/// One `/emulator/telemetry` item in `az iot hub monitor-events`' shape: `{"event": {"origin",
/// "module", "interface", "component", "payload"}}`, plus `properties` (`system`, `application`)
/// and `annotations` when `properties` is set. A body that is JSON prints as JSON, other text as a
/// string, binary as base64 text.
pub fn event_json(item: &Value, properties: bool) -> Value {
    let body = item["body"].as_str().unwrap_or_default();
    let payload = match item["bodyEncoding"].as_str() {
        Some("utf-8") => serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string())),
        _ => Value::String(body.to_string()),
    };
    let mut event = Map::new();
    event.insert("origin".into(), item["deviceId"].clone());
    event.insert("module".into(), item.get("moduleId").cloned().unwrap_or_else(|| "".into()));
    let system = &item["systemProperties"];
    // PnP devices name their model and component this way (reference-2 §1.7).
    event.insert("interface".into(), system.get("dt-dataschema").cloned().unwrap_or_else(|| "".into()));
    event.insert("component".into(), system.get("dt-subject").cloned().unwrap_or_else(|| "".into()));
    event.insert("payload".into(), payload);
    if properties {
        event.insert("properties".into(), json!({ "system": system, "application": item["properties"] }));
        let eh = &item["eventHub"];
        event.insert(
            "annotations".into(),
            json!({
                "iothub-connection-device-id": item["deviceId"],
                "iothub-enqueuedtime": item["enqueuedTimeUtc"],
                "iothub-message-source": "Telemetry",
                "x-opt-partition-id": eh["partitionId"],
                "x-opt-sequence-number": eh["sequenceNumber"],
                "x-opt-offset": eh["offset"],
            }),
        );
    }
    json!({ "event": event })
}

/// Prints telemetry from the hub whose plain port is `addr` to `out` as it arrives, as `options`
/// say; `started` is called once the starting position is known (messages after it are printed).
/// Returns how many messages were printed when the timeout or the event count is reached.
pub fn run(
    addr: SocketAddr,
    options: &MonitorOptions,
    out: &mut impl Write,
    started: impl FnOnce(),
) -> Result<u64, MonitorError> {
    let begin = Instant::now();
    let deadline = options.timeout.map(|t| begin + t);
    let mut after = if options.from_start {
        0
    } else {
        let status = get_json(addr, "/emulator/event-hub", Duration::from_secs(10))?;
        status["lastTelemetrySequenceNumber"].as_u64().ok_or_else(|| MonitorError::Answer {
            addr,
            path: "/emulator/event-hub".into(),
            detail: "no lastTelemetrySequenceNumber".into(),
        })?
    };
    started();
    let mut printed = 0u64;
    loop {
        let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        if left == Some(Duration::ZERO) || options.max_events.is_some_and(|m| printed >= m) {
            return Ok(printed);
        }
        let wait_ms =
            left.map_or(TELEMETRY_MAX_WAIT_MS, |l| (l.as_millis() as u64).min(TELEMETRY_MAX_WAIT_MS));
        let mut path = format!("/emulator/telemetry?after={after}&limit={PAGE}&waitMs={wait_ms}");
        if let Some(d) = &options.device {
            let d = percent_encoding::utf8_percent_encode(d, percent_encoding::NON_ALPHANUMERIC);
            path.push_str(&format!("&deviceId={d}"));
        }
        let items = match get_json(addr, &path, Duration::from_millis(wait_ms) + READ_GRACE)? {
            Value::Array(items) => items,
            other => {
                return Err(MonitorError::Answer {
                    addr,
                    path,
                    detail: format!("not a JSON array: {other}"),
                });
            }
        };
        for item in &items {
            after = after.max(item["sequenceNumber"].as_u64().unwrap_or(after));
            if options.max_events.is_some_and(|m| printed >= m) {
                break;
            }
            let text =
                serde_json::to_string_pretty(&event_json(item, options.properties)).unwrap_or_default();
            writeln!(out, "{text}").and_then(|()| out.flush()).map_err(MonitorError::Output)?;
            printed += 1;
        }
    }
}

/// `GET path` at `addr`, the whole exchange within `timeout`; the body parsed as JSON.
fn get_json(addr: SocketAddr, path: &str, timeout: Duration) -> Result<Value, MonitorError> {
    let io = |source| MonitorError::Io { addr, source };
    let deadline = Instant::now() + timeout;
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10).min(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(io)?;
    let mut response = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            )));
        }
        stream.set_read_timeout(Some(left)).map_err(io)?;
        let n = stream.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
        if response.len() > MAX_RESPONSE_BYTES {
            return Err(MonitorError::Answer { addr, path: path.into(), detail: "more than 64 MiB".into() });
        }
    }
    parse_response(&response).map_err(|detail| MonitorError::Answer { addr, path: path.into(), detail })
}

/// The JSON body of a raw `200` answer (with `Content-Length`, as the hub sends).
fn parse_response(response: &[u8]) -> Result<Value, String> {
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").ok_or("an incomplete answer")?;
    let head = String::from_utf8_lossy(&response[..split]);
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        let hint = if status.contains(" 404") { " (is the admin API turned off?)" } else { "" };
        return Err(format!("'{status}'{hint}"));
    }
    serde_json::from_slice(&response[split + 4..]).map_err(|e| format!("a body that is not JSON: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item() -> Value {
        json!({
            "sequenceNumber": 7,
            "deviceId": "fridge-1",
            "enqueuedTimeUtc": "2026-12-03T09:00:00.000Z",
            "systemProperties": {"message-id": "m1", "content-type": "application/json"},
            "properties": {"firmwareChannel": "beta"},
            "body": "{\"t\":21}",
            "bodyEncoding": "utf-8",
            "eventHub": {"partitionId": "2", "sequenceNumber": 3, "offset": "400"},
        })
    }

    #[test]
    fn items_print_in_monitor_events_shape() {
        let e = event_json(&item(), false);
        assert_eq!(
            e,
            json!({"event": {"origin": "fridge-1", "module": "", "interface": "", "component": "", "payload": {"t": 21}}})
        );
        let e = event_json(&item(), true);
        assert_eq!(e["event"]["properties"]["application"]["firmwareChannel"], "beta");
        assert_eq!(e["event"]["properties"]["system"]["message-id"], "m1");
        assert_eq!(e["event"]["annotations"]["x-opt-sequence-number"], 3);
        assert_eq!(e["event"]["annotations"]["x-opt-offset"], "400");
        let mut text = item();
        text["body"] = "not json".into();
        assert_eq!(event_json(&text, false)["event"]["payload"], "not json");
        let mut binary = item();
        binary["body"] = "AAEC".into();
        binary["bodyEncoding"] = "base64".into();
        assert_eq!(event_json(&binary, false)["event"]["payload"], "AAEC");
    }

    #[test]
    fn answers_other_than_200_json_are_errors_that_say_what_came() {
        assert_eq!(parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]").unwrap(), json!([]));
        let e = parse_response(b"HTTP/1.1 404 Not Found\r\n\r\n").unwrap_err();
        assert!(e.contains("404") && e.contains("admin API"), "{e}");
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n\r\nnope").unwrap_err().contains("not JSON"));
        assert!(parse_response(b"HTTP/1.1 200").unwrap_err().contains("incomplete"));
    }
}
