//! Simulated IoT devices for the emulator's fleet bench: the device [`agent`] (one device's app:
//! registration, MQTT session, C2D-driven installs, twin and telemetry reports), the [`fleet`]
//! that runs thousands of agents in one process, the [`release`] pipeline step, and the small
//! IoT Hub [`service_client`] they and the scenario runner share.

pub mod agent;
pub mod fleet;
pub mod notice;
pub mod release;
pub mod service_client;
