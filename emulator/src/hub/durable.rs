//! Durable hub state (`--persist`): the records the hub's mutation paths append to the journal,
//! recovery that decodes records straight into the shards, and fuzzy snapshots by shard walk.
//!
//! Ownership: [`Durability`] (one per persistent hub, in `Shared`) owns the journal handle, its
//! committer thread and the state directory's segment numbering. Records are appended by the
//! mutation paths while they hold the lock that orders the change (a shard lock, the feedback
//! lock), with no `.await`; the protocol driver that handled the request takes the thread's ticket
//! ([`Hub::take_durability_ticket`]) in the same synchronous stretch and awaits
//! [`Hub::durable`] before it answers success. Without `--persist` none of this exists: every
//! hook is a `None` check.
//!
//! What is stored (records in `crate::persist::records`): registry entries, twins, every C2D
//! queue's messages with delivery counts and expiry, pending feedback records and unread feedback
//! batches, the MQTT session bits kept under `clean_session=0`, jobs (as created, started and ended;
//! one the hub was running when it died comes back failed), and (in the `extra` submodule) module
//! identities with their twins and session bits, configurations, and each device's record of the
//! configurations that target it. Not stored: C2D and feedback locks (they lapse on restart: the
//! message is delivered again), connection state, telemetry, throttling counters, DPS enrollments,
//! the configuration sweeper's pending work (recovery owes a full sweep instead).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{Map, Value};

use super::{AuthType, Device, Hub, SHARD_COUNT, Shard, Status, Twin};
use crate::c2d::{AckMode, C2dMessage, DeviceQueue, FeedbackRecord, FeedbackStatus, StoredEntry};
use crate::error::{ErrorCode, HubError};
use crate::persist::PersistConfig;
use crate::persist::codec::DecodeError;
use crate::persist::journal::{CommitterHandle, Journal, SyncMode, Ticket};
use crate::persist::records::{C2dRec, DeviceRec, FeedbackRec, Record, TwinRec};
use crate::persist::store::{self, PersistError, Replayed, Rotation, Segments, SnapshotWriter};

/// Smallest log growth since the last snapshot that triggers a new one (and at least the last
/// snapshot's size: restart then reads at most about twice the live state).
const SNAPSHOT_MIN_LOG_BYTES: u64 = 64 << 20;

/// How often the snapshot thread looks at the log's growth.
const SNAPSHOT_CHECK_EVERY: Duration = Duration::from_secs(1);

/// The persistent side of a hub. See the module documentation.
#[derive(Debug)]
pub(crate) struct Durability {
    journal: Arc<Journal>,
    committer: Mutex<Option<CommitterHandle>>,
    rotation: Rotation,
    dir: PathBuf,
    /// The segment the journal writes to (or will at its next group).
    segment: AtomicU64,
    /// One snapshot at a time.
    snapshot_running: Mutex<()>,
    /// Log bytes that recovery read and no snapshot covers yet.
    recovered_log: AtomicU64,
    /// The journal position when the last snapshot started.
    snapshot_pos: AtomicU64,
    /// The last snapshot's size.
    snapshot_bytes: AtomicU64,
    /// Set by [`Hub::close_persistence`]: the snapshot thread ends.
    stop: std::sync::atomic::AtomicBool,
    /// The snapshot thread, joined by [`Hub::close_persistence`].
    snapshot_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The state directory's lock: one hub per directory.
    _lock: store::DirLock,
}

impl Drop for Durability {
    fn drop(&mut self) {
        if let Some(c) = self.committer.lock().unwrap_or_else(|p| p.into_inner()).take() {
            c.close();
        }
    }
}

/// What recovery found, for logs and measurements.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Records and bytes read.
    pub replayed: Replayed,
    /// Devices in the registry afterwards.
    pub devices: usize,
    /// How long recovery took.
    pub elapsed: Duration,
}

/// What a snapshot wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SnapshotStats {
    /// Its number (the segment the journal moved to).
    pub number: u64,
    /// Records written.
    pub records: u64,
    /// Bytes written.
    pub bytes: u64,
    /// How long it took.
    pub elapsed: Duration,
}

