//! The connection registry: for each device with an open device connection (MQTT today), a
//! [`Link`] to the task serving it, and the device's persisted MQTT session (its subscriptions).
//!
//! A link lives in the device's [`Device::link`] field, so it is owned by the registry shard like
//! everything else about the device and costs nothing for devices that are not connected. It holds
//! a connection id and a small shared mailbox ([`LinkShared`]: a bounded queue of [`LinkEvent`]s, a
//! `Notify` and a kicked flag, about a hundred bytes, chosen over an mpsc channel plus a
//! cancellation token which cost over a KiB per connection). One connection per device: attaching
//! a new link drops the old one, and dropping a link kicks its connection (IoT Hub's `400027
//! ConnectionForcefullyClosedOnNewConnection`). Deleting or disabling the device drops it too.
//!
//! A module's connection (client id `{deviceId}/{moduleId}`) is served the same way: its link and
//! session live in its [`super::Module`], and every function here that takes a `device_id` takes
//! such a client identity too (device ids never contain `/`), see `Endpoint`.
//!
//! A connection served without a task of its own (the in-process device transport drives a
//! million sessions from a few tasks) attaches with a [`ReadyHook`]: every event and the kick then
//! also put the link's key on a shared [`ReadySet`] (once until the driver looks), so one waiter
//! hears about every link it drives.
//!
//! A C2D send to a connected device whose session has room and nothing else visible in its queue
//! is handed over at once: the send locks the message for the session (under the shard lock it
//! already holds) and leaves the delivery in the link ([`LinkEvent::C2dHanded`]), so the session
//! publishes it without a visit of its own to the shard, which saves a look-up and the cache
//! misses of a device last touched by another core on every fan-out message. The session
//! *arms* its link for this at each visit that leaves room in its window (see
//! [`Hub::settle_and_receive_c2d`]); a hand-over disarms it, so the hub never hands more than the
//! window has room for; a delivery still in the link when the session ends is released.
//!
//! Events never block the hub. A C2D wake-up that finds the mailbox full is dropped safely (the
//! connection pulls from the queue after every event it handles); a desired patch or method
//! request that finds it full is logged and dropped, or refused, respectively.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{Notify, oneshot};

use crate::c2d::Delivery;
use crate::error::{ErrorCode, HubError};

use super::durable::Kept;
use super::{Device, Hub};

/// Events queued per connection before the hub starts dropping wake-ups.
pub const LINK_CHANNEL_CAPACITY: usize = 16;

/// Bits of [`Device::session`]: the subscriptions a device's MQTT session holds.
pub mod subscriptions {
    /// `devices/{id}/messages/devicebound/#`.
    pub const C2D: u8 = 1;
    /// `$iothub/twin/res/#`.
    pub const TWIN_RESPONSES: u8 = 2;
    /// `$iothub/twin/PATCH/properties/desired/#`.
    pub const DESIRED: u8 = 4;
    /// `$iothub/methods/POST/#`.
    pub const METHODS: u8 = 8;
}

/// What the hub tells a connected device's connection task.
#[derive(Debug)]
pub enum LinkEvent {
    /// A C2D message was queued for the device.
    C2dAvailable,
    /// A C2D message the hub locked for this connection when it was sent (see the module doc):
    /// publish it, no need to ask the queue.
    C2dHanded(Box<Delivery>),
    /// The service patched desired properties; the value carries `$version`.
    DesiredPatch(Box<Value>),
    /// A direct method call waiting for the device's answer.
    Method(Box<MethodCall>),
}

/// One direct-method invocation on its way to a device.
#[derive(Debug)]
pub struct MethodCall {
    /// The method name.
    pub name: String,
    /// The request payload (JSON text).
    pub payload: Bytes,
    /// Where the device's `(status, payload)` goes.
    pub reply: oneshot::Sender<MethodReply>,
}

/// A device's answer to a direct method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MethodReply {
    /// The status the device chose.
    pub status: i32,
    /// The payload it sent (JSON text, possibly empty).
    pub payload: Bytes,
}

