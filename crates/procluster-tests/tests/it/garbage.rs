//! A worker that writes bytes that are not frames costs that worker, nothing
//! else; and a worker in any language that writes frames is a worker. The
//! workers here are small Python programs writing to the channel themselves.

use procluster::Signal;
use procluster::primary::{Cluster, Event, ForkOptions, WorkerHandle, WorkerState};
use procluster_tests::*;

use crate::test_worker;

/// A worker in Python. With `PY_MODE` unset it becomes a test worker in
/// `serve` mode (its path is the first argument). Otherwise it reports
/// online, as a Rust worker does, then does what `PY_MODE` says.
const PYTHON_WORKER: &str = r#"
import json, os, struct, sys, time

channel = 3  # procluster::CHANNEL_FD; the first frame waiting there is the worker's settings
mode = os.environ.get("PY_MODE")
if mode is None:
    os.execv(sys.argv[1], [sys.argv[1], "serve"])

def header(kind, fmt, length, nfds=0):
    # magic, kind (1 control, 2 user), format (1 json, 2 binary), fds, u32 LE length
    return struct.pack("<BBBBI", 0xA7, kind, fmt, nfds, length)

def frame(kind, fmt, payload):
    return header(kind, fmt, len(payload)) + payload

def varint(n):
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)

def write_all(data):
    while data:
        data = data[os.write(channel, data):]

def read_exactly(n):
    data = b""
    while len(data) < n:
        more = os.read(channel, n - len(data))
        if not more:
            sys.exit(3)
        data += more
    return data

# Control message Online { pid }: variant 0, then the pid (postcard).
write_all(frame(1, 2, b"\x00" + varint(os.getpid())))

if mode == "garbage":
    write_all(b"GET / HTTP/1.1\r\nHost: not-a-frame\r\n\r\n")
elif mode == "truncated":
    write_all(header(2, 1, 100) + b"0123456789")
    os.close(channel)
elif mode == "oversized":
    write_all(header(2, 1, 0xFFFFFFFF))
elif mode == "bad-control":
    # A control message that does not decode (variant 99), then a user message.
    write_all(frame(1, 2, b"\x63") + frame(2, 1, json.dumps({"Echo": "after the bad control"}).encode()))
elif mode == "json":
    write_all(frame(2, 1, json.dumps({"Echo": "hello from python"}).encode()))
    while True:
        kind, fmt, nfds, length = struct.unpack("<xBBBI", read_exactly(8))
        payload = read_exactly(length)
        if kind == 2 and fmt == 1:
            command = json.loads(payload)
            write_all(frame(2, 1, json.dumps({"Echo": "python got " + command["Echo"]}).encode()))
            sys.exit(0)
# Misbehaved: wait for the primary to kill us.
time.sleep(3600)
"#;

fn python_cluster() -> Cluster {
    Cluster::builder()
        .exec("python3")
        .args(["-c", PYTHON_WORKER, test_worker()])
        .build()
        .unwrap()
}

async fn python_worker(cluster: &Cluster, mode: &str) -> WorkerHandle {
    cluster
        .fork_with(ForkOptions::default().env("PY_MODE", mode))
        .await
        .unwrap()
}

/// A cluster with a well-behaved Rust worker, online.
async fn cluster_with_a_good_worker() -> (Cluster, WorkerHandle) {
    let mut cluster = python_cluster();
    let good = cluster.fork().await.unwrap();
    online(&mut cluster, 1).await;
    (cluster, good)
}

async fn echo_round_trip(cluster: &mut Cluster, worker: &WorkerHandle) {
    worker
        .send(&Command::Echo("are you fine?".into()))
        .await
        .unwrap();
    let (from, answer) = reply(cluster).await;
    assert_eq!(&from, worker);
    assert!(
        matches!(answer, Reply::Echo(ref text) if text == "are you fine?"),
        "{answer:?}"
    );
}

/// A Python worker in `mode` misbehaves next to a good worker: it gets an
/// error naming it, a disconnect and an exit by SIGKILL; the good worker
/// goes on. Returns the error text.
async fn misbehaving(mode: &str) -> String {
    let (mut cluster, good) = cluster_with_a_good_worker().await;
    let bad = python_worker(&cluster, mode).await;
    let mut error = None;
    let mut names = Vec::new();
    loop {
        let event = next(&mut cluster).await;
        assert_eq!(
            event.worker(),
            &bad,
            "an event about the good worker: {event:?}"
        );
        names.push(name(&event));
        match event {
            Event::Error { error: text, .. } => error = Some(text),
            Event::Exit {
                status,
                exited_after_disconnect,
                ..
            } => {
                assert_eq!(status.signal(), Some(Signal::KILL), "killed: {status}");
                assert!(!exited_after_disconnect);
                break;
            }
            _ => {}
        }
    }
    assert_eq!(names, ["fork", "online", "error", "disconnect", "exit"]);
    let error = error.unwrap();
    assert!(
        error.contains(&format!("worker {}", bad.id())),
        "the error names the worker: {error}"
    );
    assert!(good.is_connected() && good.state() == WorkerState::Online);
    echo_round_trip(&mut cluster, &good).await;
    error
}

#[tokio::test]
async fn a_worker_writing_garbage_is_reported_and_killed_and_the_others_go_on() {
    let error = misbehaving("garbage").await;
    assert!(
        error.contains("0x47"),
        "the error says what was wrong (a 'G' where the magic byte should be): {error}"
    );
}

#[tokio::test]
async fn a_worker_closing_its_channel_mid_frame_is_reported_and_killed_and_the_others_go_on() {
    let error = misbehaving("truncated").await;
    assert!(error.contains("middle of a frame"), "{error}");
}

#[tokio::test]
async fn a_worker_announcing_an_oversized_frame_is_reported_and_killed_and_the_others_go_on() {
    let error = misbehaving("oversized").await;
    assert!(error.contains("exceeds"), "{error}");
}

#[tokio::test]
async fn a_worker_sending_a_malformed_control_message_is_reported_and_killed_and_heard_no_more() {
    // The user message right behind the bad control message is not
    // delivered: after the error come the disconnect and the exit only.
    let error = misbehaving("bad-control").await;
    assert!(error.contains("malformed control message"), "{error}");
}

#[tokio::test]
async fn a_python_worker_speaking_json_frames_is_a_worker() {
    let mut cluster = python_cluster();
    let python = python_worker(&cluster, "json").await;
    let (from, answer) = reply(&mut cluster).await;
    assert_eq!(from, python);
    assert!(
        matches!(answer, Reply::Echo(ref text) if text == "hello from python"),
        "{answer:?}"
    );
    python.send(&Command::Echo("ping".into())).await.unwrap();
    let (_, answer) = reply(&mut cluster).await;
    assert!(
        matches!(answer, Reply::Echo(ref text) if text == "python got ping"),
        "{answer:?}"
    );
    let (exited, names) = exit_of(&mut cluster, python.id()).await;
    assert_eq!(names, ["disconnect", "exit"]);
    assert_eq!(exited.status.code(), Some(0));
}
