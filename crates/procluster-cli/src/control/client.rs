//! `procluster status | reload | scale | stop`: one request to a running
//! primary.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::{Request, Response};
use crate::args::{ClientArgs, ReloadArgs, ScaleArgs, StatusArgs};

/// Exit status when no primary answers.
pub const NOT_RUNNING: u8 = 3;

pub fn socket_path(args: &ClientArgs) -> PathBuf {
    args.control
        .clone()
        .unwrap_or_else(|| super::default_path(args.name.as_deref().unwrap_or("default")))
}

/// Sends `request`, returns the response.
pub async fn call(path: &Path, request: &Request) -> Result<Response, String> {
    let stream = UnixStream::connect(path).await.map_err(|e| {
        format!(
            "cannot reach procluster at {}: {e} (is it running? pass --control PATH or --name NAME)",
            path.display()
        )
    })?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request).map_err(|e| e.to_string())?;
    line.push(b'\n');
    write.write_all(&line).await.map_err(|e| e.to_string())?;
    let mut answer = String::new();
    BufReader::new(read)
        .read_line(&mut answer)
        .await
        .map_err(|e| format!("the control socket failed: {e}"))?;
    if answer.is_empty() {
        return Err("procluster closed the control connection without answering".into());
    }
    serde_json::from_str(&answer).map_err(|e| format!("bad answer from procluster: {e}"))
}

async fn run(args: &ClientArgs, request: Request) -> Result<Response, ExitCode> {
    match call(&socket_path(args), &request).await {
        Ok(response) if response.ok => Ok(response),
        Ok(response) => {
            print_err(&format!(
                "procluster: {}\n",
                response.error.as_deref().unwrap_or("the request failed")
            ));
            Err(ExitCode::FAILURE)
        }
        Err(error) => {
            print_err(&format!("procluster: {error}\n"));
            Err(ExitCode::from(NOT_RUNNING))
        }
    }
}

fn print_message(response: &Response) {
    if let Some(message) = &response.message {
        print_out(&format!("{message}\n"));
    }
}

pub async fn status(args: StatusArgs) -> ExitCode {
    let response = match run(&args.client, Request::Status).await {
        Ok(r) => r,
        Err(code) => return code,
    };
    let status = response.status.unwrap_or_default();
    if args.json {
        print_out(&format!("{status}\n"));
    } else {
        print_out(&human_status(&status));
    }
    ExitCode::SUCCESS
}

pub async fn reload(args: ReloadArgs) -> ExitCode {
    match run(&args.client, Request::Reload { wait: args.wait }).await {
        Ok(response) => {
            print_message(&response);
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

pub async fn scale(args: ScaleArgs) -> ExitCode {
    match run(&args.client, Request::Scale { scale: args.to }).await {
        Ok(response) => {
            print_message(&response);
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

pub async fn stop(args: ClientArgs) -> ExitCode {
    match run(&args, Request::Stop).await {
        Ok(response) => {
            print_message(&response);
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

/// The status as a few readable lines.
pub fn human_status(status: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "primary pid {}  policy {}  ready {}  workers {}/{}",
        status["pid"],
        status["policy"].as_str().unwrap_or("?"),
        status["ready"].as_str().unwrap_or("?"),
        status["workers"].as_array().map_or(0, Vec::len),
        status["desired"],
    );
    for listener in status["listeners"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "listen  {} = {}",
            listener["name"].as_str().unwrap_or("?"),
            listener["address"].as_str().unwrap_or("?")
        );
    }
    let _ = writeln!(
        out,
        "{:>6} {:>5} {:>8} {:<9} {:>8} {:>6} {:>9} {:>9}  started",
        "id", "index", "pid", "state", "restarts", "cpu%", "memory", "uptime"
    );
    for worker in status["workers"].as_array().into_iter().flatten() {
        let cpu = worker["cpu_percent"]
            .as_f64()
            .map_or("-".to_string(), |p| format!("{p:.1}"));
        let memory = worker["rss_bytes"]
            .as_u64()
            .map_or("-".to_string(), |b| format!("{:.1}M", b as f64 / 1048576.0));
        let uptime = worker["uptime_s"]
            .as_f64()
            .map_or("-".to_string(), |s| format!("{s:.0}s"));
        let _ = writeln!(
            out,
            "{:>6} {:>5} {:>8} {:<9} {:>8} {cpu:>6} {memory:>9} {uptime:>9}  {}",
            worker["id"].to_string(),
            worker["index"].to_string(),
            worker["pid"].to_string(),
            worker["state"].as_str().unwrap_or("?"),
            worker["restarts"].to_string(),
            worker["started_at"].as_str().unwrap_or("?"),
        );
    }
    if let Some(reload) = status["reload"].as_str() {
        let _ = writeln!(out, "reload  {reload}");
    }
    out
}

/// Prints to stdout; a reader that went away (`| head`) is not an error
/// worth a panic.
fn print_out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
}

fn print_err(text: &str) {
    use std::io::Write;
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}
