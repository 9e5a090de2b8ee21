//! The nodes of the AMQP endpoint and the small interface the link engine drives them through.
//!
//! A link attaches to one node: [`attach`] classifies the terminus address and either opens the
//! node's per-link state (a [`Node`]) or refuses the link with an AMQP error (not found, redirect,
//! unauthorized, ...). From then on the engine (`super::connection`) owns the frames, credit,
//! session windows and settlement, and calls the node only for what the link *means*:
//!
//! * a complete incoming message → [`Node::receive`] → an outcome, and maybe a reply that the
//!   engine queues on the session's reply link for that node (request/response nodes such as
//!   `$cbs`);
//! * while the link has credit and the session window room → [`Node::next`] pulls one outgoing
//!   delivery at a time (so nothing is buffered per link beyond what the node holds anyway);
//! * the peer settles a delivery the node asked to track → [`Node::settled`];
//! * the link goes away (detach, end, close, drop) → [`Node::detached`] gives back what it holds.
//!
//! One file per node: `cbs` (put-token), `devicebound` (C2D sends), `feedback` (feedback batches),
//! `file_notifications`, and the Event Hub-compatible endpoint's `management` (`$management`
//! READs), `partition` (receivers on `{eh}/ConsumerGroups/{group}/Partitions/{id}`) and `redirect`
//! (IoT Hub's `amqp:link:redirect` for `messages/events`). A new node is a new file plus one arm in
//! [`attach`]. A node may also detach its own link later ([`Node::closing`]: an evicted owner-level
//! receiver, the redirect once the client granted credit).
//!
//! Owned state: each [`Node`] owns its link's state; the connection-wide authorization lives in
//! [`Auth`], owned by the connection and lent to nodes through [`Ctx`].

mod cbs;
mod devicebound;
mod feedback;
mod file_notifications;
mod management;
pub mod partition;
mod redirect;

use super::message::Message;
use super::types::Value;
use crate::clock::Millis;
use crate::error::{ErrorCode, HubError};
use crate::hub::Hub;

pub use cbs::sasl_plain;

/// How a received delivery is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `accepted`.
    Accepted,
    /// `rejected` with an AMQP error condition and description.
    Rejected(&'static str, String),
}

/// How the peer settled a delivery a node asked to track.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// `accepted` or `rejected`: the delivery is done.
    Done,
    /// `released` or `modified`: the delivery should be given back and redelivered.
    Returned,
}

/// What a node answers a complete incoming message with.
#[derive(Debug)]
pub struct Received {
    /// The delivery's outcome.
    pub outcome: Outcome,
    /// A reply for the session's reply link of this node kind (request/response nodes).
    pub reply: Option<Message>,
}

impl Received {
    /// An outcome without a reply.
    pub fn outcome(outcome: Outcome) -> Self {
        Self { outcome, reply: None }
    }
}

/// One delivery a node hands the engine to send.
#[derive(Debug)]
pub struct Outgoing {
    /// The encoded message sections.
    pub payload: Vec<u8>,
    /// Send it settled (the node needs no outcome).
    pub settled: bool,
    /// When not settled: a token the engine gives back through [`Node::settled`]. `None` for an
    /// unsettled delivery whose outcome does not matter (the peer's disposition is ignored).
    pub track: Option<u128>,
}

/// Why a link is refused (or later detached): an AMQP error, with the optional `info` map (the
/// redirect's `hostname`, `address`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// The AMQP error condition.
    pub condition: &'static str,
    /// What was wrong.
    pub description: String,
    /// The error's `info` map (symbol keys).
    pub info: Vec<(Value, Value)>,
}

impl Refusal {
    /// A refusal without info.
    pub fn new(condition: &'static str, description: impl Into<String>) -> Self {
        Self { condition, description: description.into(), info: Vec::new() }
    }

    /// The AMQP `error` value.
    pub fn to_error(&self) -> Value {
        let mut fields = vec![Value::sym(self.condition), Value::str(&self.description)];
        if !self.info.is_empty() {
            fields.push(Value::Map(self.info.clone()));
        }
        super::frame::list(super::frame::code::ERROR, fields)
    }
}

