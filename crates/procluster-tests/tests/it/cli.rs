//! The `procluster` command line with real programs: Python (standard
//! library only) and Node workers serving one shared port.
//!
//! The binary is `target/<profile>/procluster`, next to this test binary's
//! directory; it is built once per test process (`cargo build -p
//! procluster-cli`, a no-op when fresh).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use procluster::Signal;
use procluster_tests::{DEADLINE, TempDir, alive, eventually, kill_pid};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The `procluster` binary, built if needed.
fn procluster() -> PathBuf {
    static BUILD: Once = Once::new();
    let exe = std::env::current_exe().expect("test binary path");
    // target/debug/deps/it-HASH -> target/debug
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf();
    let binary = profile_dir.join("procluster");
    BUILD.call_once(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let target_dir = profile_dir.parent().expect("target root");
        let status = std::process::Command::new(cargo)
            .args(["build", "--quiet", "-p", "procluster-cli", "--target-dir"])
            .arg(target_dir)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build -p procluster-cli");
        assert!(status.success(), "cargo build -p procluster-cli failed");
    });
    assert!(binary.exists(), "{} was not built", binary.display());
    binary
}

/// A Python worker: serves HTTP on the socket at fd 3 (`socket.fromfd`),
/// answering `ID PID INDEX`. With `--ready notify` it sends READY=1 once the
/// file `go` exists in its directory (at once if there is no `gate` file),
/// and never when a file `never` exists. SIGTERM: stop accepting, finish the
/// requests in flight, exit 0.
const PY_WORKER: &str = r#"
import os, socket, sys, threading, signal, time, http.server, socketserver
here = os.path.dirname(os.path.abspath(__file__))
wid = os.environ["PROCLUSTER_WORKER_ID"]
ok = os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS") == "1"
sock = socket.fromfd(3, socket.AF_INET, socket.SOCK_STREAM)
# Every worker waits on the same socket: after a wake-up another may have
# taken the connection, so accept must not block.
sock.setblocking(False)
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = ("%s %s %s\n" % (wid, os.getpid(), os.environ.get("PROCLUSTER_WORKER_INDEX"))).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    block_on_close = True
srv = Server(("127.0.0.1", 0), Handler, bind_and_activate=False)
srv.socket = sock
def stop(*_):
    threading.Thread(target=srv.shutdown).start()
signal.signal(signal.SIGTERM, stop)
print("worker %s pid %s index %s listen-env %s" % (wid, os.getpid(), os.environ.get("PROCLUSTER_WORKER_INDEX"), "ok" if ok else "bad"), flush=True)
def notify():
    path = os.environ.get("NOTIFY_SOCKET")
    if not path or os.path.exists(os.path.join(here, "never")):
        return
    while os.path.exists(os.path.join(here, "gate")) and not os.path.exists(os.path.join(here, "go")):
        time.sleep(0.01)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.sendto(b"STATUS=serving\nREADY=1", path)
threading.Thread(target=notify, daemon=True).start()
srv.serve_forever(poll_interval=0.05)
srv.server_close()
print("worker %s done" % wid, flush=True)
"#;