/// Keys of links with something to look at (an event or the kick), for a driver serving many
/// connections from one task: see [`Hub::attach_link_with`].
#[derive(Debug, Default)]
pub struct ReadySet {
    keys: Mutex<Vec<u32>>,
    notify: Notify,
}

impl ReadySet {
    /// An empty set.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn push(&self, key: u32) {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).push(key);
        self.notify.notify_one();
    }

    /// Moves every key queued so far into `out` (each link at most once until its receiver's
    /// [`LinkReceiver::rearm`]).
    pub fn drain_into(&self, out: &mut Vec<u32>) {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        out.append(&mut keys);
    }

    /// Waits until a key is queued (returns at once if one is already waiting). Cancel-safe.
    pub async fn wait(&self) {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if !self.keys.lock().unwrap_or_else(|p| p.into_inner()).is_empty() {
                return;
            }
            notified.await;
        }
    }
}

/// How a link served without its own task tells its driver it has something to look at.
#[derive(Debug)]
pub struct ReadyHook {
    set: Arc<ReadySet>,
    key: u32,
    /// The key is in the set and the driver has not looked yet.
    queued: AtomicBool,
    /// Delivers a handed-over C2D message from the sender's thread (see [`DirectDelivery`]).
    direct: Option<Arc<dyn DirectDelivery>>,
}

impl ReadyHook {
    /// Puts `key` on `set` whenever the link has an event or is kicked.
    pub fn new(set: Arc<ReadySet>, key: u32) -> Self {
        Self { set, key, queued: AtomicBool::new(false), direct: None }
    }

    /// [`ReadyHook::new`], and a C2D message handed over to the link is first offered to
    /// `direct`, on the sender's thread once the sender let go of the device's shard.
    pub fn with_direct(set: Arc<ReadySet>, key: u32, direct: Arc<dyn DirectDelivery>) -> Self {
        Self { set, key, queued: AtomicBool::new(false), direct: Some(direct) }
    }
}

/// A connection that can publish a handed-over C2D message on the thread that sent it, without
/// waking its driver: the message reaches the device as soon as it is sent, whatever the
/// driver is doing (a driver the OS preempted mid-pass would hold it up; see `mqtt::driver`).
/// Called with no hub lock held; the connection must not block on its own state (it declines
/// when its driver is busy with it, and the driver is woken instead).
pub trait DirectDelivery: Send + Sync + std::fmt::Debug {
    /// Publishes what the link holds for the device; `false` when the driver must look
    /// (busy, a write backed up, the connection ending).
    fn try_deliver(&self, hub: &super::Hub) -> bool;
}

/// Who is told when a link has something to look at: the connection's own task, waiting on a
/// `Notify`, or the driver serving it among many ([`ReadyHook`]). One or the other: the mailbox
/// keeps only the one it uses.
#[derive(Debug)]
enum Receiver {
    Task(Notify),
    Driver(ReadyHook),
}

impl Default for Receiver {
    fn default() -> Self {
        Self::Task(Notify::new())
    }
}

/// The mailbox between the hub and one connection.
#[derive(Debug, Default)]
pub struct LinkShared {
    queue: Mutex<VecDeque<LinkEvent>>,
    receiver: Receiver,
    kicked: AtomicBool,
    /// A C2D message was queued since the receiver last looked: [`LinkEvent::C2dAvailable`] is
    /// this flag, not a queued event, so a send costs the mailbox no lock or allocation, repeated
    /// sends wake the connection once, and a full mailbox never loses the wake-up.
    c2d: AtomicBool,
    /// The delivery handed over at send time, until the receiver takes it. Filled only under the
    /// device's shard lock, and only while armed.
    handed: Mutex<Option<Box<Delivery>>>,
    /// `handed` holds a delivery (set after filling it, cleared before emptying it): the receiver
    /// looks without taking the lock, as it does for `queue` through `queued`.
    has_handed: AtomicBool,
    /// `queue` holds an event (written under its lock).
    queued: AtomicBool,
    /// The lock duration the session asked for while it is armed for a hand-over, 0 while not.
    /// Written only under the device's shard lock. (32 bits: with them the mailbox and its `Arc`
    /// counts fit mimalloc's 128-byte size class.)
    armed_lock_ms: AtomicU32,
}