fn auth_code(a: AuthType) -> u8 {
    match a {
        AuthType::Sas => 0,
        AuthType::SelfSigned => 1,
        AuthType::CertificateAuthority => 2,
        AuthType::None => 3,
    }
}

fn auth_of(code: u8) -> AuthType {
    match code {
        1 => AuthType::SelfSigned,
        2 => AuthType::CertificateAuthority,
        3 => AuthType::None,
        _ => AuthType::Sas,
    }
}

fn ack_code(a: AckMode) -> u8 {
    match a {
        AckMode::None => 0,
        AckMode::Positive => 1,
        AckMode::Negative => 2,
        AckMode::Full => 3,
    }
}

fn ack_of(code: u8) -> AckMode {
    match code {
        1 => AckMode::Positive,
        2 => AckMode::Negative,
        3 => AckMode::Full,
        _ => AckMode::None,
    }
}

fn status_code(s: FeedbackStatus) -> u8 {
    match s {
        FeedbackStatus::Success => 0,
        FeedbackStatus::Expired => 1,
        FeedbackStatus::DeliveryCountExceeded => 2,
        FeedbackStatus::Rejected => 3,
        FeedbackStatus::Purged => 4,
    }
}

fn status_of(code: u8) -> FeedbackStatus {
    match code {
        1 => FeedbackStatus::Expired,
        2 => FeedbackStatus::DeliveryCountExceeded,
        3 => FeedbackStatus::Rejected,
        4 => FeedbackStatus::Purged,
        _ => FeedbackStatus::Success,
    }
}

/// What an operation changed of an endpoint's state that `--persist` keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kept {
    /// Nothing kept changed.
    Nothing,
    /// Its identity record (MQTT session bits, model id).
    Identity,
    /// Its twin.
    Twin,
}

impl Kept {
    /// `Identity` when `changed`, else `Nothing`.
    pub(crate) fn identity_if(changed: bool) -> Self {
        if changed { Self::Identity } else { Self::Nothing }
    }
}

/// The `Device` record of `d`.
pub(crate) fn device_record(d: &Device) -> Record<'_> {
    let (pt, st) = d.thumbprints();
    Record::Device(DeviceRec {
        id: &d.id,
        generation: d.generation_id,
        etag: d.etag,
        enabled: d.status == Status::Enabled,
        status_reason: d.status_reason.as_deref(),
        status_updated: d.status_updated,
        auth_type: auth_code(d.auth_type),
        primary_key: d.primary_key.as_deref(),
        secondary_key: d.secondary_key.as_deref(),
        has_thumbprints: d.extra.as_deref().is_some_and(|e| e.thumbprints.is_some()),
        primary_thumbprint: pt,
        secondary_thumbprint: st,
        model_id: d.model_id(),
        iot_edge: d.iot_edge,
        mqtt_session: d.session,
    })
}

/// The twin's three documents as JSON text.
struct TwinText {
    tags: Vec<u8>,
    desired: Vec<u8>,
    reported: Vec<u8>,
}

impl TwinText {
    fn of(t: &Twin) -> Self {
        let text = |m: &Map<String, Value>| {
            // Most twins have empty sections (a new device's, a tags-only twin's).
            if m.is_empty() { b"{}".to_vec() } else { serde_json::to_vec(m).expect("a JSON map serializes") }
        };
        Self { tags: text(&t.tags), desired: text(&t.desired), reported: text(&t.reported) }
    }

    /// The record view of twin `t` (the twin this text was made of).
    fn rec<'a>(&'a self, t: &Twin) -> TwinRec<'a> {
        TwinRec {
            tags: &self.tags,
            desired: &self.desired,
            reported: &self.reported,
            desired_version: t.desired_version,
            reported_version: t.reported_version,
            version: t.version,
            desired_updated: t.desired_updated,
            reported_updated: t.reported_updated,
        }
    }

    fn record<'a>(&'a self, d: &'a Device) -> Record<'a> {
        Record::Twin { id: &d.id, generation: d.generation_id, twin: self.rec(&d.twin) }
    }
}