/// A Node worker: `server.listen({fd: 3})`, `process.send('ready')` once
/// listening (after the file `go` exists when a `gate` file does; never
/// when a `never` file exists).
const NODE_WORKER: &str = r#"
const http = require('http'), fs = require('fs'), path = require('path');
const wid = process.env.PROCLUSTER_WORKER_ID;
const server = http.createServer((req, res) => res.end(`${wid} ${process.pid} ${process.env.PROCLUSTER_WORKER_INDEX}\n`));
const at = (f) => fs.existsSync(path.join(__dirname, f));
server.listen({ fd: 3 }, () => {
  console.log(`node worker ${wid} listening`);
  if (at('never')) return;
  const tell = () => {
    if (at('gate') && !at('go')) return setTimeout(tell, 10);
    process.send('ready');
    process.send({ hello: wid });
  };
  tell();
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
"#;

/// A running `procluster run`, its output collected.
struct Run {
    child: Child,
    control: PathBuf,
    dir: TempDir,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// The tasks reading stdout and stderr, done at end of stream.
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Run {
    /// Starts `procluster run ARGS -- PROGRAM` in a fresh directory holding
    /// the worker scripts; `files` are created there first.
    async fn start(args: &[&str], program: &[&str], files: &[&str]) -> Self {
        let dir = TempDir::new("cli");
        std::fs::write(dir.0.join("worker.py"), PY_WORKER).unwrap();
        std::fs::write(dir.0.join("worker.js"), NODE_WORKER).unwrap();
        for file in files {
            std::fs::write(dir.0.join(file), "").unwrap();
        }
        let control = dir.0.join("control.sock");
        let mut child = Command::new(procluster())
            .arg("run")
            .arg("--control")
            .arg(&control)
            .args(args)
            .arg("--")
            .args(program)
            .current_dir(&dir.0)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start procluster run");
        let (stdout, out_reader) = collect(child.stdout.take().unwrap());
        let (stderr, err_reader) = collect(child.stderr.take().unwrap());
        Self {
            child,
            control,
            dir,
            stdout,
            stderr,
            readers: vec![out_reader, err_reader],
        }
    }

    /// Starts with 2 Python workers on a kernel-chosen port and waits until
    /// both are ready.
    async fn python(extra: &[&str], files: &[&str]) -> Self {
        let mut args = vec!["-w", "2", "-l", "web=127.0.0.1:0"];
        args.extend_from_slice(extra);
        let run = Self::start(&args, &["python3", "worker.py"], files).await;
        run.until_ready(2).await;
        run
    }

    /// Waits until `count` lines of stdout contain `text` (the workers are
    /// past their setup).
    async fn printed(&self, text: &str, count: usize) {
        eventually(&format!("{count} lines say {text:?}"), || {
            self.stdout
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains(text))
                .count()
                >= count
        })
        .await;
    }

    fn output(&self) -> String {
        format!(
            "stdout:\n{}\nstderr:\n{}",
            self.stdout.lock().unwrap().join("\n"),
            self.stderr.lock().unwrap().join("\n")
        )
    }

    /// `procluster ARGS --control PATH`: exit status, stdout, stderr.
    async fn ctl(&self, args: &[&str]) -> (i32, String, String) {
        let out = tokio::time::timeout(
            DEADLINE,
            Command::new(procluster())
                .args(args)
                .arg("--control")
                .arg(&self.control)
                .output(),
        )
        .await
        .expect("the control command answers in time")
        .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `status --json`, or `None` while the control socket is not up.
    async fn try_status(&self) -> Option<Value> {
        let (code, out, _) = self.ctl(&["status", "--json"]).await;
        if code != 0 {
            return None;
        }
        Some(serde_json::from_str(&out).expect("status --json prints JSON"))
    }

    /// Polls `status` until `check` accepts it.
    async fn status_until(&self, what: &str, check: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            match self.try_status().await {
                Some(status) if check(&status) => return status,
                _ => {}
            }
            assert!(
                start.elapsed() < DEADLINE,
                "timed out waiting until {what}\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn until_ready(&self, count: usize) -> Value {
        self.status_until(&format!("{count} workers are ready"), |s| {
            let workers = s["workers"].as_array().unwrap();
            workers.len() == count && workers.iter().all(|w| w["state"] == "ready")
        })
        .await
    }

    /// Both workers of a gated run (`gate` file, see worker.py) are up; none
    /// may be ready before the gate opens.
    async fn both_gated(&self) {
        let starting = self
            .status_until("both workers run", |s| {
                s["workers"].as_array().unwrap().len() == 2
            })
            .await;
        assert!(
            starting["workers"]
                .as_array()
                .unwrap()
                .iter()
                .all(|w| w["state"] == "starting"),
            "not ready before the gate opens: {starting}"
        );
    }

    /// With the `never` file, new workers never report ready: a reload must
    /// fail and the `ready` workers keep serving. The reload's stderr.
    async fn reload_fails_and_the_old_workers_serve(&self, ready: &Value) -> String {
        std::fs::write(self.dir.0.join("never"), "").unwrap();
        let (code, _, err) = self.ctl(&["reload", "--wait"]).await;
        assert_ne!(code, 0, "the reload must fail");
        let after = self.until_ready(2).await;
        assert_eq!(pids(&after), pids(ready), "the old workers keep serving");
        served_by_all(Run::port(&after), &pids(&after)).await;
        err
    }

    fn port(status: &Value) -> u16 {
        let address = status["listeners"][0]["address"].as_str().unwrap();
        address.rsplit(':').next().unwrap().parse().unwrap()
    }

    /// Waits for the primary to exit and its output to be read; its exit
    /// code.
    async fn exit_code(&mut self) -> i32 {
        let status = tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("procluster did not exit\n{}", self.output()))
            .unwrap();
        for reader in self.readers.drain(..) {
            let _ = tokio::time::timeout(DEADLINE, reader).await;
        }
        status.code().unwrap_or(-1)
    }
}

type Lines = Arc<Mutex<Vec<String>>>;

fn collect(
    stream: impl tokio::io::AsyncRead + Unpin + Send + 'static,
) -> (Lines, tokio::task::JoinHandle<()>) {
    let lines = Lines::default();
    let sink = lines.clone();
    let reader = tokio::spawn(async move {
        let mut reader = BufReader::new(stream).lines();
        while let Ok(Some(line)) = reader.next_line().await {
            sink.lock().unwrap().push(line);
        }
    });
    (lines, reader)
}

fn pids(status: &Value) -> Vec<u32> {
    let mut pids: Vec<u32> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["pid"].as_u64().unwrap() as u32)
        .collect();
    pids.sort_unstable();
    pids
}

/// One HTTP/1.0 GET on a new connection; the body (`ID PID INDEX`).
fn get(port: u16) -> std::io::Result<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => {
            Ok(body.trim().to_string())
        }
        _ => Err(std::io::Error::other(format!("bad response {response:?}"))),
    }
}

