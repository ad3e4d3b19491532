//! Shared pieces of the integration tests: the messages the test worker
//! understands, and helpers to wait for events with generous deadlines.

pub mod bus;
pub mod redis;
pub mod store;
pub mod telemetry;

use std::path::PathBuf;
use std::time::Duration;

use procluster::primary::{Cluster, ClusterBuilder, Event, WorkerHandle};
use procluster::{ExitStatus, Message, Signal, WorkerId};
use rustix::process::Pid;
use serde::{Deserialize, Serialize};

/// Long enough for a loaded 2-core machine; tests wait for events, never
/// sleep for them.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A cluster builder running `program` (the test worker) in `mode`.
pub fn builder_for(program: &str, mode: &str) -> ClusterBuilder {
    Cluster::builder().exec(program).args([mode]).workers(1)
}

/// The next event, failing the test after [`DEADLINE`].
pub async fn next(cluster: &mut Cluster) -> Event {
    tokio::time::timeout(DEADLINE, cluster.next_event())
        .await
        .expect("timed out waiting for a cluster event")
        .expect("the cluster ended before the expected event")
}

/// Reads events until `pick` accepts one, returning what it returned and
/// every event passed on the way.
pub async fn until<T>(
    cluster: &mut Cluster,
    mut pick: impl FnMut(&Event) -> Option<T>,
) -> (T, Vec<Event>) {
    let mut seen = Vec::new();
    loop {
        let event = next(cluster).await;
        if let Some(found) = pick(&event) {
            seen.push(event);
            return (found, seen);
        }
        seen.push(event);
    }
}

/// A short name for an event, to compare sequences.
pub fn name(event: &Event) -> &'static str {
    match event {
        Event::Fork(_) => "fork",
        Event::Online(_) => "online",
        Event::Listening { .. } => "listening",
        Event::Ready(_) => "ready",
        Event::Message { .. } => "message",
        Event::Disconnect(_) => "disconnect",
        Event::Exit { .. } => "exit",
        Event::Error { .. } => "error",
        _ => "other",
    }
}

/// Whether this is a CI run: the `CI` environment variable is set (and not
/// empty, `0` or `false`), as CI services set it.
pub fn in_ci() -> bool {
    std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Whether a test whose prerequisite may be missing on a developer's machine
/// (node, root, IPv6...) goes on: `true` when `available`. When it is
/// missing, a CI run ([`in_ci`]) fails right here, naming it, so that no test
/// passes in CI without having run; elsewhere the test is skipped with a
/// note on stderr.
///
/// ```no_run
/// # fn ipv6() -> bool { true }
/// if !procluster_tests::prerequisite("an IPv6 loopback", ipv6()) {
///     return;
/// }
/// ```
#[track_caller]
pub fn prerequisite(what: &str, available: bool) -> bool {
    if available {
        return true;
    }
    assert!(
        !in_ci(),
        "missing prerequisite: {what} (CI is set, so the test fails instead of skipping)"
    );
    eprintln!("skipped: missing prerequisite: {what} (with CI set, this fails)");
    false
}

/// Number of open descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd lists the open descriptors (Linux procfs)")
        .count()
}

