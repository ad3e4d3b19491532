//! The metrics text formats: a small model of metric families, a reader for
//! the OpenMetrics text that `prometheus-client` writes (in the primary and
//! in each worker), the merge of several workers' families, and writers for
//! both formats a scraper may ask for (Prometheus text 0.0.4 and
//! OpenMetrics 1.0).

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::fmt::Write;

/// The `Content-Type` of the Prometheus text format.
pub(crate) const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// The `Content-Type` of OpenMetrics text.
pub(crate) const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Which text a scraper gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// Prometheus text format 0.0.4 (the default).
    Text,
    /// OpenMetrics 1.0, when the `Accept` header asks for it.
    OpenMetrics,
}

impl Dialect {
    /// What an `Accept` header asks for.
    pub(crate) fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Self::OpenMetrics,
            _ => Self::Text,
        }
    }

    pub(crate) fn content_type(self) -> &'static str {
        match self {
            Self::Text => TEXT_CONTENT_TYPE,
            Self::OpenMetrics => OPENMETRICS_CONTENT_TYPE,
        }
    }
}

/// A metric family's type, as OpenMetrics names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Counter,
    Gauge,
    Histogram,
    GaugeHistogram,
    Summary,
    Info,
    StateSet,
    Unknown,
}

impl Kind {
    fn parse(name: &str) -> Self {
        match name {
            "counter" => Self::Counter,
            "gauge" => Self::Gauge,
            "histogram" => Self::Histogram,
            "gaugehistogram" => Self::GaugeHistogram,
            "summary" => Self::Summary,
            "info" => Self::Info,
            "stateset" => Self::StateSet,
            _ => Self::Unknown,
        }
    }

    fn openmetrics_name(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge => "gauge",
            Self::Histogram => "histogram",
            Self::GaugeHistogram => "gaugehistogram",
            Self::Summary => "summary",
            Self::Info => "info",
            Self::StateSet => "stateset",
            Self::Unknown => "unknown",
        }
    }

    /// Prometheus text knows fewer types: the others are gauges or untyped.
    fn text_name(self) -> &'static str {
        match self {
            Self::Counter => "counter",
            Self::Gauge | Self::Info | Self::StateSet => "gauge",
            Self::Histogram => "histogram",
            Self::Summary => "summary",
            Self::GaugeHistogram | Self::Unknown => "untyped",
        }
    }
}

/// Text read from a worker's answer: borrowed from it where nothing had to
/// be unescaped, so that reading thousands of series allocates little.
pub(crate) type Text<'a> = Cow<'a, str>;

/// Label names and values, in order.
pub(crate) type Labels<'a> = Vec<(Text<'a>, Text<'a>)>;

/// One sample line: its full name (`requests_total`, `latency_bucket`...),
/// labels in order, and value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Sample<'a> {
    pub(crate) name: Text<'a>,
    pub(crate) labels: Labels<'a>,
    pub(crate) value: f64,
}

/// A metric family: its name as OpenMetrics gives it (a counter's without
/// `_total`), type, help, unit and samples.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Family<'a> {
    pub(crate) name: Text<'a>,
    pub(crate) kind: Kind,
    pub(crate) help: Text<'a>,
    pub(crate) unit: Text<'a>,
    pub(crate) samples: Vec<Sample<'a>>,
}

/// Why a worker's metrics text was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {why}")]
pub(crate) struct ParseError {
    line: usize,
    why: String,
}

