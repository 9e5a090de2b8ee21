//! A local Azure IoT Hub emulator: the hub's state and rules ([`hub`], [`c2d`], [`sas`], [`query`],
//! scheduled [`jobs`]),
//! tier throttling ([`throttle`]), its protocol front ends ([`http`], [`mqtt`], [`amqp`]), the FTP package server for simulated devices
//! ([`ftp`]), local TLS ([`tls`]) and the server that ties them to bound listeners ([`server`]).
//! [`healthcheck`] is the client side of `/health` for container health checks; with the
//! `testcontainers` feature, `testcontainers` runs the hub image in tests.
//!
//! The binary `iothub-emulator` is a thin wrapper: it parses flags, binds sockets and calls
//! [`server::serve`].

pub mod amqp;
pub mod c2d;
pub mod clock;
pub mod configs;
pub mod dps;
pub mod error;
pub mod ftp;
pub mod healthcheck;
pub mod http;
pub mod hub;
pub mod jobs;
pub mod limits;
pub mod listener;
pub mod metrics;
pub mod monitor;
pub mod mqtt;
pub mod persist;
pub mod query;
pub mod sas;
pub mod server;
pub mod shutdown;
#[cfg(feature = "testcontainers")]
pub mod testcontainers;
pub mod throttle;
pub mod tls;
pub mod x509;

pub use error::{ErrorCode, HubError};
pub use hub::{Hub, HubConfig};