impl LinkShared {
    /// Announces queued C2D (see [`LinkShared::c2d`]); wakes the receiver unless already announced.
    fn poke_c2d(&self) {
        if !self.c2d.swap(true, Ordering::AcqRel) {
            self.wake();
        }
    }

    /// The lock duration to hand a delivery over with, if the session is armed for one and the
    /// link holds none (called under the device's shard lock).
    pub(super) fn armed_for(&self) -> Option<u64> {
        let ms = self.armed_lock_ms.load(Ordering::Relaxed);
        (ms > 0 && !self.has_handed.load(Ordering::Acquire)).then_some(u64::from(ms))
    }

    /// Arms the link for one hand-over with locks of `lock_ms`, or disarms it (`None`); called
    /// under the device's shard lock.
    pub(super) fn arm(&self, lock_ms: Option<u64>) {
        let ms = lock_ms.map_or(0, |ms| u32::try_from(ms).unwrap_or(u32::MAX).max(1));
        self.armed_lock_ms.store(ms, Ordering::Relaxed);
    }

    /// Leaves `delivery` for the receiver and disarms (called under the device's shard lock,
    /// after [`Self::armed_for`]). `true` when the receiver was not told: the caller offers the
    /// delivery to [`Self::deliver`] once it let go of the shard.
    pub(super) fn hand(&self, delivery: Delivery) -> bool {
        self.armed_lock_ms.store(0, Ordering::Relaxed);
        *self.lock_handed() = Some(Box::new(delivery));
        self.has_handed.store(true, Ordering::Release);
        if matches!(&self.receiver, Receiver::Driver(hook) if hook.direct.is_some()) {
            return true;
        }
        self.wake();
        false
    }

    /// After [`Self::hand`] returned `true`, with no hub lock held: the connection publishes the
    /// delivery on this thread, or its driver is woken to.
    pub(super) fn deliver(&self, hub: &super::Hub) {
        let direct = match &self.receiver {
            Receiver::Driver(hook) => hook.direct.as_ref(),
            Receiver::Task(_) => None,
        };
        if !direct.is_some_and(|d| d.try_deliver(hub)) {
            self.wake();
        }
    }

    /// Takes the handed-over delivery, if there is one.
    pub(super) fn take_handed(&self) -> Option<Box<Delivery>> {
        if !self.has_handed.swap(false, Ordering::AcqRel) {
            return None;
        }
        self.lock_handed().take()
    }

    fn lock_handed(&self) -> std::sync::MutexGuard<'_, Option<Box<Delivery>>> {
        self.handed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `event` unless [`LINK_CHANNEL_CAPACITY`] events are already waiting.
    fn push(&self, event: LinkEvent) -> Result<(), LinkEvent> {
        {
            let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
            if q.len() >= LINK_CHANNEL_CAPACITY {
                return Err(event);
            }
            q.push_back(event);
            self.queued.store(true, Ordering::Release);
        }
        self.wake();
        Ok(())
    }

    fn kick(&self) {
        self.kicked.store(true, Ordering::Release);
        self.wake();
    }

    fn wake(&self) {
        match &self.receiver {
            Receiver::Driver(hook) => {
                if !hook.queued.swap(true, Ordering::AcqRel) {
                    hook.set.push(hook.key);
                }
            }
            Receiver::Task(notify) => notify.notify_one(),
        }
    }
}

/// The connection task's end of its mailbox.
#[derive(Debug)]
pub struct LinkReceiver(Arc<LinkShared>);

