//! A worker program for the integration tests. Its behaviour is chosen by the
//! first argument; it reports what it sees to the primary as messages.

use std::time::Duration;

use procluster::Role;
use procluster::worker::Worker;
use procluster_tests::{Command, Reply};

#[tokio::main]
async fn main() {
    let mode = std::env::args().nth(1).unwrap_or_else(|| "serve".into());
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
        "print" => {
            println!("line one from {}", worker.id());
            print!("unterminated tail");
            use std::io::Write;
            std::io::stdout().flush().unwrap();
            worker.shutdown_signal().await;
        }
        "crash-at-boot" => panic!("boot failure (on purpose)"),
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
