//! Workers' log events in the primary: the record as it arrives, attributed
//! to the worker whose channel carried it, and where it goes.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::wire::{FieldValue, WireRecord, level_of};
use crate::WorkerId;

/// One log event of a worker, as the primary got it.
#[derive(Debug, Clone, PartialEq)]
pub struct LogRecord {
    /// The worker's id.
    pub worker: WorkerId,
    /// Its slot, when it was forked for one.
    pub slot: Option<usize>,
    /// Its process id.
    pub pid: u32,
    /// When the worker recorded the event.
    pub time: SystemTime,
    /// The event's level.
    pub level: tracing::Level,
    /// The event's target (by default its module path in the worker).
    pub target: String,
    /// Its message.
    pub message: String,
    /// Its other fields, in order.
    pub fields: Vec<(String, FieldValue)>,
    /// The spans it happened in, outermost first: name and fields.
    pub spans: Vec<(String, Vec<(String, FieldValue)>)>,
}

impl LogRecord {
    pub(crate) fn from_wire(
        worker: WorkerId,
        slot: Option<usize>,
        pid: u32,
        wire: WireRecord,
    ) -> Self {
        Self {
            worker,
            slot,
            pid,
            time: SystemTime::UNIX_EPOCH + Duration::from_micros(wire.time_us),
            level: level_of(wire.level),
            target: wire.target,
            message: wire.message,
            fields: wire.fields,
            spans: wire.spans.into_iter().map(|s| (s.name, s.fields)).collect(),
        }
    }

    /// One line of text, without its newline:
    /// `2024-05-01T12:34:56.789012Z  INFO worker 3 slot 0 pid 4242 app::http: served path=/ request{id=7}`.
    pub fn to_text(&self) -> String {
        use std::fmt::Write;
        let mut out = String::with_capacity(96 + self.message.len());
        let _ = write!(
            out,
            "{} {:>5} worker {}",
            rfc3339_micros(self.time),
            self.level,
            self.worker
        );
        if let Some(slot) = self.slot {
            let _ = write!(out, " slot {slot}");
        }
        let _ = write!(out, " pid {} {}: {}", self.pid, self.target, self.message);
        for (name, value) in &self.fields {
            let _ = write!(out, " {name}={value}");
        }
        for (name, fields) in &self.spans {
            let _ = write!(out, " {name}{{");
            for (i, (field, value)) in fields.iter().enumerate() {
                let sep = if i == 0 { "" } else { " " };
                let _ = write!(out, "{sep}{field}={value}");
            }
            out.push('}');
        }
        out
    }

    /// One JSON object: `ts` (RFC 3339, UTC), `level`, `worker`, `index`
    /// (the slot), `pid`, `target`, `message`, `fields` (an object) and
    /// `spans` (`[{name, fields}]`, outermost first).
    pub fn to_json(&self) -> serde_json::Value {
        let object = |fields: &[(String, FieldValue)]| {
            serde_json::Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_json()))
                    .collect(),
            )
        };
        serde_json::json!({
            "ts": rfc3339_micros(self.time),
            "level": self.level.as_str(),
            "worker": self.worker,
            "index": self.slot,
            "pid": self.pid,
            "target": self.target,
            "message": self.message,
            "fields": object(&self.fields),
            "spans": self.spans.iter().map(|(name, fields)| serde_json::json!({
                "name": name, "fields": object(fields),
            })).collect::<Vec<_>>(),
        })
    }
}

/// Where the primary puts its workers' log events.
#[derive(Clone, Default)]
pub enum LogOutput {
    /// Re-emitted as events of the primary's own `tracing` subscriber
    /// (target `procluster::worker`), with the worker's id, slot, pid and
    /// target as fields. The default.
    #[default]
    Tracing,
    /// One line of text per event on the primary's stderr
    /// ([`LogRecord::to_text`]).
    Text,
    /// One JSON object per line on the primary's stderr
    /// ([`LogRecord::to_json`]).
    Json,
    /// Handed to a function, called in order for each worker.
    Callback(Arc<dyn Fn(&LogRecord) + Send + Sync>),
    /// Dropped (still counted).
    Discard,
}

impl std::fmt::Debug for LogOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Tracing => "Tracing",
            Self::Text => "Text",
            Self::Json => "Json",
            Self::Callback(_) => "Callback",
            Self::Discard => "Discard",
        })
    }
}