/// The connection's authorization: what the CBS tokens (or the SASL PLAIN password) put on it
/// allow, and until when. Owned by the connection; nodes read and extend it through [`Ctx`].
///
/// Each accepted token is a grant for its resource (`sr`, decoded, scheme and port aside): a hub
/// token (`{host}`) authorizes every service operation, an Event Hubs token (`sb://{host}/{eh}`)
/// only what lies under that entity. A newer token for the same resource replaces the older one;
/// at most [`MAX_GRANTS`] are kept (the one expiring first goes).
#[derive(Debug, Default)]
pub struct Auth {
    grants: Vec<Grant>,
    /// The latest `se` of the grants that cover the hub itself (`None` inside: there are none),
    /// worked out on the first check after a grant changes: a C2D send checks it per message.
    hub_until: std::cell::Cell<Option<Option<u64>>>,
}

#[derive(Debug, Clone)]
struct Grant {
    /// The token's decoded resource.
    scope: String,
    /// The token's `se`.
    expiry_secs: u64,
}

/// Grants one connection keeps (one per resource it put a token for).
pub const MAX_GRANTS: usize = 16;

impl Auth {
    /// Records a token for `scope` valid until `expiry_secs`.
    pub fn grant(&mut self, scope: &str, expiry_secs: u64) {
        self.hub_until.set(None);
        if let Some(g) = self.grants.iter_mut().find(|g| g.scope.eq_ignore_ascii_case(scope)) {
            g.expiry_secs = expiry_secs;
            return;
        }
        if self.grants.len() >= MAX_GRANTS
            && let Some(i) = (0..self.grants.len()).min_by_key(|&i| self.grants[i].expiry_secs)
        {
            self.grants.swap_remove(i);
        }
        self.grants.push(Grant { scope: scope.to_owned(), expiry_secs });
    }

    fn live(&self, hub: &Hub) -> impl Iterator<Item = &Grant> {
        let now_secs = hub.wall_now() / 1000;
        let skew = hub.config().sas_skew_secs;
        self.grants.iter().filter(move |g| g.expiry_secs.saturating_add(skew) >= now_secs)
    }

    /// Whether an unexpired token covers `target` (a decoded resource such as `{host}/{eh}/...`).
    pub fn covers(&self, hub: &Hub, target: &str) -> bool {
        self.live(hub).any(|g| crate::sas::scope_covers(&g.scope, target))
    }

    /// Whether a hub token currently authorizes service operations.
    pub fn authorized(&self, hub: &Hub) -> bool {
        self.covers(hub, hub.hostname())
    }

    /// Why service operations are refused right now, or `None` when they are allowed.
    pub fn unauthorized_reason(&self, hub: &Hub) -> Option<String> {
        let until = self.hub_until.get().unwrap_or_else(|| {
            let until = (self.grants.iter())
                .filter(|g| crate::sas::scope_covers(&g.scope, hub.hostname()))
                .map(|g| g.expiry_secs)
                .max();
            self.hub_until.set(Some(until));
            until
        });
        // The same test as `covers` (some covering grant is live), without a scope match per call.
        if until.is_some_and(|se| se.saturating_add(hub.config().sas_skew_secs) >= hub.wall_now() / 1000) {
            return None;
        }
        self.reason(hub, hub.hostname())
    }

    /// Why `target` is not authorized right now, or `None` when it is.
    pub fn reason(&self, hub: &Hub, target: &str) -> Option<String> {
        if self.covers(hub, target) {
            return None;
        }
        let expired = self
            .grants
            .iter()
            .filter(|g| crate::sas::scope_covers(&g.scope, target))
            .map(|g| g.expiry_secs)
            .max();
        Some(match expired {
            None => {
                format!("no valid token for '{target}': put a SAS token with ServiceConnect on $cbs first")
            }
            Some(se) => format!("the CBS token expired (se={se}); put a new token on $cbs"),
        })
    }
}

/// What a node may use of its connection while the engine calls it.
#[derive(Debug)]
pub struct Ctx<'a> {
    /// The hub.
    pub hub: &'a Hub,
    /// The connection's authorization.
    pub auth: &'a mut Auth,
    /// Tier throttling: the hub time until which the driver holds the connection (neither writes
    /// nor reads), the latest of every shaped send's turn.
    pub hold_until: &'a mut Option<Millis>,
    /// Set when a C2D message was queued (see `Connection::take_sent_c2d`).
    pub sent_c2d: &'a mut bool,
    /// Tracked deliveries the session may still hold unsettled ([`super::MAX_UNSETTLED_DELIVERIES`]
    /// minus those outstanding): a node whose deliveries are tracked sends nothing at 0.
    pub unsettled_room: usize,
}