/// Whether a process exists (and is not a zombie).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// Waits until `check` holds, polling every few milliseconds, up to
/// [`DEADLINE`]. For conditions the OS offers no event for (a process
/// disappearing).
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !check() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What the primary can ask of a worker in `serve` mode.
#[derive(Debug, Serialize, Deserialize)]
pub enum Command {
    /// Reply with the same text.
    Echo(String),
    /// Reply with the same bytes (large message test).
    EchoBytes(Vec<u8>),
    /// Reply with the number of bytes received.
    CountBytes(Vec<u8>),
    /// Send `n` numbered messages as fast as possible.
    Flood(u64),
    /// Relay text to another worker.
    RelayTo(WorkerId, String),
    /// Read the fds that came with the message and report how many.
    CountFds,
    /// Send back the fd that came with the message, twice in one message.
    ReturnFd,
    /// Disconnect itself.
    Disconnect,
    /// Exit with this code.
    Exit(i32),
    /// Report this process's environment and working directory.
    Describe,
    /// Start a child and report whether it sees worker variables.
    ChildEnv,
    /// Start a child and report which descriptors it has, and what the
    /// worker's own channel is, to show the child did not inherit it.
    ChildFds,
    /// Open the cluster's service `service`, send `text` through it (with
    /// a descriptor of /dev/null attached if `with_fd`), and reply
    /// `ServiceEcho` with what came back, or with the error.
    ServiceEcho {
        service: String,
        text: String,
        with_fd: bool,
    },
    /// Start this program again as a child that reports what `role()` says,
    /// with a socket made by the worker at fd 3: the worst case of a child
    /// that inherits the worker's environment and finds a socket at fd 3.
    ChildRole,
    /// Reply `Echo` with the same text, with the message's fds attached.
    EchoWithFds(String),
    /// Reply with the same blob (bulk bytes, compact in the binary format).
    EchoBlob(Blob),
    /// Send `count` messages (`Reply::Padded`), each with one descriptor and
    /// `padding` bytes of text, from a task of its own while the worker goes
    /// on serving commands.
    SendFds { count: u64, padding: usize },
    /// In `pool` mode: submit `Echo(0..count)` to the test pool from this
    /// worker and reply `PoolSubmitted` with every answer.
    PoolSubmit { count: u64 },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Reply {
    Echo(String),
    EchoBytes(Vec<u8>),
    Count(usize),
    Seq(u64),
    Relayed {
        from: Option<WorkerId>,
        text: String,
    },
    Described {
        env: Vec<(String, String)>,
        cwd: String,
        id: WorkerId,
        index: Option<usize>,
    },
    ChildEnv(String),
    /// What `role()` said in a child of the worker.
    ChildRole(String),
    /// What a service echoed (`Ok(text, descriptors that came back)`), or why
    /// the service could not be used.
    ServiceEcho(Result<(String, usize), String>),
    Fds(usize),
    /// What `ChildFds` saw: the link target of the worker's channel (fd 3)
    /// and of every descriptor of the child.
    ChildFds {
        channel: String,
        child: Vec<String>,
    },
    Blob(Blob),
    Padded {
        seq: u64,
        padding: String,
    },
    /// What a worker's own submissions to the test pool came back with.
    PoolSubmitted(Result<Vec<PoolAnswer>, String>),
}

/// The name of the test worker's pool (`pool` mode).
pub const TEST_POOL: &str = "test";

/// A task of the test worker's pool.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum PoolTask {
    /// Answer `n` at once.
    Echo(u64),
    /// Answer `n` after `millis` of (simulated) work.
    Work { n: u64, millis: u64 },
    /// Never finish on worker `on`, cancelled or not; answer `n` anywhere
    /// else.
    HangOn { n: u64, on: WorkerId },
    /// SIGKILL the worker that runs it.
    Poison,
    /// Fail with a handler error.
    Fail { retryable: bool },
    /// Wait until cancelled, then send the primary `Reply::Echo("cancelled
    /// n")`.
    WaitForCancel(u64),
    /// Answer with the same bytes.
    Blob(Blob),
    /// Answer with the same bytes, as a view of the task's payload.
    Shared(procluster::pool::SharedBytes),
}

/// What the test pool answers: the task's number, the worker that ran it,
/// and the bytes of a `Blob` task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolAnswer {
    pub n: u64,
    pub worker: WorkerId,
    pub blob: Option<Blob>,
    /// What a `Shared` task came with.
    #[serde(default)]
    pub shared: Option<procluster::pool::SharedBytes>,
    /// The pid of the primary of the worker that ran it (its host, in the
    /// tests of the Redis backend).
    #[serde(default)]
    pub primary: u32,
}

/// Bytes serialised as one byte string (`serialize_bytes`): in the binary
/// format a length and the raw bytes, not one element per byte. (In JSON it is
/// still an array of numbers; use text there.)
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Blob(pub Vec<u8>);