impl LogOutput {
    /// Puts one record where it goes; each record in one write.
    pub(crate) fn emit(&self, record: &LogRecord) {
        match self {
            Self::Tracing => reemit(record),
            Self::Text => {
                let mut line = record.to_text();
                line.push('\n');
                let _ = std::io::stderr().lock().write_all(line.as_bytes());
            }
            Self::Json => {
                let mut line = serde_json::to_vec(&record.to_json()).unwrap_or_default();
                line.push(b'\n');
                let _ = std::io::stderr().lock().write_all(&line);
            }
            Self::Callback(callback) => callback(record),
            Self::Discard => {}
        }
    }
}

/// Through the primary's subscriber: a callsite per level (a level is part
/// of a callsite's static metadata).
fn reemit(record: &LogRecord) {
    let fields = Fields(&record.fields);
    let spans = Spans(&record.spans);
    macro_rules! emit {
        ($level:expr) => {
            tracing::event!(
                target: "procluster::worker",
                $level,
                worker = record.worker.get(),
                slot = record.slot,
                pid = record.pid,
                worker_target = %record.target,
                fields = %fields,
                spans = %spans,
                "{}",
                record.message
            )
        };
    }
    match record.level {
        tracing::Level::TRACE => emit!(tracing::Level::TRACE),
        tracing::Level::DEBUG => emit!(tracing::Level::DEBUG),
        tracing::Level::INFO => emit!(tracing::Level::INFO),
        tracing::Level::WARN => emit!(tracing::Level::WARN),
        tracing::Level::ERROR => emit!(tracing::Level::ERROR),
    }
}

struct Fields<'a>(&'a [(String, FieldValue)]);

impl std::fmt::Display for Fields<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, value)) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{name}={value}")?;
        }
        Ok(())
    }
}

struct Spans<'a>(&'a [(String, Vec<(String, FieldValue)>)]);

impl std::fmt::Display for Spans<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, fields)) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { ":" };
            write!(f, "{sep}{name}{{{}}}", Fields(fields))?;
        }
        Ok(())
    }
}

/// UTC with microseconds: `2024-05-01T12:34:56.789012Z`.
pub(crate) fn rfc3339_micros(time: SystemTime) -> String {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = date_of(secs / 86_400);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:06}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_micros()
    )
}

/// The proleptic Gregorian date `days` after 1970-01-01, counted in
/// 400-year eras of 146 097 days starting on 0000-03-01 (so a leap day is
/// the last day of its year).
fn date_of(days: u64) -> (u64, u64, u64) {
    let shifted = days + 719_468; // days from 0000-03-01 to 1970-01-01
    let era = shifted / 146_097;
    let day_of_era = shifted % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_from_march + 2) / 5 + 1;
    let month = if month_from_march < 10 {
        month_from_march + 3
    } else {
        month_from_march - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> LogRecord {
        LogRecord {
            worker: WorkerId::new(3),
            slot: Some(0),
            pid: 4242,
            time: SystemTime::UNIX_EPOCH + Duration::from_micros(1_714_566_896_789_012),
            level: tracing::Level::INFO,
            target: "app::http".into(),
            message: "served".into(),
            fields: vec![("path".into(), FieldValue::Str("/".into()))],
            spans: vec![("request".into(), vec![("id".into(), FieldValue::U64(7))])],
        }
    }

    #[test]
    fn text_lines_name_the_worker() {
        assert_eq!(
            record().to_text(),
            "2024-05-01T12:34:56.789012Z  INFO worker 3 slot 0 pid 4242 app::http: served path=/ request{id=7}"
        );
    }

    #[test]
    fn json_lines_share_the_commands_keys() {
        let json = record().to_json();
        assert_eq!(json["ts"], "2024-05-01T12:34:56.789012Z");
        assert_eq!(json["worker"], 3);
        assert_eq!(json["index"], 0);
        assert_eq!(json["pid"], 4242);
        assert_eq!(json["level"], "INFO");
        assert_eq!(json["fields"]["path"], "/");
        assert_eq!(json["spans"][0]["fields"]["id"], 7);
    }

    #[test]
    fn dates_are_civil() {
        assert_eq!(
            rfc3339_micros(SystemTime::UNIX_EPOCH),
            "1970-01-01T00:00:00.000000Z"
        );
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339_micros(leap), "2000-02-29T00:00:00.000000Z");
    }
}