/// The twin a `Twin` record (or a module's) describes.
fn twin_of(twin: &TwinRec<'_>) -> Result<Twin, DecodeError> {
    Ok(Twin {
        tags: json_map("twin tags", twin.tags)?,
        desired: json_map("twin desired properties", twin.desired)?,
        reported: json_map("twin reported properties", twin.reported)?,
        desired_version: twin.desired_version,
        reported_version: twin.reported_version,
        version: twin.version,
        desired_updated: twin.desired_updated,
        reported_updated: twin.reported_updated,
    })
}

fn c2d_record<'a>(id: &'a str, generation: u64, e: StoredEntry<'a>) -> Record<'a> {
    let m = e.message;
    Record::C2dAdded {
        id,
        generation,
        message: C2dRec {
            sequence: e.sequence_number,
            enqueued_at: e.enqueued_at,
            expires_at: e.expires_at,
            delivery_count: e.delivery_count,
            message_id: m.message_id.as_deref(),
            correlation_id: m.correlation_id.as_deref(),
            user_id: m.user_id.as_deref(),
            content_type: m.content_type.as_deref(),
            content_encoding: m.content_encoding.as_deref(),
            ack: ack_code(m.ack),
            expiry: m.expiry,
            properties: m.properties.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect(),
            body: &m.body,
        },
    }
}

fn feedback_record(serial: u64, r: &FeedbackRecord) -> Record<'_> {
    Record::FeedbackPushed(FeedbackRec {
        serial,
        original_message_id: r.original_message_id.as_deref(),
        enqueued_at: r.enqueued_at,
        status: status_code(r.status),
        device_id: &r.device_id,
        device_generation_id: &r.device_generation_id,
    })
}