impl Serialize for Blob {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Blob;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Blob, E> {
                Ok(Blob(v.to_vec()))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Blob, E> {
                Ok(Blob(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Blob, A::Error> {
                let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0));
                while let Some(byte) = seq.next_element()? {
                    out.push(byte);
                }
                Ok(Blob(out))
            }
        }
        deserializer.deserialize_byte_buf(Visit)
    }
}

/// Reads events until `count` workers have come online; returns every event
/// read on the way.
pub async fn online(cluster: &mut Cluster, count: usize) -> Vec<Event> {
    let mut seen = Vec::new();
    let mut online = 0;
    while online < count {
        let event = next(cluster).await;
        if matches!(event, Event::Online(_)) {
            online += 1;
        }
        seen.push(event);
    }
    seen
}

/// The next user message and its sender, passing over other events.
pub async fn message(cluster: &mut Cluster) -> (WorkerHandle, Message) {
    loop {
        if let Event::Message { worker, message } = next(cluster).await {
            return (worker, message);
        }
    }
}

/// The next user message and its sender, passing over other events, waiting
/// up to `deadline` in all: for a message that takes long to make.
pub async fn message_within(cluster: &mut Cluster, deadline: Duration) -> (WorkerHandle, Message) {
    let wait = async {
        loop {
            match cluster.next_event().await {
                Some(Event::Message { worker, message }) => return (worker, message),
                Some(_) => {}
                None => panic!("the cluster ended before the expected message"),
            }
        }
    };
    tokio::time::timeout(deadline, wait)
        .await
        .unwrap_or_else(|_| panic!("no message within {deadline:?}"))
}

/// The next user message decoded as a [`Reply`], and its sender.
pub async fn reply(cluster: &mut Cluster) -> (WorkerHandle, Reply) {
    let (worker, message) = message(cluster).await;
    let reply = message.decode().expect("a reply from the test worker");
    (worker, reply)
}

/// How a worker's `Exit` event described its end.
#[derive(Debug, Clone, Copy)]
pub struct Exited {
    pub status: ExitStatus,
    pub after_disconnect: bool,
}

/// Reads events until worker `id` exits. Returns how it exited and the names
/// of that worker's events read on the way (the `exit` included).
pub async fn exit_of(cluster: &mut Cluster, id: WorkerId) -> (Exited, Vec<&'static str>) {
    let mut names = Vec::new();
    loop {
        let event = next(cluster).await;
        if event.worker().id() != id {
            continue;
        }
        names.push(name(&event));
        if let Event::Exit {
            status,
            exited_after_disconnect,
            ..
        } = event
        {
            return (
                Exited {
                    status,
                    after_disconnect: exited_after_disconnect,
                },
                names,
            );
        }
    }
}

/// Reads the events left until the cluster ends (no worker alive).
pub async fn drain(cluster: &mut Cluster) -> Vec<Event> {
    let mut seen = Vec::new();
    while let Some(event) = tokio::time::timeout(DEADLINE, cluster.next_event())
        .await
        .expect("timed out waiting for the cluster to end")
    {
        seen.push(event);
    }
    seen
}

/// The names of the events about worker `id`, in order.
pub fn names_of(events: &[Event], id: WorkerId) -> Vec<&'static str> {
    events
        .iter()
        .filter(|e| e.worker().id() == id)
        .map(name)
        .collect()
}

/// Sends `signal` to process `pid` from outside the cluster.
pub fn kill_pid(pid: u32, signal: Signal) {
    let pid = Pid::from_raw(i32::try_from(pid).expect("pid fits i32")).expect("a pid is not 0");
    let signal = rustix::process::Signal::from_named_raw(signal.number()).expect("a named signal");
    rustix::process::kill_process(pid, signal).expect("kill");
}

/// Children of this process that have exited but were not reaped.
pub fn zombie_children() -> Vec<u32> {
    let me = std::process::id();
    let mut zombies = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // After the command name in parentheses: state, then the parent pid.
        let mut fields = stat.rsplit(')').next().unwrap_or("").split_whitespace();
        let state = fields.next();
        let parent = fields.next().and_then(|p| p.parse::<u32>().ok());
        if state == Some("Z") && parent == Some(me) {
            zombies.push(pid);
        }
    }
    zombies
}

