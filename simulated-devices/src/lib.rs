//! Simulated devices for the emulator's fleet bench: the application package format
//! ([`package`]), device SAS tokens ([`sas`]), the installer that downloads a release from the
//! hub's FTP package server, verifies it, unpacks it and switches to it atomically ([`install`]),
//! the device [`agent`] (one device's app: MQTT session, C2D-driven installs, twin and telemetry
//! reports), the [`fleet`] that runs thousands of agents in one process, the [`inprocess`] fleet
//! that drives a million agents through the hub's session state machine without sockets, the [`release`] pipeline
//! step, the small IoT Hub [`service_client`] they and the scenario runner share, and the AMQP
//! [`amqp_client`] the release command sends through, and the [`check_schedule`] that spreads
//! periodic update checks over a fleet.

pub mod agent;
pub mod amqp_client;
pub mod check_schedule;
pub mod fleet;
pub mod inprocess;
pub mod install;
pub mod notice;
pub mod package;
pub mod release;
pub mod sas;
pub mod service_client;

pub use install::{InstallOutcome, InstallReport, InstallState, Installer};
pub use package::{Manifest, Release};
