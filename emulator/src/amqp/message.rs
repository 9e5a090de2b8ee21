//! AMQP messages (part 3.2): the sections of a transfer payload, decoded into [`Message`] and
//! encoded back, plus the translation of a service's C2D message into the hub's [`C2dMessage`].

use bytes::Bytes;

use super::frame::{code, list};
use super::types::{DecodeError, Decoder, Value};
use crate::c2d::{AckMode, C2dMessage};

/// The body of a message.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Body {
    /// No body section at all.
    #[default]
    Empty,
    /// One or more `data` sections, concatenated.
    Data(Vec<u8>),
    /// An `amqp-value` section.
    Value(Value),
    /// `amqp-sequence` sections.
    Sequence(Vec<Value>),
}

/// The `properties` section (part 3.2.4); absent fields are `None`.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Properties {
    /// `message-id` (ulong, uuid, binary or string), kept with its AMQP type.
    pub message_id: Option<Value>,
    /// `user-id`.
    pub user_id: Option<Vec<u8>>,
    /// `to`.
    pub to: Option<String>,
    /// `reply-to`.
    pub reply_to: Option<String>,
    /// `correlation-id`, kept with its AMQP type.
    pub correlation_id: Option<Value>,
    /// `content-type`.
    pub content_type: Option<String>,
    /// `content-encoding`.
    pub content_encoding: Option<String>,
    /// `absolute-expiry-time`, ms since the epoch.
    pub absolute_expiry_time: Option<i64>,
    /// `creation-time`, ms since the epoch.
    pub creation_time: Option<i64>,
}

/// A message as the endpoint sees it. Header, delivery annotations and footer are skipped on input
/// and not written on output; message annotations are kept both ways (the hub stamps its own).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Message {
    /// The properties section.
    pub properties: Properties,
    /// Application properties, keys as strings, in wire order.
    pub application_properties: Vec<(String, Value)>,
    /// Message annotations, in wire order.
    pub message_annotations: Vec<(Value, Value)>,
    /// The body.
    pub body: Body,
}

fn opt_value(v: Value) -> Option<Value> {
    (!v.is_null()).then_some(v)
}

fn opt_string(v: Value) -> Option<String> {
    match v {
        Value::String(s) | Value::Symbol(s) => Some(s),
        _ => None,
    }
}

fn opt_time(v: &Value) -> Option<i64> {
    match v {
        Value::Timestamp(t) => Some(*t),
        _ => None,
    }
}

impl Message {
    /// Decodes the sections of a transfer payload. The sections a C2D send has (properties,
    /// application properties, data) are read field by field into the message, without building
    /// the section's value first; any other section, or one in a form that reader does not
    /// take, is decoded as a value and moved into the message. Either way each field is copied
    /// once, under the one [`Decoder`]'s bounds.
    pub fn decode(mut buf: &[u8]) -> Result<Self, DecodeError> {
        let mut m = Message::default();
        let mut decoder = Decoder::for_input(buf.len());
        while !buf.is_empty() {
            if let Some(c) = decoder.descriptor(&mut buf)? {
                let read = match c {
                    code::PROPERTIES => {
                        // A later properties section replaces an earlier one, field by field.
                        m.properties = Properties::default();
                        decoder.elements(&mut buf, false, |d, i, b| {
                            // A null field stays unset, as `set_property` would leave it: most of
                            // a send's ten fields are null, and reading one as a value costs more
                            // than the rest of the section.
                            if let [0x40, rest @ ..] = *b {
                                *b = rest;
                                return Ok(());
                            }
                            set_property(&mut m.properties, i, d.value(b)?);
                            Ok(())
                        })?
                    }
                    code::APPLICATION_PROPERTIES => {
                        let mut key = None;
                        decoder.elements(&mut buf, true, |d, i, b| {
                            let v = d.value(b)?;
                            if i % 2 == 0 {
                                key = Some(app_key(v)?);
                            } else if let Some(k) = key.take() {
                                m.application_properties.push((k, v));
                            }
                            Ok(())
                        })?
                    }
                    code::DATA => match decoder.binary(&mut buf)? {
                        Some(b) => {
                            match &mut m.body {
                                Body::Data(all) => all.extend_from_slice(b),
                                body => *body = Body::Data(b.to_vec()),
                            }
                            true
                        }
                        None => false,
                    },
                    _ => false,
                };
                if !read {
                    let v = decoder.value(&mut buf)?;
                    m.add_section(c, v)?;
                }
                continue;
            }
            let section = decoder.value(&mut buf)?;
            let Some((c, v)) = section.into_described() else {
                return Err(DecodeError::Shape("a message section is not a described value".into()));
            };
            m.add_section(c, v)?;
        }
        Ok(m)
    }