/// A new empty directory, removed with its contents on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("procluster-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create a temporary directory");
        Self(dir.canonicalize().expect("canonical temporary directory"))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------
// Port sharing (`net` mode of the test worker).

/// What the primary can ask of a worker in `net` mode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum NetCommand {
    /// `listen_tcp_with(addr, …)`, then serve as `serve` says; the reply
    /// (`NetReply::Listening` or `NetReply::Failed`) comes once the worker's
    /// accept calls are waiting, so on a round-robin listener the primary
    /// has its credit when the reply arrives.
    ListenTcp {
        addr: String,
        backlog: Option<u32>,
        ipv6_only: Option<bool>,
        exclusive: bool,
        /// `TcpOptions::prefetch` (round-robin: connections handed ahead
        /// of `accept()` calls; `None` for the library's default).
        prefetch: Option<u32>,
        /// Concurrent accept loops (connections served at once).
        capacity: usize,
        serve: Serve,
    },
    /// `listen_udp(addr)`; every datagram is reported as
    /// `NetReply::Datagram`.
    ListenUdp { addr: String },
    /// `listen_udp_with(addr, …)` with these options.
    ListenUdpWith {
        addr: String,
        exclusive: bool,
        reuse_address: bool,
    },
    /// `listen_unix(path)`, served like `Serve::Hold` with `capacity` loops.
    ListenUnix { path: String, capacity: usize },
    /// `listen_unix_with(path, …)` with these options, one accept loop.
    ListenUnixWith {
        path: String,
        readable_all: bool,
        writable_all: bool,
    },
    /// Drops the UDP socket or Unix listener reported as listening on
    /// `address`; the reply is `NetReply::Closed`.
    Close { address: String },
    /// The reply is `NetReply::Token` with the worker's sticky token.
    StickyToken,
}

/// How a worker in `net` mode serves a TCP listener.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub enum Serve {
    /// `capacity` accept loops; each writes `worker <id>\n` on the
    /// connection it accepted and keeps it open until the client closes.
    Hold,
    /// Calls `accept()` `capacity` times concurrently, polls each call once
    /// (granting credit on a round-robin listener) and never again: the
    /// connections handed to it are never taken.
    Stall,
    /// Never calls `accept()`: connections wait in the socket's queue.
    Never,
    /// `capacity` accept loops that serve each connection in a task of its
    /// own: `worker <id>\n`, then every byte the client sends, echoed,
    /// until it closes.
    Echo,
}

/// What a worker in `net` mode reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum NetReply {
    /// Listening on `address` (the listener's local address, or the Unix
    /// path asked for).
    Listening { address: String, round_robin: bool },
    /// The listen call failed.
    Failed { kind: String, message: String },
    /// A datagram arrived on a UDP socket.
    Datagram(String),
    /// The listener of a `Close` is dropped.
    Closed,
    /// The worker's sticky token.
    Token(String),
}

/// Reads the `worker <id>\n` greeting of a `net` mode worker.
pub async fn read_greeting<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut R,
) -> std::io::Result<WorkerId> {
    use tokio::io::AsyncReadExt;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        let n = tokio::time::timeout(DEADLINE, reader.read(&mut byte))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no greeting"))??;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed after {:?}",
                    String::from_utf8_lossy(&line)
                ),
            ));
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&line);
    text.strip_prefix("worker ")
        .and_then(|id| id.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad greeting {text:?}")))
}