async fn get_async(port: u16) -> std::io::Result<String> {
    tokio::task::spawn_blocking(move || get(port))
        .await
        .unwrap()
}

/// Requests until every pid in `wanted` has answered.
async fn served_by_all(port: u16, wanted: &[u32]) {
    let mut seen = std::collections::BTreeSet::new();
    let start = Instant::now();
    while !wanted.iter().all(|p| seen.contains(p)) {
        let body = get_async(port).await.expect("a worker answers");
        seen.insert(body.split(' ').nth(1).unwrap().parse::<u32>().unwrap());
        assert!(
            start.elapsed() < DEADLINE,
            "not every worker served: wanted {wanted:?}, saw {seen:?}"
        );
    }
}

fn node_available() -> bool {
    std::process::Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test]
async fn python_workers_share_one_kernel_chosen_port_with_socket_activation() {
    let mut run = Run::python(&[], &[]).await;
    let status = run.try_status().await.unwrap();
    assert_eq!(
        status["pid"].as_u64(),
        Some(u64::from(run.child.id().unwrap()))
    );
    assert_eq!(status["policy"], "shared");
    assert_eq!(status["listeners"][0]["name"], "web");
    let address = status["listeners"][0]["address"].as_str().unwrap();
    assert!(
        address.starts_with("tcp://127.0.0.1:") && !address.ends_with(":0"),
        "{address}"
    );
    let mut indexes: Vec<u64> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["index"].as_u64().unwrap())
        .collect();
    indexes.sort_unstable();
    assert_eq!(indexes, [0, 1]);
    served_by_all(Run::port(&status), &pids(&status)).await;
    run.printed("listen-env ok", 2).await;
    assert!(!run.output().contains("listen-env bad"), "{}", run.output());
    let (code, _, _) = run.ctl(&["stop"]).await;
    assert_eq!(code, 0);
    assert_eq!(run.exit_code().await, 0, "{}", run.output());
}