impl LinkReceiver {
    /// The next event, waiting for one; `None` once the connection has been kicked. Cancel-safe.
    pub async fn recv(&self) -> Option<LinkEvent> {
        loop {
            if self.is_kicked() {
                return None;
            }
            if let Some(e) = self.try_recv() {
                return Some(e);
            }
            match &self.0.receiver {
                Receiver::Task(notify) => notify.notified().await,
                // A driver looks at its links when their keys come; awaiting one of them waits
                // for any key of its driver's set, and looks again.
                Receiver::Driver(hook) => hook.set.wait().await,
            }
        }
    }

    /// The next event if one is waiting.
    pub fn try_recv(&self) -> Option<LinkEvent> {
        if let Some(delivery) = self.0.take_handed() {
            return Some(LinkEvent::C2dHanded(delivery));
        }
        if self.0.c2d.load(Ordering::Acquire) && self.0.c2d.swap(false, Ordering::AcqRel) {
            return Some(LinkEvent::C2dAvailable);
        }
        if !self.0.queued.load(Ordering::Acquire) {
            return None;
        }
        let mut q = self.0.queue.lock().unwrap_or_else(|p| p.into_inner());
        let event = q.pop_front();
        if q.is_empty() {
            self.0.queued.store(false, Ordering::Release);
            // An empty mailbox gives its buffer back: every idle connection has one.
            *q = VecDeque::new();
        }
        event
    }

    /// The delivery handed over at send time and not received yet: a session that ends takes it
    /// after the hub let go of the link (so no other can come) and releases it with its own.
    pub fn take_handed(&self) -> Option<Box<Delivery>> {
        self.0.take_handed()
    }

    /// Whether a newer connection, or deleting or disabling the device, closed this one.
    pub fn is_kicked(&self) -> bool {
        self.0.kicked.load(Ordering::Acquire)
    }

    /// For a link attached with a [`ReadyHook`]: the driver is about to look at this link, so the
    /// next event or kick queues its key again. Call it before [`Self::try_recv`] and
    /// [`Self::is_kicked`], so nothing that arrives meanwhile goes unnoticed.
    pub fn rearm(&self) {
        if let Receiver::Driver(hook) = &self.0.receiver {
            hook.queued.store(false, Ordering::Release);
        }
    }
}

/// The hub's handle on one open device connection.
#[derive(Debug)]
pub struct Link {
    /// Tells this connection apart from a newer one of the same device.
    pub conn_id: u64,
    /// The connection's mailbox.
    pub shared: Arc<LinkShared>,
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shared.kick();
    }
}

/// What a connection gets when it attaches.
#[derive(Debug)]
pub struct Attached {
    /// Its connection id (pass it back to [`Hub::detach_link`]).
    pub conn_id: u64,
    /// Hub events for it, and whether it was kicked.
    pub events: LinkReceiver,
    /// Subscriptions kept from an earlier session (0 under clean session).
    pub session: u8,
}

/// The connection-facing fields of a device or of one of its modules, borrowed from the registry
/// shard: what `hub::link` and the twin operations of a connection need, whichever identity it is.
pub(super) struct Endpoint<'a> {
    /// The open connection.
    pub link: &'a mut Option<Link>,
    /// The persisted MQTT subscriptions.
    pub session: &'a mut u8,
    /// Last activity.
    pub last_activity: &'a mut crate::clock::Millis,
    /// The twin (the device twin or the module twin).
    pub twin: &'a mut super::Twin,
    /// Whether the identity may connect and send (its device is enabled).
    pub enabled: bool,
    connected: &'a mut bool,
    connection_state_updated: &'a mut crate::clock::Millis,
    /// A device (counted in [`Hub::connected_count`]) rather than a module.
    is_device: bool,
}

