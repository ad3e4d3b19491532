//! A worker program for the integration tests. Its behaviour is chosen by the
//! first argument; it reports what it sees to the primary as messages.

use std::time::Duration;

use procluster::worker::Worker;
use procluster::{Role, WorkerId};
use procluster_tests::{Command, Reply};

#[tokio::main]
async fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "serve".into());
    if mode == "role-probe" {
        // Started by a worker, not by the primary: says what it takes itself for.
        match procluster::role() {
            Ok(Role::Primary) => println!("primary"),
            Ok(Role::Worker(_)) => println!("worker"),
            Err(error) => println!("error: {error}"),
        }
        return;
    }
    let worker = match procluster::role().expect("role") {
        Role::Primary => {
            eprintln!("test-worker must be started by a primary");
            std::process::exit(2);
        }
        Role::Worker(worker) => worker,
    };
    match mode.as_str() {
        "serve" => serve(worker).await,
        "exit42" => std::process::exit(42),
        "busy" => busy_loop(),
        "self-disconnect" => {
            worker.disconnect();
            worker.shutdown_signal().await;
        }
        // Asks for a privileged port and prints how that went.
        "privileged-listen" => match worker.listen_tcp("127.0.0.1:1").await {
            Ok(_) => println!("listening"),
            Err(error) => println!("error {:?}: {error}", error.kind()),
        },
        // Never reads its messages; leaves when disconnected.
        "deaf" => worker.shutdown_signal().await,
        "print" => {
            println!("line one from {}", worker.id());
            print!("unterminated tail");
            use std::io::Write;
            std::io::stdout().flush().unwrap();
            worker.shutdown_signal().await;
        }
        "crash-at-boot" => panic!("boot failure (on purpose)"),
        "net" => net::run(worker).await,
        "bus" => procluster_tests::bus::worker_main(worker).await,
        "store" => procluster_tests::store::worker_main(worker).await,
        "ready-serve" => {
            say_ready(&worker).await;
            serve(worker).await;
        }
        "ready-never-exit" => {
            say_ready(&worker).await;
            // Ignores disconnect; only SIGKILL (or the primary's end) stops it.
            std::future::pending::<()>().await;
        }
        "ready-gen0-only" => {
            if procluster_tests::generation() == 0 {
                say_ready(&worker).await;
            }
            serve(worker).await;
        }
        "ready-then-hang" => ready_then_hang(worker).await,
        "listen-then-serve" => {
            // Ready, for a supervisor, when the primary reports it listening.
            let _listener = worker.listen_tcp("127.0.0.1:0").await.expect("listen");
            serve(worker).await;
        }
        "first-worker-serves-100" => {
            say_ready(&worker).await;
            if worker.id() == WorkerId::new(1) {
                worker.add_requests(100);
            }
            serve(worker).await;
        }
        "first-worker-leaks" => {
            say_ready(&worker).await;
            if worker.id() == WorkerId::new(1) {
                leak(worker).await;
            } else {
                serve(worker).await;
            }
        }
        // Serves the test pool until disconnected; answers PoolSubmit.
        "pool" => pool::run(worker).await,
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2);
        }
    }
}

#[allow(clippy::empty_loop)]
fn busy_loop() -> ! {
    let mut x: u64 = 0;
    loop {
        x = std::hint::black_box(x.wrapping_add(1));
    }
}

/// One round trip through a service whose primary side echoes frames.
async fn service_echo(
    worker: &Worker,
    service: &str,
    text: &str,
    with_fd: bool,
) -> Result<(String, usize), String> {
    let port = worker
        .service(service, |port| port)
        .map_err(|e| e.to_string())?;
    let fds = if with_fd {
        vec![std::fs::File::open("/dev/null").expect("/dev/null").into()]
    } else {
        Vec::new()
    };
    port.send(port.format(), text.as_bytes(), fds)
        .await
        .map_err(|e| e.to_string())?;
    let frame = port.recv().await.ok_or("the service's port closed")?;
    Ok((
        String::from_utf8_lossy(&frame.body).into_owned(),
        frame.fds.len(),
    ))
}

async fn serve(worker: Worker) {
    let shutdown = worker.shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            message = worker.recv() => {
                let Some(mut message) = message else { break };
                if let Some(from) = message.from_worker() {
                    let text: String = message.decode().expect("relayed text");
                    worker.send(&Reply::Relayed { from: Some(from), text }).await.expect("send");
                    continue;
                }
                let command: Command = message.decode().expect("command");
                handle(&worker, command, &mut message).await;
            }
        }
    }
    // Stay a little so an in-flight exchange is visible, then exit cleanly.
    tokio::time::sleep(Duration::from_millis(10)).await;
}

