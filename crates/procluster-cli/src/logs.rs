//! What the primary prints: workers' output (one line per line, never
//! mixed) and its own log, as text or JSON lines of one schema.
//!
//! Nothing the primary prints may stop it. Each of stdout and stderr has a
//! writer thread fed through a bounded queue ([`QUEUE_BYTES`]): the
//! runtime's threads only queue lines, so a pipe that is full or slow stalls
//! nobody but the writer; when the queue is full, lines are dropped and
//! counted, and a closed stream (a reader that went away: `EPIPE`) loses its
//! lines, counted too. Once a line gets through again, a notice says how many
//! were lost before it. SIGPIPE is ignored (Rust's default), so a closed
//! pipe is an error to count, never a signal.
//!
//! The JSON schema, one object per line, for workers' lines and the
//! primary's own records alike:
//!
//! | key | present | value |
//! |---|---|---|
//! | `ts` | always | RFC 3339 UTC time, milliseconds: `2024-05-01T12:34:56.789Z` |
//! | `pid` | always | the process that wrote it (the worker's, or the primary's) |
//! | `stream` | always | `stdout` or `stderr`: where the line is printed |
//! | `line` | always | the text (invalid UTF-8 replaced by U+FFFD) |
//! | `worker`, `index` | workers' lines | the worker's id and slot |
//! | `level` | the primary's records | `error`, `warn`, `info`, `debug` or `trace` |
//! | `fields` | the primary's records with fields | an object: `{"worker": 3, "status": "exit code 1"}` |

use std::collections::VecDeque;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use procluster::primary::{OutputHook, OutputLine, Stream};

use crate::args::LogFormat;

/// Bytes of lines a stream may hold waiting for its writer; past that,
/// lines are dropped (and counted).
pub const QUEUE_BYTES: usize = 4 << 20;

/// The primary's stdout and stderr, each with its writer thread.
struct Outputs {
    stdout: Arc<Sink>,
    stderr: Arc<Sink>,
    format: LogFormat,
}

static OUTPUTS: OnceLock<Outputs> = OnceLock::new();

fn outputs() -> &'static Outputs {
    OUTPUTS.get_or_init(|| Outputs {
        stdout: Sink::start(Stream::Stdout, LogFormat::Text),
        stderr: Sink::start(Stream::Stderr, LogFormat::Text),
        format: LogFormat::Text,
    })
}

/// Sets up the primary's output: the sinks, and its own log on stderr.
/// `PROCLUSTER_LOG` (an env filter such as `debug`) changes the level; the
/// default is `info`.
pub fn init(format: LogFormat) {
    let _ = OUTPUTS.set(Outputs {
        stdout: Sink::start(Stream::Stdout, format),
        stderr: Sink::start(Stream::Stderr, format),
        format,
    });
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("PROCLUSTER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| SinkWriter(outputs().stderr.clone()))
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        // A write that fails is counted by the sink; tracing's own report
        // of it would print with `eprintln!`, which panics on a closed
        // stderr.
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.event_format(JsonRecords).try_init(),
    };
}

/// Prints one line of the primary's own on stderr, outside the log (a
/// final verdict such as a crash loop), in the output's format.
pub fn say(text: &str) {
    let out = outputs();
    let line = match out.format {
        LogFormat::Text => format!("procluster: {text}\n").into_bytes(),
        LogFormat::Json => record("error", text, serde_json::Map::new(), SystemTime::now()),
    };
    out.stderr.push(line);
}

/// Waits until what was queued is written, for at most `limit` (a stream
/// nobody reads must not keep the primary from exiting).
pub fn flush(limit: Duration) {
    if let Some(out) = OUTPUTS.get() {
        let deadline = Instant::now() + limit;
        out.stdout.flush_until(deadline);
        out.stderr.flush_until(deadline);
    }
}

/// Lines of output lost so far on stdout and stderr (dropped while the
/// stream was full or slow, or failed to write), for `status`.
pub fn lost() -> (u64, u64) {
    let out = outputs();
    (
        out.stdout.lost.load(Ordering::Relaxed),
        out.stderr.lost.load(Ordering::Relaxed),
    )
}

/// The hook that prints each line of workers' output: worker stdout to the
/// primary's stdout, stderr to stderr, each line whole.
pub fn output_hook(format: LogFormat) -> OutputHook {
    Arc::new(move |line: OutputLine<'_>| {
        let formatted = match format {
            LogFormat::Text => text_line(&line),
            LogFormat::Json => json_line(&line, SystemTime::now()),
        };
        let out = outputs();
        match line.stream {
            Stream::Stdout => out.stdout.push(formatted),
            Stream::Stderr => out.stderr.push(formatted),
        }
    })
}

/// `[worker 3] the line`.
pub fn text_line(line: &OutputLine<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.line.len() + 16);
    let _ = write!(out, "[worker {}] ", line.worker);
    out.extend_from_slice(line.line);
    out.push(b'\n');
    out
}

