//! Simulated devices for the emulator's fleet bench: the application package format
//! ([`package`]), device SAS tokens ([`sas`]) and the installer that downloads a release from the
//! hub's FTP package server, verifies it, unpacks it and switches to it atomically ([`install`]).
//!
//! The agent that keeps an MQTT connection and reacts to C2D update notices builds on these.

pub mod install;
pub mod package;
pub mod sas;

pub use install::{InstallOutcome, InstallReport, InstallState, Installer};
pub use package::{Manifest, Release};
