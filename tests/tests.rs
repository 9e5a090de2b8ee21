//! End-to-end tests: one binary, one module per area, a shared harness in `lib.rs`.

mod abuse;
mod amqp;
mod auth;
mod c2d;
mod ci_examples;
mod containers;
mod dps;
mod fleet;
mod ftp_installer;
mod http;
mod jobs;
mod metrics;
mod mqtt;
mod nonroot;
mod persist;
mod registry;
mod release;
mod sdk;
mod startup;
mod throttle;
mod x509;