/// Reads OpenMetrics text (or Prometheus text) into families, in order.
/// Samples that come without a `# TYPE` line form an `unknown` family of
/// their own name.
pub(crate) fn parse(text: &str) -> Result<Vec<Family<'_>>, ParseError> {
    let mut families: Vec<Family<'_>> = Vec::new();
    // Where the family of each name declared last sits: a registry of
    // thousands of families is read in one pass.
    let mut named: HashMap<&str, usize> = HashMap::new();
    for (number, line) in text.lines().enumerate() {
        let error = |why: &str| ParseError {
            line: number + 1,
            why: why.to_string(),
        };
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.trim_start().splitn(3, ' ');
            let keyword = words.next().unwrap_or("");
            let name = words.next().unwrap_or("");
            let rest = words.next().unwrap_or("");
            match keyword {
                "TYPE" | "HELP" | "UNIT" if name.is_empty() => {
                    return Err(error("a metadata line without a metric name"));
                }
                "TYPE" => {
                    family_named(&mut families, &mut named, name).kind = Kind::parse(rest.trim())
                }
                "HELP" => family_named(&mut families, &mut named, name).help = unescape(rest),
                "UNIT" => family_named(&mut families, &mut named, name).unit = rest.trim().into(),
                // `# EOF` and plain comments.
                _ => {}
            }
            continue;
        }
        let sample = parse_sample(line).map_err(|why| error(&why))?;
        let owner = families
            .iter()
            .rposition(|f| belongs_to(&sample.name, f))
            .unwrap_or_else(|| {
                if let Cow::Borrowed(name) = sample.name {
                    named.insert(name, families.len());
                }
                families.push(Family {
                    name: sample.name.clone(),
                    kind: Kind::Unknown,
                    help: Text::Borrowed(""),
                    unit: Text::Borrowed(""),
                    samples: Vec::new(),
                });
                families.len() - 1
            });
        families[owner].samples.push(sample);
    }
    Ok(families)
}

/// The family `name` declared last, or a new one (metadata may come in any
/// order before the samples).
fn family_named<'f, 'a>(
    families: &'f mut Vec<Family<'a>>,
    named: &mut HashMap<&'a str, usize>,
    name: &'a str,
) -> &'f mut Family<'a> {
    let at = match named.get(name) {
        Some(&at) => at,
        None => {
            named.insert(name, families.len());
            families.push(Family {
                name: name.into(),
                kind: Kind::Unknown,
                help: Text::Borrowed(""),
                unit: Text::Borrowed(""),
                samples: Vec::new(),
            });
            families.len() - 1
        }
    };
    &mut families[at]
}

/// Whether a sample of that name is one of the family's (`_total`,
/// `_bucket`... after the family's name, as its type allows).
fn belongs_to(sample: &str, family: &Family) -> bool {
    let Some(suffix) = sample.strip_prefix(family.name.as_ref()) else {
        return false;
    };
    let allowed: &[&str] = match family.kind {
        Kind::Counter => &["_total", "_created", ""],
        Kind::Histogram | Kind::GaugeHistogram => {
            &["_bucket", "_sum", "_count", "_created", "_gsum", "_gcount"]
        }
        Kind::Summary => &["_sum", "_count", "_created", ""],
        Kind::Info => &["_info"],
        Kind::Gauge | Kind::StateSet | Kind::Unknown => &[""],
    };
    allowed.contains(&suffix)
}

/// `name{a="1",b="2"} value [timestamp]`.
fn parse_sample(line: &str) -> Result<Sample<'_>, String> {
    let name_end = line.find(['{', ' ']).ok_or("a sample without a value")?;
    let name = &line[..name_end];
    if !valid_name(name) {
        return Err(format!("{name:?} is not a metric name"));
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(inner)?;
        labels = parsed;
        rest = after;
    }
    let value_text = rest
        .split_whitespace()
        .next()
        .ok_or("a sample without a value")?;
    let value = parse_value(value_text).ok_or_else(|| format!("bad value {value_text:?}"))?;
    Ok(Sample {
        name: name.into(),
        labels,
        value,
    })
}

/// Labels up to the closing `}`; returns them and what follows.
fn parse_labels(mut text: &str) -> Result<(Labels<'_>, &str), String> {
    let mut labels = Vec::new();
    loop {
        text = text.trim_start_matches([' ', ',']);
        if let Some(after) = text.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = text.find('=').ok_or("a label without a value")?;
        let name = text[..eq].trim();
        if !valid_name(name) {
            return Err(format!("{name:?} is not a label name"));
        }
        let quoted = text[eq + 1..]
            .strip_prefix('"')
            .ok_or("a label value without quotes")?;
        let (value, end) = label_value(quoted)?;
        labels.push((name.into(), value));
        text = &quoted[end + 1..];
    }
}

