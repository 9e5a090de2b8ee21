//! The test bench of the IoT Hub emulator: scenario files ([`scenario`]), the scenario runner
//! with its metrics ([`runner`]) and a probe of this process's memory ([`memory`]).

pub mod memory;
pub mod runner;
pub mod scenario;