impl Ctx<'_> {
    /// Holds the connection until hub time `at_ms` (or later, if already held longer).
    pub fn hold_until(&mut self, at_ms: Millis) {
        *self.hold_until = Some(self.hold_until.map_or(at_ms, |h| h.max(at_ms)));
    }
}

/// A request to attach a link, as the engine parsed it.
#[derive(Debug)]
pub struct AttachRequest<'a> {
    /// The link name.
    pub name: &'a str,
    /// True when the peer sends on the link (it attached as sender).
    pub peer_sends: bool,
    /// The address of the terminus on our side (target when the peer sends, else source).
    pub address: &'a str,
    /// The peer's source terminus (filters live here).
    pub source: &'a Value,
    /// The peer's target terminus (a reply link's address lives here).
    pub target: &'a Value,
    /// The attach's desired capabilities (a symbol, an array of symbols, or null).
    pub desired_capabilities: &'a Value,
    /// The attach's link properties (a map, or null).
    pub properties: &'a Value,
}

/// The per-link state of a node. Every method has a default, so a node implements only the
/// direction it serves.
pub trait Node: std::fmt::Debug + Send {
    /// The node's kind (`"$cbs"`, `"devicebound"`, ...): the engine routes a reply returned by
    /// [`Node::receive`] to a link of the same session whose node answers [`Node::takes_replies`].
    fn kind(&self) -> &'static str;

    /// A complete message the peer sent on this link (the node's to keep: a C2D send moves its
    /// body into the hub's queue without a copy).
    fn receive(&mut self, _ctx: &mut Ctx<'_>, _message: Message) -> Received {
        Received::outcome(Outcome::Rejected("amqp:not-allowed", "this link does not accept messages".into()))
    }

    /// The next delivery to send. Called only while the link has credit and the session window
    /// has room, so a node never needs to buffer for a slow peer.
    fn next(&mut self, _ctx: &mut Ctx<'_>) -> Option<Outgoing> {
        None
    }

    /// True when this link carries replies for request links of `kind` on the same session.
    fn takes_replies(&self, _kind: &str) -> bool {
        false
    }

    /// Queues a reply (reply links only); false when it was dropped (bounded queue).
    fn push_reply(&mut self, _reply: Message) -> bool {
        false
    }

