//! What the service endpoint's nodes do with a delivery, in IoT Hub's terms (reference §3.4, §3.9):
//! `$cbs` put-token, C2D sends to `/messages/devicebound`, and feedback batches for
//! `/messages/serviceBound/feedback`. Hub errors become the AMQP conditions the SDKs map. With a
//! tier configured, C2D sends pass the tier throttle first: over the rate they are held (shaped),
//! past the backlog rejected with `com.microsoft:device-container-throttled`, past the daily quota
//! with `com.microsoft:quota-exceeded`.

use super::connection::Connection;
use super::message::{Body, Message, Properties, to_c2d};
use super::types::Value;
use crate::c2d::Delivery;
use crate::error::{ErrorCode, HubError};
use crate::sas::Rights;
use crate::throttle::{Admission, Op};

/// The nodes a link may attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Address {
    /// `$cbs`: put-token requests in, replies out.
    Cbs,
    /// `/messages/devicebound`: C2D sends in.
    DeviceBound,
    /// `/messages/serviceBound/feedback`: feedback batches out.
    Feedback,
    /// `/messages/serviceBound/filenotifications`: accepted, stays idle (no file upload yet).
    FileNotifications,
}

impl Address {
    /// Classifies a link address: a path, or a full `amqps://{host}/path` URI (uamqp), with the
    /// path compared case-insensitively (C# writes `deviceBound`).
    pub fn classify(raw: &str) -> Option<Self> {
        let path = match raw.split_once("://") {
            Some((_, rest)) => rest.find('/').map_or("", |i| &rest[i..]),
            None => raw,
        };
        let path = path.trim_end_matches('/').to_ascii_lowercase();
        match path.as_str() {
            "$cbs" => Some(Self::Cbs),
            "/messages/devicebound" => Some(Self::DeviceBound),
            "/messages/servicebound/feedback" => Some(Self::Feedback),
            "/messages/servicebound/filenotifications" => Some(Self::FileNotifications),
            _ => None,
        }
    }

    /// Which side sends on a link to this node: `Some(true)` when the peer sends, `None` for
    /// `$cbs` (a sender and a receiver link).
    pub fn peer_sends(self) -> Option<bool> {
        match self {
            Self::Cbs => None,
            Self::DeviceBound => Some(true),
            Self::Feedback | Self::FileNotifications => Some(false),
        }
    }
}

/// How a received delivery is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `accepted`.
    Accepted,
    /// `rejected` with an AMQP error condition and description.
    Rejected(&'static str, String),
}

/// The AMQP condition IoT Hub uses for a hub error (reference §3.9, from the C# error mapper).
pub fn condition(code: ErrorCode) -> &'static str {
    match code {
        ErrorCode::DeviceNotFound | ErrorCode::NotFound => "amqp:not-found",
        ErrorCode::DeviceMaximumQueueDepthExceeded => "amqp:resource-limit-exceeded",
        ErrorCode::MessageTooLarge => "amqp:link:message-size-exceeded",
        ErrorCode::IotHubUnauthorizedAccess | ErrorCode::IotHubUnauthorized => "amqp:unauthorized-access",
        ErrorCode::IotHubQuotaExceeded => "com.microsoft:quota-exceeded",
        // What the Node service SDK maps to its retryable `ThrottlingError`
        // (azure-iothub common-amqp/amqp_common_errors.js) and the C# mapper to throttling.
        ErrorCode::ThrottlingException | ErrorCode::ThrottleBacklogLimitExceeded => {
            "com.microsoft:device-container-throttled"
        }
        ErrorCode::DeviceMessageLockLost => "com.microsoft:message-lock-lost",
        ErrorCode::PreconditionFailed => "com.microsoft:precondition-failed",
        ErrorCode::GatewayTimeout => "com.microsoft:timeout",
        ErrorCode::ServerError => "amqp:internal-error",
        _ => "com.microsoft:argument-error",
    }
}

fn rejected(e: &HubError) -> Outcome {
    Outcome::Rejected(condition(e.code), format!("ErrorCode:{};{}", e.code.name(), e.message))
}

/// The CBS token types accepted in put-token.
const TOKEN_TYPES: [&str; 2] = ["servicebus.windows.net:sastoken", "azure-devices.net:sastoken"];

/// Handles a `$cbs` request: verifies a put-token's SAS like every other service token and
/// grants the connection until the token expires. Returns the delivery's outcome and the reply,
/// whose `correlation-id` keeps the AMQP type of the request's `message-id` (uamqp reads a ulong)
/// and whose `status-code` is an AMQP int (sdk-wire-notes §3, §5.3).
pub fn put_token(conn: &mut Connection, request: &Message) -> (Outcome, Message) {
    let (status, description) = match check_put_token(conn, request) {
        Ok(expiry_secs) => {
            conn.grant(expiry_secs);
            (200, "OK".to_owned())
        }
        Err((status, description)) => {
            tracing::info!(status, "CBS put-token refused: {description}");
            (status, description)
        }
    };
    let p = &request.properties;
    let reply = Message {
        properties: Properties {
            message_id: Some(Value::str(&uuid::Uuid::new_v4().to_string())),
            correlation_id: p.message_id.clone().or_else(|| p.correlation_id.clone()),
            to: p.reply_to.clone(),
            ..Properties::default()
        },
        application_properties: vec![
            ("status-code".into(), Value::Int(status)),
            ("status-description".into(), Value::str(&description)),
        ],
        message_annotations: vec![],
        body: Body::Value(Value::Null),
    };
    (Outcome::Accepted, reply)
}