#[tokio::test]
async fn a_killed_worker_is_replaced_and_status_shows_the_restart() {
    let run = Run::python(&[], &[]).await;
    let before = run.try_status().await.unwrap();
    let victim = &before["workers"][0];
    let (victim_pid, victim_index) = (
        victim["pid"].as_u64().unwrap() as u32,
        victim["index"].clone(),
    );
    kill_pid(victim_pid, Signal::KILL);
    let after = run
        .status_until("the slot has a new ready worker", |s| {
            s["workers"].as_array().unwrap().iter().any(|w| {
                w["index"] == victim_index
                    && w["pid"].as_u64() != Some(u64::from(victim_pid))
                    && w["state"] == "ready"
                    && w["restarts"] == 1
            })
        })
        .await;
    assert_eq!(after["workers"].as_array().unwrap().len(), 2);
    served_by_all(Run::port(&after), &pids(&after)).await;
}

#[tokio::test]
async fn reload_wait_under_load_replaces_every_worker_and_drops_nothing() {
    let run = Run::python(&["--ready", "notify"], &[]).await;
    let before = run.try_status().await.unwrap();
    let port = Run::port(&before);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::task::spawn_blocking(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && ok < 20_000 {
                match get(port) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e.to_string()),
                }
            }
            (ok, failed)
        })
    };
    let (code, out, err) = run.ctl(&["reload", "--wait"]).await;
    assert_eq!(code, 0, "{out}{err}\n{}", run.output());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok > 0);
    let after = run.until_ready(2).await;
    let old = pids(&before);
    assert!(
        pids(&after).iter().all(|p| !old.contains(p)),
        "every worker is new"
    );
    assert!(
        after["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["generation"] == 1)
    );
}

#[tokio::test]
async fn notify_readiness_gates_workers_and_a_never_ready_worker_fails_the_reload() {
    let run = Run::start(
        &[
            "-w",
            "2",
            "-l",
            "127.0.0.1:0",
            "--ready",
            "notify",
            "--ready-timeout",
            "1s",
        ],
        &["python3", "worker.py"],
        &["gate"],
    )
    .await;
    run.both_gated().await;
    std::fs::write(run.dir.0.join("go"), "").unwrap();
    let ready = run.until_ready(2).await;
    let err = run.reload_fails_and_the_old_workers_serve(&ready).await;
    assert!(err.contains("ready"), "{err}");
}

#[tokio::test]
async fn node_workers_gate_readiness_on_process_send_and_serve_the_port() {
    if !node_available() {
        eprintln!("node is not installed; skipping");
        return;
    }
    let run = Run::start(
        &[
            "-w",
            "2",
            "-l",
            "127.0.0.1:0",
            "--ready",
            "node-ipc",
            "--ready-timeout",
            "2s",
        ],
        &["node", "worker.js"],
        &["gate"],
    )
    .await;
    run.both_gated().await;
    std::fs::write(run.dir.0.join("go"), "").unwrap();
    let ready = run.until_ready(2).await;
    served_by_all(Run::port(&ready), &pids(&ready)).await;
    run.reload_fails_and_the_old_workers_serve(&ready).await;
    eventually("the other message is logged", || {
        run.stderr
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("hello"))
    })
    .await;
}

#[tokio::test]
async fn sigterm_stops_gracefully_and_the_primary_exits_0() {
    let mut run = Run::python(&[], &[]).await;
    let workers = pids(&run.try_status().await.unwrap());
    run.printed("listen-env", 2).await;
    kill_pid(run.child.id().unwrap(), Signal::TERM);
    assert_eq!(run.exit_code().await, 0, "{}", run.output());
    assert!(workers.iter().all(|&p| !alive(p)));
    let stdout = run.stdout.lock().unwrap().join("\n");
    assert_eq!(
        stdout.matches(" done").count(),
        2,
        "both drained and exited:\n{stdout}"
    );
    assert!(!run.control.exists(), "the control socket is removed");
}

