//! The `hello` example as a person runs it: what it prints, and how it ends
//! when its port is taken.

use std::path::{Path, PathBuf};
use std::sync::Once;

use procluster_tests::DEADLINE;
use tokio::process::Command;

/// The `hello` example, built if needed (a no-op when fresh).
pub fn hello() -> PathBuf {
    static BUILD: Once = Once::new();
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    BUILD.call_once(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let target_dir = profile_dir.parent().expect("target root");
        let status = std::process::Command::new(cargo)
            .args(["build", "--quiet", "-p", "procluster", "--example", "hello"])
            .arg("--target-dir")
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build --example hello");
        assert!(status.success(), "cargo build --example hello failed");
    });
    let binary = profile_dir.join("examples").join("hello");
    assert!(binary.exists(), "{} was not built", binary.display());
    binary
}

#[tokio::test]
async fn the_demo_given_a_port_in_use_says_so_once_and_exits_non_zero() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let out = tokio::time::timeout(
        DEADLINE,
        Command::new(hello())
            .args(["--workers", "2", "--port", &port])
            .env_remove("PROCLUSTER_SCHED_POLICY")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the demo gives up on a port in use instead of restarting")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(
        stderr.matches("already in use").count(),
        1,
        "said once:\n{stderr}"
    );
    assert!(!stderr.contains("restart in"), "no restart loop:\n{stderr}");
}

#[tokio::test]
async fn the_demo_prints_the_supervisors_events_as_sentences() {
    let mut child = Command::new(hello())
        .args(["--workers", "2", "--port", "0"])
        .env_remove("PROCLUSTER_SCHED_POLICY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    tokio::time::timeout(
        DEADLINE,
        tokio::io::AsyncBufReadExt::read_line(&mut stdout, &mut line),
    )
    .await
    .expect("the demo listens")
    .unwrap();
    assert!(line.starts_with("listening on http://127.0.0.1:"), "{line}");
    procluster_tests::kill_pid(child.id().unwrap(), procluster::Signal::TERM);
    let out = tokio::time::timeout(DEADLINE, child.wait_with_output())
        .await
        .expect("the demo stops")
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for sentence in [
        "supervising 2 worker slot(s)",
        "worker 1 started in slot 0 (generation 0)",
        "is ready in slot 1",
        "stopping",
    ] {
        assert!(stderr.contains(sentence), "{sentence:?} in:\n{stderr}");
    }
    assert!(!stderr.contains('{'), "no Debug form:\n{stderr}");
}
