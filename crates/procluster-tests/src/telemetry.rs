//! Pieces of the telemetry tests: what the telemetry worker says, and a
//! small HTTP client for the metrics endpoint.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The telemetry worker logged what it was asked to, and dropped this many
/// events (its buffer was full).
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LogsDone {
    pub dropped: u64,
}

/// An answer of the metrics endpoint.
#[derive(Debug)]
pub struct HttpAnswer {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// `GET path` on `addr`, with an `Accept` header if given; the connection
/// is closed after the answer.
pub async fn http_get(addr: SocketAddr, path: &str, accept: Option<&str>) -> HttpAnswer {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the metrics endpoint");
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("read");
    let text = String::from_utf8(raw).expect("UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head and a body");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    let content_type = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Type: "))
        .unwrap_or_default()
        .to_string();
    HttpAnswer {
        status,
        content_type,
        body: body.to_string(),
    }
}