impl Device {
    /// The connection-facing fields of the device (`module == None`) or of its module `module`.
    pub(super) fn endpoint(&mut self, module: Option<&str>) -> Option<Endpoint<'_>> {
        let enabled = self.status == super::device::Status::Enabled;
        match module {
            None => Some(Endpoint {
                link: &mut self.link,
                session: &mut self.session,
                last_activity: &mut self.last_activity,
                twin: &mut self.twin,
                enabled,
                connected: &mut self.connected,
                connection_state_updated: &mut self.connection_state_updated,
                is_device: true,
            }),
            Some(mid) => {
                let m = self.module_mut(mid)?;
                Some(Endpoint {
                    link: &mut m.link,
                    session: &mut m.session,
                    last_activity: &mut m.last_activity,
                    twin: &mut m.twin,
                    enabled,
                    connected: &mut m.connected,
                    connection_state_updated: &mut m.connection_state_updated,
                    is_device: false,
                })
            }
        }
    }
}

impl Hub {
    /// Runs `f` on the endpoint of connection identity `client_id` — `{deviceId}` or
    /// `{deviceId}/{moduleId}` (see [`super::module::split_client_id`]) — under its shard lock.
    pub(super) fn with_endpoint<T>(
        &self,
        client_id: &str,
        f: impl FnOnce(Endpoint<'_>) -> Result<T, HubError>,
    ) -> Result<T, HubError> {
        let (device_id, module_id) = super::module::split_client_id(client_id);
        self.with_device(device_id, |d| {
            let e = d
                .endpoint(module_id)
                .ok_or_else(|| HubError::module_not_found(device_id, module_id.unwrap_or_default()))?;
            f(e)
        })
    }

    /// [`Self::with_endpoint`] for changes to what `--persist` keeps: `f` says what it changed
    /// of the endpoint's kept state, and that is journaled (see [`Hub::record_endpoint`]).
    pub(super) fn with_endpoint_kept<T>(
        &self,
        client_id: &str,
        f: impl FnOnce(Endpoint<'_>) -> Result<(T, Kept), HubError>,
    ) -> Result<T, HubError> {
        let (device_id, module_id) = super::module::split_client_id(client_id);
        self.with_device(device_id, |d| {
            let e = d
                .endpoint(module_id)
                .ok_or_else(|| HubError::module_not_found(device_id, module_id.unwrap_or_default()))?;
            let (t, kept) = f(e)?;
            self.record_endpoint(d, module_id, kept);
            Ok(t)
        })
    }

    /// Sets an endpoint's `connected` (and when it changed); a device's through
    /// [`Hub::set_connected`]'s counter.
    fn set_endpoint_connected(&self, e: &mut Endpoint<'_>, connected: bool, now: crate::clock::Millis) {
        if e.is_device && *e.connected != connected {
            if connected {
                self.shared.connected_count.fetch_add(1, Ordering::Relaxed);
            } else {
                self.shared.connected_count.fetch_sub(1, Ordering::Relaxed);
            }
        }
        *e.connected = connected;
        *e.connection_state_updated = now;
    }

    /// Registers a new connection for `device_id` (closing any older one), marks the device
    /// connected and returns the persisted session, cleared first when `clean_session`.
    pub fn attach_link(&self, device_id: &str, clean_session: bool) -> Result<Attached, HubError> {
        self.attach_link_with(device_id, clean_session, None)
    }

    /// [`Self::attach_link`] for a connection served without its own task: with `ready`, events
    /// and the kick are announced on the hook's [`ReadySet`] instead of waking a waiter.
    pub fn attach_link_with(
        &self,
        device_id: &str,
        clean_session: bool,
        ready: Option<ReadyHook>,
    ) -> Result<Attached, HubError> {
        let now = self.now();
        let conn_id = self.next_counter();
        let receiver = ready.map_or_else(Receiver::default, Receiver::Driver);
        let shared = Arc::new(LinkShared { receiver, ..LinkShared::default() });
        let link = Link { conn_id, shared: shared.clone() };
        let session = self.with_endpoint_kept(device_id, |mut d| {
            let cleared = clean_session && *d.session != 0;
            if cleared {
                *d.session = 0;
            }
            if d.link.replace(link).is_some() {
                tracing::info!(
                    device = device_id,
                    code = 400027,
                    "ConnectionForcefullyClosedOnNewConnection: a new connection replaced the old one"
                );
            }
            self.set_endpoint_connected(&mut d, true, now);
            *d.last_activity = now;
            Ok((*d.session, Kept::identity_if(cleared)))
        })?;
        self.shared.changed.notify_waiters();
        Ok(Attached { conn_id, events: LinkReceiver(shared), session })
    }

    /// Unregisters connection `conn_id` of `device_id` if it is still the current one. With
    /// `keep_session == false` (clean session) the persisted subscriptions are dropped too.
    pub fn detach_link(&self, device_id: &str, conn_id: u64, keep_session: bool) {
        let now = self.now();
        let _ = self.with_endpoint_kept(device_id, |mut d| {
            let mut cleared = false;
            if d.link.as_ref().is_some_and(|l| l.conn_id == conn_id) {
                *d.link = None;
                self.set_endpoint_connected(&mut d, false, now);
                if !keep_session && *d.session != 0 {
                    *d.session = 0;
                    cleared = true;
                }
            }
            Ok(((), Kept::identity_if(cleared)))
        });
    }

    /// Stores the subscriptions of connection `conn_id` so the next session of the device finds
    /// them (the connection calls this after every SUBSCRIBE/UNSUBSCRIBE).
    pub fn save_session(&self, device_id: &str, conn_id: u64, session: u8) {
        let _ = self.with_endpoint_kept(device_id, |d| {
            // Kept with --persist: a device reconnecting after a hub restart under
            // clean_session=0 need not subscribe again (the Python SDK does not).
            let changed = d.link.as_ref().is_some_and(|l| l.conn_id == conn_id) && *d.session != session;
            if changed {
                *d.session = session;
            }
            Ok(((), Kept::identity_if(changed)))
        });
        // A method call may be waiting (connect timeout) for this device to subscribe.
        self.shared.changed.notify_waiters();
    }

    /// Whether `device_id` still exists and is enabled: a dropped connection's MQTT Will is
    /// recorded only then (a deleted or disabled device sends nothing).
    pub fn device_may_send(&self, device_id: &str) -> bool {
        self.with_endpoint(device_id, |d| Ok(d.enabled)).unwrap_or(false)
    }

    /// Records device activity (any packet from it).
    pub fn touch_device(&self, device_id: &str) {
        let now = self.now();
        let _ = self.with_endpoint(device_id, |d| {
            *d.last_activity = now;
            Ok(())
        });
    }

    /// Wakes the current connection of `device_id` (if any) to pull C2D: used when a replaced
    /// connection released messages the new one could not see yet.
    pub fn wake_c2d(&self, device_id: &str) {
        let _ = self.with_device(device_id, |d| {
            Hub::poke_c2d(d);
            Ok(())
        });
    }

    /// Wakes the connection of `d` (if any) because a C2D message was queued.
    pub(super) fn poke_c2d(d: &Device) {
        if let Some(link) = &d.link {
            link.shared.poke_c2d();
        }
    }

    /// Sends `patch` (with `$version`) to the device if it is connected and subscribed to desired
    /// property updates. Like IoT Hub, a device that is offline only sees it in its next GET.
    pub fn notify_desired(&self, device_id: &str, patch: Value) {
        let _ = self.with_endpoint(device_id, |d| {
            if *d.session & subscriptions::DESIRED == 0 {
                return Ok(());
            }
            if let Some(link) = &d.link
                && link.shared.push(LinkEvent::DesiredPatch(Box::new(patch))).is_err()
            {
                tracing::warn!(device = device_id, "connection busy; a desired-properties patch was dropped");
            }
            Ok(())
        });
    }

    /// Whether `device_id` is connected and subscribed to direct methods.
    fn method_link(&self, device_id: &str) -> Result<Option<Arc<LinkShared>>, HubError> {
        self.with_endpoint(device_id, |d| {
            Ok(d.link.as_ref().filter(|_| *d.session & subscriptions::METHODS != 0).map(|l| l.shared.clone()))
        })
    }

    /// Invokes direct method `name` on `device_id` (reference §2.7; a module's `{deviceId}/{moduleId}`,
    /// reference-2 §4.1): waits up to `connect` for the
    /// device to be online and subscribed (404103 `DeviceNotOnline` otherwise), then up to
    /// `response` for its answer (504101 `GatewayTimeout` otherwise).
    pub async fn invoke_method(
        &self,
        device_id: &str,
        name: &str,
        payload: Bytes,
        connect: Duration,
        response: Duration,
    ) -> Result<MethodReply, HubError> {
        let who = match super::module::split_client_id(device_id) {
            (d, Some(m)) => format!("module '{m}' of device '{d}'"),
            (d, None) => format!("device '{d}'"),
        };
        let offline = || HubError::new(ErrorCode::DeviceNotOnline, format!("{who} is not online"));
        let deadline = tokio::time::Instant::now() + connect;
        let _watching = self.shared.changed.watch();
        let events = loop {
            let notified = self.shared.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(tx) = self.method_link(device_id)? {
                break tx;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(offline());
            }
        };
        let (reply, rx) = oneshot::channel();
        let call = MethodCall { name: name.to_string(), payload, reply };
        events.push(LinkEvent::Method(Box::new(call))).map_err(|_| offline())?;
        match tokio::time::timeout(response, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(offline()),
            Err(_) => Err(HubError::new(
                ErrorCode::GatewayTimeout,
                format!("{who} did not answer method '{name}' within {} s", response.as_secs()),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::{DeviceInput, HubConfig};

    fn hub_with(id: &str) -> Hub {
        let hub = Hub::new(HubConfig::default());
        hub.put_device(id, DeviceInput::default(), None).unwrap();
        hub
    }

    #[tokio::test(start_paused = true)]
    async fn methods_need_an_online_subscribed_device_and_time_out() {
        let hub = hub_with("d1");
        let call = |hub: Hub| async move {
            hub.invoke_method("d1", "m", Bytes::new(), Duration::ZERO, Duration::from_secs(5)).await
        };
        assert_eq!(call(hub.clone()).await.unwrap_err().code, ErrorCode::DeviceNotOnline);
        let link = hub.attach_link("d1", false).unwrap();
        assert_eq!(call(hub.clone()).await.unwrap_err().code, ErrorCode::DeviceNotOnline, "not subscribed");
        hub.save_session("d1", link.conn_id, subscriptions::METHODS);
        let pending = tokio::spawn(call(hub.clone()));
        let Some(LinkEvent::Method(m)) = link.events.recv().await else { panic!("no method event") };
        assert_eq!(m.name, "m");
        drop(m);
        assert_eq!(
            pending.await.unwrap().unwrap_err().code,
            ErrorCode::DeviceNotOnline,
            "connection dropped the call"
        );
        let pending = tokio::spawn(call(hub.clone()));
        let _held = link.events.recv().await;
        assert_eq!(pending.await.unwrap().unwrap_err().code, ErrorCode::GatewayTimeout);
    }

    #[tokio::test(start_paused = true)]
    async fn connect_timeout_waits_for_the_device() {
        let hub = hub_with("d1");
        let h = hub.clone();
        let pending = tokio::spawn(async move {
            h.invoke_method("d1", "m", Bytes::new(), Duration::from_secs(30), Duration::from_secs(5)).await
        });
        tokio::task::yield_now().await;
        let link = hub.attach_link("d1", false).unwrap();
        hub.save_session("d1", link.conn_id, subscriptions::METHODS);
        let Some(LinkEvent::Method(m)) = link.events.recv().await else { panic!("no method event") };
        m.reply.send(MethodReply { status: 200, payload: Bytes::from_static(b"1") }).unwrap();
        assert_eq!(pending.await.unwrap().unwrap().status, 200);
    }

    /// The mailbox is allocated per connection (a million in the million-device run): with its
    /// `Arc` counts it stays within mimalloc's 128-byte size class.
    #[test]
    fn a_mailbox_fits_128_bytes() {
        assert!(std::mem::size_of::<LinkShared>() + 16 <= 128, "{}", std::mem::size_of::<LinkShared>());
    }

    #[test]
    fn hooked_links_announce_events_and_kicks_once_until_rearmed() {
        let hub = hub_with("d1");
        hub.put_device("d2", DeviceInput::default(), None).unwrap();
        let set = ReadySet::new();
        let a = hub.attach_link_with("d1", false, Some(ReadyHook::new(set.clone(), 7))).unwrap();
        let b = hub.attach_link_with("d2", false, Some(ReadyHook::new(set.clone(), 9))).unwrap();
        let mut keys = Vec::new();
        set.drain_into(&mut keys);
        assert!(keys.is_empty(), "attaching announces nothing");
        hub.wake_c2d("d1");
        hub.wake_c2d("d1");
        set.drain_into(&mut keys);
        assert_eq!(keys, [7], "a link is announced once until its driver looks");
        a.events.rearm();
        assert!(matches!(a.events.try_recv(), Some(LinkEvent::C2dAvailable)));
        hub.wake_c2d("d1");
        hub.delete_device("d2", None).unwrap();
        keys.clear();
        set.drain_into(&mut keys);
        assert_eq!(keys, [7, 9], "rearmed: the next event is announced again; a kick is announced");
        assert!(b.events.is_kicked());
    }

    #[test]
    fn c2d_wake_ups_coalesce_and_survive_a_full_mailbox() {
        let hub = hub_with("d1");
        let a = hub.attach_link("d1", false).unwrap();
        hub.save_session("d1", a.conn_id, subscriptions::DESIRED);
        for v in 0..LINK_CHANNEL_CAPACITY + 5 {
            hub.notify_desired("d1", serde_json::json!({"v": v, "$version": v}));
        }
        for _ in 0..3 {
            hub.wake_c2d("d1");
        }
        let mut c2d = 0;
        let mut patches = 0;
        while let Some(e) = a.events.try_recv() {
            match e {
                LinkEvent::C2dAvailable => c2d += 1,
                LinkEvent::DesiredPatch(_) => patches += 1,
                LinkEvent::Method(_) => panic!("no method was called"),
                LinkEvent::C2dHanded(_) => panic!("nothing was armed"),
            }
        }
        assert_eq!(
            (c2d, patches),
            (1, LINK_CHANNEL_CAPACITY),
            "one C2D wake-up for three sends, not refused"
        );
        hub.wake_c2d("d1");
        assert!(matches!(a.events.try_recv(), Some(LinkEvent::C2dAvailable)), "announced again once taken");
        assert!(a.events.try_recv().is_none());
    }

    #[test]
    fn detach_keeps_or_clears_the_session_and_deleting_kicks() {
        let hub = hub_with("d1");
        let a = hub.attach_link("d1", false).unwrap();
        hub.save_session("d1", a.conn_id, subscriptions::C2D);
        hub.detach_link("d1", a.conn_id, true);
        let b = hub.attach_link("d1", false).unwrap();
        assert_eq!(b.session, subscriptions::C2D);
        hub.detach_link("d1", b.conn_id, false);
        let c = hub.attach_link("d1", false).unwrap();
        assert_eq!(c.session, 0);
        let disable = DeviceInput { status: Some(crate::hub::Status::Disabled), ..Default::default() };
        hub.put_device("d1", disable, Some(crate::hub::IfMatch::Any)).unwrap();
        assert!(c.events.is_kicked(), "disabling the device closes its connection");
        assert_eq!(hub.get_device("d1").unwrap()["connectionState"], "Disconnected");
        let d = hub.attach_link("d1", false).unwrap();
        hub.delete_device("d1", None).unwrap();
        assert!(d.events.is_kicked());
    }
}
