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
use procluster_tests::{DEADLINE, TempDir, alive, eventually, kill_pid, prerequisite};
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
/// and never when a file `never` exists; with a file `count` it reports its
/// request count (`X_PROCLUSTER_REQUESTS`) there after each request. With a
/// file `flood` it prints
/// lines of 1 kB on stdout (and every tenth a short one on stderr) as fast
/// as it can, about 2000 a second. SIGTERM: stop accepting, finish the
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
served = [0]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        served[0] += 1
        if os.environ.get("NOTIFY_SOCKET") and os.path.exists(os.path.join(here, "count")):
            n = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            n.sendto(b"X_PROCLUSTER_REQUESTS=%d" % served[0], os.environ["NOTIFY_SOCKET"])
        body = ("%s %s %s\n" % (wid, os.getpid(), os.environ.get("PROCLUSTER_WORKER_INDEX"))).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    block_on_close = True
    def get_request(self):
        # A file hold-INDEX makes this worker stop accepting (busy, as an
        # application at capacity) until it is removed.
        hold = os.path.join(here, "hold-" + os.environ.get("PROCLUSTER_WORKER_INDEX", ""))
        while os.path.exists(hold):
            time.sleep(0.01)
        return self.socket.accept()
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
def flood():
    n = 0
    while True:
        n += 1
        print("flood %d %s" % (n, "x" * 1000), flush=True)
        if n % 10 == 0:
            print("flood-err %d" % n, file=sys.stderr, flush=True)
        time.sleep(0.0005)
