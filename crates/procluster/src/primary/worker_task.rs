//! Starting one worker and running its task: read its channel, answer its
//! control messages, reap it, and report its lifecycle in order.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::process::{Child, Command};

use super::output::{OutputLine, Stream, forward_lines};
use super::worker_handle::{Lifecycle, WorkerHandle, WorkerShared, WorkerState};
use super::{ChildFd, Event, ForkOptions, Inner, Program, Stdio, hello, spawn, worker_env};
use crate::channel::{self, ChannelError, ChannelReader};
use crate::listeners::registry::{Member, failure_reply};
use crate::message::{Message, ServiceFrame};
use crate::protocol::{Control, Frame, FrameKind, ListenSpec};
use crate::{Error, ExitStatus, Signal, WorkerId};

/// Longest address a worker may report as listening (a Unix path is at most
/// 108 bytes; this leaves room for any address).
const MAX_ADDRESS_LEN: usize = 1024;

/// How long after a worker exits its channel and output may still drain.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

pub(super) async fn fork(
    inner: &Arc<Inner>,
    id: WorkerId,
    options: ForkOptions,
) -> Result<WorkerHandle, Error> {
    let settings = &inner.settings;
    let program = match &settings.exec {
        Some(program) => program.clone(),
        None => std::env::current_exe()
            .map_err(|e| Error::io("cannot find the current executable", e))?,
    };
    let foreign = settings.program.is_foreign();
    let (ours, theirs) =
        channel::socket_pair().map_err(|e| Error::io("cannot create a worker channel", e))?;

    let mut command = Command::new(&program);
    match &settings.args {
        Some(args) => command.args(args),
        None => command.args(std::env::args_os().skip(1)),
    };
    command.envs(settings.env.iter().map(|(k, v)| (k, v)));
    command.envs(options.env.iter().map(|(k, v)| (k, v)));
    command.envs(worker_env(id, settings, &options));
    if let Some(cwd) = &settings.cwd {
        command.current_dir(cwd);
    }
    let (stdout, stderr) = match settings.stdio {
        Stdio::Inherit => (
            std::process::Stdio::inherit(),
            std::process::Stdio::inherit(),
        ),
        Stdio::Prefixed | Stdio::Callback(_) => {
            (std::process::Stdio::piped(), std::process::Stdio::piped())
        }
        Stdio::Null => (std::process::Stdio::null(), std::process::Stdio::null()),
    };
    command
        .stdin(std::process::Stdio::null())
        .stdout(stdout)
        .stderr(stderr);
    let mut fds = crate::sys::ChildFds::default();
    if foreign {
        // No channel: the worker's end is simply closed.
        drop(theirs);
    } else {
        // The worker's settings wait in its channel before it starts.
        write_all(&ours, &hello(inner, id, &options).to_frame())
            .map_err(|e| Error::io("cannot write a worker's settings to its channel", e))?;
        fds.place(theirs, crate::CHANNEL_FD);
    }
    for placed in child_fds(&settings.fds, &options.fds) {
        let copy = placed
            .fd
            .try_clone()
            .map_err(|e| Error::io("cannot duplicate a descriptor for a worker", e))?;
        fds.place(copy, placed.target);
    }
    let highest_target = fds.highest_target();
    crate::sys::prepare_child(
        &mut command,
        fds,
        settings.own_process_group,
        settings.batch_scheduling,
        spawn::open_files_for_workers(),
    );

    let mut child = spawn::spawn(command, highest_target)
        .await
        .map_err(|source| Error::Spawn {
            program: program.clone(),
            source,
        })?;
    let pid = child.id();
    let pidfd = pid.and_then(open_pidfd);
    let (sender, mut reader) = channel::open(ours, settings.max_frame)
        .map_err(|e| Error::io("cannot open a worker channel", e))?;
    reader.set_busy_poll(settings.busy_poll);
    let worker = WorkerHandle {
        shared: Arc::new(WorkerShared {
            id,
            index: options.index,
            format: settings.format,
            sender,
            lifecycle: Mutex::new(Lifecycle {
                state: WorkerState::Forked,
                exited_after_disconnect: false,
                exit: None,
                pid,
                last_heartbeat: None,
                reported_ready: false,
                requests: 0,
                exit_blame: None,
            }),
            pidfd,
            unread: Mutex::new(0),
            unread_room: tokio::sync::Notify::new(),
            own_group: settings.own_process_group,
            events: inner.events.clone(),
            stop_signal: match settings.program {
                Program::Procluster => None,
                Program::Foreign { stop_signal } => Some(stop_signal),
            },
        }),
    };
    let outputs = capture_output(&mut child, &worker, &settings.stdio);
    inner.insert(worker.clone());
    inner.emit(Event::Fork(worker.clone()));
    tracing::debug!(worker = %id, pid, program = %program.display(), "worker forked");
    let reader = if foreign {
        // Nothing will ever be sent to or read from a foreign worker; it is
        // online as soon as it runs.
        worker.shared.sender.close();
        advance(&worker, WorkerState::Online);
        inner.emit(Event::Online(worker.clone()));
        None
    } else {
        Some(reader)
    };
    tokio::spawn(run(inner.clone(), worker.clone(), child, reader, outputs));
    Ok(worker)
}

