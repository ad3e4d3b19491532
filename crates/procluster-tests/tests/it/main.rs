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
/// Builds example `name` of the procluster crate (nothing to do when the
/// workspace's targets are built) and returns its path, beside this test
/// binary.
pub fn example(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let target_dir = profile_dir.parent().expect("target");
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .expect("profile");
    let cargo = option_env!("CARGO").unwrap_or("cargo");
    let mut build = std::process::Command::new(cargo);
    build
        .args(["build", "--quiet", "-p", "procluster", "--example", name])
        .arg("--target-dir")
        .arg(target_dir);
    if profile != "debug" {
        build.args([
            "--profile",
            if profile == "release" {
                "release"
            } else {
                profile
            },
        ]);
    }
    let status = build
        .status()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the {name} example: {e}"));
    assert!(status.success(), "cannot build the {name} example");
    profile_dir.join("examples").join(name)
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