#[tokio::test]
async fn a_worker_that_ignores_the_stop_signal_is_killed_after_the_kill_timeout() {
    let mut run = Run::start(
        &["-w", "1", "--kill-timeout", "300ms"],
        &[
            "sh",
            "-c",
            "trap '' TERM; echo ignoring-term; while :; do sleep 0.05; done",
        ],
        &[],
    )
    .await;
    run.until_ready(1).await;
    // Only once the shell ignores SIGTERM: a stop that came earlier would
    // end it at once.
    run.printed("ignoring-term", 1).await;
    let (code, _, _) = run.ctl(&["stop"]).await;
    assert_eq!(code, 0);
    assert_eq!(run.exit_code().await, 1, "not every worker stopped in time");
}

#[tokio::test]
async fn sigkill_of_the_primary_leaves_no_worker_alive() {
    let mut run = Run::python(&[], &[]).await;
    let workers = pids(&run.try_status().await.unwrap());
    kill_pid(run.child.id().unwrap(), Signal::KILL);
    eventually("every worker is gone", || {
        workers.iter().all(|&p| !alive(p))
    })
    .await;
    let _ = run.exit_code().await;
}

#[tokio::test]
async fn json_logs_parse_and_carry_the_right_worker() {
    let mut run = Run::python(&["--log-format", "json"], &[]).await;
    let status = run.try_status().await.unwrap();
    run.printed("listen-env", 2).await;
    run.ctl(&["stop"]).await;
    assert_eq!(run.exit_code().await, 0);
    let lines = run.stdout.lock().unwrap().clone();
    let mut checked = 0;
    for line in &lines {
        let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let text = value["line"].as_str().unwrap();
        assert_eq!(value["stream"], "stdout");
        assert!(value["ts"].as_str().unwrap().ends_with('Z'));
        if let Some(rest) = text.strip_prefix("worker ") {
            let fields: Vec<&str> = rest.split(' ').collect();
            assert_eq!(value["worker"].to_string(), fields[0], "{line}");
            if fields[1] == "pid" {
                assert_eq!(value["pid"].to_string(), fields[2], "{line}");
                assert_eq!(value["index"].to_string(), fields[4], "{line}");
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 2, "{lines:#?}");
    let _ = status;
}

#[tokio::test]
async fn scale_adds_and_removes_workers() {
    let run = Run::python(&[], &[]).await;
    let (code, _, err) = run.ctl(&["scale", "+1"]).await;
    assert_eq!(code, 0, "{err}");
    let three = run.until_ready(3).await;
    assert_eq!(three["desired"], 3);
    let (code, _, err) = run.ctl(&["scale", "1"]).await;
    assert_eq!(code, 0, "{err}");
    run.until_ready(1).await;
    let (code, _, err) = run.ctl(&["scale", "-1"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("0 workers"), "{err}");
}

#[tokio::test]
async fn a_program_that_does_not_exist_exits_127_naming_it() {
    let mut run = Run::start(&["-w", "1"], &["no-such-program-here"], &[]).await;
    assert_eq!(run.exit_code().await, 127);
    assert!(
        run.output().contains("no-such-program-here"),
        "{}",
        run.output()
    );
}

#[tokio::test]
async fn a_port_in_use_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let mut run = Run::start(&["-w", "1", "-l", &address], &["python3", "worker.py"], &[]).await;
    assert_eq!(run.exit_code().await, 1);
    let output = run.output();
    assert!(
        output.contains(&address) && output.contains("in use"),
        "{output}"
    );
}

#[tokio::test]
async fn an_unknown_config_key_is_named() {
    let dir = TempDir::new("cli-config");
    let config = dir.0.join("procluster.toml");
    std::fs::write(&config, "workers = 2\nlisten-typo = \"127.0.0.1:0\"\n").unwrap();
    let out = Command::new(procluster())
        .args(["run", "--config"])
        .arg(&config)
        .args(["--", "true"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listen-typo"), "{stderr}");
}

#[tokio::test]
async fn a_crash_loop_exits_non_zero_with_the_reason() {
    let mut run = Run::start(
        &["-w", "1", "--max-crashes", "2"],
        &["sh", "-c", "exit 3"],
        &[],
    )
    .await;
    assert_eq!(run.exit_code().await, 1);
    let output = run.output();
    assert!(
        output.contains("crash loop") && output.contains("code 3"),
        "{output}"
    );
}

#[tokio::test]
async fn control_commands_without_a_primary_fail_clearly() {
    let dir = TempDir::new("cli-none");
    let out = Command::new(procluster())
        .args(["status", "--control"])
        .arg(dir.0.join("nothing.sock"))
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is it running"));
}

/// Runs as `python3 -c LAUNCHER PROGRAM ARGS...`, standing in for systemd:
/// binds a TCP socket on a kernel-chosen port of 127.0.0.1, places it at
/// fd 3, sets `LISTEN_FDS=1`, `LISTEN_PID` (its own pid, which `execve`
/// keeps), `LISTEN_FDNAMES=web` and `NOTIFY_SOCKET` (from `TEST_NOTIFY`),
/// prints the port, then becomes PROGRAM.
const SYSTEMD_LAUNCHER: &str = r#"
import os, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0))
s.listen(128)
port = s.getsockname()[1]
if s.fileno() != 3:
    os.dup2(s.fileno(), 3)
os.set_inheritable(3, True)
env = dict(os.environ)
env.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="web",
           NOTIFY_SOCKET=env.pop("TEST_NOTIFY"))
print("launcher port %d" % port, flush=True)
os.execve(sys.argv[1], sys.argv[1:], env)
"#;

/// A worker for `--watchdog` (run as `python3 -c`, in the primary's
/// directory): sends READY=1, then WATCHDOG=1 every 30 ms. If the file
/// `hang-INDEX` exists it stops pinging after 5 pings but stays alive. On
/// SIGABRT it removes `hang-INDEX` (so its replacement behaves), creates
/// `aborted-PID` and exits 3.
const WATCHDOG_WORKER: &str = r#"
import os, signal, socket, time
index = os.environ["PROCLUSTER_WORKER_INDEX"]
hang = "hang-" + index
def aborted(*_):
    try:
        os.remove(hang)
    except FileNotFoundError:
        pass
    open("aborted-%d" % os.getpid(), "w").close()
    os._exit(3)
signal.signal(signal.SIGABRT, aborted)
pings = 5 if os.path.exists(hang) else None
print("watchdog worker pid %d index %s usec %s for %s" % (os.getpid(), index,
      os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")), flush=True)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
sent = 0
while pings is None or sent < pings:
    s.sendto(b"WATCHDOG=1", os.environ["NOTIFY_SOCKET"])
    sent += 1
    time.sleep(0.03)
while True:
    signal.pause()
"#;

impl Run {
    /// Starts `procluster run --control PATH ARGS -- PROGRAM` as systemd
    /// would: through [`SYSTEMD_LAUNCHER`], which passes one listening
    /// socket named `web` and a `NOTIFY_SOCKET` bound here. Returns the run,
    /// the notify socket, and the port the launcher bound.
    async fn under_systemd(
        args: &[&str],
        program: &[&str],
        files: &[&str],
    ) -> (Self, tokio::net::UnixDatagram, u16) {
        let dir = TempDir::new("cli-systemd");
        std::fs::write(dir.0.join("worker.py"), PY_WORKER).unwrap();
        for file in files {
            std::fs::write(dir.0.join(file), "").unwrap();
        }
        let notify_path = dir.0.join("systemd-notify.sock");
        let notify = tokio::net::UnixDatagram::bind(&notify_path).unwrap();
        let control = dir.0.join("control.sock");
        let mut child = Command::new("python3")
            .arg("-c")
            .arg(SYSTEMD_LAUNCHER)
            .arg(procluster())
            .arg("run")
            .arg("--control")
            .arg(&control)
            .args(args)
            .arg("--")
            .args(program)
            .current_dir(&dir.0)
            .env("TEST_NOTIFY", &notify_path)
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start the launcher");
        let (stdout, out_reader) = collect(child.stdout.take().unwrap());
        let (stderr, err_reader) = collect(child.stderr.take().unwrap());
        let run = Self {
            child,
            control,
            dir,
            stdout,
            stderr,
            readers: vec![out_reader, err_reader],
        };
        run.printed("launcher port ", 1).await;
        let port = run
            .stdout
            .lock()
            .unwrap()
            .iter()
            .find_map(|l| l.strip_prefix("launcher port ")?.trim().parse().ok())
            .expect("the launcher prints its port");
        (run, notify, port)
    }
}

/// The next datagram on the primary's `NOTIFY_SOCKET`, within [`DEADLINE`].
async fn notified(socket: &tokio::net::UnixDatagram, run: &Run) -> String {
    let mut buf = [0u8; 4096];
    let n = tokio::time::timeout(DEADLINE, socket.recv(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("no sd_notify message from the primary\n{}", run.output()))
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// `Uid:` or `Gid:` of /proc/PID/status: real, effective, saved, fs.
fn proc_ids(pid: u32, key: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"))
        .split_whitespace()
        .map(|n| n.parse().unwrap())
        .collect()
}

/// The id (third field) of `name` in /etc/passwd or /etc/group.
fn etc_id(file: &str, name: &str) -> Option<u32> {
    std::fs::read_to_string(file)
        .ok()?
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[0] == name)?[2]
        .parse()
        .ok()
}

#[tokio::test]
async fn under_systemd_the_primary_serves_the_passed_socket_and_reports_its_state() {
    let (mut run, notify, port) = Run::under_systemd(
        &["-w", "2", "--ready", "notify"],
        &["python3", "worker.py"],
        &["gate"],
    )
    .await;
    let starting = run
        .status_until("both workers run", |s| {
            s["workers"].as_array().unwrap().len() == 2
        })
        .await;
    assert_eq!(
        starting["pid"].as_u64(),
        Some(u64::from(run.child.id().unwrap())),
        "the launcher became the primary"
    );
    assert_eq!(
        starting["listeners"],
        serde_json::json!([{"name": "web", "address": format!("tcp://127.0.0.1:{port}")}]),
        "the passed socket, under its LISTEN_FDNAMES name, and no other"
    );
    let mut buf = [0u8; 4096];
    assert!(
        matches!(notify.try_recv(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "nothing is reported before the workers are ready"
    );
    std::fs::write(run.dir.0.join("go"), "").unwrap();
    assert_eq!(notified(&notify, &run).await, "READY=1");
    let ready = run.until_ready(2).await;
    served_by_all(port, &pids(&ready)).await;
    run.printed("listen-env ok", 2).await;
    assert!(!run.output().contains("listen-env bad"), "{}", run.output());

    let (code, out, err) = run.ctl(&["reload", "--wait"]).await;
    assert_eq!(code, 0, "{out}{err}\n{}", run.output());
    let reloading = notified(&notify, &run).await;
    assert!(
        reloading.starts_with("RELOADING=1\nMONOTONIC_USEC="),
        "{reloading:?}"
    );
    assert_eq!(notified(&notify, &run).await, "READY=1");
    let after = run.until_ready(2).await;
    served_by_all(port, &pids(&after)).await;

    let (code, _, _) = run.ctl(&["stop"]).await;
    assert_eq!(code, 0);
    assert_eq!(notified(&notify, &run).await, "STOPPING=1");
    assert_eq!(run.exit_code().await, 0, "{}", run.output());
    assert!(
        matches!(notify.try_recv(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the workers' own READY=1 never reach systemd's socket"
    );
}

#[tokio::test]
async fn workers_run_as_the_given_user_and_group_on_the_port_the_primary_bound() {
    let (Some(uid), Some(gid)) = (
        etc_id("/etc/passwd", "nobody"),
        etc_id("/etc/group", "nogroup"),
    ) else {
        eprintln!("no user nobody or group nogroup; skipping");
        return;
    };
    if !rustix::process::geteuid().is_root() {
        eprintln!("not root; skipping");
        return;
    }
    // The worker comes on the command line: `run` makes the directory of
    // the control socket (here the run's directory, worker.py's too) 0700
    // root, unreadable to nobody.
    let worker = PY_WORKER.replace("os.path.dirname(os.path.abspath(__file__))", "os.getcwd()");
    let run = Run::start(
        &[
            "-w",
            "2",
            "-l",
            "127.0.0.1:0",
            "--user",
            "nobody",
            "--group",
            "nogroup",
        ],
        &["python3", "-c", &worker],
        &[],
    )
    .await;
    run.until_ready(2).await;
    let status = run.try_status().await.unwrap();
    let workers = pids(&status);
    assert_eq!(workers.len(), 2, "{status}");
    // Having served, each worker is past the shim's switch and exec.
    served_by_all(Run::port(&status), &workers).await;
    run.printed("listen-env ok", 2).await;
    for &pid in &workers {
        assert_eq!(proc_ids(pid, "Uid:"), [uid; 4], "worker {pid}");
        assert_eq!(proc_ids(pid, "Gid:"), [gid; 4], "worker {pid}");
        assert_eq!(proc_ids(pid, "Groups:"), [gid], "worker {pid}");
    }
    assert_eq!(
        proc_ids(run.child.id().unwrap(), "Uid:"),
        [0; 4],
        "the primary stays root"
    );
}

#[tokio::test]
async fn a_worker_that_stops_sending_watchdog_gets_sigabrt_and_is_replaced() {
    let run = Run::start(
        &["-w", "2", "--ready", "notify", "--watchdog", "300ms"],
        &["python3", "-c", WATCHDOG_WORKER],
        &["hang-0"],
    )
    .await;
    let first = run.until_ready(2).await;
    let slot = |status: &Value, index: u64| -> (u32, u64) {
        let worker = status["workers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["index"] == index)
            .unwrap_or_else(|| panic!("no worker in slot {index}: {status}"))
            .clone();
        (
            worker["pid"].as_u64().unwrap() as u32,
            worker["restarts"].as_u64().unwrap(),
        )
    };
    let (hung, _) = slot(&first, 0);
    let (healthy, _) = slot(&first, 1);
    let after = run
        .status_until("slot 0 has a new ready worker", |s| {
            s["workers"].as_array().unwrap().iter().any(|w| {
                w["index"] == 0
                    && w["pid"].as_u64() != Some(u64::from(hung))
                    && w["state"] == "ready"
            })
        })
        .await;
    assert!(
        run.dir.0.join(format!("aborted-{hung}")).exists(),
        "the hung worker got SIGABRT\n{}",
        run.output()
    );
    assert!(!alive(hung));
    assert_eq!(slot(&after, 0).1, 1, "one restart in slot 0: {after}");
    assert_eq!(
        slot(&after, 1),
        (healthy, 0),
        "the worker that kept pinging stays"
    );
    assert!(
        run.output().contains("stopped sending WATCHDOG=1"),
        "{}",
        run.output()
    );
    run.printed(&format!("usec 300000 for {hung}"), 1).await;
}

/// Fails today: with --user the worker cannot send READY=1. Its
/// NOTIFY_SOCKET is `CONTROL.notify/ID.sock`, which sits in the control
/// socket's directory (made 0700 root by `run`), and the socket file itself is
/// root's, mode 0755 by the umask, so `sendto` from uid nobody is EACCES.
#[tokio::test]
async fn workers_running_as_another_user_can_report_readiness() {
    if etc_id("/etc/passwd", "nobody").is_none() || !rustix::process::geteuid().is_root() {
        eprintln!("no user nobody, or not root; skipping");
        return;
    }
    let worker = PY_WORKER.replace("os.path.dirname(os.path.abspath(__file__))", "os.getcwd()");
    let run = Run::start(
        &[
            "-w",
            "2",
            "-l",
            "127.0.0.1:0",
            "--user",
            "nobody",
            "--ready",
            "notify",
        ],
        &["python3", "-c", &worker],
        &[],
    )
    .await;
    let ready = run.until_ready(2).await;
    served_by_all(Run::port(&ready), &pids(&ready)).await;
}
mod telemetry;