/// The records that turn a queue that was `before` (`(sequence, delivery count)` pairs) into `q`.
fn queue_changes(
    id: &str,
    generation: u64,
    before: &[(u64, u32)],
    q: &DeviceQueue,
    mut emit: impl FnMut(&Record<'_>),
) {
    let mut old = before.iter().peekable();
    for (seq, dc) in q.states() {
        while let Some(&&(s, _)) = old.peek() {
            if s >= seq {
                break;
            }
            emit(&Record::C2dRemoved { id, generation, sequence: s });
            old.next();
        }
        match old.peek() {
            Some(&&(s, d)) if s == seq => {
                old.next();
                if d != dc {
                    emit(&Record::C2dAbandoned { id, generation, sequence: seq, delivery_count: dc });
                }
            }
            _ => {
                if let Some(e) = q.stored_entry(seq) {
                    emit(&c2d_record(id, generation, e));
                }
            }
        }
    }
    for &(s, _) in old {
        emit(&Record::C2dRemoved { id, generation, sequence: s });
    }
}

fn json_map(what: &'static str, text: &[u8]) -> Result<Map<String, Value>, DecodeError> {
    serde_json::from_slice(text).map_err(|e| DecodeError::Invalid { what, detail: e.to_string() })
}

fn message_of(m: &C2dRec<'_>) -> C2dMessage {
    let own = |s: Option<&str>| s.map(str::to_owned);
    C2dMessage {
        message_id: own(m.message_id),
        correlation_id: own(m.correlation_id),
        user_id: own(m.user_id),
        content_type: own(m.content_type),
        content_encoding: own(m.content_encoding),
        ack: ack_of(m.ack),
        expiry: m.expiry,
        properties: m.properties.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        body: Bytes::copy_from_slice(m.body),
    }
}

pub(super) fn blank_device(id: &str, generation: u64) -> Device {
    Device {
        id: id.to_owned(),
        generation_id: generation,
        etag: 0,
        status: Status::Enabled,
        status_reason: None,
        status_updated: 0,
        auth_type: AuthType::Sas,
        primary_key: None,
        secondary_key: None,
        extra: None,
        iot_edge: false,
        connected: false,
        connection_state_updated: 0,
        last_activity: 0,
        twin: Twin::new(0),
        c2d: DeviceQueue::default(),
        link: None,
        session: 0,
    }
}

fn set_identity(d: &mut Device, r: &DeviceRec<'_>) {
    d.etag = r.etag;
    d.status = if r.enabled { Status::Enabled } else { Status::Disabled };
    d.status_reason = r.status_reason.map(str::to_owned);
    d.status_updated = r.status_updated;
    d.auth_type = auth_of(r.auth_type);
    d.primary_key = r.primary_key.map(str::to_owned);
    d.secondary_key = r.secondary_key.map(str::to_owned);
    d.iot_edge = r.iot_edge;
    d.session = r.mqtt_session;
    let thumbprints = r
        .has_thumbprints
        .then(|| (r.primary_thumbprint.map(str::to_owned), r.secondary_thumbprint.map(str::to_owned)));
    let model_id = r.model_id.map(Box::from);
    d.update_extra(|e| {
        e.thumbprints = thumbprints;
        e.model_id = model_id;
    });
}

impl Hub {
    /// A hub with `config` whose state lives in `persist.dir`: recovers what is there (the
    /// newest snapshot, then the log after it; a torn tail is cut), then journals every change.
    /// Returns once recovery is done; nothing can reach the hub before.
    pub fn open_persistent(
        config: super::HubConfig,
        clock: Arc<dyn crate::clock::Clock>,
        persist: &PersistConfig,
    ) -> Result<(Self, Recovered), PersistError> {
        let started = Instant::now();
        let lock = store::DirLock::acquire(&persist.dir)?;
        let hub = Self::with_clock(config, clock);
        let mut max_counter = 0u64;
        let mut failure = None;
        let (_, next_segment, replayed) = store::replay(&persist.dir, |r| {
            if failure.is_none()
                && let Err(e) = hub.apply(r, &mut max_counter)
            {
                failure = Some(e);
            }
        })?;
        if let Some(source) = failure {
            return Err(PersistError::Corrupt { path: persist.dir.clone(), offset: 0, source });
        }
        let devices = hub.count_recovered(max_counter, true);
        let (segments, rotation) =
            Segments::create(&persist.dir, next_segment, persist.sync == SyncMode::Sync)?;
        let (journal, committer) = Journal::start(segments, persist.sync, 0);
        let durability = Durability {
            journal,
            committer: Mutex::new(Some(committer)),
            rotation,
            dir: persist.dir.clone(),
            segment: AtomicU64::new(next_segment),
            snapshot_running: Mutex::new(()),
            recovered_log: AtomicU64::new(replayed.log_bytes),
            snapshot_pos: AtomicU64::new(0),
            snapshot_bytes: AtomicU64::new(replayed.bytes - replayed.log_bytes),
            stop: std::sync::atomic::AtomicBool::new(false),
            snapshot_thread: Mutex::new(None),
            _lock: lock,
        };
        hub.shared.durable.set(durability).expect("a new hub has no journal yet");
        let thread = spawn_snapshotter(Arc::downgrade(&hub.shared));
        if let Some(d) = hub.shared.durable.get() {
            *d.snapshot_thread.lock().unwrap_or_else(|p| p.into_inner()) = thread;
        }
        // The sweeper's pending work was not kept: finish it (a no-op for twins in line), once
        // what it changes is journaled.
        hub.resume_configurations();
        let recovered = Recovered { replayed, devices, elapsed: started.elapsed() };
        tracing::info!(
            devices,
            records = replayed.records,
            bytes = replayed.bytes,
            torn_bytes = replayed.torn_bytes,
            elapsed_ms = recovered.elapsed.as_millis() as u64,
            dir = %persist.dir.display(),
            "hub state recovered"
        );
        Ok((hub, recovered))
    }

    /// Whether the hub journals its state (`--persist`).
    pub fn is_persistent(&self) -> bool {
        self.shared.durable.get().is_some()
    }

    fn journal(&self) -> Option<&Journal> {
        self.shared.durable.get().map(|d| &*d.journal)
    }

    /// Appends `record` to the journal (no-op without `--persist`). Call it under the lock that
    /// ordered the change.
    pub(super) fn record(&self, record: &Record<'_>) {
        if let Some(j) = self.journal() {
            // A failed journal fails the thread's ticket, so the change is not answered as done.
            let _ = j.append(|w| record.encode(w));
        }
    }

    /// Appends `d`'s twin.
    pub(super) fn record_twin(&self, d: &Device) {
        if self.journal().is_some() {
            let text = TwinText::of(&d.twin);
            self.record(&text.record(d));
        }
    }

    /// Journals what `kept` says changed of endpoint `module` of `d` (the device itself for
    /// `None`; a module's identity and twin are one record).
    pub(super) fn record_endpoint(&self, d: &Device, module: Option<&str>, kept: Kept) {
        match (module, kept) {
            (_, Kept::Nothing) => {}
            (Some(mid), _) => self.record_module(d, mid),
            (None, Kept::Identity) => self.record(&device_record(d)),
            (None, Kept::Twin) => self.record_twin(d),
        }
    }

    /// `(sequence, delivery count)` of `q` before an operation, when journaling.
    pub(super) fn queue_before(&self, q: &DeviceQueue) -> Option<Vec<(u64, u32)>> {
        self.journal().map(|_| q.states().collect())
    }

    /// Appends what changed in `d`'s queue since `before`.
    pub(super) fn record_queue(&self, d: &Device, before: Option<Vec<(u64, u32)>>) {
        if let Some(before) = before {
            queue_changes(&d.id, d.generation_id, &before, &d.c2d, |r| self.record(r));
        }
    }

    /// Appends what changed in the feedback channel since `(base, before)`.
    pub(super) fn record_feedback(
        &self,
        fb: &crate::c2d::FeedbackHub,
        before: Option<(u64, Vec<(u64, u32)>)>,
    ) {
        if let Some((base, batches)) = before {
            if fb.pending_base() != base {
                self.record(&Record::FeedbackCut { next: fb.pending_base() });
            }
            queue_changes("", 0, &batches, fb.batches(), |r| self.record(r));
        }
    }

    /// The feedback channel's state before an operation, when journaling.
    pub(super) fn feedback_before(&self, fb: &crate::c2d::FeedbackHub) -> Option<(u64, Vec<(u64, u32)>)> {
        self.journal().map(|_| (fb.pending_base(), fb.batches().states().collect()))
    }

    /// Appends a pushed feedback record.
    pub(super) fn record_feedback_push(&self, serial: u64, r: &FeedbackRecord) {
        if self.journal().is_some() {
            self.record(&feedback_record(serial, r));
        }
    }

    /// Appends job `id`'s stored state (see `crate::jobs::model::Job::stored`).
    pub(crate) fn record_job(&self, id: &str, stored: &Value) {
        if self.journal().is_some() {
            let state = serde_json::to_vec(stored).expect("a JSON value serializes");
            self.record(&Record::Job { id, state: &state });
        }
    }

    /// The ticket of the records this thread appended since the last take (`None`: nothing to
    /// wait for, or no `--persist`). Take it right after the synchronous handling, before any
    /// `.await`, then [`Hub::durable`] before answering.
    pub fn take_durability_ticket(&self) -> Option<Ticket> {
        self.journal().and_then(Journal::take_thread_ticket)
    }

    /// Waits until the records up to `ticket` are written (and synced with `--persist-sync`).
    /// Fails with `ServerError` when the journal failed or closed: the change must not be
    /// answered as done.
    pub async fn durable(&self, ticket: Option<Ticket>) -> Result<(), HubError> {
        let (Some(t), Some(j)) = (ticket, self.journal()) else { return Ok(()) };
        j.durable(t).await.map_err(|e| HubError::new(ErrorCode::ServerError, e.to_string()))
    }

    /// Waits until everything appended so far is written: for callers that cannot track tickets.
    pub async fn durable_all(&self) -> Result<(), HubError> {
        let t = self.journal().map(Journal::appended_position);
        self.durable(t).await
    }

    /// Graceful shutdown of the state: stops the snapshot thread (after a snapshot in progress),
    /// writes what is pending and closes the journal; later changes are not journaled (their
    /// waits fail). The directory stays locked until the hub is dropped.
    pub fn close_persistence(&self) {
        let Some(d) = self.shared.durable.get() else { return };
        d.stop.store(true, Ordering::Release);
        let thread = d.snapshot_thread.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = thread {
            t.thread().unpark();
            if t.thread().id() != std::thread::current().id() {
                let _ = t.join();
            }
        }
        let committer = d.committer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(c) = committer {
            c.close();
        }
    }

    /// Stops journaling as kill -9 would: what is not written yet is never written, and every
    /// later change fails to become durable. For crash tests (the hub is then dropped).
    pub fn halt_persistence(&self) {
        if let Some(j) = self.journal() {
            j.halt();
        }
    }

    /// Applies one recovered record to the hub's structures.
    fn apply(&self, r: Record<'_>, max_counter: &mut u64) -> Result<(), DecodeError> {
        match r {
            Record::Device(rec) => {
                *max_counter = (*max_counter).max(rec.generation).max(rec.etag);
                let mut shard = self.shard_for(rec.id);
                match shard.devices.get_mut(rec.id) {
                    Some(d) if d.generation_id > rec.generation => {}
                    Some(d) if d.generation_id == rec.generation => set_identity(d, &rec),
                    _ => {
                        let mut d = blank_device(rec.id, rec.generation);
                        set_identity(&mut d, &rec);
                        shard.devices.insert(rec.id.to_owned(), d);
                    }
                }
            }
            Record::DeviceRemoved { id, generation } => {
                let mut shard = self.shard_for(id);
                if shard.devices.get(id).is_some_and(|d| d.generation_id == generation) {
                    shard.devices.remove(id);
                }
            }
            Record::Twin { id, generation, twin } => {
                let twin = twin_of(&twin)?;
                self.with_generation(id, generation, |d| d.twin = twin);
            }
            Record::C2dAdded { id, generation, message } => {
                let add = |q: &mut DeviceQueue| {
                    q.restore(
                        message_of(&message),
                        message.sequence,
                        message.enqueued_at,
                        message.expires_at,
                        message.delivery_count,
                    )
                };
                if id.is_empty() {
                    add(self.feedback().batches_mut());
                } else {
                    self.with_generation(id, generation, |d| add(&mut d.c2d));
                }
            }
            Record::C2dRemoved { id, generation, sequence } => {
                if id.is_empty() {
                    self.feedback().batches_mut().restore_removed(sequence);
                } else {
                    self.with_generation(id, generation, |d| d.c2d.restore_removed(sequence));
                }
            }
            Record::C2dAbandoned { id, generation, sequence, delivery_count } => {
                if id.is_empty() {
                    self.feedback().batches_mut().restore_delivery_count(sequence, delivery_count);
                } else {
                    self.with_generation(id, generation, |d| {
                        d.c2d.restore_delivery_count(sequence, delivery_count)
                    });
                }
            }
            Record::C2dSequence { id, generation, last } => {
                if id.is_empty() {
                    self.feedback().batches_mut().restore_last_sequence(last);
                } else {
                    self.with_generation(id, generation, |d| d.c2d.restore_last_sequence(last));
                }
            }
            Record::FeedbackPushed(f) => {
                let record = FeedbackRecord {
                    original_message_id: f.original_message_id.map(str::to_owned),
                    enqueued_at: f.enqueued_at,
                    status: status_of(f.status),
                    device_id: f.device_id.to_owned(),
                    device_generation_id: f.device_generation_id.to_owned(),
                };
                self.feedback().restore_pushed(f.serial, record);
            }
            Record::FeedbackCut { next } => self.feedback().restore_cut(next),
            Record::Job { id, state } => {
                let v: Value = serde_json::from_slice(state)
                    .map_err(|e| DecodeError::Invalid { what: "job state", detail: e.to_string() })?;
                let mut job = crate::jobs::model::Job::from_stored(id, &v)
                    .map_err(|e| DecodeError::Invalid { what: "job state", detail: e.message })?;
                // A job the hub was running (or waiting to run) when it died ends as failed, as at
                // a graceful shutdown: its devices are not walked again behind the service's back.
                if !job.status.is_terminal() {
                    job.fail(self.now(), "the hub restarted before the job finished");
                }
                self.jobs().with_table(|t| t.restore(job));
            }
            Record::Module(m) => self.apply_module(&m, max_counter)?,
            Record::ModuleRemoved { device_id, device_generation, id, generation } => {
                self.apply_module_removed(device_id, device_generation, id, generation);
            }
            Record::Configuration(c) => self.apply_configuration(&c, max_counter)?,
            Record::ConfigurationRemoved { id } => self.configs_state().restore_removed(id),
            Record::DeviceConfigs(c) => self.apply_device_configs(&c),
        }
        Ok(())
    }

    /// Sets the counts kept incrementally elsewhere from what replay put in the shards (devices,
    /// modules, and with `histogram` the metrics' queue-depth histogram: replay fills queues
    /// without `c2d_visit`); returns the devices.
    fn count_recovered(&self, max_counter: u64, histogram: bool) -> usize {
        let (mut devices, mut modules) = (0, 0);
        for i in 0..SHARD_COUNT {
            let shard = self.shard(i);
            devices += shard.devices.len();
            for d in shard.devices.values() {
                modules += d.modules().len();
                if histogram {
                    self.metrics().c2d_depth_moved(0, d.c2d.len());
                }
            }
        }
        self.shared.device_count.store(devices, Ordering::Relaxed);
        self.shared.module_count.store(modules, Ordering::Relaxed);
        self.shared.counter.fetch_max(max_counter, Ordering::Relaxed);
        devices
    }

    /// Applies the records of a state file's bytes (`segment-N.log` or `snapshot-N.snap`) to this
    /// hub as recovery does, stopping at a torn tail; returns the valid prefix's length and the
    /// records applied. For the fuzz target and tools: the hub does not journal what it applies.
    pub fn replay_state_bytes(&self, bytes: &[u8]) -> Result<(usize, u64), DecodeError> {
        let mut max_counter = 0;
        let mut records = 0u64;
        let end = crate::persist::codec::scan(bytes, |_, payload| {
            self.apply(Record::decode(payload)?, &mut max_counter)?;
            records += 1;
            Ok::<_, DecodeError>(())
        })?;
        let valid = match end {
            crate::persist::codec::ScanEnd::Clean => bytes.len(),
            crate::persist::codec::ScanEnd::Torn { at } => at,
        };
        self.count_recovered(max_counter, false);
        Ok((valid, records))
    }

    fn with_generation(&self, id: &str, generation: u64, f: impl FnOnce(&mut Device)) {
        let mut shard = self.shard_for(id);
        if let Some(d) = shard.devices.get_mut(id).filter(|d| d.generation_id == generation) {
            f(d);
        }
    }

    /// Writes a snapshot of the live state and starts a new log segment; the segments and
    /// snapshots it replaces are deleted. Shards are walked one at a time (each under its lock,
    /// released in between), so the hub keeps serving: changes made meanwhile are in the new
    /// segment and replay over the snapshot (records are idempotent state). `None` without
    /// `--persist`.
    pub fn snapshot(&self) -> Option<Result<SnapshotStats, PersistError>> {
        let d = self.shared.durable.get()?;
        Some(self.snapshot_with(d))
    }

    fn snapshot_with(&self, d: &Durability) -> Result<SnapshotStats, PersistError> {
        let _one = d.snapshot_running.lock().unwrap_or_else(|p| p.into_inner());
        let started = Instant::now();
        let n = d.segment.fetch_add(1, Ordering::AcqRel) + 1;
        // From here every group the committer writes goes to segment n: a record written to an
        // older segment was appended before this line, so its change is in the walk below.
        d.rotation.request(n);
        let pos = d.journal.appended_position().0;
        let mut w = SnapshotWriter::create(&d.dir, n)?;
        let mut frames = Vec::new();
        // Configurations first, so the devices' records that name them share their ids on replay.
        let records = extra::snapshot_configurations(&self.configs_state().all(), &mut frames);
        w.push_framed(&frames, records)?;
        for i in 0..SHARD_COUNT {
            frames.clear();
            let records = snapshot_shard(&self.shard(i), &mut frames);
            w.push_framed(&frames, records)?;
        }
        frames.clear();
        let mut records = 0;
        {
            let fb = self.feedback();
            for (i, r) in fb.pending_list().iter().enumerate() {
                records += put(&mut frames, &feedback_record(fb.pending_base() + i as u64, r));
            }
            records += put(&mut frames, &Record::FeedbackCut { next: fb.pending_base() });
            let q = fb.batches();
            for e in q.stored() {
                records += put(&mut frames, &c2d_record("", 0, e));
            }
            if q.last_sequence() > q.states().last().map_or(0, |(s, _)| s) {
                records +=
                    put(&mut frames, &Record::C2dSequence { id: "", generation: 0, last: q.last_sequence() });
            }
        }
        // The jobs under their own lock, not nested in the feedback lock.
        records += self.jobs().with_table(|t| {
            let mut n = 0;
            for job in t.all() {
                let state = serde_json::to_vec(&job.stored()).expect("a JSON value serializes");
                n += put(&mut frames, &Record::Job { id: &job.request.id, state: &state });
            }
            n
        });
        w.push_framed(&frames, records)?;
        let stats = SnapshotStats { number: n, records: w.records, bytes: w.bytes, elapsed: Duration::ZERO };
        w.finish()?;
        d.snapshot_pos.store(pos, Ordering::Release);
        d.recovered_log.store(0, Ordering::Release);
        d.snapshot_bytes.store(stats.bytes, Ordering::Release);
        let stats = SnapshotStats { elapsed: started.elapsed(), ..stats };
        tracing::info!(
            number = n,
            records = stats.records,
            bytes = stats.bytes,
            elapsed_ms = stats.elapsed.as_millis() as u64,
            "state snapshot written"
        );
        Ok(stats)
    }
}

/// Appends `r` as a frame to `out` (snapshot records are framed under the lock and written after).
fn put(out: &mut Vec<u8>, r: &Record<'_>) -> u64 {
    crate::persist::codec::frame(out, |w| r.encode(w));
    1
}

/// Every live entity of `shard` as framed records; returns how many.
fn snapshot_shard(shard: &Shard, out: &mut Vec<u8>) -> u64 {
    let mut n = 0;
    for d in shard.devices.values() {
        n += put(out, &device_record(d));
        let text = TwinText::of(&d.twin);
        n += put(out, &text.record(d));
        for e in d.c2d.stored() {
            n += put(out, &c2d_record(&d.id, d.generation_id, e));
        }
        // Only when the queue's newest entry does not already say it.
        if d.c2d.last_sequence() > d.c2d.states().last().map_or(0, |(s, _)| s) {
            n += put(
                out,
                &Record::C2dSequence { id: &d.id, generation: d.generation_id, last: d.c2d.last_sequence() },
            );
        }
        n += extra::snapshot_device_extra(d, out);
    }
    n
}

/// Takes a snapshot whenever the log has grown past the last snapshot's size (and at least
/// [`SNAPSHOT_MIN_LOG_BYTES`]) since the last one; ends with the hub or at
/// [`Hub::close_persistence`].
fn spawn_snapshotter(shared: Weak<super::Shared>) -> Option<std::thread::JoinHandle<()>> {
    let spawned = std::thread::Builder::new().name("state-snapshots".into()).spawn(move || {
        loop {
            std::thread::park_timeout(SNAPSHOT_CHECK_EVERY);
            let Some(shared) = shared.upgrade() else { return };
            let hub = Hub { shared };
            let Some(d) = hub.shared.durable.get() else { return };
            if d.stop.load(Ordering::Acquire) {
                return;
            }
            let grown = d.recovered_log.load(Ordering::Acquire)
                + d.journal.durable_position().saturating_sub(d.snapshot_pos.load(Ordering::Acquire));
            let due = grown >= SNAPSHOT_MIN_LOG_BYTES.max(d.snapshot_bytes.load(Ordering::Acquire));
            if due && let Err(e) = hub.snapshot_with(d) {
                tracing::error!("state snapshot failed (the log keeps growing; restart reads it all): {e}");
            }
        }
    });
    match spawned {
        Ok(t) => Some(t),
        Err(e) => {
            tracing::error!("cannot start the state snapshot thread: {e}");
            None
        }
    }
}

#[path = "durable_extra.rs"]
mod extra;

#[cfg(test)]
#[path = "durable_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "durable_extra_tests.rs"]
mod extra_tests;
