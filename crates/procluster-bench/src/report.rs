//! Printing results: an aligned table for people, JSON for machines.

/// One row: a measurement, its value, a reference figure (Node's, or the
/// ideal server's) and how they compare.
pub struct Row {
    pub name: String,
    pub unit: &'static str,
    pub value: f64,
    pub reference: Option<f64>,
    /// Whether a larger figure is better (throughput) or smaller (latency).
    pub higher_is_better: bool,
}

impl Row {
    /// A figure with nothing to compare it with.
    pub fn plain(name: &str, unit: &'static str, value: f64) -> Self {
        Self {
            name: name.into(),
            unit,
            value,
            reference: None,
            higher_is_better: true,
        }
    }

    /// A throughput compared with a reference throughput.
    pub fn ratio(name: &str, unit: &'static str, value: f64, reference: f64) -> Self {
        Self {
            name: name.into(),
            unit,
            value,
            reference: Some(reference),
            higher_is_better: true,
        }
    }

    /// A figure compared with a reference; `higher_is_better` says which way.
    pub fn compared(
        name: &str,
        unit: &'static str,
        value: f64,
        reference: Option<f64>,
        higher_is_better: bool,
    ) -> Self {
        Self {
            name: name.into(),
            unit,
            value,
            reference,
            higher_is_better,
        }
    }

    /// How much better than the reference: >1 means better.
    pub fn advantage(&self) -> Option<f64> {
        let reference = self.reference?;
        if self.higher_is_better {
            Some(self.value / reference)
        } else {
            Some(reference / self.value)
        }
    }
}

pub fn print_table(rows: &[Row], value_column: &str, reference_column: &str) {
    println!(
        "{:<58} {:>12} {:>12} {:>8}",
        "measurement", value_column, reference_column, "ratio"
    );
    for row in rows {
        let reference = row.reference.map_or("-".to_string(), |n| format!("{n:.1}"));
        let ratio = row
            .advantage()
            .map_or("-".to_string(), |a| format!("{a:.2}"));
        let name = format!("{} ({})", row.name, row.unit);
        println!("{name:<58} {:>12.1} {reference:>12} {ratio:>8}", row.value);
    }
}

pub fn to_json(rows: &[Row]) -> serde_json::Value {
    serde_json::Value::Array(
        rows.iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name, "unit": r.unit, "value": r.value,
                    "reference": r.reference, "ratio": r.advantage(),
                })
            })
            .collect(),
    )
}
