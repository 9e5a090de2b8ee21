//! The test bench of the IoT Hub emulator: scenario files ([`scenario`]) and the scenario runner
//! with its metrics ([`runner`]).

pub mod runner;
pub mod scenario;