fn check_put_token(conn: &Connection, request: &Message) -> Result<u64, (i32, String)> {
    match request.app_str("operation") {
        Some("put-token") => {}
        other => {
            return Err((400, format!("unsupported $cbs operation {other:?}; only put-token is served")));
        }
    }
    match request.app_str("type") {
        Some(t) if TOKEN_TYPES.contains(&t) => {}
        other => return Err((400, format!("unsupported token type {other:?}; use {}", TOKEN_TYPES[0]))),
    }
    let token = match &request.body {
        Body::Value(Value::String(s)) => s.clone(),
        Body::Data(b) => String::from_utf8_lossy(b).into_owned(),
        _ => return Err((400, "the put-token body must be the SAS token as a string".into())),
    };
    conn.hub()
        .authenticate_service(&token, Rights::SERVICE_CONNECT)
        .map(|auth| auth.expiry_secs)
        .map_err(|e| (i32::from(e.code.http_status()), e.message))
}

/// Handles SASL PLAIN (`\0{user}\0{password}`): the password is a service SAS token.
pub fn sasl_plain(conn: &mut Connection, response: &[u8]) -> bool {
    let mut parts = response.split(|&b| b == 0);
    let password = parts.nth(2).map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default();
    match conn.hub().authenticate_service(&password, Rights::SERVICE_CONNECT) {
        Ok(auth) => {
            conn.grant(auth.expiry_secs);
            true
        }
        Err(e) => {
            tracing::info!("SASL PLAIN refused: {e}");
            false
        }
    }
}

/// Queues a C2D message from a `/messages/devicebound` transfer; the delivery is accepted only
/// once the hub has queued it.
pub fn send_c2d(conn: &mut Connection, m: &Message) -> Outcome {
    if let Some(why) = conn.unauthorized_reason() {
        tracing::info!("C2D send refused: {why}");
        return Outcome::Rejected(
            "amqp:unauthorized-access",
            format!("ErrorCode:IotHubUnauthorizedAccess;{why}"),
        );
    }
    let (device, msg) = match to_c2d(m) {
        Ok(x) => x,
        Err(e) => {
            tracing::info!("C2D send refused: {e}");
            return Outcome::Rejected(
                "com.microsoft:argument-error",
                format!("ErrorCode:ArgumentInvalid;{e}"),
            );
        }
    };
    match conn.hub().admit_message(Op::C2dSend, msg.body.len()) {
        Admission::Now => {}
        // Accepted, worked off at the limit rate: the driver holds the connection (its
        // dispositions and further reads) until the send's turn.
        Admission::Shaped { at_ms } => conn.hold_until(at_ms),
        Admission::Refused(r) => {
            let e = conn.hub().throttle_error(&r);
            tracing::info!(device = %device, "C2D send refused: {e}");
            return rejected(&e);
        }
    }
    match conn.hub().send_c2d(&device, msg) {
        Ok(_) => Outcome::Accepted,
        Err(e) => {
            tracing::info!(device = %device, "C2D send refused: {e}");
            rejected(&e)
        }
    }
}

/// The AMQP message carrying a feedback batch (JSON array body, IoT Hub's feedback content
/// type, the hub name as user-id).
pub fn feedback_message(d: &Delivery) -> Message {
    let m = &d.message;
    Message {
        properties: Properties {
            message_id: Some(Value::str(&d.lock_token.to_string())),
            user_id: m.user_id.as_ref().map(|u| u.as_bytes().to_vec()),
            to: Some("/messages/servicebound/feedback".into()),
            content_type: m.content_type.clone(),
            content_encoding: Some("utf-8".into()),
            absolute_expiry_time: i64::try_from(d.expires_at).ok(),
            creation_time: i64::try_from(d.enqueued_at).ok(),
            ..Properties::default()
        },
        application_properties: vec![],
        message_annotations: vec![
            (Value::sym("x-opt-lock-token"), Value::Uuid(uuid::Uuid::from_u128(d.lock_token.0).into_bytes())),
            (Value::sym("x-opt-sequence-number"), Value::Long(d.sequence_number as i64)),
            (Value::sym("iothub-enqueuedtime"), Value::Timestamp(d.enqueued_at as i64)),
            (Value::sym("iothub-deliverycount"), Value::Int(d.delivery_count as i32)),
        ],
        body: Body::Data(m.body.to_vec()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(Address::classify("$cbs"), Some(Address::Cbs));
        assert_eq!(Address::classify("/messages/devicebound"), Some(Address::DeviceBound));
        assert_eq!(Address::classify("amqps://localhost/messages/devicebound"), Some(Address::DeviceBound));
        assert_eq!(Address::classify("/messages/deviceBound"), Some(Address::DeviceBound));
        assert_eq!(Address::classify("/messages/serviceBound/feedback"), Some(Address::Feedback));
        assert_eq!(
            Address::classify("amqps://h:5671/messages/serviceBound/filenotifications"),
            Some(Address::FileNotifications)
        );
        assert_eq!(Address::classify("/messages/events"), None);
        assert_eq!(Address::classify(""), None);
    }

    #[test]
    fn conditions_follow_the_reference_table() {
        assert_eq!(condition(ErrorCode::DeviceNotFound), "amqp:not-found");
        assert_eq!(condition(ErrorCode::DeviceMaximumQueueDepthExceeded), "amqp:resource-limit-exceeded");
        assert_eq!(condition(ErrorCode::MessageTooLarge), "amqp:link:message-size-exceeded");
        assert_eq!(condition(ErrorCode::IotHubUnauthorizedAccess), "amqp:unauthorized-access");
        assert_eq!(condition(ErrorCode::InvalidMessageExpiryTime), "com.microsoft:argument-error");
        assert_eq!(condition(ErrorCode::ThrottlingException), "com.microsoft:device-container-throttled");
        assert_eq!(condition(ErrorCode::IotHubQuotaExceeded), "com.microsoft:quota-exceeded");
    }
}
