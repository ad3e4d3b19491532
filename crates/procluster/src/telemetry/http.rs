//! The primary's HTTP endpoint: `/metrics`, `/healthz` and `/readyz` on one
//! listener. A deliberately small HTTP/1.1 server: `GET` and `HEAD`, bodies
//! refused, keep-alive, bounded request heads and connections.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::Telemetry;
use super::exposition::Dialect;

/// Longest request head accepted.
const MAX_HEAD: usize = 8 * 1024;
/// Connections served at once; more wait in the listen queue.
const MAX_CONNECTIONS: usize = 64;
/// How long a connection may stay idle (or take to send a request head).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Accepts until the telemetry is dropped.
pub(crate) async fn serve(listener: TcpListener, telemetry: std::sync::Weak<super::Shared>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::debug!(%error, "metrics endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(shared) = telemetry.upgrade() else {
            return;
        };
        let telemetry = Telemetry { shared };
        tokio::spawn(async move {
            let _ = connection(stream, telemetry).await;
            drop(permit);
        });
    }
}

/// A parsed request head.
#[derive(Debug, PartialEq)]
struct Request {
    method: String,
    path: String,
    accept: Option<String>,
    close: bool,
    has_body: bool,
}

fn parse_head(head: &str) -> Option<Request> {
    let mut lines = head.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let method = first.next()?.to_string();
    let target = first.next()?;
    let version = first.next()?;
    let path = target.split('?').next().unwrap_or(target).to_string();
    let mut request = Request {
        method,
        path,
        accept: None,
        close: version == "HTTP/1.0",
        has_body: false,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "accept" => request.accept = Some(value.to_string()),
            "connection" => {
                let value = value.to_ascii_lowercase();
                request.close = value.contains("close")
                    || (version == "HTTP/1.0" && !value.contains("keep-alive"));
            }
            "content-length" => request.has_body = value != "0",
            "transfer-encoding" => request.has_body = true,
            _ => {}
        }
    }
    Some(request)
}

async fn connection(mut stream: TcpStream, telemetry: Telemetry) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let mut buf = Vec::with_capacity(1024);
    loop {
        let head = match tokio::time::timeout(IDLE_TIMEOUT, read_head(&mut stream, &mut buf)).await
        {
            Ok(Ok(Some(head))) => head,
            Ok(Ok(None)) | Err(_) => return Ok(()),
            Ok(Err(error)) => return Err(error),
        };
        let Some(request) = parse_head(&head) else {
            respond(&mut stream, 400, "text/plain", "bad request\n", false, true).await?;
            return Ok(());
        };
        if request.has_body {
            respond(
                &mut stream,
                400,
                "text/plain",
                "no body expected\n",
                false,
                true,
            )
            .await?;
            return Ok(());
        }
        let head_only = request.method == "HEAD";
        if request.method != "GET" && !head_only {
            respond(&mut stream, 405, "text/plain", "GET only\n", false, true).await?;
            return Ok(());
        }
        let (status, content_type, body) = route(&telemetry, &request).await;
        respond(
            &mut stream,
            status,
            content_type,
            &body,
            head_only,
            request.close,
        )
        .await?;
        if request.close {
            return Ok(());
        }
    }
}

async fn route(telemetry: &Telemetry, request: &Request) -> (u16, &'static str, String) {
    match request.path.as_str() {
        "/metrics" => {
            let dialect = Dialect::from_accept(request.accept.as_deref());
            let body = telemetry.scrape(dialect).await;
            (200, dialect.content_type(), body)
        }
        "/healthz" | "/livez" => {
            let health = telemetry.health();
            let status = if health.alive { 200 } else { 503 };
            (status, "text/plain; charset=utf-8", health.to_string())
        }
        "/readyz" => {
            let readiness = telemetry.readiness();
            let status = if readiness.ready { 200 } else { 503 };
            (status, "text/plain; charset=utf-8", readiness.to_string())
        }
        _ => (
            404,
            "text/plain; charset=utf-8",
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}

/// Reads one request head (up to the blank line); `None` at a clean end
/// of the connection. Bytes after the head stay in `buf` (pipelining).
async fn read_head(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<Option<String>> {
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            return Ok(Some(head));
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::Error::other("request head too large"));
        }
        let mut chunk = [0u8; 2048];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    body: &str,
    head_only: bool,
    close: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let connection = if close { "close" } else { "keep-alive" };
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: {connection}\r\nCache-Control: no-store\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&out).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads_parse() {
        let request = parse_head(
            "GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: application/openmetrics-text; version=1.0.0\r\nConnection: close",
        )
        .unwrap();
        assert_eq!(request.path, "/metrics");
        assert!(request.close && !request.has_body);
        assert!(
            request
                .accept
                .unwrap()
                .starts_with("application/openmetrics-text")
        );
        let old = parse_head("GET / HTTP/1.0").unwrap();
        assert!(old.close);
        assert!(parse_head("garbage").is_none());
        assert!(
            parse_head("POST / HTTP/1.1\r\nContent-Length: 5")
                .unwrap()
                .has_body
        );
    }
}
