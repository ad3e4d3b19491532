//! What the primary prints: workers' output (one line per line, never mixed)
//! and its own log, as text or JSON lines.

use std::io::Write;
use std::sync::Arc;
use std::time::SystemTime;

use procluster::primary::{OutputHook, OutputLine, Stream};

use crate::args::LogFormat;

/// The primary's own log, on stderr. `PROCLUSTER_LOG` (an env filter such
/// as `debug`) changes the level; the default is `info`.
pub fn init(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_env("PROCLUSTER_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// The hook that prints each line of workers' output: worker stdout to the
/// primary's stdout, stderr to stderr, each line in one write under the
/// stream's lock.
pub fn output_hook(format: LogFormat) -> OutputHook {
    Arc::new(move |line: OutputLine<'_>| {
        let formatted = match format {
            LogFormat::Text => text_line(&line),
            LogFormat::Json => json_line(&line, SystemTime::now()),
        };
        let _ = match line.stream {
            Stream::Stdout => std::io::stdout().lock().write_all(&formatted),
            Stream::Stderr => std::io::stderr().lock().write_all(&formatted),
        };
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

/// `{"ts":…,"worker":3,"index":0,"pid":…,"stream":"stdout","line":"…"}`.
/// Bytes that are not UTF-8 are replaced (U+FFFD).
pub fn json_line(line: &OutputLine<'_>, now: SystemTime) -> Vec<u8> {
    let value = serde_json::json!({
        "ts": rfc3339(now),
        "worker": line.worker,
        "index": line.index,
        "pid": line.pid,
        "stream": line.stream.name(),
        "line": String::from_utf8_lossy(line.line),
    });
    let mut out = serde_json::to_vec(&value).unwrap_or_default();
    out.push(b'\n');
    out
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
    use std::time::Duration;

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
    fn dates_are_civil() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }
}
