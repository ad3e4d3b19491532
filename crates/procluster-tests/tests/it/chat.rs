//! The chat example, run as a user would: WebSocket clients on every
//! worker hear each other, and the hit counter is shared, on the local
//! backends and on Redis.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Stdio;

use futures_util::{SinkExt, StreamExt};
use procluster_tests::DEADLINE;
use procluster_tests::redis::RedisServer;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

type Client = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

/// The chat example, built if needed.
fn chat_example() -> PathBuf {
    crate::example("chat")
}

/// The example running with 2 workers on a free port.
struct Chat {
    child: tokio::process::Child,
    port: u16,
}

impl Chat {
    async fn start(extra: &[&str]) -> Self {
        let mut child = tokio::process::Command::new(chat_example())
            .args(["--workers", "2", "--port", "0", "--policy", "round-robin"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start the chat example");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(DEADLINE, lines.next_line())
            .await
            .expect("the chat did not say where it listens")
            .unwrap()
            .expect("the chat ended before it listened");
        let port = line
            .strip_prefix("listening on http://127.0.0.1:")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        Self { child, port }
    }

    /// One HTTP request on a connection of its own; the response's body.
    async fn http(&self, method: &str, path: &str) -> String {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await.unwrap();
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: chat\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        tokio::time::timeout(DEADLINE, stream.read_to_string(&mut response))
            .await
            .expect("no HTTP response")
            .unwrap();
        let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        body.to_string()
    }

    /// WebSocket clients, `per_worker` on each of the 2 workers (the
    /// upgrade response says which worker took the connection).
    async fn clients(&self, per_worker: usize) -> Vec<(String, Client)> {
        let mut by_worker: BTreeMap<String, usize> = BTreeMap::new();
        let mut clients = Vec::new();
        for _ in 0..64 {
            let url = format!("ws://127.0.0.1:{}/ws", self.port);
            let (client, response) =
                tokio::time::timeout(DEADLINE, tokio_tungstenite::connect_async(url))
                    .await
                    .expect("no WebSocket handshake")
                    .expect("a WebSocket");
            let worker = response.headers()["x-procluster-worker"]
                .to_str()
                .unwrap()
                .to_string();
            let count = by_worker.entry(worker.clone()).or_default();
            if *count < per_worker {
                *count += 1;
                clients.push((worker, client));
            }
            if by_worker.len() == 2 && by_worker.values().all(|n| *n == per_worker) {
                return clients;
            }
        }
        panic!("64 connections did not reach both workers: {by_worker:?}");
    }
}

async fn text(client: &mut Client) -> String {
    loop {
        let message = tokio::time::timeout(DEADLINE, client.next())
            .await
            .expect("timed out waiting for a chat message")
            .expect("the WebSocket closed")
            .expect("a WebSocket message");
        if let Message::Text(text) = message {
            return text.to_string();
        }
    }
}

async fn a_chat_spans_every_worker_and_shares_its_counter(extra: &[&str]) {
    let chat = Chat::start(extra).await;
    let whoami = chat.http("GET", "/whoami").await;
    assert!(
        whoami.starts_with("worker ") && whoami.contains("(pid "),
        "{whoami}"
    );

    let mut clients = chat.clients(2).await;
    let sent: BTreeSet<String> = (0..clients.len())
        .map(|i| format!("hello from client {i}"))
        .collect();
    for ((_, client), message) in clients.iter_mut().zip(&sent) {
        client.send(Message::text(message.clone())).await.unwrap();
    }
    for (worker, client) in &mut clients {
        let mut heard = BTreeSet::new();
        while heard.len() < sent.len() {
            heard.insert(text(client).await);
        }
        assert_eq!(heard, sent, "a client of {worker}");
    }

    let mut counted = Vec::new();
    for _ in 0..10 {
        counted.push(chat.http("POST", "/hits").await.parse::<i64>().unwrap());
    }
    counted.sort_unstable();
    assert_eq!(counted, (1..=10).collect::<Vec<_>>());
    assert_eq!(chat.http("GET", "/hits").await, "10");
    drop(chat.child);
}

#[tokio::test]
async fn the_chat_example_spans_every_worker_and_shares_its_counter() {
    a_chat_spans_every_worker_and_shares_its_counter(&[]).await;
}

#[tokio::test]
async fn the_chat_example_on_redis() {
    let server = RedisServer::start();
    a_chat_spans_every_worker_and_shares_its_counter(&["--redis", &server.url()]).await;
}