/// The cluster's descriptors, then the fork's; a fork's entry replaces the
/// cluster's at the same number.
fn child_fds<'a>(cluster: &'a [ChildFd], fork: &'a [ChildFd]) -> impl Iterator<Item = &'a ChildFd> {
    cluster
        .iter()
        .filter(|c| fork.iter().all(|f| f.target != c.target))
        .chain(fork)
}

fn open_pidfd(pid: u32) -> Option<OwnedFd> {
    #[cfg(target_os = "linux")]
    {
        let pid = rustix::process::Pid::from_raw(i32::try_from(pid).ok()?)?;
        rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = pid;
        None
    }
}

fn capture_output(
    child: &mut Child,
    worker: &WorkerHandle,
    stdio: &Stdio,
) -> Vec<tokio::task::JoinHandle<()>> {
    let streams = [
        (Stream::Stdout, child.stdout.take().map(OutputPipe::Stdout)),
        (Stream::Stderr, child.stderr.take().map(OutputPipe::Stderr)),
    ];
    let (id, index, pid) = (worker.id(), worker.index(), worker.pid());
    let mut tasks = Vec::new();
    for (stream, pipe) in streams {
        let Some(pipe) = pipe else { continue };
        let emit: LineSink = match stdio {
            Stdio::Callback(hook) => {
                let hook = hook.clone();
                Box::new(move |line| {
                    hook(OutputLine {
                        worker: id,
                        index,
                        pid,
                        stream,
                        line,
                    })
                })
            }
            _ => Box::new(move |line| print_prefixed(stream, id, line)),
        };
        tasks.push(tokio::spawn(async move {
            match pipe {
                OutputPipe::Stdout(out) => forward_lines(out, emit).await,
                OutputPipe::Stderr(err) => forward_lines(err, emit).await,
            }
        }));
    }
    tasks
}

/// Where one stream's lines go.
type LineSink = Box<dyn FnMut(&[u8]) + Send>;

enum OutputPipe {
    Stdout(tokio::process::ChildStdout),
    Stderr(tokio::process::ChildStderr),
}

/// `[worker ID] line` on the primary's stream of the same name, written
/// whole under the stream's lock so lines of different workers never mix.
fn print_prefixed(stream: Stream, id: WorkerId, line: &[u8]) {
    use std::io::Write;
    let mut buf = Vec::with_capacity(line.len() + 16);
    let _ = write!(buf, "[worker {id}] ");
    buf.extend_from_slice(line);
    buf.push(b'\n');
    let _ = match stream {
        Stream::Stdout => std::io::stdout().lock().write_all(&buf),
        Stream::Stderr => std::io::stderr().lock().write_all(&buf),
    };
}

