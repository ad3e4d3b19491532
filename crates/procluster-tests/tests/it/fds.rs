//! File descriptors riding with messages: sockets handed to a worker and
//! back, in any number, next to large payloads, in both directions at once;
//! and what the receiver owns.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::OwnedFd;

use procluster::primary::{Cluster, WorkerHandle};
use procluster_tests::*;
use rustix::io::FdFlags;

use crate::builder;

/// A loopback connection: the client end, and the accepted end to send.
fn connection() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    client.set_read_timeout(Some(DEADLINE)).unwrap();
    let (accepted, _) = listener.accept().unwrap();
    (client, accepted)
}

/// Writes `text` through `fd` (a received copy of the accepted end) and
/// checks it comes out of the client end.
fn check_carries(fd: OwnedFd, client: &mut TcpStream, text: &str) {
    let mut through = TcpStream::from(fd);
    through.write_all(text.as_bytes()).unwrap();
    let mut read = vec![0; text.len()];
    client.read_exact(&mut read).unwrap();
    assert_eq!(String::from_utf8_lossy(&read), text);
}

async fn one_worker() -> (Cluster, WorkerHandle) {
    let mut cluster = builder("serve").build().unwrap();
    let worker = cluster.fork().await.unwrap();
    online(&mut cluster, 1).await;
    (cluster, worker)
}

#[tokio::test]
async fn a_socket_sent_to_a_worker_comes_back_twice_in_one_message_and_works() {
    let (mut cluster, worker) = one_worker().await;
    let (mut client, accepted) = connection();
    worker
        .send_fds(&Command::ReturnFd, &[&accepted])
        .await
        .unwrap();
    drop(accepted); // from now on only the copies that travelled hold the socket
    let (from, mut message) = message(&mut cluster).await;
    assert_eq!(from, worker);
    assert!(matches!(message.decode::<Reply>().unwrap(), Reply::Fds(2)));
    let fds = message.take_fds();
    assert_eq!(fds.len(), 2);
    let mut fds = fds.into_iter();
    check_carries(fds.next().unwrap(), &mut client, "through the first copy; ");
    check_carries(fds.next().unwrap(), &mut client, "and through the second");
    let mut end = [0; 1];
    assert_eq!(
        client.read(&mut end).unwrap(),
        0,
        "once both copies are closed, the connection ends"
    );
}

#[tokio::test]
async fn the_same_socket_sent_in_two_messages_arrives_with_each() {
    let (mut cluster, worker) = one_worker().await;
    let (mut client, accepted) = connection();
    worker
        .send_fds(&Command::EchoWithFds("first".into()), &[&accepted])
        .await
        .unwrap();
    worker
        .send_fds(&Command::EchoWithFds("second".into()), &[&accepted])
        .await
        .unwrap();
    drop(accepted);
    for expected in ["first", "second"] {
        let (_, mut message) = message(&mut cluster).await;
        assert!(
            matches!(message.decode::<Reply>().unwrap(), Reply::Echo(ref text) if text == expected)
        );
        let mut fds = message.take_fds();
        assert_eq!(fds.len(), 1, "one fd with {expected}");
        check_carries(fds.pop().unwrap(), &mut client, expected);
    }
}

#[tokio::test]
async fn an_800_kb_payload_with_a_socket_arrives_intact_both_ways() {
    let (mut cluster, worker) = one_worker().await;
    let (mut client, accepted) = connection();
    let text: String = (0..800_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    worker
        .send_fds(&Command::EchoWithFds(text.clone()), &[&accepted])
        .await
        .unwrap();
    drop(accepted);
    let (_, mut message) = message(&mut cluster).await;
    let Reply::Echo(back) = message.decode::<Reply>().unwrap() else {
        panic!("not an echo")
    };
    assert!(back == text, "the 800 KB text changed on the way");
    let mut fds = message.take_fds();
    assert_eq!(fds.len(), 1);
    check_carries(fds.pop().unwrap(), &mut client, "still the same socket");
}

#[tokio::test]
async fn fd_carrying_messages_in_both_directions_at_once_do_not_deadlock() {
    const COUNT: u64 = 200;
    const PADDING: usize = 32 * 1024; // 6 MiB each way: far more than socket buffers hold
    let (mut cluster, worker) = one_worker().await;
    // The worker starts sending its own fd-carrying messages...
    worker
        .send(&Command::SendFds {
            count: COUNT,
            padding: PADDING,
        })
        .await
        .unwrap();
    // ...while the primary sends as many, each answered with its fd.
    let sender = worker.clone();
    let sending = tokio::spawn(async move {
        let null = std::fs::File::open("/dev/null").unwrap();
        for i in 0..COUNT {
            let text = format!("{i:>PADDING$}");
            sender
                .send_fds(&Command::EchoWithFds(text), &[&null])
                .await
                .unwrap();
        }
    });
    let (mut padded, mut echoed) = (0, 0);
    while padded < COUNT || echoed < COUNT {
        let (_, message) = message(&mut cluster).await;
        assert_eq!(message.fds().len(), 1, "every message carries its one fd");
        match message.decode::<Reply>().unwrap() {
            Reply::Padded { seq, .. } => {
                assert_eq!(seq, padded, "the worker's messages stay in order");
                padded += 1;
            }
            Reply::Echo(text) => {
                assert_eq!(
                    text.trim_start(),
                    echoed.to_string(),
                    "the echoes stay in order"
                );
                echoed += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    tokio::time::timeout(DEADLINE, sending)
        .await
        .expect("the primary's sends complete")
        .unwrap();
}

#[tokio::test]
async fn received_fds_are_close_on_exec() {
    let (mut cluster, worker) = one_worker().await;
    let (_client, accepted) = connection();
    worker
        .send_fds(&Command::ReturnFd, &[&accepted])
        .await
        .unwrap();
    let (_, message) = message(&mut cluster).await;
    assert_eq!(message.fds().len(), 2);
    for fd in message.fds() {
        let flags = rustix::io::fcntl_getfd(fd).unwrap();
        assert!(
            flags.contains(FdFlags::CLOEXEC),
            "a received fd would leak into the primary's children"
        );
    }
}

#[tokio::test]
async fn a_dropped_message_closes_its_fds() {
    let (mut cluster, worker) = one_worker().await;
    let (_client, accepted) = connection();
    let before = open_fds();
    worker
        .send_fds(&Command::ReturnFd, &[&accepted])
        .await
        .unwrap();
    let (_, message) = message(&mut cluster).await;
    assert_eq!(message.fds().len(), 2);
    assert_eq!(
        open_fds(),
        before + 2,
        "the message holds its two fds (and nothing else is left open)"
    );
    drop(message);
    assert_eq!(open_fds(), before, "dropping the message closed them");
}