/// Connects to a `net` mode worker's TCP listener and reads which worker
/// answered; the connection stays open while the stream is kept.
pub async fn ask_tcp(
    addr: std::net::SocketAddr,
) -> std::io::Result<(WorkerId, tokio::net::TcpStream)> {
    let mut stream = tokio::time::timeout(DEADLINE, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let id = read_greeting(&mut stream).await?;
    Ok((id, stream))
}

/// One listening TCP socket as `ss -ltnp` shows it.
#[derive(Debug, Clone)]
pub struct SsListener {
    /// Connections waiting to be accepted.
    pub recv_q: u32,
    /// The backlog.
    pub send_q: u32,
    pub local: String,
    /// The processes holding it (`users:((…))`).
    pub users: String,
}

/// The listening TCP sockets on `port`, from `ss` (iproute2).
pub fn ss_listeners(port: u16) -> Vec<SsListener> {
    let out = std::process::Command::new("ss")
        .args(["-Hltnp", &format!("sport = :{port}")])
        .output()
        .expect("run ss (install iproute2)");
    assert!(out.status.success(), "ss failed: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 5 || fields[0] != "LISTEN" {
                return None;
            }
            let local = fields[3].to_string();
            if !local.ends_with(&format!(":{port}")) {
                return None;
            }
            Some(SsListener {
                recv_q: fields[1].parse().ok()?,
                send_q: fields[2].parse().ok()?,
                local,
                users: fields[5..].join(" "),
            })
        })
        .collect()
}

/// How many sockets process `pid` has open.
pub fn socket_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.flatten()
                .filter(|entry| {
                    std::fs::read_link(entry.path())
                        .is_ok_and(|target| target.to_string_lossy().starts_with("socket:"))
                })
                .count()
        })
        .unwrap_or(0)
}

/// What a supervised test worker says once it is ready.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub id: WorkerId,
    pub index: Option<usize>,
    pub generation: u64,
    pub pid: u32,
}

/// The generation a supervisor gave this worker (0 when not supervised).
pub fn generation() -> u64 {
    std::env::var(procluster::supervisor::GENERATION_ENV)
        .ok()
        .and_then(|g| g.parse().ok())
        .unwrap_or(0)
}

/// The next event of a supervised cluster, failing the test after
/// [`DEADLINE`].
pub async fn next_supervised(
    supervised: &mut procluster::supervisor::SupervisedCluster,
) -> procluster::supervisor::Report {
    tokio::time::timeout(DEADLINE, supervised.next_event())
        .await
        .expect("timed out waiting for a supervised cluster event")
        .expect("the supervised cluster ended before the expected event")
}

/// Reads a supervised cluster's events until `pick` accepts one, returning
/// what it returned and every event passed on the way (that one included).
pub async fn until_supervised<T>(
    supervised: &mut procluster::supervisor::SupervisedCluster,
    mut pick: impl FnMut(&procluster::supervisor::Report) -> Option<T>,
) -> (T, Vec<procluster::supervisor::Report>) {
    let mut seen = Vec::new();
    loop {
        let event = next_supervised(supervised).await;
        let found = pick(&event);
        seen.push(event);
        if let Some(found) = found {
            return (found, seen);
        }
    }
}

/// Waits for a supervised cluster to finish, up to [`DEADLINE`], returning
/// the events read on the way and the outcome.
pub async fn finish_supervised(
    mut supervised: procluster::supervisor::SupervisedCluster,
) -> (
    Vec<procluster::supervisor::Report>,
    Result<procluster::supervisor::Outcome, procluster::supervisor::SupervisionError>,
) {
    let mut seen = Vec::new();
    let outcome = tokio::time::timeout(DEADLINE, async {
        while let Some(event) = supervised.next_event().await {
            seen.push(event);
        }
        supervised.wait().await
    })
    .await
    .expect("timed out waiting for the supervised cluster to finish");
    (seen, outcome)
}

/// The `Hello` in a supervised event, if it carries one.
pub fn hello_in(event: &procluster::supervisor::Report) -> Option<Hello> {
    match event {
        procluster::supervisor::Report::Cluster(Event::Message { message, .. }) => {
            message.decode().ok()
        }
        _ => None,
    }
}

/// The resident set size of process `pid` in bytes (`VmRSS` of
/// `/proc/PID/status`, as the supervisor samples it); `None` once it is gone.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line["VmRSS:".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}