/// A label value up to its closing quote (borrowed unless it holds an
/// escape), and where that quote is.
fn label_value(quoted: &str) -> Result<(Text<'_>, usize), String> {
    let unterminated = || "an unterminated label value".to_string();
    let end = quoted.find(['"', '\\']).ok_or_else(unterminated)?;
    if quoted.as_bytes()[end] == b'"' {
        return Ok((Text::Borrowed(&quoted[..end]), end));
    }
    let mut value = String::from(&quoted[..end]);
    let mut chars = quoted[end..].char_indices();
    loop {
        match chars.next() {
            None => return Err(unterminated()),
            Some((at, '"')) => return Ok((Text::Owned(value), end + at)),
            Some((_, '\\')) => match chars.next() {
                Some((_, 'n')) => value.push('\n'),
                Some((_, c)) => value.push(c),
                None => return Err(unterminated()),
            },
            Some((_, c)) => value.push(c),
        }
    }
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(text: &str) -> Option<f64> {
    match text {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => text.parse().ok(),
    }
}

fn unescape(text: &str) -> Text<'_> {
    if !text.contains('\\') {
        return text.into();
    }
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out.into()
}

/// How the families of several workers become one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Aggregation {
    /// Samples with the same name and labels are added up across workers
    /// (gauges too, as prom-client's `AggregatorRegistry` does by default).
    #[default]
    Sum,
    /// Every worker's samples are kept, told apart by a `worker` and a
    /// `slot` label.
    PerWorker,
}

/// One worker's families and the labels that name it.
pub(crate) struct Contribution<'a> {
    pub(crate) worker: String,
    pub(crate) slot: Option<String>,
    pub(crate) families: Vec<Family<'a>>,
}

/// What merging left out: families whose type differed from the first
/// worker's declaration of the same name, or whose name is taken.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MergeReport {
    pub(crate) conflicts: u64,
}

/// Merges the workers' families by name, in the order they first appear;
/// `reserved` names (the cluster's own families) are left out.
pub(crate) fn merge<'a>(
    contributions: Vec<Contribution<'a>>,
    how: Aggregation,
    reserved: &[&str],
) -> (Vec<Family<'a>>, MergeReport) {
    let reserved: HashSet<&str> = reserved.iter().copied().collect();
    let mut merged: Vec<Family<'a>> = Vec::new();
    let mut index: HashMap<Text<'a>, usize> = HashMap::new();
    // Per family: where each (sample name, labels) sits, to add up.
    let mut positions: Vec<HashMap<(Text<'a>, Labels<'a>), usize>> = Vec::new();
    let mut report = MergeReport::default();
    for contribution in contributions {
        for family in contribution.families {
            if reserved.contains(family.name.as_ref()) {
                report.conflicts += 1;
                continue;
            }
            let at = match index.get(&family.name) {
                Some(&at) if merged[at].kind != family.kind => {
                    report.conflicts += 1;
                    continue;
                }
                Some(&at) => at,
                None => {
                    index.insert(family.name.clone(), merged.len());
                    merged.push(Family {
                        samples: Vec::new(),
                        ..family.clone()
                    });
                    positions.push(HashMap::new());
                    merged.len() - 1
                }
            };
            for (position, mut sample) in family.samples.into_iter().enumerate() {
                if how == Aggregation::PerWorker {
                    let mut labels: Labels<'a> =
                        vec![("worker".into(), contribution.worker.clone().into())];
                    if let Some(slot) = &contribution.slot {
                        labels.push(("slot".into(), slot.clone().into()));
                    }
                    labels.extend(
                        sample
                            .labels
                            .into_iter()
                            .filter(|(k, _)| k != "worker" && k != "slot"),
                    );
                    sample.labels = labels;
                } else if let Some(same) = merged[at]
                    .samples
                    .get_mut(position)
                    .filter(|m| m.name == sample.name && m.labels == sample.labels)
                {
                    // Workers usually list a family's series in the same
                    // order: no lookup needed.
                    same.value += sample.value;
                    continue;
                }
                let key = (sample.name.clone(), sample.labels.clone());
                match positions[at].get(&key) {
                    Some(&i) => merged[at].samples[i].value += sample.value,
                    None => {
                        positions[at].insert(key, merged[at].samples.len());
                        merged[at].samples.push(sample);
                    }
                }
            }
        }
    }
    (merged, report)
}