/// `{"ts":…,"pid":…,"stream":"stdout","line":"…","worker":3,"index":0}`.
/// Bytes that are not UTF-8 are replaced (U+FFFD).
pub fn json_line(line: &OutputLine<'_>, now: SystemTime) -> Vec<u8> {
    let value = serde_json::json!({
        "ts": rfc3339(now),
        "pid": line.pid,
        "stream": line.stream.name(),
        "line": String::from_utf8_lossy(line.line),
        "worker": line.worker,
        "index": line.index,
    });
    let mut out = serde_json::to_vec(&value).unwrap_or_default();
    out.push(b'\n');
    out
}

/// One of the primary's own records as a JSON line.
fn record(
    level: &str,
    text: &str,
    fields: serde_json::Map<String, serde_json::Value>,
    now: SystemTime,
) -> Vec<u8> {
    let mut value = serde_json::json!({
        "ts": rfc3339(now),
        "pid": std::process::id(),
        "stream": "stderr",
        "line": text,
        "level": level,
    });
    if !fields.is_empty() {
        value["fields"] = serde_json::Value::Object(fields);
    }
    let mut out = serde_json::to_vec(&value).unwrap_or_default();
    out.push(b'\n');
    out
}

/// The primary's log records in the JSON schema.
struct JsonRecords;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for JsonRecords
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let mut fields = FieldsVisitor::default();
        event.record(&mut fields);
        let level = event.metadata().level().as_str().to_ascii_lowercase();
        let bytes = record(&level, &fields.message, fields.fields, SystemTime::now());
        writer.write_str(&String::from_utf8_lossy(&bytes))
    }
}

/// Collects an event's message and its other fields as JSON values.
#[derive(Default)]
struct FieldsVisitor {
    message: String,
    fields: serde_json::Map<String, serde_json::Value>,
}

impl FieldsVisitor {
    fn put(&mut self, field: &tracing::field::Field, value: serde_json::Value) {
        if field.name() == "message" {
            self.message = match value {
                serde_json::Value::String(text) => text,
                other => other.to_string(),
            };
        } else {
            self.fields.insert(field.name().to_string(), value);
        }
    }
}

impl tracing::field::Visit for FieldsVisitor {
    /// Values logged by `Display` (`worker = %id`) come here too: a whole
    /// number stays a number in JSON.
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        let text = format!("{value:?}");
        match text.parse::<u64>() {
            Ok(number) => self.put(field, number.into()),
            Err(_) => self.put(field, text.into()),
        }
    }
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.put(field, value.into());
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.put(field, value.into());
    }
    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.put(field, value.into());
    }
    fn record_f64(&mut self, field: &tracing::field::Field, value: f64) {
        self.put(field, value.into());
    }
    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.put(field, value.into());
    }
}

/// Hands what tracing formats to the stderr sink, one event per write.
struct SinkWriter(Arc<Sink>);

impl Write for SinkWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf.to_vec());
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One output stream: a bounded queue of lines and the thread that writes
/// them.
struct Sink {
    state: Mutex<Queue>,
    /// Every line lost so far (dropped when full, or failed to write).
    lost: AtomicU64,
    /// Lines queued, or the queue emptied.
    changed: Condvar,
    stream: Stream,
    format: LogFormat,
}

#[derive(Default)]
struct Queue {
    lines: VecDeque<Vec<u8>>,
    bytes: usize,
    /// Dropped because the queue was full, not reported yet.
    dropped: u64,
    /// Lines in the writer's hands.
    writing: bool,
}

