//! The `$cbs` node (claims-based security): put-token requests arrive on a link the peer sends on
//! ([`Requests`]); each reply goes out on the session's `$cbs` receiver link (a [`super::ReplyLink`]),
//! which holds at most [`crate::amqp::MAX_PENDING_REPLIES`] while the client grants no credit. Also SASL PLAIN, whose
//! password is a service SAS token (reference §1.4).
//!
//! A put-token's SAS is verified like every other service token; an accepted one authorizes the
//! connection's service operations until it expires (the connection's [`Auth`]).

use super::{Auth, Ctx, Node, Outcome, Received};
use crate::amqp::message::{Body, Message, Properties};
use crate::amqp::types::Value;
use crate::error::HubError;
use crate::hub::{Authenticated, Hub};
use crate::sas::{ResourceTarget, Rights, SasToken};

/// The node kind replies are routed by.
pub(super) const KIND: &str = "$cbs";

/// The CBS token types accepted in put-token.
const TOKEN_TYPES: [&str; 2] = ["servicebus.windows.net:sastoken", "azure-devices.net:sastoken"];

/// A link the peer sends put-token requests on.
#[derive(Debug)]
pub struct Requests;

impl Node for Requests {
    fn kind(&self) -> &'static str {
        KIND
    }

    /// Verifies a put-token and answers it. The reply's `correlation-id` keeps the AMQP type of
    /// the request's `message-id` (uamqp reads a ulong) and its `status-code` is an AMQP int
    /// (sdk-wire-notes §3, §5.3).
    fn receive(&mut self, ctx: &mut Ctx<'_>, request: Message) -> Received {
        let (status, description) = match check_put_token(ctx.hub, &request) {
            Ok(auth) => {
                ctx.auth.grant(&auth.resource, auth.expiry_secs);
                // The Event Hubs service answers 202; the IoT Hub Node SDKs want exactly 200 on
                // their own hub tokens (reference-2 §1.2).
                if crate::sas::scope_covers(&auth.resource, ctx.hub.hostname()) {
                    (200, "OK".to_owned())
                } else {
                    (202, "Accepted".to_owned())
                }
            }
            Err((status, description)) => {
                tracing::info!(status, "CBS put-token refused: {description}");
                (status, description)
            }
        };
        Received { outcome: Outcome::Accepted, reply: Some(reply(&request, status, &description)) }
    }
}

/// The reply to a request: correlated by its `message-id` (or `correlation-id`), addressed to its
/// `reply-to`, with `status-code` (int) and `status-description`.
pub(super) fn reply(request: &Message, status: i32, description: &str) -> Message {
    let p = &request.properties;
    Message {
        properties: Properties {
            message_id: Some(Value::str(&uuid::Uuid::new_v4().to_string())),
            correlation_id: p.message_id.clone().or_else(|| p.correlation_id.clone()),
            to: p.reply_to.clone(),
            ..Properties::default()
        },
        application_properties: vec![
            ("status-code".into(), Value::Int(status)),
            ("status-description".into(), Value::str(description)),
        ],
        message_annotations: vec![],
        body: Body::Value(Value::Null),
    }
}

/// Verifies a put-token: a hub service token (IoT Hub's rules), else a policy token scoped to a
/// resource on the hub's host such as the Event Hub-compatible entity (`sb://{host}/{eh}`).
fn check_put_token(hub: &Hub, request: &Message) -> Result<Authenticated, (i32, String)> {
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
    authenticate(hub, &token).map_err(|e| (i32::from(e.code.http_status()), e.message))
}

/// A token for an IoT Hub resource (`{host}`, `{host}/devices/...`) is checked as a hub service
/// token; one for any other resource on the host (`sb://{host}/{eh}`, `{host}/messages/events`) as
/// a scoped policy token.
fn authenticate(hub: &Hub, token: &str) -> Result<Authenticated, HubError> {
    let iot_hub_resource = SasToken::parse(token).is_ok_and(|t| ResourceTarget::parse(&t.resource).is_ok());
    if iot_hub_resource {
        hub.authenticate_service(token, Rights::SERVICE_CONNECT)
    } else {
        hub.authenticate_scoped_policy(token, Rights::SERVICE_CONNECT)
    }
}

/// Handles SASL PLAIN (`\0{user}\0{password}`): the password is a service SAS token, scoped to
/// the hub or to a resource on it (the redirect sample signs `{host}/messages/events`).
pub fn sasl_plain(hub: &Hub, auth: &mut Auth, response: &[u8]) -> bool {
    let mut parts = response.split(|&b| b == 0);
    let password = parts.nth(2).map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default();
    match authenticate(hub, &password) {
        Ok(a) => {
            auth.grant(&a.resource, a.expiry_secs);
            true
        }
        Err(e) => {
            tracing::info!("SASL PLAIN refused: {e}");
            false
        }
    }
}
