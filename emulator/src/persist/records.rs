//! The hub's state records: what one journal frame (or snapshot frame) says, encoded from and
//! decoded into plain views of the hub's structures (sans-IO).
//!
//! Records are *state*, not operations (design note `docs/designs/2026-12-durable-state.md`):
//! each says what an entity now is, so replaying one twice, or replaying a record over a fuzzy
//! snapshot that already holds its effect, changes nothing. Every record names the device's
//! generation id, so a record of a deleted device never lands on a re-created one.
//!
//! Decoding borrows from the payload ([`Record`] holds `&str`/`&[u8]`), refuses anything a writer
//! does not produce ([`DecodeError`]), and allocates only what the input itself holds (counts are
//! checked against the bytes left before anything is reserved).

use super::codec::{DecodeError, Reader, Writer};

/// Record tags (the first payload byte). Never reuse a retired value.
mod tag {
    pub const DEVICE: u8 = 1;
    pub const DEVICE_REMOVED: u8 = 2;
    pub const TWIN: u8 = 3;
    pub const C2D_ADDED: u8 = 4;
    pub const C2D_REMOVED: u8 = 5;
    pub const C2D_ABANDONED: u8 = 6;
    pub const FEEDBACK_PUSHED: u8 = 7;
    pub const FEEDBACK_CUT: u8 = 8;
    pub const JOB: u8 = 9;
    pub const C2D_SEQUENCE: u8 = 10;
    pub const MODULE: u8 = 11;
    pub const MODULE_REMOVED: u8 = 12;
    pub const CONFIGURATION: u8 = 13;
    pub const CONFIGURATION_REMOVED: u8 = 14;
    pub const DEVICE_CONFIGS: u8 = 15;
}

/// A registry entry (`Device` record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceRec<'a> {
    /// Device id.
    pub id: &'a str,
    /// Generation id.
    pub generation: u64,
    /// Identity etag counter.
    pub etag: u64,
    /// `true` when enabled.
    pub enabled: bool,
    /// `statusReason`.
    pub status_reason: Option<&'a str>,
    /// When the status last changed.
    pub status_updated: u64,
    /// `hub::AuthType` as 0 sas, 1 selfSigned, 2 certificateAuthority, 3 none.
    pub auth_type: u8,
    /// Symmetric keys.
    pub primary_key: Option<&'a str>,
    /// See `primary_key`.
    pub secondary_key: Option<&'a str>,
    /// Whether X.509 thumbprints are registered (then the two below, as given).
    pub has_thumbprints: bool,
    /// Primary thumbprint.
    pub primary_thumbprint: Option<&'a str>,
    /// Secondary thumbprint.
    pub secondary_thumbprint: Option<&'a str>,
    /// The Plug and Play model id the device announced.
    pub model_id: Option<&'a str>,
    /// `capabilities.iotEdge`.
    pub iot_edge: bool,
    /// The MQTT session kept under `clean_session=0`: a bitset of `hub::link::subscriptions`.
    pub mqtt_session: u8,
}

/// A twin (`Twin` record): the three documents as JSON objects, with versions and times.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TwinRec<'a> {
    /// Tags (JSON object text).
    pub tags: &'a [u8],
    /// Desired properties (JSON object text).
    pub desired: &'a [u8],
    /// Reported properties (JSON object text).
    pub reported: &'a [u8],
    /// `properties.desired.$version`.
    pub desired_version: u64,
    /// `properties.reported.$version`.
    pub reported_version: u64,
    /// Twin `version`.
    pub version: u64,
    /// When desired last changed.
    pub desired_updated: u64,
    /// When reported last changed.
    pub reported_updated: u64,
}

