//! The service-facing AMQP 1.0 endpoint (port 5671): what the official service SDKs use to send
//! C2D messages and read feedback (reference §3.4, §3.9; sdk-wire-notes §3, §4, §7 item 3).
//!
//! Layers, bottom up: [`types`] (the AMQP type system), [`frame`] (framing, performatives),
//! [`message`] (message sections and the C2D translation), [`connection`] (the sans-IO link
//! engine: connection, sessions, links, credit, settlement), [`nodes`] (what each node does, one
//! file per node, behind the small `Node` interface the engine drives) and [`server`] (the socket
//! driver: TLS, reads, writes, wake-ups).
//!
//! One port takes both ways the SDKs open a connection: a SASL header offering `MSSBCBS`
//! (uamqp, empty initial response), `ANONYMOUS` and `PLAIN`, and a bare AMQP header (rhea).

pub mod connection;
#[cfg(test)]
mod connection_tests;
pub mod frame;
pub mod message;
pub mod nodes;
pub mod server;
pub mod types;

pub use connection::{Connection, Wakes};

/// The max-frame-size we announce: the largest frame a peer may send us.
pub const MAX_FRAME_BYTES: u32 = 64 * 1024;
/// The max-message-size we announce on links. Larger than IoT Hub's 64 KB C2D limit so that an
/// oversized C2D message reaches the hub's check and gets IoT Hub's own error; deliveries past it
/// are rejected with `amqp:link:message-size-exceeded` without being buffered.
pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
/// Bytes one connection may hold in unfinished multi-frame deliveries, across all its links (16
/// sessions of 64 links could otherwise each buffer [`MAX_MESSAGE_BYTES`] before any auth). A
/// delivery that would pass it is rejected with `amqp:link:message-size-exceeded`.
pub const MAX_BUFFERED_DELIVERY_BYTES: usize = 2 * MAX_MESSAGE_BYTES;
/// Sessions per connection (channel-max + 1).
pub const MAX_SESSIONS: usize = 16;
/// Links per session (handle-max + 1).
pub const MAX_LINKS_PER_SESSION: u32 = 64;
/// Transfers a peer may send before we re-announce the session window.
pub const SESSION_WINDOW: u32 = 2048;
/// Credit granted to each link the peer sends on; topped up when half is used.
pub const LINK_CREDIT: u32 = 100;
/// Replies (CBS, management) kept per reply link while the client grants it no credit.
pub const MAX_PENDING_REPLIES: usize = 16;
/// Tracked deliveries (feedback batches) one session may hold unsettled at once.
pub const MAX_UNSETTLED_DELIVERIES: usize = 64;