    /// Moves the decoded section `c` into the message.
    fn add_section(&mut self, c: u64, v: Value) -> Result<(), DecodeError> {
        let m = self;
        match c {
            code::PROPERTIES => {
                let Value::List(items) = v else {
                    return Err(DecodeError::Shape("the properties section is not a list".into()));
                };
                m.properties = Properties::default();
                for (i, v) in items.into_iter().enumerate() {
                    set_property(&mut m.properties, i, v);
                }
            }
            code::APPLICATION_PROPERTIES => {
                let Value::Map(pairs) = v else {
                    return Err(DecodeError::Shape("application-properties is not a map".into()));
                };
                m.application_properties.reserve(pairs.len());
                for (k, v) in pairs {
                    m.application_properties.push((app_key(k)?, v));
                }
            }
            code::DATA => {
                let Value::Binary(b) = v else {
                    return Err(DecodeError::Shape("a data section is not binary".into()));
                };
                match &mut m.body {
                    Body::Data(all) => all.extend_from_slice(&b),
                    body => *body = Body::Data(b),
                }
            }
            code::AMQP_VALUE => m.body = Body::Value(v),
            code::AMQP_SEQUENCE => {
                let Value::List(items) = v else {
                    return Err(DecodeError::Shape("an amqp-sequence section is not a list".into()));
                };
                match &mut m.body {
                    Body::Sequence(all) => all.extend(items),
                    body => *body = Body::Sequence(items),
                }
            }
            code::MESSAGE_ANNOTATIONS => {
                let Value::Map(pairs) = v else {
                    return Err(DecodeError::Shape("message-annotations is not a map".into()));
                };
                m.message_annotations.extend(pairs);
            }
            code::HEADER | code::DELIVERY_ANNOTATIONS | code::FOOTER => {}
            other => return Err(DecodeError::Shape(format!("unknown message section 0x{other:x}"))),
        }
        Ok(())
    }

    /// Encodes the message's sections.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        if !self.message_annotations.is_empty() {
            Value::described(code::MESSAGE_ANNOTATIONS, Value::Map(self.message_annotations.clone()))
                .encode(&mut out);
        }
        let p = &self.properties;
        let s = |v: &Option<String>| v.as_ref().map_or(Value::Null, |s| Value::str(s));
        let sym = |v: &Option<String>| v.as_ref().map_or(Value::Null, |s| Value::sym(s));
        let t = |v: &Option<i64>| v.map_or(Value::Null, Value::Timestamp);
        list(
            code::PROPERTIES,
            vec![
                p.message_id.clone().unwrap_or(Value::Null),
                p.user_id.clone().map_or(Value::Null, Value::Binary),
                s(&p.to),
                Value::Null,
                s(&p.reply_to),
                p.correlation_id.clone().unwrap_or(Value::Null),
                sym(&p.content_type),
                sym(&p.content_encoding),
                t(&p.absolute_expiry_time),
                t(&p.creation_time),
            ],
        )
        .encode(&mut out);
        if !self.application_properties.is_empty() {
            let pairs = self.application_properties.iter().map(|(k, v)| (Value::str(k), v.clone())).collect();
            Value::described(code::APPLICATION_PROPERTIES, Value::Map(pairs)).encode(&mut out);
        }
        match &self.body {
            Body::Empty => {}
            Body::Data(b) => Value::described(code::DATA, Value::Binary(b.clone())).encode(&mut out),
            Body::Value(v) => Value::described(code::AMQP_VALUE, v.clone()).encode(&mut out),
            Body::Sequence(items) => {
                Value::described(code::AMQP_SEQUENCE, Value::List(items.clone())).encode(&mut out)
            }
        }
        out
    }

    /// Application property `name` as text.
    pub fn app_str(&self, name: &str) -> Option<&str> {
        self.application_properties.iter().find(|(k, _)| k == name).and_then(|(_, v)| v.as_str())
    }
}