async fn handle(worker: &Worker, command: Command, message: &mut procluster::Message) {
    let reply = match command {
        Command::Echo(text) => Reply::Echo(text),
        Command::EchoBytes(bytes) => Reply::EchoBytes(bytes),
        Command::CountBytes(bytes) => Reply::Count(bytes.len()),
        Command::Flood(n) => {
            for i in 0..n {
                worker.send(&Reply::Seq(i)).await.expect("send");
            }
            return;
        }
        Command::RelayTo(target, text) => {
            worker.send_to(target, &text).await.expect("relay");
            return;
        }
        Command::CountFds => Reply::Fds(message.fds().len()),
        Command::ReturnFd => {
            let fds = message.take_fds();
            worker
                .send_fds(&Reply::Fds(2), &[&fds[0], &fds[0]])
                .await
                .expect("send fds");
            return;
        }
        Command::Disconnect => {
            worker.disconnect();
            return;
        }
        Command::Exit(code) => std::process::exit(code),
        Command::Describe => Reply::Described {
            env: std::env::vars().collect(),
            cwd: std::env::current_dir().unwrap().display().to_string(),
            id: worker.id(),
            index: worker.index(),
        },
        Command::ChildEnv => {
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg("env | grep ^PROCLUSTER_ || true; ls /proc/self/fd | wc -l")
                .output()
                .expect("sh");
            Reply::ChildEnv(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        Command::ServiceEcho {
            service,
            text,
            with_fd,
        } => Reply::ServiceEcho(service_echo(worker, &service, &text, with_fd).await),
        Command::ChildRole => {
            let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
            // The shell moves its standard input (our socket) to fd 3, then
            // becomes this program in `role-probe` mode.
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(r#"exec 3<&0 0</dev/null; exec "$0" role-probe"#)
                .arg(std::env::current_exe().expect("current_exe"))
                .stdin(std::process::Stdio::from(std::os::fd::OwnedFd::from(
                    theirs,
                )))
                .output()
                .expect("sh");
            drop(ours);
            Reply::ChildRole(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        }
        Command::ChildFds => {
            // The shell lists its own descriptors (`$$`), as links.
            let out = std::process::Command::new("sh")
                .arg("-c")
                .arg(r#"for fd in /proc/$$/fd/*; do echo "$fd -> $(readlink "$fd")"; done"#)
                .output()
                .expect("sh");
            let child = String::from_utf8_lossy(&out.stdout)
                .lines()
                .map(str::to_owned)
                .collect();
            let channel = std::fs::read_link(format!("/proc/self/fd/{}", procluster::CHANNEL_FD))
                .map(|target| target.display().to_string())
                .unwrap_or_else(|e| format!("not open: {e}"));
            Reply::ChildFds { channel, child }
        }
        Command::EchoWithFds(text) => {
            let fds = message.take_fds();
            worker
                .send_fds(&Reply::Echo(text), &fds)
                .await
                .expect("send fds");
            return;
        }
        Command::EchoBlob(blob) => Reply::Blob(blob),
        // Only the `pool` mode has a pool.
        Command::PoolSubmit { .. } => {
            Reply::PoolSubmitted(Err("this worker does not serve the test pool".into()))
        }
        Command::SendFds { count, padding } => {
            let worker = worker.clone();
            tokio::spawn(async move {
                let null = std::fs::File::open("/dev/null").expect("/dev/null");
                let padding = "p".repeat(padding);
                for seq in 0..count {
                    let reply = Reply::Padded {
                        seq,
                        padding: padding.clone(),
                    };
                    worker
                        .send_fds(&reply, &[&null])
                        .await
                        .expect("send with fd");
                }
            });
            return;
        }
    };
    worker.send(&reply).await.expect("send reply");
}

/// `net` mode: listens as the primary asks (`NetCommand`) and serves
/// connections with a `worker <id>` greeting.
mod net {
    use std::future::Future;
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::Poll;

    use procluster::listeners::{TcpListener, TcpOptions, UdpOptions, UnixOptions};
    use procluster::worker::Worker;
    use procluster_tests::{NetCommand, NetReply, Serve};
    use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
    use tokio::sync::oneshot;
    use tokio::task::JoinSet;

    pub async fn run(worker: Worker) {
        // Accept loops that end by themselves once the worker disconnects.
        let mut serving = JoinSet::new();
        // Loops that never end by themselves; aborted at the end.
        let mut background = JoinSet::new();
        let mut kept = Vec::new();
        let mut kept_unix = Vec::new();
        // The tasks serving each UDP socket or Unix listener, by address.
        let mut holders: std::collections::HashMap<String, Vec<tokio::task::JoinHandle<()>>> =
            std::collections::HashMap::new();
        while let Some(message) = worker.recv().await {
            let command = match message.decode().expect("a net command") {
                NetCommand::ListenUdp { addr } => NetCommand::ListenUdpWith {
                    addr,
                    exclusive: false,
                    reuse_address: false,
                },
                NetCommand::ListenUnixWith {
                    path,
                    readable_all,
                    writable_all,
                } => {
                    let mut options = UnixOptions::default();
                    options.readable_all = readable_all;
                    options.writable_all = writable_all;
                    let reply = match worker.listen_unix_with(&path, options).await {
                        Err(e) => failed(&e),
                        Ok(listener) => {
                            kept_unix.push(listener);
                            NetReply::Listening {
                                address: path,
                                round_robin: false,
                            }
                        }
                    };
                    if worker.send(&reply).await.is_err() {
                        break;
                    }
                    continue;
                }
                other => other,
            };
            let reply = match command {
                NetCommand::ListenTcp {
                    addr,
                    backlog,
                    ipv6_only,
                    exclusive,
                    prefetch,
                    capacity,
                    serve,
                } => {
                    // Defaults for fields added to `TcpOptions` later.
                    #[allow(clippy::needless_update)]
                    let options = TcpOptions {
                        backlog,
                        ipv6_only,
                        exclusive,
                        prefetch,
                        ..TcpOptions::default()
                    };
                    match worker.listen_tcp_with(&addr, options).await {
                        Err(e) => failed(&e),
                        Ok(listener) => {
                            let reply = NetReply::Listening {
                                address: listener.local_addr().expect("local addr").to_string(),
                                round_robin: listener.is_round_robin(),
                            };
                            let listener = Arc::new(listener);
                            match serve {
                                Serve::Hold => {
                                    let mut ready = Vec::new();
                                    for _ in 0..capacity {
                                        let (tx, rx) = oneshot::channel();
                                        ready.push(rx);
                                        serving.spawn(accept_loop(
                                            listener.clone(),
                                            worker.id().get(),
                                            tx,
                                        ));
                                    }
                                    for rx in ready {
                                        let _ = rx.await;
                                    }
                                }
                                Serve::Stall => {
                                    let (tx, rx) = oneshot::channel();
                                    background.spawn(stall(listener, capacity, tx));
                                    let _ = rx.await;
                                }
                                Serve::Never => kept.push(listener),
                                Serve::Echo => {
                                    let mut ready = Vec::new();
                                    for _ in 0..capacity.max(1) {
                                        let (tx, rx) = oneshot::channel();
                                        ready.push(rx);
                                        serving.spawn(echo_loop(
                                            listener.clone(),
                                            worker.id().get(),
                                            tx,
                                        ));
                                    }
                                    for rx in ready {
                                        let _ = rx.await;
                                    }
                                }
                            }
                            reply
                        }
                    }
                }
                NetCommand::ListenUdp { .. } | NetCommand::ListenUnixWith { .. } => {
                    unreachable!("rewritten above")
                }
                NetCommand::ListenUdpWith {
                    addr,
                    exclusive,
                    reuse_address,
                } => match worker
                    .listen_udp_with(&addr, {
                        let mut options = UdpOptions::default();
                        options.exclusive = exclusive;
                        options.reuse_address = reuse_address;
                        options
                    })
                    .await
                {
                    Err(e) => failed(&e),
                    Ok(socket) => {
                        let reply = NetReply::Listening {
                            address: socket.local_addr().expect("local addr").to_string(),
                            round_robin: false,
                        };
                        let worker = worker.clone();
                        let task = tokio::spawn(async move {
                            let mut buf = vec![0u8; 2048];
                            while let Ok(n) = socket.recv(&mut buf).await {
                                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                                if worker.send(&NetReply::Datagram(text)).await.is_err() {
                                    return;
                                }
                            }
                        });
                        if let NetReply::Listening { address, .. } = &reply {
                            holders.entry(address.clone()).or_default().push(task);
                        }
                        reply
                    }
                },
                NetCommand::ListenUnix { path, capacity } => {
                    match worker.listen_unix(&path).await {
                        Err(e) => failed(&e),
                        Ok(listener) => {
                            let listener = Arc::new(listener);
                            for _ in 0..capacity {
                                let listener = listener.clone();
                                let id = worker.id().get();
                                let task = tokio::spawn(async move {
                                    while let Ok((stream, _)) = listener.accept().await {
                                        greet_and_hold(stream, id).await;
                                    }
                                });
                                holders.entry(path.clone()).or_default().push(task);
                            }
                            NetReply::Listening {
                                address: path,
                                round_robin: false,
                            }
                        }
                    }
                }
                NetCommand::StickyToken => NetReply::Token(worker.sticky_token()),
                NetCommand::Close { address } => {
                    for task in holders.remove(&address).unwrap_or_default() {
                        task.abort();
                        let _ = task.await;
                    }
                    NetReply::Closed
                }
            };
            if worker.send(&reply).await.is_err() {
                break;
            }
        }
        // Disconnected: serve what was accepted, then exit.
        for task in holders.into_values().flatten() {
            task.abort();
        }
        drop(kept);
        drop(kept_unix);
        background.abort_all();
        while serving.join_next().await.is_some() {}
    }

    fn failed(error: &std::io::Error) -> NetReply {
        NetReply::Failed {
            kind: format!("{:?}", error.kind()),
            message: error.to_string(),
        }
    }

    /// Accepts until the listener closes; `ready` fires once the first
    /// `accept()` waits (its credit is on its way to the primary).
    async fn accept_loop(listener: Arc<TcpListener>, id: u32, ready: oneshot::Sender<()>) {
        let mut ready = Some(ready);
        loop {
            let accepted = {
                let accept = listener.accept();
                tokio::pin!(accept);
                match std::future::poll_fn(|cx| Poll::Ready(accept.as_mut().poll(cx))).await {
                    Poll::Ready(accepted) => accepted,
                    Poll::Pending => {
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(());
                        }
                        accept.await
                    }
                }
            };
            if let Some(ready) = ready.take() {
                let _ = ready.send(());
            }
            let Ok((stream, _)) = accepted else { return };
            greet_and_hold(stream, id).await;
        }
    }

    /// As `accept_loop`, serving each connection in a task of its own with
    /// the greeting, then an echo of what the client sends.
    async fn echo_loop(listener: Arc<TcpListener>, id: u32, ready: oneshot::Sender<()>) {
        let mut ready = Some(ready);
        let mut served = JoinSet::new();
        loop {
            let accepted = {
                let accept = listener.accept();
                tokio::pin!(accept);
                match std::future::poll_fn(|cx| Poll::Ready(accept.as_mut().poll(cx))).await {
                    Poll::Ready(accepted) => accepted,
                    Poll::Pending => {
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(());
                        }
                        accept.await
                    }
                }
            };
            if let Some(ready) = ready.take() {
                let _ = ready.send(());
            }
            let Ok((mut stream, _)) = accepted else { break };
            served.spawn(async move {
                if stream
                    .write_all(format!("worker {id}\n").as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                let (mut reader, mut writer) = stream.split();
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            });
            while served.try_join_next().is_some() {}
        }
        while served.join_next().await.is_some() {}
    }

    /// Writes the greeting and waits until the client closes.
    async fn greet_and_hold<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S, id: u32) {
        if stream
            .write_all(format!("worker {id}\n").as_bytes())
            .await
            .is_err()
        {
            return;
        }
        let mut buf = [0u8; 64];
        while matches!(stream.read(&mut buf).await, Ok(n) if n > 0) {}
    }

    /// Grants credit for `capacity` connections and never takes them.
    async fn stall(listener: Arc<TcpListener>, capacity: usize, ready: oneshot::Sender<()>) {
        let mut calls: Vec<Pin<Box<dyn Future<Output = _> + Send + '_>>> = (0..capacity)
            .map(|_| Box::pin(listener.accept()) as Pin<Box<dyn Future<Output = _> + Send>>)
            .collect();
        std::future::poll_fn(|cx| {
            for call in &mut calls {
                let _ = call.as_mut().poll(cx);
            }
            Poll::Ready(())
        })
        .await;
        let _ = ready.send(());
        std::future::pending::<()>().await;
        drop(calls);
    }
}

/// Reports ready to the supervisor, then says hello (id, slot, generation).
async fn say_ready(worker: &Worker) {
    worker.ready().expect("ready");
    let hello = procluster_tests::Hello {
        id: worker.id(),
        index: worker.index(),
        generation: procluster_tests::generation(),
        pid: std::process::id(),
    };
    worker.send(&hello).await.expect("send hello");
}

/// Ready, then every runtime thread blocks in `std::thread::sleep`: timers
/// stop, so heartbeats stop, as in a server stuck in blocking code. SIGUSR2
/// (the diagnostic signal the tests use) is caught, so only SIGKILL ends it.
async fn ready_then_hang(worker: Worker) {
    let _usr2 = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined2())
        .expect("handle SIGUSR2");
    say_ready(&worker).await;
    let threads = std::thread::available_parallelism().map_or(4, |n| n.get()) * 4;
    for _ in 0..threads {
        tokio::spawn(async {
            loop {
                std::thread::sleep(Duration::from_millis(50));
            }
        });
    }
    loop {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Grows the resident memory by 4 MiB every 20 ms, writing to every page so
/// the memory is really resident, up to 512 MiB and never more; exits once
/// disconnected.
async fn leak(worker: Worker) {
    const STEP: usize = 4 << 20;
    const BOUND: usize = 512 << 20;
    // Every 4 KiB touches every page, whatever the page size.
    const PAGE: usize = 4096;
    let shutdown = worker.shutdown_signal();
    tokio::pin!(shutdown);
    let mut every = tokio::time::interval(Duration::from_millis(20));
    let mut kept: Vec<Vec<u8>> = Vec::new();
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            message = worker.recv() => {
                if message.is_none() {
                    break;
                }
            }
            _ = every.tick(), if kept.len() * STEP < BOUND => {
                let mut chunk = vec![0u8; STEP];
                for byte in chunk.iter_mut().step_by(PAGE) {
                    *byte = 1;
                }
                kept.push(std::hint::black_box(chunk));
            }
        }
    }
}

mod pool {
    use procluster::pool::{CancelToken, HandlerError, Order, WorkerPool};
    use procluster::worker::Worker;
    use procluster_tests::{Command, PoolAnswer, PoolTask, Reply, TEST_POOL};
    use std::time::Duration;

    type TestPool = WorkerPool<PoolTask, PoolAnswer>;

    pub async fn run(worker: Worker) {
        let pool: TestPool = WorkerPool::open(&worker, TEST_POOL).expect("the test pool");
        tokio::spawn(commands(worker.clone(), pool.clone()));
        worker.ready().expect("ready");
        let me = worker.clone();
        pool.serve(move |task, cancel| handle(me.clone(), task, cancel))
            .await
            .expect("serve");
    }

    async fn handle(
        worker: Worker,
        task: PoolTask,
        cancel: CancelToken,
    ) -> Result<PoolAnswer, HandlerError> {
        let answer = |n| PoolAnswer {
            n,
            worker: worker.id(),
            blob: None,
            shared: None,
            primary: std::os::unix::process::parent_id(),
        };
        match task {
            PoolTask::Echo(n) => Ok(answer(n)),
            PoolTask::Work { n, millis } => {
                tokio::time::sleep(Duration::from_millis(millis)).await;
                Ok(answer(n))
            }
            PoolTask::HangOn { n, on } => {
                if on == worker.id() {
                    std::future::pending::<()>().await;
                }
                Ok(answer(n))
            }
            PoolTask::Poison => {
                procluster_tests::kill_pid(std::process::id(), procluster::Signal::KILL);
                std::future::pending().await
            }
            PoolTask::Fail { retryable: true } => Err(HandlerError::retryable("asked to fail")),
            PoolTask::Fail { retryable: false } => Err(HandlerError::new("asked to fail")),
            PoolTask::WaitForCancel(n) => {
                cancel.cancelled().await;
                let _ = worker.send(&Reply::Echo(format!("cancelled {n}"))).await;
                Ok(answer(n))
            }
            PoolTask::Blob(blob) => Ok(PoolAnswer {
                n: blob.0.len() as u64,
                worker: worker.id(),
                blob: Some(blob),
                shared: None,
                primary: std::os::unix::process::parent_id(),
            }),
            PoolTask::Shared(bytes) => Ok(PoolAnswer {
                n: bytes.len() as u64,
                worker: worker.id(),
                blob: None,
                shared: Some(bytes),
                primary: std::os::unix::process::parent_id(),
            }),
        }
    }

    async fn commands(worker: Worker, pool: TestPool) {
        while let Some(message) = worker.recv().await {
            let Ok(Command::PoolSubmit { count }) = message.decode() else {
                continue;
            };
            let mut batch = pool.submit_all((0..count).map(PoolTask::Echo), Order::Submitted);
            let mut answers = Vec::new();
            let mut failed = None;
            while let Some(result) = batch.next().await {
                match result {
                    Ok(answer) => answers.push(answer),
                    Err(error) => failed = Some(error.to_string()),
                }
            }
            let reply = match failed {
                Some(error) => Err(error),
                None => Ok(answers),
            };
            worker
                .send(&Reply::PoolSubmitted(reply))
                .await
                .expect("reply");
        }
    }
}