/// A queued message (`C2dAdded` record; also a feedback batch with the empty device id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct C2dRec<'a> {
    /// Per-queue sequence number.
    pub sequence: u64,
    /// When the hub accepted it.
    pub enqueued_at: u64,
    /// When it expires.
    pub expires_at: u64,
    /// Abandons so far.
    pub delivery_count: u32,
    /// `message-id`.
    pub message_id: Option<&'a str>,
    /// `correlation-id`.
    pub correlation_id: Option<&'a str>,
    /// `user-id`.
    pub user_id: Option<&'a str>,
    /// `content-type`.
    pub content_type: Option<&'a str>,
    /// `content-encoding`.
    pub content_encoding: Option<&'a str>,
    /// `iothub-ack`: 0 none, 1 positive, 2 negative, 3 full.
    pub ack: u8,
    /// The expiry the sender asked for.
    pub expiry: Option<u64>,
    /// Application properties in order.
    pub properties: Vec<(&'a str, &'a str)>,
    /// Payload.
    pub body: &'a [u8],
}

/// A feedback record waiting to be cut into a batch (`FeedbackPushed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackRec<'a> {
    /// Position in the hub's stream of feedback records (the first is 0).
    pub serial: u64,
    /// `originalMessageId`.
    pub original_message_id: Option<&'a str>,
    /// When the outcome happened.
    pub enqueued_at: u64,
    /// `c2d::FeedbackStatus` as 0 success, 1 expired, 2 delivery count exceeded, 3 rejected, 4 purged.
    pub status: u8,
    /// Device id.
    pub device_id: &'a str,
    /// Device generation id text.
    pub device_generation_id: &'a str,
}

/// A module identity with its module twin (`Module` record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleRec<'a> {
    /// The device's id.
    pub device_id: &'a str,
    /// The device's generation id.
    pub device_generation: u64,
    /// Module id.
    pub id: &'a str,
    /// The module's generation id.
    pub generation: u64,
    /// Identity etag counter.
    pub etag: u64,
    /// `managedBy`.
    pub managed_by: Option<&'a str>,
    /// As [`DeviceRec::auth_type`].
    pub auth_type: u8,
    /// Symmetric keys.
    pub primary_key: Option<&'a str>,
    /// See `primary_key`.
    pub secondary_key: Option<&'a str>,
    /// Whether X.509 thumbprints are registered (then the two below, as given).
    pub has_thumbprints: bool,
    /// Primary thumbprint.
    pub primary_thumbprint: Option<&'a str>,
    /// Secondary thumbprint.
    pub secondary_thumbprint: Option<&'a str>,
    /// The Plug and Play model id the module announced.
    pub model_id: Option<&'a str>,
    /// The module's MQTT session bits (as [`DeviceRec::mqtt_session`]).
    pub mqtt_session: u8,
    /// The module twin.
    pub twin: TwinRec<'a>,
}

/// A configuration (`Configuration` record): the numbers the service cannot set, and the rest as
/// the Configuration JSON the service API returns (restored through the same parser, so fields
/// the parser learns later are kept without a new record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigurationRec<'a> {
    /// Configuration id.
    pub id: &'a str,
    /// Creation order (ties between equal priorities go to the most recently created).
    pub seq: u64,
    /// Etag counter.
    pub etag: u64,
    /// When created.
    pub created: u64,
    /// When last changed.
    pub updated: u64,
    /// The Configuration JSON (without metric results).
    pub body: &'a [u8],
}

