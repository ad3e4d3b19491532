//! Node's IPC channel: a stream socket pair whose worker end is
//! `NODE_CHANNEL_FD`, carrying newline-delimited JSON
//! (`NODE_CHANNEL_SERIALIZATION_MODE=json`). `process.send('ready')` marks
//! the worker ready; Node's internal messages (`{"cmd": "NODE_..."}`) are
//! ignored; anything else is reported as a message.

use std::os::fd::OwnedFd;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use super::Signal;

/// Longest message line kept; longer ones are cut.
const MAX_MESSAGE: usize = 64 * 1024;

/// `(ours, theirs)`: ours is non-blocking for the runtime, theirs blocking
/// for the worker. Both close-on-exec (theirs is placed in the worker on
/// purpose).
pub fn pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    ours.set_nonblocking(true)?;
    Ok((ours.into(), theirs.into()))
}

pub async fn read(ours: OwnedFd, signals: mpsc::UnboundedSender<Signal>) {
    let Ok(stream) = tokio::net::UnixStream::from_std(std::os::unix::net::UnixStream::from(ours))
    else {
        return;
    };
    let mut lines = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        let mut limited = (&mut lines).take(MAX_MESSAGE as u64 + 1);
        let read = tokio::select! {
            read = limited.read_until(b'\n', &mut line) => read,
            () = signals.closed() => return,
        };
        match read {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                if line.len() > MAX_MESSAGE && line.last() != Some(&b'\n') {
                    // Skip the rest of an overlong message.
                    let mut rest = Vec::new();
                    let _ = lines.read_until(b'\n', &mut rest).await;
                }
                if let Some(signal) = parse(&line) {
                    if signals.send(signal).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

use tokio::io::AsyncReadExt;

/// One message line.
pub fn parse(line: &[u8]) -> Option<Signal> {
    let text = String::from_utf8_lossy(line);
    let text = text.trim();
    if text.is_empty() {
        return None;
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::String(s)) if s == "ready" => Some(Signal::Ready),
        Ok(serde_json::Value::Object(map)) => {
            let is = |key: &str, value: &str| map.get(key).and_then(|v| v.as_str()) == Some(value);
            if map
                .get("cmd")
                .and_then(|c| c.as_str())
                .is_some_and(|c| c.starts_with("NODE_"))
            {
                None
            } else if is("type", "ready") || is("status", "ready") {
                Some(Signal::Ready)
            } else if let Some(n) = map
                .get("procluster")
                .and_then(|p| p.get("requests"))
                .and_then(|n| n.as_u64())
            {
                Some(Signal::Requests(n))
            } else {
                Some(Signal::Message(text.to_string()))
            }
        }
        _ => Some(Signal::Message(text.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_and_other_messages() {
        assert_eq!(parse(b"\"ready\"\n"), Some(Signal::Ready));
        assert_eq!(parse(b"{\"type\":\"ready\"}\n"), Some(Signal::Ready));
        assert_eq!(parse(b"{\"cmd\":\"NODE_HANDLE_ACK\"}\n"), None);
        assert_eq!(
            parse(b"{\"hello\":1}\n"),
            Some(Signal::Message("{\"hello\":1}".into()))
        );
        assert_eq!(parse(b"\n"), None);
        assert_eq!(
            parse(b"{\"procluster\":{\"requests\":42}}\n"),
            Some(Signal::Requests(42))
        );
    }
}
