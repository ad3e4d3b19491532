//! The binary's `--help` documents every flag of `run`. (Being an
//! integration test of this package also makes `cargo test --workspace`
//! build the `procluster` binary the workspace's process tests run.)

use std::process::Command;

fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_procluster"))
        .args(args)
        .output()
        .expect("run procluster");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn run_help_documents_every_option() {
    let text = help(&["run", "--help"]);
    for flag in [
        "--workers",
        "--listen",
        "--policy",
        "--ready",
        "--ready-timeout",
        "--kill-timeout",
        "--stop-signal",
        "--control",
        "--config",
        "--user",
        "--group",
        "--log-format",
        "--watchdog",
        "--max-crashes",
        "--crash-window",
        "--name",
    ] {
        assert!(text.contains(flag), "{flag} is not documented:\n{text}");
    }
    let top = help(&["--help"]);
    for command in ["run", "status", "reload", "scale", "stop"] {
        assert!(top.contains(command), "{command}:\n{top}");
    }
    assert!(!top.contains("__exec"), "the shim is internal");
}

#[test]
fn a_bad_flag_exits_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_procluster"))
        .args(["run", "--workers", "none", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--workers"));
}
