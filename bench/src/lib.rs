//! The test bench of the IoT Hub emulator: scenario files ([`scenario`]) and, as they land, the
//! scenario runner, metrics and reports.

pub mod scenario;