/// An application property's key, which must be a string.
fn app_key(k: Value) -> Result<String, DecodeError> {
    opt_string(k).ok_or_else(|| DecodeError::Shape("an application-properties key is not a string".into()))
}

/// Sets field `i` of the properties section (part 3.2.4) from its decoded value; a field of the
/// wrong type reads as absent, fields past the last known one are ignored.
fn set_property(p: &mut Properties, i: usize, v: Value) {
    match i {
        0 => p.message_id = opt_value(v),
        1 => {
            p.user_id = match v {
                Value::Binary(b) => Some(b),
                other => opt_string(other).map(String::into_bytes),
            }
        }
        2 => p.to = opt_string(v),
        4 => p.reply_to = opt_string(v),
        5 => p.correlation_id = opt_value(v),
        6 => p.content_type = opt_string(v),
        7 => p.content_encoding = opt_string(v),
        8 => p.absolute_expiry_time = opt_time(&v),
        9 => p.creation_time = opt_time(&v),
        _ => {}
    }
}

/// Why a service's message cannot become a C2D message (`com.microsoft:argument-error`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum C2dFormatError {
    /// `to` is missing or not `/devices/{id}/messages/devicebound`.
    #[error("properties.to must be /devices/{{deviceId}}/messages/devicebound, got {0:?}")]
    To(Option<String>),
    /// `iothub-ack` is not none/positive/negative/full.
    #[error("iothub-ack must be none, positive, negative or full, got {0:?}")]
    Ack(String),
    /// The body is not data (or a string/binary amqp-value).
    #[error("the body must be one or more data sections")]
    Body,
    /// `absolute-expiry-time` before the Unix epoch: not a time a message can expire at.
    #[error("properties.absolute-expiry-time must be a time after 1970-01-01, got {0} ms")]
    Expiry(i64),
}

/// The device id named by a C2D `to` address (`/devices/{url-encoded id}/messages/devicebound`,
/// `devicebound` in any case).
pub fn device_from_to(to: &str) -> Option<String> {
    let rest = to.strip_prefix("/devices/")?;
    let (encoded, tail) = rest.split_once('/')?;
    if !tail.eq_ignore_ascii_case("messages/devicebound") || encoded.is_empty() {
        return None;
    }
    if !encoded.contains('%') {
        return Some(encoded.to_owned());
    }
    percent_encoding::percent_decode_str(encoded).decode_utf8().ok().map(|s| s.into_owned())
}

fn app_value_text(v: Value) -> String {
    match v {
        Value::Bool(b) => b.to_string(),
        Value::Timestamp(t) => t.to_string(),
        Value::Double(d) => d.to_string(),
        Value::Float(f) => f.to_string(),
        v => v.into_id_string().unwrap_or_default(),
    }
}