impl Sink {
    fn start(stream: Stream, format: LogFormat) -> Arc<Self> {
        let sink = Arc::new(Self {
            state: Mutex::new(Queue::default()),
            lost: AtomicU64::new(0),
            changed: Condvar::new(),
            stream,
            format,
        });
        let writer = sink.clone();
        let started = std::thread::Builder::new()
            .name(format!("procluster-{}", stream.name()))
            .spawn(move || writer.run());
        if started.is_err() {
            // No thread: lines are written by whoever queues them.
            sink.lock().writing = true;
        }
        sink
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a line; never blocks on the stream.
    fn push(&self, line: Vec<u8>) {
        let mut queue = self.lock();
        if queue.bytes + line.len() > QUEUE_BYTES {
            queue.dropped += 1;
            self.lost.fetch_add(1, Ordering::Relaxed);
            return;
        }
        queue.bytes += line.len();
        queue.lines.push_back(line);
        drop(queue);
        self.changed.notify_all();
    }

    fn run(&self) {
        let mut out = Output::new(self.stream);
        let mut lost = 0u64;
        loop {
            let (lines, dropped) = {
                let mut queue = self.lock();
                queue.writing = false;
                self.changed.notify_all();
                while queue.lines.is_empty() {
                    queue = self.changed.wait(queue).unwrap_or_else(|e| e.into_inner());
                }
                queue.writing = true;
                queue.bytes = 0;
                let lines = std::mem::take(&mut queue.lines);
                (lines, std::mem::take(&mut queue.dropped))
            };
            lost += dropped;
            for line in lines {
                if lost > 0 && out.write(&self.notice(lost)).is_ok() {
                    lost = 0;
                }
                if out.write(&line).is_err() {
                    lost += 1;
                    self.lost.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    /// What a reader is told once lines get through again.
    fn notice(&self, lost: u64) -> Vec<u8> {
        let text = format!(
            "procluster: {lost} line(s) of output to {} were lost: it was full, too slow or closed",
            self.stream.name()
        );
        match self.format {
            LogFormat::Text => format!("{text}\n").into_bytes(),
            LogFormat::Json => {
                let value = serde_json::json!({
                    "ts": rfc3339(SystemTime::now()),
                    "pid": std::process::id(),
                    "stream": self.stream.name(),
                    "line": text,
                    "level": "warn",
                    "fields": {"lost": lost},
                });
                let mut out = serde_json::to_vec(&value).unwrap_or_default();
                out.push(b'\n');
                out
            }
        }
    }

    fn flush_until(&self, deadline: Instant) {
        let mut queue = self.lock();
        while !queue.lines.is_empty() || queue.writing {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            queue = self
                .changed
                .wait_timeout(queue, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The process's stdout or stderr, written without Rust's buffering or its
/// lock (only the sink's thread writes).
struct Output(Option<std::fs::File>);

impl Output {
    fn new(stream: Stream) -> Self {
        use std::os::fd::AsFd;
        let fd = match stream {
            Stream::Stdout => std::io::stdout().as_fd().try_clone_to_owned(),
            Stream::Stderr => std::io::stderr().as_fd().try_clone_to_owned(),
        };
        // Without a copy (no descriptor left), writes fail and are counted.
        Self(fd.ok().map(std::fs::File::from))
    }

    fn write(&mut self, line: &[u8]) -> std::io::Result<()> {
        match &mut self.0 {
            Some(file) => file.write_all(line),
            None => Err(std::io::Error::from(std::io::ErrorKind::BrokenPipe)),
        }
    }
}

/// UTC, millisecond precision: `2024-05-01T12:34:56.789Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(bytes: &[u8]) -> OutputLine<'_> {
        OutputLine {
            worker: 7.into(),
            index: Some(1),
            pid: 1234,
            stream: Stream::Stderr,
            line: bytes,
        }
    }

    #[test]
    fn text_lines_carry_the_worker_id() {
        assert_eq!(text_line(&line(b"hello")), b"[worker 7] hello\n");
    }

    #[test]
    fn json_lines_parse_and_carry_the_worker() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_714_566_896_789);
        let bytes = json_line(&line(b"say \"hi\"\xff"), at);
        assert_eq!(bytes.last(), Some(&b'\n'));
        let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(value["ts"], "2024-05-01T12:34:56.789Z");
        assert_eq!(value["worker"], 7);
        assert_eq!(value["index"], 1);
        assert_eq!(value["pid"], 1234);
        assert_eq!(value["stream"], "stderr");
        assert_eq!(value["line"], "say \"hi\"\u{fffd}");
    }

    #[test]
    fn the_primarys_records_have_the_same_keys_without_a_worker() {
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_714_566_896_789);
        let mut fields = serde_json::Map::new();
        fields.insert("slot".into(), 2.into());
        let value: serde_json::Value =
            serde_json::from_slice(&record("warn", "restart", fields, at)).unwrap();
        assert_eq!(value["ts"], "2024-05-01T12:34:56.789Z");
        assert_eq!(value["pid"], std::process::id());
        assert_eq!(value["stream"], "stderr");
        assert_eq!(value["line"], "restart");
        assert_eq!(value["level"], "warn");
        assert_eq!(value["fields"]["slot"], 2);
        assert!(value.get("worker").is_none());
    }

    #[test]
    fn a_full_queue_drops_and_counts_instead_of_blocking() {
        // A sink whose writer never runs: the queue fills, then drops.
        let sink = Sink {
            state: Mutex::new(Queue::default()),
            lost: AtomicU64::new(0),
            changed: Condvar::new(),
            stream: Stream::Stdout,
            format: LogFormat::Text,
        };
        let line = vec![b'x'; 1024];
        let fits = QUEUE_BYTES / line.len();
        for _ in 0..fits + 10 {
            sink.push(line.clone());
        }
        let queue = sink.lock();
        assert_eq!(queue.lines.len(), fits);
        assert_eq!(queue.dropped, 10);
        assert_eq!(sink.lost.load(Ordering::Relaxed), 10);
        drop(queue);
        let notice = String::from_utf8(sink.notice(10)).unwrap();
        assert!(
            notice.contains("10 line(s) of output to stdout were lost"),
            "{notice}"
        );
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