/// Writes families in `dialect`; OpenMetrics text ends with `# EOF`.
pub(crate) fn render(families: &[Family<'_>], dialect: Dialect, out: &mut String) {
    for family in families {
        match dialect {
            Dialect::OpenMetrics => render_openmetrics(family, out),
            Dialect::Text => render_text(family, out),
        }
    }
    if dialect == Dialect::OpenMetrics {
        out.push_str("# EOF\n");
    }
}

fn render_openmetrics(family: &Family<'_>, out: &mut String) {
    let _ = writeln!(out, "# HELP {} {}", family.name, escape(&family.help, true));
    let _ = writeln!(
        out,
        "# TYPE {} {}",
        family.name,
        family.kind.openmetrics_name()
    );
    if !family.unit.is_empty() {
        let _ = writeln!(out, "# UNIT {} {}", family.name, family.unit);
    }
    for sample in &family.samples {
        render_sample(sample, out);
    }
}

fn render_text(family: &Family<'_>, out: &mut String) {
    // Prometheus text names a counter's family by its sample name, and
    // knows no `_created` samples.
    let name = match family.kind {
        Kind::Counter => format!("{}_total", family.name),
        Kind::Info => format!("{}_info", family.name),
        _ => family.name.to_string(),
    };
    let _ = writeln!(out, "# HELP {name} {}", escape(&family.help, false));
    let _ = writeln!(out, "# TYPE {name} {}", family.kind.text_name());
    for sample in &family.samples {
        if sample.name.ends_with("_created") {
            continue;
        }
        render_sample(sample, out);
    }
}

fn render_sample(sample: &Sample<'_>, out: &mut String) {
    out.push_str(&sample.name);
    if !sample.labels.is_empty() {
        out.push('{');
        for (i, (name, value)) in sample.labels.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{name}=\"{}\"", escape(value, true));
        }
        out.push('}');
    }
    out.push(' ');
    write_value(sample.value, out);
    out.push('\n');
}

fn write_value(value: f64, out: &mut String) {
    if value.is_nan() {
        out.push_str("NaN");
    } else if value == f64::INFINITY {
        out.push_str("+Inf");
    } else if value == f64::NEG_INFINITY {
        out.push_str("-Inf");
    } else {
        let _ = write!(out, "{value}");
    }
}

