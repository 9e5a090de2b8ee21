//! End-to-end tests: one binary, one module per area, a shared harness in `lib.rs`.

mod mqtt;
mod sdk;