if os.path.exists(os.path.join(here, "flood")):
    threading.Thread(target=flood, daemon=True).start()
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
        let (mut run, stdout, stderr) = Self::start_raw(args, program, files).await;
        let (out, out_reader) = collect(stdout);
        let (err, err_reader) = collect(stderr);
        run.stdout = out;
        run.stderr = err;
        run.readers = vec![out_reader, err_reader];
        run
    }

    /// As [`Run::start`], handing back the primary's stdout and stderr
    /// unread.
    async fn start_raw(
        args: &[&str],
        program: &[&str],
        files: &[&str],
    ) -> (
        Self,
        tokio::process::ChildStdout,
        tokio::process::ChildStderr,
    ) {
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
        let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
        let run = Self {
            child,
            control,
            dir,
            stdout: Lines::default(),
            stderr: Lines::default(),
            readers: Vec::new(),
        };
        (run, stdout, stderr)
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

    /// Waits until a line of stderr contains `text`.
    async fn printed_err(&self, text: &str) {
        eventually(&format!("stderr says {text:?}"), || {
            self.stderr.lock().unwrap().iter().any(|l| l.contains(text))
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

/// Under reuseport, a worker that stops accepting has new connections
/// steered to the other: of 30 requests one after another,
/// only those that reached its queue before the primary noticed (20 ms
/// without progress) wait for it; once it accepts again, it serves again.
#[tokio::test]
async fn a_worker_that_stops_accepting_gets_no_new_connections_until_it_takes_its_queue() {
    let run = Run::python(&["--policy", "reuseport"], &[]).await;
    let status = run.try_status().await.unwrap();
    let port = Run::port(&status);
    let hold = run.dir.0.join("hold-0");
    std::fs::write(&hold, "").unwrap();
    let mut waited = Vec::new();
    for _ in 0..30 {
        let started = Instant::now();
        // A request queued behind the held worker is given up after 4 s.
        let answer = tokio::task::spawn_blocking(move || {
            let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
            stream.set_read_timeout(Some(Duration::from_secs(4)))?;
            stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut response = String::new();
            stream.read_to_string(&mut response).map(|_| response)
        })
        .await
        .unwrap();
        if answer.is_err() {
            waited.push(started.elapsed());
        }
    }
    assert!(
        waited.len() <= 3,
        "{} of 30 requests waited for the held worker: {waited:?}",
        waited.len()
    );
    std::fs::remove_file(&hold).unwrap();
    served_by_all(port, &pids(&status)).await;
}

/// Under reuseport, scaling 4 → 2 under `Connection: close` load loses no
/// request: the removed slots get no new connection, and what waited in their queues
/// when their workers exited is taken by the primary and served by the
/// others instead of being reset with the socket.
#[tokio::test]
async fn scaling_down_under_load_loses_no_queued_connection() {
    let run = Run::start(
        &["-w", "4", "-l", "web=127.0.0.1:0", "--policy", "reuseport"],
        &["python3", "worker.py"],
        &[],
    )
    .await;
    let status = run.until_ready(4).await;
    // Every worker is serving (past its start), so the two that go stop
    // gracefully and say so.
    run.printed("listen-env ok", 4).await;
    let port = Run::port(&status);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u32, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    match get(port) {
                        Ok(_) => ok += 1,
                        Err(error) => failed.push(error.to_string()),
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    let (code, _, err) = run.ctl(&["scale", "2"]).await;
    assert_eq!(code, 0, "{err}");
    run.printed(" done", 2).await;
    run.until_ready(2).await;
    get_async(port).await.expect("the cluster serves");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failed) = (0, Vec::new());
    for client in clients {
        let (o, f) = client.join().unwrap();
        ok += o;
        failed.extend(f);
    }
    assert!(ok > 0);
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        ok as usize + failed.len()
    );
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

/// The `--ready-timeout` of the tests that gate readiness: the time a
/// worker has from its start to report ready once its gate opens, so long
/// enough for Python or Node to start on a loaded machine; a reload whose
/// new workers never report ready fails after it.
const READY_TIMEOUT: &str = "10s";

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
            READY_TIMEOUT,
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
    if !prerequisite("node", node_available()) {
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
            READY_TIMEOUT,
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

/// One worker, a shell that ignores SIGTERM, stopped with `flag 300ms`;
/// returned once it ignores the signal (a stop that came earlier would end
/// it at once).
async fn ignoring_term(flag: &str) -> Run {
    let run = Run::start(
        &["-w", "1", flag, "300ms"],
        &[
            "sh",
            "-c",
            "trap '' TERM; echo ignoring-term; while :; do sleep 0.05; done",
        ],
        &[],
    )
    .await;
    run.until_ready(1).await;
    run.printed("ignoring-term", 1).await;
    run
}

#[tokio::test]
async fn a_worker_that_ignores_the_stop_signal_is_killed_after_the_kill_timeout() {
    let mut run = ignoring_term("--kill-timeout").await;
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
    let primary = run.child.id().unwrap();
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
    // The primary's own records: the same schema, without a worker.
    let records = run.stderr.lock().unwrap().clone();
    let mut started = 0;
    for line in &records {
        let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        let ts = value["ts"].as_str().unwrap();
        assert!(
            ts.len() == 24 && ts.ends_with('Z') && ts.as_bytes()[10] == b'T',
            "{line}"
        );
        assert!(value["pid"].is_u64() && value["line"].is_string(), "{line}");
        assert_eq!(value["stream"], "stderr", "{line}");
        if value.get("worker").is_none() {
            assert!(value["level"].is_string(), "{line}");
            assert_eq!(value["pid"].as_u64(), Some(u64::from(primary)), "{line}");
        }
        if value["line"] == "worker started" {
            assert!(value["fields"]["worker"].is_u64(), "{line}");
            started += 1;
        }
    }
    assert_eq!(started, 2, "{records:#?}");
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
/// `hang-INDEX` exists it stops pinging once the file `silence` exists too,
/// but stays alive. On
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
print("watchdog worker pid %d index %s usec %s for %s" % (os.getpid(), index,
      os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID")), flush=True)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
while not (os.path.exists(hang) and os.path.exists("silence")):
    s.sendto(b"WATCHDOG=1", os.environ["NOTIFY_SOCKET"])
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
        prerequisite("a user nobody and a group nogroup", false);
        return;
    };
    if !prerequisite("root", rustix::process::geteuid().is_root()) {
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

/// The worker in slot 0 pings until the test creates the file `silence`,
/// then hangs; the one in slot 1 pings every 30 ms throughout. The watchdog
/// (2 s, some 60 pings) leaves the healthy worker a wide margin on a loaded
/// machine, and the hang starts only once the test has seen both ready.
#[tokio::test]
async fn a_worker_that_stops_sending_watchdog_gets_sigabrt_and_is_replaced() {
    let run = Run::start(
        &["-w", "2", "--ready", "notify", "--watchdog", "2s"],
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
    std::fs::write(run.dir.0.join("silence"), "").unwrap();
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
    eventually("the primary says why it killed the worker", || {
        run.output().contains("stopped sending WATCHDOG=1")
    })
    .await;
    run.printed(&format!("usec 2000000 for {hung}"), 1).await;
}

/// Fails today: with --user the worker cannot send READY=1. Its
/// NOTIFY_SOCKET is `CONTROL.notify/ID.sock`, which sits in the control
/// socket's directory (made 0700 root by `run`), and the socket file itself is
/// root's, mode 0755 by the umask, so `sendto` from uid nobody is EACCES.
#[tokio::test]
async fn workers_running_as_another_user_can_report_readiness() {
    if !prerequisite("a user nobody", etc_id("/etc/passwd", "nobody").is_some())
        || !prerequisite("root", rustix::process::geteuid().is_root())
    {
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

/// The socket (`socket:[INODE]`) a process has at fd 3.
fn fd3(pid: u32) -> String {
    std::fs::read_link(format!("/proc/{pid}/fd/3"))
        .map(|p| p.display().to_string())
        .unwrap_or_default()
}

fn slot_pid(status: &Value, index: u64) -> Option<u32> {
    status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["index"] == index && w["state"] == "ready")
        .map(|w| w["pid"].as_u64().unwrap() as u32)
}

#[tokio::test]
async fn reuseport_gives_each_slot_its_own_socket_kept_across_its_restarts() {
    let run = Run::python(&["--policy", "reuseport"], &[]).await;
    let before = run.try_status().await.unwrap();
    assert_eq!(before["policy"], "reuseport");
    let (first, second) = (slot_pid(&before, 0).unwrap(), slot_pid(&before, 1).unwrap());
    let (socket0, socket1) = (fd3(first), fd3(second));
    assert!(socket0.starts_with("socket:["), "{socket0}");
    assert_ne!(socket0, socket1, "one socket per slot");
    served_by_all(Run::port(&before), &pids(&before)).await;
    kill_pid(first, Signal::KILL);
    let after = run
        .status_until("slot 0 has a new ready worker", |s| {
            slot_pid(s, 0).is_some_and(|p| p != first)
        })
        .await;
    let replacement = slot_pid(&after, 0).unwrap();
    assert_eq!(fd3(replacement), socket0, "the slot keeps its socket");
    served_by_all(Run::port(&after), &pids(&after)).await;
}

#[tokio::test]
async fn round_robin_is_refused_with_the_reason() {
    let mut run = Run::start(
        &["-w", "1", "-l", "127.0.0.1:0", "--policy", "round-robin"],
        &["python3", "worker.py"],
        &[],
    )
    .await;
    assert_eq!(run.exit_code().await, 2);
    let output = run.output();
    assert!(
        output.contains("round-robin is not available") && output.contains("reuseport"),
        "{output}"
    );
}

/// One HTTP/1.0 GET on a new connection from `source` (a loopback
/// address); the body (`ID PID INDEX`).
fn get_from(port: u16, source: std::net::IpAddr) -> std::io::Result<String> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&std::net::SocketAddr::new(source, 0).into())?;
    socket.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())?;
    let mut stream = std::net::TcpStream::from(socket);
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.contains(" 200 ") => Ok(body.trim().to_string()),
        _ => Err(std::io::Error::other(format!("bad response {response:?}"))),
    }
}

/// The slot (`INDEX`) that answers each of `sources`, asking each `rounds`
/// times: one slot per source, or the test fails.
async fn slots_by_source(port: u16, sources: &[std::net::IpAddr], rounds: usize) -> Vec<u64> {
    let sources = sources.to_vec();
    tokio::task::spawn_blocking(move || {
        sources
            .iter()
            .map(|source| {
                let answers: std::collections::BTreeSet<u64> = (0..rounds)
                    .map(|_| {
                        let body = get_from(port, *source).expect("a worker answers");
                        body.split(' ').nth(2).unwrap().parse().unwrap()
                    })
                    .collect();
                assert_eq!(answers.len(), 1, "{source} reached slots {answers:?}");
                *answers.first().unwrap()
            })
            .collect()
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn sticky_ip_sends_each_client_address_to_one_slot_across_its_restarts() {
    let run = Run::start(
        &["-w", "3", "-l", "web=127.0.0.1:0", "--policy", "sticky:ip"],
        &["python3", "worker.py"],
        &[],
    )
    .await;
    run.until_ready(3).await;
    let status = run.try_status().await.unwrap();
    assert_eq!(status["policy"], "sticky:ip");
    let port = Run::port(&status);
    let sources: Vec<std::net::IpAddr> = (0..60)
        .map(|i| std::net::IpAddr::from([127, 40, 0, 1 + i]))
        .collect();
    let before = slots_by_source(port, &sources, 3).await;
    let used: std::collections::BTreeSet<u64> = before.iter().copied().collect();
    assert_eq!(used.len(), 3, "every slot gets clients: {before:?}");
    // Slot 1's worker dies: its next worker gets its clients back.
    let victim = slot_pid(&status, 1).unwrap();
    kill_pid(victim, Signal::KILL);
    run.status_until("slot 1 has a new ready worker", |s| {
        slot_pid(s, 1).is_some_and(|p| p != victim)
    })
    .await;
    let after = slots_by_source(port, &sources, 2).await;
    assert_eq!(before, after);
}

#[tokio::test]
async fn sticky_keys_read_from_requests_are_refused_by_the_command_with_the_reason() {
    let mut run = Run::start(
        &[
            "-w",
            "1",
            "-l",
            "127.0.0.1:0",
            "--policy",
            "sticky:cookie=sid",
        ],
        &["python3", "worker.py"],
        &[],
    )
    .await;
    assert_eq!(run.exit_code().await, 2);
    let output = run.output();
    assert!(
        output.contains("not available to programs run by the command")
            && output.contains("sticky:ip"),
        "{output}"
    );
}

/// Requests `count` times; every one must be answered.
async fn serves(port: u16, count: usize) {
    for _ in 0..count {
        get_async(port).await.expect("a worker answers");
    }
}

#[tokio::test]
async fn closed_stdout_and_stderr_do_not_stop_the_primary() {
    let (mut run, stdout, stderr) = Run::start_raw(
        &["-w", "2", "-l", "127.0.0.1:0"],
        &["python3", "worker.py"],
        &["flood"],
    )
    .await;
    // The reader goes away, as `| head -2` does.
    drop((stdout, stderr));
    let ready = run.until_ready(2).await;
    let port = Run::port(&ready);
    let lost = run
        .status_until("lines to both closed streams are counted as lost", |s| {
            s["output_lost"]["stdout"].as_u64() > Some(0)
                && s["output_lost"]["stderr"].as_u64() > Some(0)
        })
        .await;
    assert_eq!(pids(&lost), pids(&ready), "no worker was restarted");
    // The primary's own records go to the closed stderr too.
    let (code, _, err) = run.ctl(&["scale", "+1"]).await;
    assert_eq!(code, 0, "{err}");
    run.until_ready(3).await;
    serves(port, 20).await;
    let (code, _, _) = run.ctl(&["stop"]).await;
    assert_eq!(code, 0);
    assert_eq!(run.exit_code().await, 0, "a clean stop, no panic");
}

#[tokio::test]
async fn a_full_stdout_stalls_nothing_and_the_loss_is_reported_once_it_drains() {
    let (mut run, stdout, stderr) = Run::start_raw(
        &["-w", "2", "-l", "127.0.0.1:0"],
        &["python3", "worker.py"],
        &["flood"],
    )
    .await;
    // stderr is read; stdout is a pipe nobody reads (yet).
    let (errors, err_reader) = collect(stderr);
    run.stderr = errors;
    run.readers.push(err_reader);
    let ready = run.until_ready(2).await;
    let status = run
        .status_until("the full stdout drops lines", |s| {
            s["output_lost"]["stdout"].as_u64() > Some(0)
        })
        .await;
    assert_eq!(pids(&status), pids(&ready), "no worker was restarted");
    serves(Run::port(&status), 20).await;
    // The reader comes back: the primary says how much it lost.
    let (lines, out_reader) = collect(stdout);
    run.stdout = lines;
    run.readers.push(out_reader);
    run.printed("line(s) of output to stdout were lost", 1)
        .await;
    let (code, _, _) = run.ctl(&["stop"]).await;
    assert_eq!(code, 0);
    assert_eq!(run.exit_code().await, 0);
}

#[tokio::test]
async fn a_worker_that_misses_the_ready_timeout_is_stopped_gracefully_and_told_why() {
    // It serves, but never sends READY=1 (as uvicorn under --ready notify).
    let mut run = Run::start(
        &[
            "-w",
            "1",
            "-l",
            "127.0.0.1:0",
            "--ready",
            "notify",
            "--ready-timeout",
            "1s",
            "--kill-timeout",
            "20s",
        ],
        &["python3", "worker.py"],
        &["never"],
    )
    .await;
    // Its SIGTERM handler finishes and prints `done`: it was asked, not killed.
    run.printed(" done", 1).await;
    let _ = run.ctl(&["stop"]).await;
    let _ = run.exit_code().await;
    let output = run.output();
    assert!(
        output.contains("no READY=1 on NOTIFY_SOCKET within 1s")
            && output.contains("does the program speak sd_notify? try --ready delay:2s or none"),
        "{output}"
    );
}

impl Run {
    /// `procluster run` started by `sh -c 'ulimit LIMIT; exec procluster run …'`.
    async fn with_limit(limit: &str, args: &[&str], program: &[&str]) -> Self {
        let dir = TempDir::new("cli-limit");
        let control = dir.0.join("control.sock");
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit {limit} && exec \"$0\" \"$@\""))
            .arg(procluster())
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
            .expect("start procluster run under a limit");
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
}

/// `Max open files` of a process: (soft, hard).
fn open_files_limit(pid: u32) -> (String, String) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[3].to_string(), fields[4].to_string())
}

#[tokio::test]
async fn the_primary_raises_its_open_file_limit_and_workers_get_theirs_back() {
    let hard = rustix::process::getrlimit(rustix::process::Resource::Nofile).maximum;
    // 100 workers need about 500 descriptors in the primary.
    let enough = hard.is_none_or(|h| h >= 1024);
    if !prerequisite(
        &format!("a hard open-file limit of 1024 or more (it is {hard:?})"),
        enough,
    ) {
        return;
    }
    let run = Run::with_limit(
        "-Sn 128",
        &["-w", "100", "-l", "127.0.0.1:0"],
        &["sleep", "1000"],
    )
    .await;
    let status = run.until_ready(100).await;
    let primary = run.child.id().unwrap();
    let (soft, hard) = open_files_limit(primary);
    assert_eq!(soft, hard, "the primary runs at its hard limit");
    let worker = pids(&status)[0];
    assert_eq!(open_files_limit(worker).0, "128", "the worker's own limit");
    let (code, _, _) = run.ctl(&["stop"]).await;
    assert_eq!(code, 0);
}

#[tokio::test]
async fn spawns_out_of_descriptors_are_retried_while_the_others_serve() {
    // The hard limit too: not every worker fits.
    let run = Run::with_limit(
        "-n 64",
        &["-w", "30", "-l", "127.0.0.1:0"],
        &["sleep", "1000"],
    )
    .await;
    run.printed_err("for lack of resources").await;
    let some = run
        .status_until("some workers run", |s| {
            s["workers"].as_array().unwrap().len() >= 3
        })
        .await;
    assert_eq!(some["desired"], 30);
    assert_eq!(some["breaker_tripped"], false, "not a crash loop");
    // Fewer slots: those left all get a worker; the primary never gave up.
    let (code, _, err) = run.ctl(&["scale", "3"]).await;
    assert_eq!(code, 0, "{err}");
    run.until_ready(3).await;
    let output = run.output();
    assert!(!output.contains("crash loop"), "{output}");
    assert!(output.contains("Too many open files"), "{output}");
}

/// `procluster ARGS` run to its end: exit status and stderr.
async fn procluster_once(args: &[&str], dir: &Path) -> (i32, String) {
    let out = tokio::time::timeout(
        DEADLINE,
        Command::new(procluster())
            .args(args)
            .current_dir(dir)
            .env_remove("LISTEN_FDS")
            .stdin(Stdio::null())
            .output(),
    )
    .await
    .expect("procluster ends in time")
    .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn small_mistakes_get_the_conventional_status_and_a_useful_message() {
    let dir = TempDir::new("cli-mistakes");
    std::fs::write(dir.0.join("server.sh"), "#!/bin/sh\nsleep 1\n").unwrap();
    let control = dir.0.join("c.sock");
    let control = control.to_str().unwrap();

    let (code, err) =
        procluster_once(&["run", "--control", control, "--", "./server.sh"], &dir.0).await;
    assert_eq!(code, 126, "exists but is not executable: {err}");
    assert!(err.contains("not executable"), "{err}");

    let (code, err) =
        procluster_once(&["run", "-l", "tcp//127.0.0.1:80", "--", "true"], &dir.0).await;
    assert_eq!(
        code, 2,
        "a malformed listen address is a usage error: {err}"
    );
    assert!(err.contains("did you mean tcp://"), "{err}");

    let (code, err) = procluster_once(
        &[
            "run",
            "-l",
            "web=127.0.0.1:0",
            "-l",
            "web=127.0.0.1:0",
            "--",
            "true",
        ],
        &dir.0,
    )
    .await;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("two listeners are named \"web\""), "{err}");

    let (code, err) = procluster_once(&["run", "-w", "2", "python3", "app.py"], &dir.0).await;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("unexpected argument 'python3'")
            && err.contains("procluster run -w 2 -- python3 app.py"),
        "{err}"
    );
}

#[tokio::test]
async fn a_cluster_without_any_listener_is_warned_about() {
    let mut run = Run::start(&["-w", "1"], &["sh", "-c", "echo up; sleep 100"], &[]).await;
    run.printed("up", 1).await;
    run.printed_err("no listener").await;
    let (code, _, _) = run.ctl(&["stop"]).await;
    assert_eq!(code, 0);
    assert_eq!(run.exit_code().await, 0);
}

#[tokio::test]
async fn env_env_file_chdir_backlog_and_pidfile_reach_the_workers() {
    let dir = TempDir::new("cli-flags");
    let home = dir.0.join("home");
    std::fs::create_dir(&home).unwrap();
    let env_file = dir.0.join("app.env");
    std::fs::write(
        &env_file,
        "# settings\nexport FROM_FILE='file value'\nSHARED=file\n",
    )
    .unwrap();
    let pidfile = dir.0.join("primary.pid");
    let mut run = Run::start(
        &[
            "-w",
            "1",
            "-l",
            "127.0.0.1:0",
            "--backlog",
            "77",
            "--env-file",
            env_file.to_str().unwrap(),
            "-e",
            "SHARED=flag",
            "--env",
            "EMPTY=",
            "--chdir",
            home.to_str().unwrap(),
            "--pidfile",
            pidfile.to_str().unwrap(),
        ],
        &[
            "sh",
            "-c",
            "echo \"env [$FROM_FILE] [$SHARED] [${EMPTY-unset}] cwd $(pwd)\"; exec sleep 1000",
        ],
        &[],
    )
    .await;
    let status = run.until_ready(1).await;
    run.printed("env [", 1).await;
    let line = run
        .stdout
        .lock()
        .unwrap()
        .iter()
        .find(|l| l.contains("env ["))
        .cloned()
        .unwrap();
    assert!(
        line.ends_with(&format!(
            "env [file value] [flag] [] cwd {}",
            home.display()
        )),
        "{line}"
    );
    let primary = run.child.id().unwrap();
    assert_eq!(
        std::fs::read_to_string(&pidfile).unwrap().trim(),
        primary.to_string()
    );
    let port = Run::port(&status);
    let listeners = procluster_tests::ss_listeners(port);
    assert!(
        !listeners.is_empty() && listeners.iter().all(|l| l.send_q == 77),
        "{}",
        listeners.len()
    );
    let (code, _, _) = run.ctl(&["stop"]).await;
    assert_eq!(code, 0);
    assert_eq!(run.exit_code().await, 0);
    assert!(!pidfile.exists(), "the pid file goes with the primary");
}

#[tokio::test]
async fn graceful_timeout_is_the_kill_timeout() {
    let mut run = ignoring_term("--graceful-timeout").await;
    let (code, _, _) = run.ctl(&["stop"]).await;
    assert_eq!(code, 0);
    assert_eq!(
        run.exit_code().await,
        1,
        "killed after the graceful timeout"
    );
}

/// Waits until slot 0's worker is no longer `first` and the new one is
/// ready; the status then.
async fn replaced(run: &Run, first: u32) -> Value {
    run.status_until("slot 0 has a new ready worker", |s| {
        slot_pid(s, 0).is_some_and(|p| p != first)
    })
    .await
}

#[tokio::test]
async fn max_age_recycles_workers_new_first() {
    // One worker: a recycle replaces it while others may still start.
    let run = Run::start(
        &[
            "-w",
            "1",
            "-l",
            "127.0.0.1:0",
            "--max-age",
            "2s",
            "--ready",
            "notify",
        ],
        &["python3", "worker.py"],
        &[],
    )
    .await;
    let ready = run
        .status_until("slot 0 has a ready worker", |s| slot_pid(s, 0).is_some())
        .await;
    let first = slot_pid(&ready, 0).unwrap();
    let after = replaced(&run, first).await;
    let recycled = after["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["index"] == 0)
        .unwrap()
        .clone();
    assert_eq!(
        recycled["restarts"], 0,
        "a recycle is not a restart: {after}"
    );
    assert!(
        run.output().contains("recycling worker"),
        "{}",
        run.output()
    );
}

#[tokio::test]
async fn max_requests_recycles_a_worker_by_the_count_it_reports() {
    let run = Run::start(
        &[
            "-w",
            "1",
            "-l",
            "127.0.0.1:0",
            "--max-requests",
            "5",
            "--max-requests-jitter",
            "0",
            "--ready",
            "notify",
        ],
        &["python3", "worker.py"],
        &["count"],
    )
    .await;
    let status = run.until_ready(1).await;
    let first = slot_pid(&status, 0).unwrap();
    let port = Run::port(&status);
    serves(port, 5).await;
    replaced(&run, first).await;
    let output = run.output();
    assert!(output.contains("requests (limit 5)"), "{output}");
}

#[tokio::test]
async fn max_memory_counts_the_workers_whole_process_tree() {
    // The worker itself is small; the child it starts holds 64 MiB.
    let worker = r#"
import signal, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "b = bytearray(64 << 20)\nimport time\ntime.sleep(1000)"])
def stop(*_):
    child.kill()
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
print("tree up", flush=True)
while True:
    time.sleep(1)
"#;
    let run = Run::start(
        &["-w", "1", "--max-memory", "40M"],
        &["python3", "-c", worker],
        &[],
    )
    .await;
    let status = run.until_ready(1).await;
    let first = slot_pid(&status, 0).unwrap();
    let own = procluster_tests::rss_bytes(first).unwrap_or(0);
    assert!(own < 40 << 20, "the worker alone is under the limit: {own}");
    replaced(&run, first).await;
    assert!(run.output().contains("memory"), "{}", run.output());
}

/// The real programs of the README's table, installed by
/// `scripts/test-deps` in `.test-deps/` at the workspace root.
fn test_deps() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.test-deps")
}

/// Whether a program of `scripts/test-deps` is installed (skipped with a
/// message if not, failed under CI).
fn installed(path: &Path, what: &str) -> bool {
    prerequisite(
        &format!("{what} at {} (run scripts/test-deps)", path.display()),
        path.exists(),
    )
}

/// The `procluster run …` command of the README's PM2/gunicorn table whose
/// program is `program`, as words.
fn readme_command(program: &str) -> Vec<String> {
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md"))
            .expect("README.md");
    let table = readme
        .split("### For users of PM2, gunicorn and systemd")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").find(|block| block.starts_with('|')))
        .expect("the README's table");
    table
        .split('`')
        .filter(|code| code.starts_with("procluster run "))
        .map(|code| {
            code.split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        })
        .find(|words| {
            words
                .iter()
                .position(|w| w == "--")
                .is_some_and(|at| words.get(at + 1).is_some_and(|p| p == program))
        })
        .unwrap_or_else(|| panic!("no `procluster run … -- {program}` in the README's table"))
}

/// A Python WSGI app for gunicorn: `ID PID INDEX`.
const WSGI_APP: &str = r#"
import os
def app(environ, start_response):
    body = ("%s %s %s\n" % (os.environ["PROCLUSTER_WORKER_ID"], os.getpid(), os.environ["PROCLUSTER_WORKER_INDEX"])).encode()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]
"#;

/// A Python ASGI app for uvicorn: `ID PID INDEX`.
const ASGI_APP: &str = r#"
import os
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = ("%s %s %s\n" % (os.environ["PROCLUSTER_WORKER_ID"], os.getpid(), os.environ["PROCLUSTER_WORKER_INDEX"])).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
"#;

/// Node's plain `http`, as the README's PM2 row says.
const NODE_APP: &str = r#"
const http = require('http');
const server = http.createServer((req, res) =>
  res.end(`${process.env.PROCLUSTER_WORKER_ID} ${process.pid} ${process.env.PROCLUSTER_WORKER_INDEX}\n`));
server.listen({ fd: 3 }, () => process.send('ready'));
process.on('SIGTERM', () => server.close(() => process.exit(0)));
"#;

/// The same with express.
const EXPRESS_APP: &str = r#"
const app = require('express')();
app.get('/', (req, res) =>
  res.send(`${process.env.PROCLUSTER_WORKER_ID} ${process.pid} ${process.env.PROCLUSTER_WORKER_INDEX}\n`));
const server = app.listen({ fd: 3 }, () => process.send('ready'));
process.on('SIGTERM', () => server.close(() => process.exit(0)));
"#;

impl Run {
    /// Runs a README command: its port becomes 0 (any free one), the
    /// control socket is the run's own; `app` is written to `file` in the
    /// run's directory, and `env` is added to procluster's environment.
    async fn readme(command: &[String], file: &str, app: &str, env: &[(&str, String)]) -> Self {
        let dir = TempDir::new("cli-readme");
        std::fs::write(dir.0.join(file), app).unwrap();
        let control = dir.0.join("control.sock");
        let args: Vec<String> = command[2..]
            .iter()
            .map(|word| match word.rsplit_once(':') {
                Some((host, port)) if host == "127.0.0.1" && port.parse::<u16>().is_ok() => {
                    "127.0.0.1:0".to_string()
                }
                _ => word.clone(),
            })
            .collect();
        let mut child = Command::new(procluster());
        child
            .arg("run")
            .arg("--control")
            .arg(&control)
            .args(&args)
            .current_dir(&dir.0)
            .env_remove("NOTIFY_SOCKET")
            .env_remove("LISTEN_FDS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (key, value) in env {
            child.env(key, value);
        }
        let mut child = child.spawn().expect("start a README command");
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

    /// The number of workers the command asked for.
    fn workers_of(command: &[String]) -> usize {
        let at = command.iter().position(|w| w == "-w").expect("-w");
        match command[at + 1].as_str() {
            "auto" => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n.parse().unwrap(),
        }
    }

    /// Ready, served by every worker, reloaded with `reload --wait` under
    /// requests that all get answers, served by the new workers, stopped
    /// with exit 0. `resets_per_old_worker`: how many connections an old
    /// worker's own shutdown may reset (a server's known race, never the
    /// cluster's); every other failure fails the test.
    async fn behaves_as_the_readme_says(mut self, workers: usize, resets_per_old_worker: usize) {
        let ready = self.until_ready(workers).await;
        let port = Run::port(&ready);
        served_by_ids(port, &ids(&ready)).await;
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
        let (code, out, err) = self.ctl(&["reload", "--wait"]).await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(code, 0, "{out}{err}\n{}", self.output());
        let (ok, failed) = load.await.unwrap();
        let resets = failed
            .iter()
            .filter(|e| e.contains("Connection reset by peer"))
            .count();
        assert!(
            ok > 0 && failed.len() == resets && resets <= resets_per_old_worker * workers,
            "{} failed of {}: {failed:?}",
            failed.len(),
            ok + failed.len()
        );
        let after = self.until_ready(workers).await;
        assert!(
            pids(&after).iter().all(|p| !pids(&ready).contains(p)),
            "every worker is new"
        );
        served_by_ids(port, &ids(&after)).await;
        let (code, _, _) = self.ctl(&["stop"]).await;
        assert_eq!(code, 0);
        assert_eq!(self.exit_code().await, 0, "{}", self.output());
    }
}

/// The workers' ids (`PROCLUSTER_WORKER_ID`), sorted.
fn ids(status: &Value) -> Vec<u64> {
    let mut ids: Vec<u64> = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_u64().unwrap())
        .collect();
    ids.sort_unstable();
    ids
}

/// Requests until every worker id in `wanted` has answered (by the first
/// field of the body: a forking server answers from a child process, with
/// the worker's id but a pid of its own).
async fn served_by_ids(port: u16, wanted: &[u64]) {
    let mut seen = std::collections::BTreeSet::new();
    let start = Instant::now();
    while !wanted.iter().all(|id| seen.contains(id)) {
        let body = get_async(port).await.expect("a worker answers");
        seen.insert(body.split(' ').next().unwrap().parse::<u64>().unwrap());
        assert!(
            start.elapsed() < DEADLINE,
            "not every worker served: wanted {wanted:?}, saw {seen:?}"
        );
    }
}

fn venv_path() -> String {
    let bin = test_deps().join("venv/bin");
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

#[tokio::test]
async fn the_readmes_gunicorn_command_serves_reloads_and_scales_by_signal() {
    if !installed(&test_deps().join("venv/bin/gunicorn"), "gunicorn") {
        return;
    }
    let command = readme_command("gunicorn");
    let workers = Run::workers_of(&command);
    let run = Run::readme(&command, "app.py", WSGI_APP, &[("PATH", venv_path())]).await;
    let ready = run.until_ready(workers).await;
    // gunicorn's signals, sent to the primary.
    let primary = run.child.id().unwrap();
    kill_pid(primary, Signal::TTIN);
    run.until_ready(workers + 1).await;
    kill_pid(primary, Signal::TTOU);
    run.until_ready(workers).await;
    kill_pid(primary, Signal::HUP);
    run.status_until("SIGHUP reloaded every worker", |s| {
        s["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["generation"] == 1 && w["state"] == "ready")
            .count()
            == workers
    })
    .await;
    let output = run.output();
    assert!(!output.contains("Bad file descriptor"), "{output}");
    assert!(
        !output.contains("gunicorn.ctl"),
        "no control socket of gunicorn's: {output}"
    );
    let _ = ready;
    run.behaves_as_the_readme_says(workers, 0).await;
}

#[tokio::test]
async fn the_readmes_uvicorn_command_serves_and_reloads() {
    if !installed(&test_deps().join("venv/bin/uvicorn"), "uvicorn") {
        return;
    }
    let command = readme_command("uvicorn");
    let workers = Run::workers_of(&command);
    let run = Run::readme(&command, "app.py", ASGI_APP, &[("PATH", venv_path())]).await;
    // uvicorn's shutdown stops listening and, in the same loop iteration,
    // closes every connection whose request it has not parsed yet: one it
    // accepted a moment before its SIGTERM is reset with the request unread
    // (uvicorn discussion 2315; gunicorn's UvicornWorker sees the same).
    // Nothing queued in the cluster's socket is lost: that stays for the
    // new workers.
    run.behaves_as_the_readme_says(workers, 1).await;
}

#[tokio::test]
async fn the_readmes_node_command_serves_and_reloads_with_plain_http_and_express() {
    let modules = test_deps().join("node/node_modules");
    if !prerequisite("node", node_available()) {
        return;
    }
    if !installed(&modules.join("express"), "express") {
        return;
    }
    let command = readme_command("node");
    let workers = Run::workers_of(&command);
    for app in [NODE_APP, EXPRESS_APP] {
        let env = [("NODE_PATH", modules.display().to_string())];
        let run = Run::readme(&command, "app.js", app, &env).await;
        run.behaves_as_the_readme_says(workers, 0).await;
    }
}
mod telemetry;