/// Escapes a label value (`quotes`) or a help text.
fn escape(text: &str, quotes: bool) -> std::borrow::Cow<'_, str> {
    if !text.contains(['\\', '\n', '"']) {
        return text.into();
    }
    let mut out = String::with_capacity(text.len() + 4);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '"' if quotes => out.push_str("\\\""),
            c => out.push(c),
        }
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORKER: &str = "# HELP jobs Jobs done.\n# TYPE jobs counter\njobs_total{queue=\"a\"} 3\njobs_total{queue=\"b\\\"x\"} 1\n# HELP temp Temperature.\n# TYPE temp gauge\n# UNIT temp celsius\ntemp 21.5\n# HELP latency Latency.\n# TYPE latency histogram\nlatency_sum 1.5\nlatency_count 2\nlatency_bucket{le=\"0.5\"} 1\nlatency_bucket{le=\"+Inf\"} 2\n# EOF\n";

    fn contribution<'a>(worker: &str, text: &'a str) -> Contribution<'a> {
        Contribution {
            worker: worker.into(),
            slot: Some(format!("{}", worker.parse::<u32>().unwrap() - 1)),
            families: parse(text).unwrap(),
        }
    }

    #[test]
    fn openmetrics_text_reads_into_families() {
        let families = parse(WORKER).unwrap();
        let names: Vec<_> = families.iter().map(|f| (f.name.as_ref(), f.kind)).collect();
        assert_eq!(
            names,
            [
                ("jobs", Kind::Counter),
                ("temp", Kind::Gauge),
                ("latency", Kind::Histogram)
            ]
        );
        assert_eq!(families[0].samples[1].labels[0].1, "b\"x");
        assert_eq!(families[1].unit, "celsius");
        assert_eq!(families[2].samples[3].labels[0].1, "+Inf");
        assert_eq!(
            parse("x +Inf\n").unwrap()[0].samples[0].value,
            f64::INFINITY
        );
    }

    #[test]
    fn sums_add_equal_series_and_keep_the_others() {
        let (merged, report) = merge(
            vec![contribution("1", WORKER), contribution("2", WORKER)],
            Aggregation::Sum,
            &[],
        );
        assert_eq!(report.conflicts, 0);
        assert_eq!(merged[0].samples[0].value, 6.0);
        assert_eq!(merged[1].samples[0].value, 43.0);
        assert_eq!(merged[2].samples.len(), 4);
        assert_eq!(merged[2].samples[3].value, 4.0);
    }

    #[test]
    fn sums_match_series_listed_in_another_order() {
        let reversed = "# TYPE jobs counter\njobs_total{queue=\"b\\\"x\"} 10\njobs_total{queue=\"a\"} 20\njobs_total{queue=\"c\"} 5\n";
        let (merged, _) = merge(
            vec![contribution("1", WORKER), contribution("2", reversed)],
            Aggregation::Sum,
            &[],
        );
        let values: Vec<(String, f64)> = merged[0]
            .samples
            .iter()
            .map(|s| (s.labels[0].1.to_string(), s.value))
            .collect();
        assert_eq!(
            values,
            [("a".into(), 23.0), ("b\"x".into(), 11.0), ("c".into(), 5.0)]
        );
    }

    #[test]
    fn per_worker_series_carry_worker_and_slot() {
        let (merged, _) = merge(
            vec![contribution("1", WORKER), contribution("2", WORKER)],
            Aggregation::PerWorker,
            &[],
        );
        assert_eq!(merged[0].samples.len(), 4);
        assert_eq!(
            merged[0].samples[2].labels,
            [
                ("worker".into(), "2".into()),
                ("slot".into(), "1".into()),
                ("queue".into(), "a".into())
            ]
        );
    }

    #[test]
    fn a_type_conflict_or_a_reserved_name_is_left_out_and_counted() {
        let other =
            "# TYPE jobs gauge\njobs 1\n# TYPE procluster_workers gauge\nprocluster_workers 9\n";
        let (merged, report) = merge(
            vec![contribution("1", WORKER), contribution("2", other)],
            Aggregation::Sum,
            &["procluster_workers"],
        );
        assert_eq!(report.conflicts, 2);
        assert_eq!(merged[0].samples[0].value, 3.0);
        assert_eq!(merged.len(), 3);
    }

    #[test]
    fn both_dialects_render_what_they_read() {
        let families = parse(WORKER).unwrap();
        let mut om = String::new();
        render(&families, Dialect::OpenMetrics, &mut om);
        assert_eq!(parse(&om).unwrap(), families);
        assert!(om.ends_with("# EOF\n"));
        let mut text = String::new();
        render(&families, Dialect::Text, &mut text);
        assert!(text.contains("# TYPE jobs_total counter\njobs_total{queue=\"a\"} 3\n"));
        assert!(!text.contains("# EOF") && !text.contains("# UNIT"));
    }

    #[test]
    fn garbage_is_an_error_naming_the_line() {
        let error = parse("ok 1\nnot a metric\n").unwrap_err();
        assert_eq!(error.line, 2);
        assert!(parse("x{a=\"1} 2\n").is_err());
        assert!(parse("x{a=\"1\"} nope\n").is_err());
    }

    #[test]
    fn accept_headers_pick_the_dialect() {
        assert_eq!(Dialect::from_accept(None), Dialect::Text);
        assert_eq!(
            Dialect::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            )),
            Dialect::OpenMetrics
        );
        assert_eq!(Dialect::from_accept(Some("text/plain")), Dialect::Text);
    }
}
