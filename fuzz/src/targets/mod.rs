//! The fuzz targets, one per decoder. Each is a [`Target`]: its seeds (valid traffic made with the
//! project's own encoders), a dictionary for the mutator, its allocation limit (`alloc_k` bytes
//! per input byte plus `alloc_c`) and a check that calls the project's public API and returns
//! `Err` when a property other than "does not panic" and "allocates within the limit" breaks.

mod amqp;
mod device;
mod dps;
mod ftp;
mod mqtt;
mod state;
mod text;
mod x509;

use crate::runner::Target;

/// Every target, in the order `all` runs them.
pub const ALL: &[Target] = &[
    amqp::VALUE,
    amqp::FRAME,
    amqp::MESSAGE,
    amqp::CONNECTION,
    amqp::CLIENT,
    mqtt::PACKET,
    mqtt::TOPIC,
    device::DEVICE_MQTT,
    dps::DPS_MQTT,
    text::SAS_TOKEN,
    text::CONNECTION_STRING,
    text::QUERY,
    text::TWIN_JSON,
    text::SCENARIO,
    ftp::FTP_PATH,
    x509::CHAIN,
    state::STATE_JOURNAL,
];

/// The target called `name`.
pub fn by_name(name: &str) -> Option<&'static Target> {
    ALL.iter().find(|t| t.name == name)
}