    /// The peer settled a tracked delivery.
    fn settled(&mut self, _ctx: &mut Ctx<'_>, _token: u128, _how: Settled) {}

    /// The link is gone: give back every tracked delivery still unsettled (they are redelivered).
    fn detached(&mut self, _ctx: &mut Ctx<'_>, _unsettled: Vec<u128>) {}

    /// Whether a drain request may use the remaining credit up at once (nothing more to send
    /// now). False keeps the credit for deliveries that come later.
    fn honours_drain(&self) -> bool {
        true
    }

    /// What may give [`Node::next`] (or [`Node::closing`]) something to do: the driver waits on
    /// that notifier and pumps. Asked only while the link has credit, unless the node
    /// [`Node::watches`].
    fn wants_wake(&self, _ctx: &Ctx<'_>) -> Wake {
        Wake::Never
    }

    /// True when the node must be woken even while its link has no credit (it can be evicted).
    fn watches(&self) -> bool {
        false
    }

    /// Checked on every pump, before credit: `Some` detaches the link with that error (an
    /// owner-level receiver evicted by a newer one).
    fn closing(&mut self, _ctx: &mut Ctx<'_>) -> Option<Refusal> {
        None
    }

    /// True when [`Node::closing`] may have become `Some` because [`Node::next`] was called.
    fn closing_after_next(&self) -> bool {
        false
    }

    /// The capabilities the attach reply offers (a symbol array, or null).
    fn offered_capabilities(&self) -> Value {
        Value::Null
    }

    /// A reply link's own address (the client's target terminus): a reply whose `to` names it is
    /// routed here rather than to another reply link of the same kind.
    fn reply_address(&self) -> Option<&str> {
        None
    }

    /// Hub time at which [`Node::next`] may have something even without a notification.
    fn wake_at(&self, _ctx: &Ctx<'_>) -> Option<Millis> {
        None
    }
}

/// What a node waits on to have something to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Nothing: it sends only in answer to the peer.
    Never,
    /// The hub's notifier (C2D, feedback, devices).
    OnHubChange,
    /// The event log's notifier (telemetry appended, an owner-level receiver evicted).
    OnEvents,
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

/// The rejected outcome for a hub error, in IoT Hub's `ErrorCode:{name};{message}` form.
pub fn rejected(e: &HubError) -> Outcome {
    Outcome::Rejected(condition(e.code), format!("ErrorCode:{};{}", e.code.name(), e.message))
}

/// The path of a link address: a path as it is, or the path of a full `amqps://{host}/path` URI
/// (uamqp), without a trailing `/`.
pub fn address_path(raw: &str) -> &str {
    let path = match raw.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("", |i| &rest[i..]),
        None => raw,
    };
    path.trim_end_matches('/')
}

/// The nodes served, as the refusal of an unknown address lists them.
const SERVED: &str = "$cbs, /messages/devicebound, /messages/serviceBound/feedback, \
                      /messages/serviceBound/filenotifications, and the Event Hub-compatible \
                      $management and {eh}/ConsumerGroups/{group}/Partitions/{id}";

/// Opens the node `req.address` names for one link, or refuses the link. Paths compare
/// case-insensitively (C# writes `deviceBound`); the Event Hub-compatible entity's paths come with
/// or without a leading `/` and as full `amqps://{host}/...` URIs (Python).
pub fn attach(ctx: &mut Ctx<'_>, req: &AttachRequest<'_>) -> Result<Box<dyn Node>, Refusal> {
    let raw_path = address_path(req.address);
    let path = raw_path.to_ascii_lowercase();
    let node: Option<Box<dyn Node>> = match (path.as_str(), req.peer_sends) {
        ("$cbs", true) => Some(Box::new(cbs::Requests)),
        ("$cbs", false) => Some(Box::new(ReplyLink::new("$cbs-replies", cbs::KIND, None))),
        ("/messages/devicebound", true) => Some(Box::new(devicebound::DeviceBound)),
        ("/messages/servicebound/feedback", false) => Some(Box::new(feedback::Feedback)),
        ("/messages/servicebound/filenotifications", false) => {
            Some(Box::new(file_notifications::FileNotifications))
        }
        _ => None,
    };
    if let Some(node) = node {
        return Ok(node);
    }
    let segments: Vec<&str> = raw_path.trim_start_matches('/').split('/').collect();
    let entity = ctx.hub.event_hub_name();
    let is = |seg: &str, name: &str| seg.eq_ignore_ascii_case(name);
    match (segments.as_slice(), req.peer_sends) {
        (["$management"], true) => return Ok(Box::new(management::Requests)),
        ([eh, "$management"], true) if is(eh, entity) => return Ok(Box::new(management::Requests)),
        (["$management"], false) => {
            return Ok(Box::new(ReplyLink::new("$management-replies", management::KIND, reply_address(req))));
        }
        ([eh, "$management"], false) if is(eh, entity) => {
            return Ok(Box::new(ReplyLink::new("$management-replies", management::KIND, reply_address(req))));
        }
        ([eh, groups, group, partitions, id], false)
            if is(eh, entity) && is(groups, "ConsumerGroups") && is(partitions, "Partitions") =>
        {
            return partition::open(ctx, req, group, id);
        }
        ([messages, events, rest @ ..], false) if is(messages, "messages") && is(events, "events") => {
            return Ok(Box::new(redirect::Redirect::new(redirect::refusal(ctx, &rest.join("/")))));
        }
        _ => {}
    }
    Err(Refusal::new(
        "amqp:not-found",
        format!("no node {:?} here; this endpoint serves {SERVED}", req.address),
    ))
}

/// A reply link's client-side address: the target terminus of the peer's attach.
fn reply_address(req: &AttachRequest<'_>) -> Option<String> {
    super::frame::terminus_address(req.target).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_paths() {
        assert_eq!(address_path("$cbs"), "$cbs");
        assert_eq!(address_path("amqps://localhost/messages/devicebound"), "/messages/devicebound");
        assert_eq!(
            address_path("amqps://h:5671/messages/serviceBound/feedback/"),
            "/messages/serviceBound/feedback"
        );
        assert_eq!(address_path("amqps://h"), "");
    }

    fn open(peer_sends: bool, address: &str) -> Result<&'static str, &'static str> {
        let hub = Hub::new(crate::hub::HubConfig::default());
        let mut auth = Auth::default();
        let mut hold = None;
        let mut sent = false;
        let mut ctx =
            Ctx { hub: &hub, auth: &mut auth, hold_until: &mut hold, sent_c2d: &mut sent, unsettled_room: 1 };
        let req = AttachRequest {
            name: "l",
            peer_sends,
            address,
            source: &Value::Null,
            target: &Value::Null,
            desired_capabilities: &Value::Null,
            properties: &Value::Null,
        };
        attach(&mut ctx, &req).map(|n| n.kind()).map_err(|r| r.condition)
    }

    #[test]
    fn addresses_open_their_node_in_the_right_direction() {
        assert_eq!(open(true, "$cbs"), Ok("$cbs"));
        assert_eq!(open(false, "$cbs"), Ok("$cbs-replies"));
        assert_eq!(open(true, "/messages/devicebound"), Ok("devicebound"));
        assert_eq!(open(true, "amqps://localhost/messages/devicebound"), Ok("devicebound"));
        assert_eq!(open(true, "/messages/deviceBound"), Ok("devicebound"));
        assert_eq!(open(false, "/messages/serviceBound/feedback"), Ok("feedback"));
        assert_eq!(
            open(false, "amqps://h:5671/messages/serviceBound/filenotifications"),
            Ok("filenotifications")
        );
        assert_eq!(open(false, "/messages/devicebound"), Err("amqp:not-found"), "wrong direction");
        assert_eq!(open(true, "/messages/serviceBound/feedback"), Err("amqp:not-found"));
        assert_eq!(open(true, ""), Err("amqp:not-found"));
    }

    /// The per-message check (cached) answers as `covers` does, through grants, renewals, other
    /// scopes and expiry (with the skew).
    #[test]
    fn the_cached_service_check_follows_grants_and_expiry() {
        let clock = crate::clock::ManualClock::new(1_000_000);
        let hub = Hub::with_clock(crate::hub::HubConfig::default(), std::sync::Arc::new(clock.clone()));
        let host = hub.hostname().to_owned();
        let skew = hub.config().sas_skew_secs;
        let mut auth = Auth::default();
        let agrees = |auth: &Auth| {
            let cached = auth.unauthorized_reason(&hub).is_none();
            assert_eq!(cached, auth.covers(&hub, &host));
            cached
        };
        assert!(!agrees(&auth), "no token yet");
        auth.grant(&format!("{host}/myeh"), 2_000);
        assert!(!agrees(&auth), "an Event Hubs token does not cover the hub");
        auth.grant(&host, 1_100);
        assert!(agrees(&auth));
        clock.set(1_000 * (1_100 + skew + 1));
        assert!(!agrees(&auth), "expired, past the skew");
        auth.grant(&host.to_uppercase(), 5_000);
        assert!(agrees(&auth), "a renewal (any case) is seen at once");
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

/// A receiver link that carries a request node's replies (the session's `$cbs` or
/// `$management` receiver): they wait here, at most [`super::MAX_PENDING_REPLIES`], for the
/// client's credit, and go out settled.
#[derive(Debug)]
pub struct ReplyLink {
    kind: &'static str,
    /// The kind of the request node whose replies this link takes.
    serves: &'static str,
    /// The client-side address replies may name in their `to` (a `reply-to`).
    address: Option<String>,
    pending: std::collections::VecDeque<Message>,
}

impl ReplyLink {
    /// A reply link of `kind` for the request node `serves`, at the client's `address`.
    pub fn new(kind: &'static str, serves: &'static str, address: Option<String>) -> Self {
        Self { kind, serves, address, pending: std::collections::VecDeque::new() }
    }
}

impl Node for ReplyLink {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn takes_replies(&self, kind: &str) -> bool {
        kind == self.serves
    }

    fn reply_address(&self) -> Option<&str> {
        self.address.as_deref()
    }

    fn push_reply(&mut self, reply: Message) -> bool {
        if self.pending.len() >= super::MAX_PENDING_REPLIES {
            tracing::warn!(
                node = self.serves,
                "dropping a reply: the client grants no credit on its receiver"
            );
            return false;
        }
        self.pending.push_back(reply);
        true
    }

    fn next(&mut self, _ctx: &mut Ctx<'_>) -> Option<Outgoing> {
        let m = self.pending.pop_front()?;
        Some(Outgoing { payload: m.encode(), settled: true, track: None })
    }

    /// Drain uses the credit up only when no reply is waiting.
    fn honours_drain(&self) -> bool {
        self.pending.is_empty()
    }
}
