//! `procluster logs`: the workers' recent output over the control socket,
//! and with `-f` what follows. The answer is the usual response line, then
//! one JSON line per output line (`{ts, worker, index, pid, stream, line}`),
//! until the primary closes the connection (at once without `-f`).

use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::broadcast::error::RecvError;

use super::{Request, Response};
use crate::args::ClientArgs;
use crate::recent::{Line, Recent};

/// `procluster logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// Keep printing lines as workers write them.
    #[arg(short, long)]
    pub follow: bool,
    /// Only this worker's lines (its id).
    #[arg(long, value_name = "ID", conflicts_with = "slot")]
    pub worker: Option<u32>,
    /// Only the lines of the workers of this slot (0..N-1).
    #[arg(long, value_name = "N")]
    pub slot: Option<usize>,
    /// How many recent lines to print first.
    #[arg(short = 'n', long, value_name = "N", default_value_t = 100)]
    pub lines: usize,
    /// Print each line as the JSON object the primary sends.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub client: ClientArgs,
}

/// What a `logs` client asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogsQuery {
    pub follow: bool,
    #[serde(default)]
    pub worker: Option<u32>,
    #[serde(default)]
    pub slot: Option<usize>,
    pub lines: usize,
}

impl LogsQuery {
    fn wants(&self, line: &Line) -> bool {
        self.worker.is_none_or(|w| w == line.worker)
            && self.slot.is_none_or(|s| line.index == Some(s))
    }
}

/// Answers a `logs` request on the control connection.
pub async fn serve(
    query: LogsQuery,
    mut out: impl AsyncWrite + Unpin,
    recent: Option<Arc<Recent>>,
) -> std::io::Result<()> {
    let Some(recent) = recent else {
        return write_json(&mut out, &Response::error("this primary keeps no output")).await;
    };
    // Subscribed before the backlog is read, so no line falls between them.
    let mut feed = recent.follow();
    let backlog = recent.last(query.lines, |l| query.wants(l));
    write_json(&mut out, &Response::ok("logs")).await?;
    for line in &backlog {
        write_json(&mut out, &**line).await?;
    }
    if !query.follow {
        return out.shutdown().await;
    }
    // Lines pushed between subscribing and reading the backlog come in both.
    let mut in_backlog_window = !backlog.is_empty();
    loop {
        match feed.recv().await {
            Ok(line) => {
                if !query.wants(&line) {
                    continue;
                }
                if in_backlog_window {
                    if backlog.iter().any(|l| Arc::ptr_eq(l, &line)) {
                        continue;
                    }
                    in_backlog_window = false;
                }
                write_json(&mut out, &*line).await?;
            }
            Err(RecvError::Lagged(missed)) => {
                let notice = Line {
                    ts: crate::logs::rfc3339(std::time::SystemTime::now()),
                    worker: 0,
                    index: None,
                    pid: std::process::id(),
                    stream: "notice".into(),
                    line: format!("{missed} lines skipped: this client fell behind"),
                };
                write_json(&mut out, &notice).await?;
            }
            Err(RecvError::Closed) => return out.shutdown().await,
        }
    }
}

async fn write_json(
    out: &mut (impl AsyncWrite + Unpin),
    value: &impl Serialize,
) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(value)?;
    bytes.push(b'\n');
    out.write_all(&bytes).await
}

/// `procluster logs`.
pub async fn logs(args: LogsArgs) -> ExitCode {
    let path = super::client::socket_path(&args.client);
    let query = LogsQuery {
        follow: args.follow,
        worker: args.worker,
        slot: args.slot,
        lines: args.lines,
    };
    let result = stream(&path, query, |line| {
        let text = if args.json {
            serde_json::to_string(line).unwrap_or_default()
        } else {
            line.text()
        };
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{text}")
            .and_then(|()| stdout.flush())
            .is_ok()
    })
    .await;
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(StreamError::NotRunning(error)) => {
            eprintln!("procluster: {error}");
            ExitCode::from(super::client::NOT_RUNNING)
        }
        Err(StreamError::Failed(error)) => {
            eprintln!("procluster: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Why a logs stream ended badly.
#[derive(Debug)]
pub enum StreamError {
    /// No primary answers on the socket.
    NotRunning(String),
    /// It answered with an error, or the stream broke.
    Failed(String),
}

/// Asks for logs and calls `each` per line until the primary closes the
/// stream or `each` returns false.
pub async fn stream(
    path: &std::path::Path,
    query: LogsQuery,
    mut each: impl FnMut(&Line) -> bool,
) -> Result<(), StreamError> {
    let stream = UnixStream::connect(path).await.map_err(|e| {
        StreamError::NotRunning(format!(
            "cannot reach procluster at {}: {e} (is it running? pass --control PATH or --name NAME)",
            path.display()
        ))
    })?;
    let (read, mut write) = stream.into_split();
    let mut request = serde_json::to_vec(&Request::Logs(query))
        .map_err(|e| StreamError::Failed(e.to_string()))?;
    request.push(b'\n');
    write
        .write_all(&request)
        .await
        .map_err(|e| StreamError::Failed(e.to_string()))?;
    let mut lines = BufReader::new(read).lines();
    let first = lines
        .next_line()
        .await
        .map_err(|e| StreamError::Failed(format!("the control socket failed: {e}")))?
        .ok_or_else(|| {
            StreamError::Failed("procluster closed the control connection without answering".into())
        })?;
    let response: Response = serde_json::from_str(&first)
        .map_err(|e| StreamError::Failed(format!("bad answer from procluster: {e}")))?;
    if !response.ok {
        return Err(StreamError::Failed(
            response
                .error
                .unwrap_or_else(|| "the request failed".into()),
        ));
    }
    while let Some(text) = lines
        .next_line()
        .await
        .map_err(|e| StreamError::Failed(format!("the control socket failed: {e}")))?
    {
        let line: Line = serde_json::from_str(&text)
            .map_err(|e| StreamError::Failed(format!("bad line from procluster: {e}")))?;
        if !each(&line) {
            break;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(worker: u32, index: usize, text: &str) -> Line {
        Line {
            ts: "t".into(),
            worker,
            index: Some(index),
            pid: 9,
            stream: "stdout".into(),
            line: text.into(),
        }
    }

    #[tokio::test]
    async fn the_backlog_is_filtered_and_the_stream_ends_without_follow() {
        let recent = Arc::new(Recent::default());
        for (w, i, t) in [(1, 0, "a"), (2, 1, "b"), (1, 0, "c")] {
            recent.push(line(w, i, t));
        }
        let query = LogsQuery {
            follow: false,
            worker: None,
            slot: Some(0),
            lines: 10,
        };
        let mut out = Vec::new();
        serve(query, &mut out, Some(recent)).await.unwrap();
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert!(lines[0].contains("\"ok\":true"));
        assert!(lines[1].contains("\"line\":\"a\"") && lines[2].contains("\"line\":\"c\""));
    }

    #[test]
    fn the_request_is_tagged_json() {
        let text = serde_json::to_string(&Request::Logs(LogsQuery {
            follow: true,
            worker: Some(3),
            slot: None,
            lines: 5,
        }))
        .unwrap();
        assert_eq!(
            text,
            r#"{"cmd":"logs","follow":true,"worker":3,"slot":null,"lines":5}"#
        );
    }
}
