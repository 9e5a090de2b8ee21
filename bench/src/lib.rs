//! The test bench of the IoT Hub emulator: scenario files ([`scenario`]), the scenario runner
//! with its metrics ([`runner`]), the real hub as a child process ([`child_hub`]), a probe of
//! this process's memory ([`memory`]) and the C2D fan-out bench's shared parts ([`fanout`]).

pub mod child_hub;
pub mod fanout;
pub mod memory;
pub mod runner;
pub mod scenario;