/// The worker's task. Keeps Node's order: every message read before the
/// channel closed is reported before `Disconnect`, and `Exit` comes last.
async fn run(
    inner: Arc<Inner>,
    worker: WorkerHandle,
    mut child: Child,
    reader: Option<ChannelReader>,
    outputs: Vec<tokio::task::JoinHandle<()>>,
) {
    // Frames read but not yet handed on: while they wait for room in the
    // application's queue, the worker is still reaped and nothing else waits.
    let mut frames = Vec::new();
    // A foreign worker has no channel: it is "connected" until it exits.
    let foreign = reader.is_none();
    let mut reader = reader;
    let mut reading = !foreign;
    let mut ended: Option<Result<(), ChannelError>> = None;
    let mut status = None;
    let mut drain_deadline = None;
    loop {
        let channel_busy = reading || !frames.is_empty();
        if !channel_busy && status.is_some() {
            break;
        }
        let waiting = !frames.is_empty();
        let user_bytes = user_bytes(&frames);
        tokio::select! {
            read = read_frames(&mut reader, &mut frames), if reading && !waiting => {
                if let Some(end) = read_end(read) {
                    reading = false;
                    ended = Some(end);
                }
            }
            reserved = reserve(&inner, user_bytes), if waiting => {
                if let Err(error) = deliver(&inner, &worker, &mut frames, reserved) {
                    reading = false;
                    ended = Some(Err(error));
                }
            }
            exit = child.wait(), if status.is_none() => {
                let exit = exit.map_or(ExitStatus::unknown(), ExitStatus::from_std);
                // Reaped: from now on no signal may go to this pid.
                worker.shared.lifecycle().exit = Some(exit);
                if worker.shared.own_group {
                    // What it started in its group goes with it (as systemd's
                    // KillMode=mixed); pid numbers are not reused this soon.
                    if let Some(pid) = worker.shared.lifecycle().pid {
                        let _ = crate::sys::kill_group(pid, Signal::KILL);
                    }
                }
                status = Some(exit);
                drain_deadline = Some(tokio::time::Instant::now() + DRAIN_AFTER_EXIT);
            }
            () = sleep_until(drain_deadline), if channel_busy && drain_deadline.is_some() => {
                // A grandchild holds the worker's end open, or nobody reads
                // the events: the worker is gone, stop waiting for either.
                if !frames.is_empty() {
                    tracing::warn!(worker = %worker.id(), dropped = frames.len(), "dropped messages of an exited worker nobody read");
                    frames.clear();
                }
                reading = false;
                ended.get_or_insert(Ok(()));
            }
        }
        if !reading && frames.is_empty() {
            if let Some(end) = ended.take() {
                if let Err(error) = end {
                    misbehaved(&inner, &worker, &error);
                }
                mark_disconnected(&inner, &worker);
                worker.shared.sender.close();
            }
        }
    }
    if foreign {
        mark_disconnected(&inner, &worker);
    }
    // It may have listened after it disconnected: it holds nothing now.
    inner.listeners.worker_gone(worker.id());
    drain_outputs(outputs).await;
    let status = status.unwrap_or(ExitStatus::unknown());
    let exited_after_disconnect = {
        let mut life = worker.shared.lifecycle();
        life.state = WorkerState::Dead;
        life.exit = Some(status);
        life.exited_after_disconnect
    };
    tracing::debug!(worker = %worker.id(), %status, exited_after_disconnect, "worker exited");
    super::service::worker_gone(&inner.services, &worker, Some(status));
    inner.finish(
        worker.id(),
        Event::Exit {
            worker: worker.clone(),
            status,
            exited_after_disconnect,
        },
    );
}

/// What a read means for the channel: `None` to keep reading, or how it ended.
fn read_end(read: Result<bool, ChannelError>) -> Option<Result<(), ChannelError>> {
    match read {
        Ok(true) => None,
        Ok(false) => Some(Ok(())),
        Err(error) => Some(Err(error)),
    }
}

/// Waits for the worker's output to reach its end, up to one deadline for
/// all streams; what a grandchild keeps open is abandoned.
async fn drain_outputs(outputs: Vec<tokio::task::JoinHandle<()>>) {
    let deadline = tokio::time::Instant::now() + DRAIN_AFTER_EXIT;
    for mut output in outputs {
        if tokio::time::timeout_at(deadline, &mut output)
            .await
            .is_err()
        {
            output.abort();
        }
    }
}

/// Whether a frame is a user message, which waits in the application's
/// queue (and counts against its budget).
fn is_user(frame: &Frame) -> bool {
    matches!(frame.kind, FrameKind::User | FrameKind::Relayed)
}

/// Bytes of user messages among `frames`, as the queue counts them.
fn user_bytes(frames: &[Frame]) -> usize {
    frames
        .iter()
        .filter(|f| is_user(f))
        .map(|f| f.payload.len().max(1))
        .sum()
}

/// Waits for room in the application's queue for `user_bytes`; returns the
/// bytes reserved.
///
/// # Cancel safety
/// Cancel safe: nothing is reserved unless the future completes.
async fn reserve(inner: &Inner, user_bytes: usize) -> usize {
    if user_bytes == 0 {
        return 0;
    }
    let wanted = user_bytes.min(inner.budget_total) as u32;
    match inner.budget.acquire_many(wanted).await {
        Ok(permit) => {
            permit.forget();
            wanted as usize
        }
        // The semaphore is never closed; deliver without a reservation.
        Err(_) => 0,
    }
}