/// Turns a service's C2D message into the hub's form, with the device it is for. Consumes the
/// message: its body and text move into the C2D message rather than being copied.
pub fn to_c2d(m: Message) -> Result<(String, C2dMessage), C2dFormatError> {
    let Message { properties: p, application_properties, body, .. } = m;
    let Some(device) = p.to.as_deref().and_then(device_from_to) else {
        return Err(C2dFormatError::To(p.to));
    };
    let mut ack = AckMode::None;
    let mut properties = Vec::with_capacity(application_properties.len());
    for (k, v) in application_properties {
        if k == "iothub-ack" {
            let text = app_value_text(v);
            ack = AckMode::parse(&text).ok_or(C2dFormatError::Ack(text))?;
        } else {
            properties.push((k, app_value_text(v)));
        }
    }
    let body = match body {
        Body::Data(b) | Body::Value(Value::Binary(b)) => Bytes::from(b),
        Body::Empty => Bytes::new(),
        Body::Value(Value::String(s)) => Bytes::from(s.into_bytes()),
        _ => return Err(C2dFormatError::Body),
    };
    let expiry = match p.absolute_expiry_time {
        Some(t) => Some(u64::try_from(t).map_err(|_| C2dFormatError::Expiry(t))?),
        None => None,
    };
    let msg = C2dMessage {
        message_id: p.message_id.and_then(Value::into_id_string),
        correlation_id: p.correlation_id.and_then(Value::into_id_string),
        user_id: p.user_id.map(|u| {
            String::from_utf8(u).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
        }),
        content_type: p.content_type,
        content_encoding: p.content_encoding,
        ack,
        expiry,
        properties,
        body,
    };
    Ok((device, msg))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_round_trips() {
        let m = Message {
            properties: Properties {
                message_id: Some(Value::Ulong(0)),
                to: Some("/devices/a/messages/devicebound".into()),
                correlation_id: Some(Value::str("c")),
                content_type: Some("application/json".into()),
                absolute_expiry_time: Some(1_000),
                ..Default::default()
            },
            application_properties: vec![("status-code".into(), Value::Int(200))],
            message_annotations: vec![],
            body: Body::Data(b"hello".to_vec()),
        };
        assert_eq!(Message::decode(&m.encode()).unwrap(), m);
    }

    /// The message as decoding every section into a value first reads it.
    fn decode_by_values(mut buf: &[u8]) -> Result<Message, DecodeError> {
        let mut m = Message::default();
        let mut decoder = Decoder::for_input(buf.len());
        while !buf.is_empty() {
            let Some((c, v)) = decoder.value(&mut buf)?.into_described() else {
                return Err(DecodeError::Shape("a message section is not a described value".into()));
            };
            m.add_section(c, v)?;
        }
        Ok(m)
    }

    /// A message with every section a C2D send or a reply may carry, twice over in places.
    fn every_section() -> Vec<u8> {
        let m = Message {
            properties: Properties {
                message_id: Some(Value::str("m-1")),
                user_id: Some(b"u".to_vec()),
                to: Some("/devices/d%201/messages/devicebound".into()),
                reply_to: Some("r".into()),
                correlation_id: Some(Value::Ulong(7)),
                content_type: Some("application/json".into()),
                content_encoding: Some("utf-8".into()),
                absolute_expiry_time: Some(1_000),
                creation_time: Some(500),
            },
            application_properties: vec![
                ("iothub-ack".into(), Value::str("full")),
                ("n".into(), Value::Int(3)),
            ],
            message_annotations: vec![(Value::sym("x-opt"), Value::Long(1))],
            body: Body::Data(b"hello".to_vec()),
        };
        let mut bytes = Value::described(code::HEADER, Value::List(vec![Value::Bool(true)])).to_bytes();
        bytes.extend(m.encode());
        Value::described(code::DATA, Value::Binary(b" world".to_vec())).encode(&mut bytes);
        // A properties section in its long form, replacing the first.
        let long = Value::List(vec![Value::str("m-2"), Value::Null, Value::str(&"t".repeat(300))]);
        Value::described(code::PROPERTIES, long).encode(&mut bytes);
        Value::described(code::FOOTER, Value::Map(vec![])).encode(&mut bytes);
        bytes
    }

    #[test]
    fn sections_read_field_by_field_read_as_values_do() {
        let bytes = every_section();
        let m = Message::decode(&bytes).unwrap();
        assert_eq!(m, decode_by_values(&bytes).unwrap());
        assert_eq!(m.properties.message_id, Some(Value::str("m-2")));
        assert_eq!(m.properties.to.as_deref(), Some(&*"t".repeat(300)));
        assert_eq!(m.properties.content_type, None, "the second properties section replaced the first");
        assert_eq!(m.body, Body::Data(b"hello world".to_vec()));
        assert_eq!(m.app_str("iothub-ack"), Some("full"));
        // Sections in forms only the value path reads (a value body, a list-encoded map).
        let mut other = Value::described(code::AMQP_VALUE, Value::str("v")).to_bytes();
        Value::described(code::APPLICATION_PROPERTIES, Value::List(vec![])).encode(&mut other);
        assert_eq!(Message::decode(&other), decode_by_values(&other));
        assert!(Message::decode(&other).is_err());
    }

    #[test]
    fn a_damaged_message_decodes_as_values_decode_it() {
        let bytes = every_section();
        for i in 0..bytes.len() {
            for v in [
                0x00, 0x01, 0x40, 0x45, 0x53, 0x73, 0x75, 0x80, 0xa0, 0xa1, 0xb0, 0xc0, 0xc1, 0xd0, 0xd1,
                0xff,
            ] {
                let mut damaged = bytes.clone();
                damaged[i] = v;
                let (fast, slow) = (Message::decode(&damaged), decode_by_values(&damaged));
                match (&fast, &slow) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b, "byte {i} = {v:#x}"),
                    (Err(_), Err(_)) => {}
                    _ => panic!("byte {i} = {v:#x}: {fast:?} against {slow:?}"),
                }
            }
        }
    }

    #[test]
    fn data_sections_concatenate() {
        let mut bytes = Value::described(code::DATA, Value::Binary(b"ab".to_vec())).to_bytes();
        Value::described(code::DATA, Value::Binary(b"cd".to_vec())).encode(&mut bytes);
        assert_eq!(Message::decode(&bytes).unwrap().body, Body::Data(b"abcd".to_vec()));
    }

    #[test]
    fn to_addresses() {
        assert_eq!(device_from_to("/devices/a%2Fb%20c/messages/devicebound").as_deref(), Some("a/b c"));
        assert_eq!(device_from_to("/devices/d1/messages/deviceBound").as_deref(), Some("d1"));
        assert_eq!(device_from_to("/devices//messages/devicebound"), None);
        assert_eq!(device_from_to("/devices/d1/messages/events"), None);
        assert_eq!(device_from_to("d1"), None);
    }

    #[test]
    fn c2d_translation_keeps_every_field() {
        let m = Message {
            properties: Properties {
                message_id: Some(Value::Uuid(uuid::Uuid::nil().into_bytes())),
                to: Some("/devices/dev%201/messages/devicebound".into()),
                correlation_id: Some(Value::str("corr")),
                content_type: Some("text/plain".into()),
                content_encoding: Some("utf-8".into()),
                absolute_expiry_time: Some(5_000),
                ..Default::default()
            },
            application_properties: vec![
                ("iothub-ack".into(), Value::str("full")),
                ("k".into(), Value::str("v")),
                ("n".into(), Value::Int(3)),
            ],
            message_annotations: vec![],
            body: Body::Data(b"payload".to_vec()),
        };
        let (device, c2d) = to_c2d(m.clone()).unwrap();
        assert_eq!(device, "dev 1");
        assert_eq!(c2d.message_id.as_deref(), Some("00000000-0000-0000-0000-000000000000"));
        assert_eq!(c2d.correlation_id.as_deref(), Some("corr"));
        assert_eq!(c2d.ack, AckMode::Full);
        assert_eq!(c2d.expiry, Some(5_000));
        assert_eq!(c2d.content_type.as_deref(), Some("text/plain"));
        assert_eq!(c2d.content_encoding.as_deref(), Some("utf-8"));
        assert_eq!(c2d.properties, vec![("k".into(), "v".into()), ("n".into(), "3".into())]);
        assert_eq!(&c2d.body[..], b"payload");
    }

    #[test]
    fn bad_c2d_messages_say_why() {
        let mut m = Message::default();
        assert!(matches!(to_c2d(m.clone()), Err(C2dFormatError::To(None))));
        m.properties.to = Some("/devices/d/messages/devicebound".into());
        m.application_properties.push(("iothub-ack".into(), Value::str("sometimes")));
        assert_eq!(to_c2d(m.clone()).unwrap_err(), C2dFormatError::Ack("sometimes".into()));
        m.application_properties.clear();
        m.body = Body::Sequence(vec![]);
        assert_eq!(to_c2d(m.clone()).unwrap_err(), C2dFormatError::Body);
    }
}