/// What a device twin or module twin keeps about configurations (`DeviceConfigs` record;
/// `configs::model::TwinConfigs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfigsRec<'a> {
    /// Device id.
    pub id: &'a str,
    /// Its generation id.
    pub generation: u64,
    /// The module `(id, generation)` of the device whose module twin this record is about;
    /// `None`: the device twin's.
    pub module: Option<(&'a str, u64)>,
    /// `(configuration id, status)`: 0 targeted, 1 applied.
    pub statuses: Vec<(&'a str, u8)>,
    /// Desired paths the configurations wrote (segments joined with `.`).
    pub paths: Vec<&'a str>,
}

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    /// The device's registry entry is now this (created or updated).
    Device(DeviceRec<'a>),
    /// The device of this generation is gone.
    DeviceRemoved {
        /// Device id.
        id: &'a str,
        /// Its generation id.
        generation: u64,
    },
    /// The device's twin is now this.
    Twin {
        /// Device id.
        id: &'a str,
        /// Its generation id.
        generation: u64,
        /// The twin.
        twin: TwinRec<'a>,
    },
    /// The message is in the device's queue (the empty id: the feedback batch queue).
    C2dAdded {
        /// Device id.
        id: &'a str,
        /// Its generation id.
        generation: u64,
        /// The message.
        message: C2dRec<'a>,
    },
    /// The message left the queue (completed, rejected, dead-lettered, purged or expired).
    C2dRemoved {
        /// Device id.
        id: &'a str,
        /// Its generation id.
        generation: u64,
        /// The message's sequence number.
        sequence: u64,
    },
    /// The message's delivery count is now `delivery_count` (it was abandoned).
    C2dAbandoned {
        /// Device id.
        id: &'a str,
        /// Its generation id.
        generation: u64,
        /// The message's sequence number.
        sequence: u64,
        /// Abandons so far.
        delivery_count: u32,
    },
    /// The queue has handed out sequence numbers up to `last` (kept across an emptied queue).
    C2dSequence {
        /// Device id.
        id: &'a str,
        /// Its generation id.
        generation: u64,
        /// The last sequence number handed out.
        last: u64,
    },
    /// A feedback record is pending.
    FeedbackPushed(FeedbackRec<'a>),
    /// Pending feedback records before serial `next` were cut into batches.
    FeedbackCut {
        /// The serial of the first record still pending.
        next: u64,
    },
    /// A scheduled job is now this (its JSON as the jobs API shows it).
    Job {
        /// Job id.
        id: &'a str,
        /// The job's state, as `jobs` encodes it.
        state: &'a [u8],
    },
    /// The device's module is now this (created or updated, its twin included).
    Module(ModuleRec<'a>),
    /// The module of this generation is gone from the device.
    ModuleRemoved {
        /// Device id.
        device_id: &'a str,
        /// The device's generation id.
        device_generation: u64,
        /// Module id.
        id: &'a str,
        /// The module's generation id.
        generation: u64,
    },
    /// The configuration is now this (created or updated).
    Configuration(ConfigurationRec<'a>),
    /// The configuration is gone.
    ConfigurationRemoved {
        /// Configuration id.
        id: &'a str,
    },
    /// The device's configuration statuses and written paths are now these (empty: none).
    DeviceConfigs(DeviceConfigsRec<'a>),
}

impl Record<'_> {
    /// Writes the record's payload.
    pub fn encode(&self, w: &mut Writer<'_>) {
        match self {
            Self::Device(d) => {
                w.u8(tag::DEVICE);
                w.str(d.id);
                w.u64(d.generation);
                w.u64(d.etag);
                w.bool(d.enabled);
                w.opt_str(d.status_reason);
                w.u64(d.status_updated);
                w.u8(d.auth_type);
                w.opt_str(d.primary_key);
                w.opt_str(d.secondary_key);
                w.bool(d.has_thumbprints);
                w.opt_str(d.primary_thumbprint);
                w.opt_str(d.secondary_thumbprint);
                w.opt_str(d.model_id);
                w.bool(d.iot_edge);
                w.u8(d.mqtt_session);
            }
            Self::DeviceRemoved { id, generation } => {
                w.u8(tag::DEVICE_REMOVED);
                w.str(id);
                w.u64(*generation);
            }
            Self::Twin { id, generation, twin } => {
                w.u8(tag::TWIN);
                w.str(id);
                w.u64(*generation);
                twin.encode(w);
            }
            Self::C2dAdded { id, generation, message: m } => {
                w.u8(tag::C2D_ADDED);
                w.str(id);
                w.u64(*generation);
                w.u64(m.sequence);
                w.u64(m.enqueued_at);
                w.u64(m.expires_at);
                w.u64(u64::from(m.delivery_count));
                w.opt_str(m.message_id);
                w.opt_str(m.correlation_id);
                w.opt_str(m.user_id);
                w.opt_str(m.content_type);
                w.opt_str(m.content_encoding);
                w.u8(m.ack);
                w.bool(m.expiry.is_some());
                w.u64(m.expiry.unwrap_or(0));
                w.u64(m.properties.len() as u64);
                for (k, v) in &m.properties {
                    w.str(k);
                    w.str(v);
                }
                w.bytes(m.body);
            }
            Self::C2dRemoved { id, generation, sequence } => {
                w.u8(tag::C2D_REMOVED);
                w.str(id);
                w.u64(*generation);
                w.u64(*sequence);
            }
            Self::C2dAbandoned { id, generation, sequence, delivery_count } => {
                w.u8(tag::C2D_ABANDONED);
                w.str(id);
                w.u64(*generation);
                w.u64(*sequence);
                w.u64(u64::from(*delivery_count));
            }
            Self::C2dSequence { id, generation, last } => {
                w.u8(tag::C2D_SEQUENCE);
                w.str(id);
                w.u64(*generation);
                w.u64(*last);
            }
            Self::FeedbackPushed(f) => {
                w.u8(tag::FEEDBACK_PUSHED);
                w.u64(f.serial);
                w.opt_str(f.original_message_id);
                w.u64(f.enqueued_at);
                w.u8(f.status);
                w.str(f.device_id);
                w.str(f.device_generation_id);
            }
            Self::FeedbackCut { next } => {
                w.u8(tag::FEEDBACK_CUT);
                w.u64(*next);
            }
            Self::Job { id, state } => {
                w.u8(tag::JOB);
                w.str(id);
                w.bytes(state);
            }
            Self::Module(m) => {
                w.u8(tag::MODULE);
                w.str(m.device_id);
                w.u64(m.device_generation);
                w.str(m.id);
                w.u64(m.generation);
                w.u64(m.etag);
                w.opt_str(m.managed_by);
                w.u8(m.auth_type);
                w.opt_str(m.primary_key);
                w.opt_str(m.secondary_key);
                w.bool(m.has_thumbprints);
                w.opt_str(m.primary_thumbprint);
                w.opt_str(m.secondary_thumbprint);
                w.opt_str(m.model_id);
                w.u8(m.mqtt_session);
                m.twin.encode(w);
            }
            Self::ModuleRemoved { device_id, device_generation, id, generation } => {
                w.u8(tag::MODULE_REMOVED);
                w.str(device_id);
                w.u64(*device_generation);
                w.str(id);
                w.u64(*generation);
            }
            Self::Configuration(c) => {
                w.u8(tag::CONFIGURATION);
                w.str(c.id);
                w.u64(c.seq);
                w.u64(c.etag);
                w.u64(c.created);
                w.u64(c.updated);
                w.bytes(c.body);
            }
            Self::ConfigurationRemoved { id } => {
                w.u8(tag::CONFIGURATION_REMOVED);
                w.str(id);
            }
            Self::DeviceConfigs(c) => {
                w.u8(tag::DEVICE_CONFIGS);
                w.str(c.id);
                w.u64(c.generation);
                w.bool(c.module.is_some());
                if let Some((module, generation)) = c.module {
                    w.str(module);
                    w.u64(generation);
                }
                w.u64(c.statuses.len() as u64);
                for (id, status) in &c.statuses {
                    w.str(id);
                    w.u8(*status);
                }
                w.u64(c.paths.len() as u64);
                for p in &c.paths {
                    w.str(p);
                }
            }
        }
    }
}

impl TwinRec<'_> {
    fn encode(&self, w: &mut Writer<'_>) {
        w.bytes(self.tags);
        w.bytes(self.desired);
        w.bytes(self.reported);
        w.u64(self.desired_version);
        w.u64(self.reported_version);
        w.u64(self.version);
        w.u64(self.desired_updated);
        w.u64(self.reported_updated);
    }
}

impl<'a> TwinRec<'a> {
    fn decode(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        Ok(Self {
            tags: r.bytes("tags")?,
            desired: r.bytes("desired")?,
            reported: r.bytes("reported")?,
            desired_version: r.u64("desired version")?,
            reported_version: r.u64("reported version")?,
            version: r.u64("twin version")?,
            desired_updated: r.u64("desired updated")?,
            reported_updated: r.u64("reported updated")?,
        })
    }
}

impl<'a> Record<'a> {
    /// Decodes one payload; every byte must belong to the record.
    pub fn decode(payload: &'a [u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(payload);
        let record = match r.u8("record tag")? {
            tag::DEVICE => {
                let d = DeviceRec {
                    id: r.str("device id")?,
                    generation: r.u64("generation id")?,
                    etag: r.u64("etag")?,
                    enabled: r.bool("status")?,
                    status_reason: r.opt_str("status reason")?,
                    status_updated: r.u64("status updated")?,
                    auth_type: r.u8("authentication type")?,
                    primary_key: r.opt_str("primary key")?,
                    secondary_key: r.opt_str("secondary key")?,
                    has_thumbprints: r.bool("thumbprints")?,
                    primary_thumbprint: r.opt_str("primary thumbprint")?,
                    secondary_thumbprint: r.opt_str("secondary thumbprint")?,
                    model_id: r.opt_str("model id")?,
                    iot_edge: r.bool("iotEdge")?,
                    mqtt_session: r.u8("MQTT session")?,
                };
                if d.auth_type > 3 {
                    return Err(invalid("authentication type", d.auth_type));
                }
                Self::Device(d)
            }
            tag::DEVICE_REMOVED => {
                Self::DeviceRemoved { id: r.str("device id")?, generation: r.u64("generation id")? }
            }
            tag::TWIN => Self::Twin {
                id: r.str("device id")?,
                generation: r.u64("generation id")?,
                twin: TwinRec::decode(&mut r)?,
            },
            tag::C2D_ADDED => {
                let id = r.str("device id")?;
                let generation = r.u64("generation id")?;
                let sequence = r.u64("sequence number")?;
                let enqueued_at = r.u64("enqueued time")?;
                let expires_at = r.u64("expiry time")?;
                let delivery_count = u32_of(r.u64("delivery count")?, "delivery count")?;
                let message_id = r.opt_str("message-id")?;
                let correlation_id = r.opt_str("correlation-id")?;
                let user_id = r.opt_str("user-id")?;
                let content_type = r.opt_str("content-type")?;
                let content_encoding = r.opt_str("content-encoding")?;
                let ack = r.u8("iothub-ack")?;
                if ack > 3 {
                    return Err(invalid("iothub-ack", ack));
                }
                let has_expiry = r.bool("expiry presence")?;
                let expiry = r.u64("expiry")?;
                let count = r.u64("property count")?;
                // Each property takes at least its two length prefixes.
                if count > (r.remaining() / 8) as u64 {
                    return Err(DecodeError::Invalid {
                        what: "property count",
                        detail: format!("{count} properties cannot fit in {} bytes", r.remaining()),
                    });
                }
                let mut properties = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    properties.push((r.str("property name")?, r.str("property value")?));
                }
                let body = r.bytes("body")?;
                Self::C2dAdded {
                    id,
                    generation,
                    message: C2dRec {
                        sequence,
                        enqueued_at,
                        expires_at,
                        delivery_count,
                        message_id,
                        correlation_id,
                        user_id,
                        content_type,
                        content_encoding,
                        ack,
                        expiry: has_expiry.then_some(expiry),
                        properties,
                        body,
                    },
                }
            }
            tag::C2D_REMOVED => Self::C2dRemoved {
                id: r.str("device id")?,
                generation: r.u64("generation id")?,
                sequence: r.u64("sequence number")?,
            },
            tag::C2D_ABANDONED => Self::C2dAbandoned {
                id: r.str("device id")?,
                generation: r.u64("generation id")?,
                sequence: r.u64("sequence number")?,
                delivery_count: u32_of(r.u64("delivery count")?, "delivery count")?,
            },
            tag::C2D_SEQUENCE => Self::C2dSequence {
                id: r.str("device id")?,
                generation: r.u64("generation id")?,
                last: r.u64("last sequence number")?,
            },
            tag::FEEDBACK_PUSHED => {
                let f = FeedbackRec {
                    serial: r.u64("feedback serial")?,
                    original_message_id: r.opt_str("originalMessageId")?,
                    enqueued_at: r.u64("enqueued time")?,
                    status: r.u8("status code")?,
                    device_id: r.str("device id")?,
                    device_generation_id: r.str("device generation id")?,
                };
                if f.status > 4 {
                    return Err(invalid("feedback status", f.status));
                }
                Self::FeedbackPushed(f)
            }
            tag::FEEDBACK_CUT => Self::FeedbackCut { next: r.u64("feedback serial")? },
            tag::JOB => Self::Job { id: r.str("job id")?, state: r.bytes("job state")? },
            tag::MODULE => {
                let m = ModuleRec {
                    device_id: r.str("device id")?,
                    device_generation: r.u64("generation id")?,
                    id: r.str("module id")?,
                    generation: r.u64("module generation id")?,
                    etag: r.u64("etag")?,
                    managed_by: r.opt_str("managedBy")?,
                    auth_type: r.u8("authentication type")?,
                    primary_key: r.opt_str("primary key")?,
                    secondary_key: r.opt_str("secondary key")?,
                    has_thumbprints: r.bool("thumbprints")?,
                    primary_thumbprint: r.opt_str("primary thumbprint")?,
                    secondary_thumbprint: r.opt_str("secondary thumbprint")?,
                    model_id: r.opt_str("model id")?,
                    mqtt_session: r.u8("MQTT session")?,
                    twin: TwinRec::decode(&mut r)?,
                };
                if m.auth_type > 3 {
                    return Err(invalid("authentication type", m.auth_type));
                }
                Self::Module(m)
            }
            tag::MODULE_REMOVED => Self::ModuleRemoved {
                device_id: r.str("device id")?,
                device_generation: r.u64("generation id")?,
                id: r.str("module id")?,
                generation: r.u64("module generation id")?,
            },
            tag::CONFIGURATION => Self::Configuration(ConfigurationRec {
                id: r.str("configuration id")?,
                seq: r.u64("configuration creation order")?,
                etag: r.u64("etag")?,
                created: r.u64("created time")?,
                updated: r.u64("updated time")?,
                body: r.bytes("configuration")?,
            }),
            tag::CONFIGURATION_REMOVED => Self::ConfigurationRemoved { id: r.str("configuration id")? },
            tag::DEVICE_CONFIGS => {
                let id = r.str("device id")?;
                let generation = r.u64("generation id")?;
                let module = if r.bool("module presence")? {
                    Some((r.str("module id")?, r.u64("module generation id")?))
                } else {
                    None
                };
                // Each status takes at least its length prefix and status byte, each path its prefix.
                let count = bounded_count(&mut r, "configuration status count", 5)?;
                let mut statuses = Vec::with_capacity(count);
                for _ in 0..count {
                    let config = r.str("configuration id")?;
                    let status = r.u8("configuration status")?;
                    if status > 1 {
                        return Err(invalid("configuration status", status));
                    }
                    statuses.push((config, status));
                }
                let count = bounded_count(&mut r, "configuration path count", 4)?;
                let mut paths = Vec::with_capacity(count);
                for _ in 0..count {
                    paths.push(r.str("configuration path")?);
                }
                Self::DeviceConfigs(DeviceConfigsRec { id, generation, module, statuses, paths })
            }
            other => return Err(invalid("record tag", other)),
        };
        r.finish()?;
        Ok(record)
    }
}

/// Reads an element count and refuses one the bytes left cannot hold (each element takes at
/// least `min_bytes`), before anything is reserved for it.
fn bounded_count(r: &mut Reader<'_>, what: &'static str, min_bytes: usize) -> Result<usize, DecodeError> {
    let count = r.u64(what)?;
    if count > (r.remaining() / min_bytes) as u64 {
        return Err(DecodeError::Invalid {
            what,
            detail: format!("{count} entries cannot fit in {} bytes", r.remaining()),
        });
    }
    Ok(count as usize)
}

fn invalid(what: &'static str, v: u8) -> DecodeError {
    DecodeError::Invalid { what, detail: format!("{v} is not a value this version writes") }
}

fn u32_of(v: u64, what: &'static str) -> Result<u32, DecodeError> {
    u32::try_from(v).map_err(|_| DecodeError::Invalid { what, detail: format!("{v} is above u32") })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::persist::codec::{FRAME_HEADER_BYTES, ScanEnd, frame, scan};

    fn samples() -> Vec<Record<'static>> {
        vec![
            Record::Device(DeviceRec {
                id: "fridge-1",
                generation: 7,
                etag: 9,
                enabled: false,
                status_reason: Some("maintenance"),
                status_updated: 1_700_000_000_000,
                auth_type: 1,
                primary_key: None,
                secondary_key: Some("a2V5"),
                has_thumbprints: true,
                primary_thumbprint: Some("AB".repeat(20).leak()),
                secondary_thumbprint: None,
                model_id: Some("dtmi:com:example:Fridge;1"),
                iot_edge: true,
                mqtt_session: 5,
            }),
            Record::DeviceRemoved { id: "gone", generation: 3 },
            Record::Twin {
                id: "fridge-1",
                generation: 7,
                twin: TwinRec {
                    tags: br#"{"site":"a"}"#,
                    desired: b"{}",
                    reported: br#"{"t":21.5}"#,
                    desired_version: 2,
                    reported_version: 5,
                    version: 8,
                    desired_updated: 10,
                    reported_updated: 11,
                },
            },
            Record::C2dAdded {
                id: "fridge-1",
                generation: 7,
                message: C2dRec {
                    sequence: 4,
                    enqueued_at: 100,
                    expires_at: 200,
                    delivery_count: 2,
                    message_id: Some("m-1"),
                    correlation_id: None,
                    user_id: Some("svc"),
                    content_type: Some("application/json"),
                    content_encoding: None,
                    ack: 3,
                    expiry: Some(200),
                    properties: vec![("k", "v"), ("empty", "")],
                    body: b"{\"cmd\":\"defrost\"}",
                },
            },
            Record::C2dRemoved { id: "fridge-1", generation: 7, sequence: 4 },
            Record::C2dAbandoned { id: "fridge-1", generation: 7, sequence: 5, delivery_count: 1 },
            Record::C2dSequence { id: "fridge-1", generation: 7, last: 5 },
            Record::FeedbackPushed(FeedbackRec {
                serial: 12,
                original_message_id: None,
                enqueued_at: 300,
                status: 4,
                device_id: "fridge-1",
                device_generation_id: "000000000000000007",
            }),
            Record::FeedbackCut { next: 13 },
            Record::Job { id: "job-1", state: br#"{"jobId":"job-1"}"# },
            Record::Module(ModuleRec {
                device_id: "fridge-1",
                device_generation: 7,
                id: "sensor",
                generation: 12,
                etag: 13,
                managed_by: Some("IotEdge"),
                auth_type: 0,
                primary_key: Some("a2V5"),
                secondary_key: Some("a2V5Mg=="),
                has_thumbprints: false,
                primary_thumbprint: None,
                secondary_thumbprint: None,
                model_id: Some("dtmi:com:example:Sensor;1"),
                mqtt_session: 3,
                twin: TwinRec {
                    tags: b"{}",
                    desired: br#"{"rate":5}"#,
                    reported: br#"{"rate":5}"#,
                    desired_version: 2,
                    reported_version: 2,
                    version: 3,
                    desired_updated: 20,
                    reported_updated: 21,
                },
            }),
            Record::ModuleRemoved {
                device_id: "fridge-1",
                device_generation: 7,
                id: "sensor",
                generation: 12,
            },
            Record::Configuration(ConfigurationRec {
                id: "fw",
                seq: 2,
                etag: 14,
                created: 1_700_000_000_000,
                updated: 1_700_000_001_000,
                body:
                    br#"{"id":"fw","content":{"deviceContent":{"properties.desired.fw":"2"}},"priority":10}"#,
            }),
            Record::ConfigurationRemoved { id: "fw" },
            Record::DeviceConfigs(DeviceConfigsRec {
                id: "fridge-1",
                generation: 7,
                module: None,
                statuses: vec![("fw", 1), ("old", 0)],
                paths: vec!["fw", "settings.rate"],
            }),
            Record::DeviceConfigs(DeviceConfigsRec {
                id: "fridge-1",
                generation: 7,
                module: None,
                statuses: Vec::new(),
                paths: Vec::new(),
            }),
            Record::DeviceConfigs(DeviceConfigsRec {
                id: "gateway-1",
                generation: 8,
                module: Some(("thermo", 12)),
                statuses: vec![("mod-fw", 1)],
                paths: vec!["rate"],
            }),
        ]
    }

    #[test]
    fn every_record_round_trips_through_a_frame() {
        let mut buf = Vec::new();
        for r in samples() {
            frame(&mut buf, |w| r.encode(w));
        }
        let mut back = samples().into_iter();
        let end = scan(&buf, |_, p| {
            assert_eq!(Record::decode(p)?, back.next().unwrap());
            Ok::<_, DecodeError>(())
        })
        .unwrap();
        assert_eq!(end, ScanEnd::Clean);
        assert!(back.next().is_none());
    }

    #[test]
    fn a_cut_or_padded_record_is_refused() {
        for r in samples() {
            let mut buf = Vec::new();
            frame(&mut buf, |w| r.encode(w));
            let payload = &buf[FRAME_HEADER_BYTES..];
            for cut in 0..payload.len() {
                assert!(Record::decode(&payload[..cut]).is_err(), "{r:?} cut at {cut}");
            }
            let mut padded = payload.to_vec();
            padded.push(0);
            assert_eq!(Record::decode(&padded), Err(DecodeError::Trailing(1)));
        }
    }

    #[test]
    fn unknown_tags_and_values_are_refused() {
        assert!(matches!(Record::decode(&[0]), Err(DecodeError::Invalid { what: "record tag", .. })));
        assert!(matches!(Record::decode(&[200]), Err(DecodeError::Invalid { .. })));
        // A property count no payload could hold is refused before anything is reserved.
        let mut buf = Vec::new();
        frame(&mut buf, |w| {
            w.u8(tag::C2D_ADDED);
            w.str("d");
            for _ in 0..5 {
                w.u64(0);
            }
            for _ in 0..5 {
                w.opt_str(None);
            }
            w.u8(0);
            w.bool(false);
            w.u64(0);
            w.u64(u64::MAX);
        });
        let e = Record::decode(&buf[FRAME_HEADER_BYTES..]).unwrap_err();
        assert!(matches!(e, DecodeError::Invalid { what: "property count", .. }), "{e:?}");
        // So are configuration statuses and paths.
        for statuses in [u64::MAX, 1] {
            let mut buf = Vec::new();
            frame(&mut buf, |w| {
                w.u8(tag::DEVICE_CONFIGS);
                w.str("d");
                w.u64(1);
                w.bool(false);
                w.u64(statuses);
                if statuses == 1 {
                    w.str("c");
                    w.u8(0);
                }
                w.u64(1 << 40);
            });
            let e = Record::decode(&buf[FRAME_HEADER_BYTES..]).unwrap_err();
            assert!(
                matches!(
                    e,
                    DecodeError::Invalid {
                        what: "configuration status count" | "configuration path count",
                        ..
                    }
                ),
                "{e:?}"
            );
        }
        let mut buf = Vec::new();
        frame(&mut buf, |w| {
            w.u8(tag::DEVICE_CONFIGS);
            w.str("d");
            w.u64(1);
            w.bool(false);
            w.u64(1);
            w.str("c");
            w.u8(2);
            w.u64(0);
        });
        let e = Record::decode(&buf[FRAME_HEADER_BYTES..]).unwrap_err();
        assert!(matches!(e, DecodeError::Invalid { what: "configuration status", .. }), "{e:?}");
    }
}