async fn read_frames(
    reader: &mut Option<ChannelReader>,
    frames: &mut Vec<Frame>,
) -> Result<bool, ChannelError> {
    match reader {
        Some(reader) => reader.read_frames(frames).await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Hands decoded frames to the application or the control handler, with
/// `left` bytes reserved for them. Stops at the first frame that breaks the
/// protocol; nothing after it counts.
fn deliver(
    inner: &Arc<Inner>,
    worker: &WorkerHandle,
    frames: &mut Vec<Frame>,
    mut left: usize,
) -> Result<(), ChannelError> {
    let mut batch = Vec::new();
    let mut outcome = Ok(());
    for frame in frames.drain(..) {
        let charge = if is_user(&frame) {
            take_charge(&frame, &mut left)
        } else {
            0
        };
        if outcome.is_err() || frame.kind == FrameKind::Relayed {
            // Not queued for the application: give its share back.
            inner.budget.add_permits(charge);
        }
        if outcome.is_err() {
            continue; // dropped, with its fds
        }
        match frame.kind {
            FrameKind::User => {
                let message = Message {
                    format: frame.format,
                    payload: frame.payload,
                    fds: frame.fds,
                    from_worker: None,
                    charge,
                };
                batch.push(Event::Message {
                    worker: worker.clone(),
                    message,
                });
            }
            FrameKind::Relayed => {
                flush(inner, &mut batch);
                relay(inner, worker, frame);
            }
            FrameKind::Control => {
                flush(inner, &mut batch);
                match Control::decode(&frame.payload) {
                    Ok(control) => handle_control(inner, worker, control, frame.fds),
                    Err(error) => outcome = Err(ChannelError::Protocol(error)),
                }
            }
            FrameKind::Service => {
                flush(inner, &mut batch);
                to_service(inner, worker, frame);
            }
        }
    }
    inner.budget.add_permits(left);
    flush(inner, &mut batch);
    outcome
}

/// A user frame's share of the bytes acquired for its batch.
fn take_charge(frame: &Frame, left: &mut usize) -> usize {
    let charge = frame.payload.len().max(1).min(*left);
    *left -= charge;
    charge
}

fn flush(inner: &Inner, batch: &mut Vec<Event>) {
    if !batch.is_empty() {
        let _ = inner.events.send(std::mem::take(batch));
    }
}

fn handle_control(inner: &Arc<Inner>, worker: &WorkerHandle, control: Control, fds: Vec<OwnedFd>) {
    match control {
        Control::Online { .. } => {
            let first = advance(worker, WorkerState::Online);
            if first {
                inner.emit(Event::Online(worker.clone()));
            }
        }
        Control::Disconnected => {
            worker.shared.lifecycle().exited_after_disconnect = true;
            mark_disconnected(inner, worker);
        }
        Control::Disconnect => {
            // The worker asks; tell it to go ahead, as if we had asked.
            worker.disconnect();
        }
        Control::Ready => {
            // Once per worker: a worker repeating itself cannot grow the queue.
            let first = !std::mem::replace(&mut worker.shared.lifecycle().reported_ready, true);
            if first {
                inner.emit(Event::Ready(worker.clone()));
            }
        }
        Control::Heartbeat => {
            worker.shared.lifecycle().last_heartbeat = Some(std::time::Instant::now())
        }
        Control::Requests { total } => worker.shared.lifecycle().requests = total,
        Control::Consumed { bytes } => worker.consumed(bytes),
        Control::Listen { seq, spec, ordinal } => listen(inner, worker, seq, &spec, ordinal),
        Control::Listening { address } => report_listening(inner, worker, address),
        Control::CloseListener { key } => inner.listeners.close(worker.id(), key),
        Control::ConnectionAck {
            key,
            seq,
            accepted,
            credit,
        } => inner.listeners.ack(worker.id(), key, seq, accepted, credit),
        Control::Credit { key, n } => inner.listeners.credit(worker.id(), key, n),
        Control::StoppedAccepting { key } => inner.listeners.stopped_accepting(worker.id(), key),
        other => {
            drop(fds);
            tracing::debug!(worker = %worker.id(), ?other, "ignoring an unexpected control message");
        }
    }
}

/// Answers a worker's listen request; a worker that gets its listener is
/// `Listening`.
fn listen(inner: &Arc<Inner>, worker: &WorkerHandle, seq: u32, spec: &ListenSpec, ordinal: u32) {
    let joined = if worker.state() >= WorkerState::Disconnected {
        // It disconnected meanwhile: it may not hold a listener any more.
        Err(std::io::Error::new(
            std::io::ErrorKind::NotConnected,
            "the worker is disconnected from the cluster",
        ))
    } else {
        let member = Member {
            id: worker.id(),
            index: worker.index(),
            sender: worker.shared.sender.clone(),
        };
        inner.listeners.listen(&member, spec, ordinal)
    };
    let joined = match joined {
        Ok(joined) => joined,
        Err(error) => {
            tracing::debug!(worker = %worker.id(), %error, "listen request failed");
            let reply = Control::ListenResult {
                seq,
                reply: failure_reply(&error),
            };
            let _ = worker
                .shared
                .sender
                .send_now(FrameKind::Control, &reply.encode(), Vec::new());
            return;
        }
    };
    let reply = Control::ListenResult {
        seq,
        reply: joined.reply,
    };
    let sent = worker
        .shared
        .sender
        .send_now(FrameKind::Control, &reply.encode(), joined.fds);
    match sent {
        Ok(()) => report_listening(inner, worker, joined.address),
        // The answer cannot reach the worker: it does not hold the listener.
        Err(_) => inner.listeners.close(worker.id(), joined.key),
    }
}

/// Emits `Listening` for a worker (also for exclusive listeners it reports).
fn report_listening(inner: &Inner, worker: &WorkerHandle, address: String) {
    if address.len() > MAX_ADDRESS_LEN {
        tracing::warn!(
            worker = %worker.id(),
            "ignored a listening report with an overlong address"
        );
        return;
    }
    advance(worker, WorkerState::Listening);
    inner.emit(Event::Listening {
        worker: worker.clone(),
        address,
    });
}

/// Writes a small buffer to a fresh, empty socket.
fn write_all(socket: &OwnedFd, mut bytes: &[u8]) -> std::io::Result<()> {
    while !bytes.is_empty() {
        match rustix::io::write(socket, bytes) {
            Ok(n) => bytes = &bytes[n..],
            Err(rustix::io::Errno::INTR) => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

/// Moves the worker forward to `state`; returns whether it moved.
fn advance(worker: &WorkerHandle, state: WorkerState) -> bool {
    let mut life = worker.shared.lifecycle();
    if life.state < state {
        life.state = state;
        true
    } else {
        false
    }
}

fn mark_disconnected(inner: &Arc<Inner>, worker: &WorkerHandle) {
    worker.shared.unread_room.notify_waiters();
    if advance(worker, WorkerState::Disconnected) {
        inner.listeners.worker_gone(worker.id());
        super::service::worker_gone(&inner.services, worker, None);
        inner.emit(Event::Disconnect(worker.clone()));
    }
}

/// Garbage from one worker costs that worker, nothing else.
fn misbehaved(inner: &Arc<Inner>, worker: &WorkerHandle, error: &ChannelError) {
    let message = format!(
        "worker {} (pid {}) broke the channel protocol and was killed: {error}",
        worker.id(),
        worker.pid()
    );
    tracing::error!("{message}");
    inner.emit(Event::Error {
        worker: worker.clone(),
        error: message,
    });
    let _ = worker.signal(Signal::KILL);
}

/// Hands a service frame to its service in the primary.
fn to_service(inner: &Inner, worker: &WorkerHandle, frame: Frame) {
    let (index, body) = crate::message::split_service_payload(frame.payload);
    match inner.services.get(usize::from(index)) {
        Some(service) => service.on_frame(
            worker,
            ServiceFrame {
                format: frame.format,
                body,
                fds: frame.fds,
            },
        ),
        None => tracing::warn!(
            worker = %worker.id(),
            index,
            "dropped a frame for a service the cluster does not have"
        ),
    }
}

/// Forwards a worker-to-worker message without ever waiting on the target:
/// a target whose channel is full or gone loses the message (logged), and
/// the sender's task carries on.
fn relay(inner: &Arc<Inner>, from: &WorkerHandle, frame: Frame) {
    let target = WorkerId::new(u32::from_le_bytes(
        frame.payload[..4]
            .try_into()
            .expect("length checked by the decoder"),
    ));
    let Some(to) = inner.worker(target).filter(WorkerHandle::is_connected) else {
        tracing::warn!(
            from = %from.id(),
            to = %target,
            "dropped a message for a worker that is not connected"
        );
        return;
    };
    if !to.has_window() {
        tracing::warn!(
            from = %from.id(),
            to = %target,
            "dropped a relayed message: the target is not reading"
        );
        return;
    }
    let bytes = frame.payload.len() - 4;
    let source = from.id().get().to_le_bytes();
    let result =
        to.shared
            .sender
            .try_send_with(FrameKind::Relayed, frame.format, frame.fds, |buf| {
                std::io::Write::write_all(buf, &source)?;
                std::io::Write::write_all(buf, &frame.payload[4..])
            });
    match result {
        Ok(()) => to.charge_unread(bytes),
        Err(error) => {
            tracing::warn!(from = %from.id(), to = %target, %error, "dropped a relayed message")
        }
    }
}
