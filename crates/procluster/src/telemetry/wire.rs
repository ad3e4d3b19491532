//! What the telemetry service's two sides say to each other (postcard
//! envelopes in service frames).

use serde::{Deserialize, Serialize};

/// The primary asks a worker.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) enum ToWorker {
    /// Encode your registry and answer with [`FromWorker::Metrics`].
    Scrape { id: u64 },
}

/// A worker tells the primary.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) enum FromWorker<'a> {
    /// The worker opened its side: it answers scrapes and may send logs.
    Hello,
    /// Its registry as OpenMetrics text, for scrape `id`.
    Metrics { id: u64, text: &'a str },
    /// A batch of log records (each postcard-encoded, one after another),
    /// and how many events the worker dropped since it started because its
    /// buffer was full.
    Logs { dropped: u64, records: &'a [u8] },
}

impl ToWorker {
    pub(crate) fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }
}

impl FromWorker<'_> {
    pub(crate) fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }
}

/// A log field's value, kept typed so JSON output keeps numbers numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FieldValue {
    /// Text, or anything recorded with `Debug` or `Display`.
    Str(String),
    /// A signed integer.
    I64(i64),
    /// An unsigned integer.
    U64(u64),
    /// A floating-point number.
    F64(f64),
    /// A boolean.
    Bool(bool),
}

impl std::fmt::Display for FieldValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Str(s) => f.write_str(s),
            Self::I64(n) => write!(f, "{n}"),
            Self::U64(n) => write!(f, "{n}"),
            Self::F64(n) => write!(f, "{n}"),
            Self::Bool(b) => write!(f, "{b}"),
        }
    }
}

impl FieldValue {
    pub(crate) fn to_json(&self) -> serde_json::Value {
        match self {
            Self::Str(s) => serde_json::Value::from(s.as_str()),
            Self::I64(n) => (*n).into(),
            Self::U64(n) => (*n).into(),
            Self::F64(n) => serde_json::Number::from_f64(*n)
                .map_or_else(|| n.to_string().into(), serde_json::Value::Number),
            Self::Bool(b) => (*b).into(),
        }
    }
}

/// One event as it travels: level (0 = trace .. 4 = error), when (µs since
/// the Unix epoch), where from, what, and the spans it happened in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct WireRecord {
    pub(crate) time_us: u64,
    pub(crate) level: u8,
    pub(crate) target: String,
    pub(crate) message: String,
    pub(crate) fields: Vec<(String, FieldValue)>,
    pub(crate) spans: Vec<WireSpan>,
}

/// A span an event happened in, with the fields it was created with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct WireSpan {
    pub(crate) name: String,
    pub(crate) fields: Vec<(String, FieldValue)>,
}

pub(crate) fn level_code(level: tracing::Level) -> u8 {
    match level {
        tracing::Level::TRACE => 0,
        tracing::Level::DEBUG => 1,
        tracing::Level::INFO => 2,
        tracing::Level::WARN => 3,
        tracing::Level::ERROR => 4,
    }
}

pub(crate) fn level_of(code: u8) -> tracing::Level {
    match code {
        0 => tracing::Level::TRACE,
        1 => tracing::Level::DEBUG,
        2 => tracing::Level::INFO,
        3 => tracing::Level::WARN,
        _ => tracing::Level::ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip() {
        let bytes = FromWorker::Logs {
            dropped: 3,
            records: b"abc",
        }
        .encode();
        let back: FromWorker<'_> = postcard::from_bytes(&bytes).unwrap();
        assert_eq!(
            back,
            FromWorker::Logs {
                dropped: 3,
                records: b"abc"
            }
        );
        let scrape = ToWorker::Scrape { id: 7 }.encode();
        assert_eq!(
            postcard::from_bytes::<ToWorker>(&scrape).unwrap(),
            ToWorker::Scrape { id: 7 }
        );
    }
}
