//! Integration tests: real worker processes on real sockets. One test binary
//! for fast linking; one module per area.

mod core;

/// The test worker program, built by cargo for this test binary.
pub fn test_worker() -> &'static str {
    env!("CARGO_BIN_EXE_test-worker")
}

/// A cluster builder running the test worker in `mode`.
pub fn builder(mode: &str) -> procluster::primary::ClusterBuilder {
    procluster_tests::builder_for(test_worker(), mode)
}

mod environment;
mod fds;
mod garbage;
mod leaks;
mod messages;
mod orphans;
mod output;

/// The test primary program (a primary in a process of its own).
pub fn test_primary() -> &'static str {
    env!("CARGO_BIN_EXE_test-primary")
}
mod bus;
mod chat;
mod cli;
mod demo;
mod listeners;
mod pool;
mod services;
mod sticky;
mod store;
mod supervisor;
mod telemetry;
