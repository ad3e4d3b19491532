//! Printing results: an aligned table for people, JSON for machines.

/// One row: a measurement, procluster's figure, Node's, and how they compare.
pub struct Row {
    pub name: String,
    pub unit: &'static str,
    pub procluster: f64,
    pub node: Option<f64>,
    /// Whether a larger figure is better (throughput) or smaller (latency).
    pub higher_is_better: bool,
}

impl Row {
    /// procluster's advantage: >1 means procluster is better.
    pub fn advantage(&self) -> Option<f64> {
        let node = self.node?;
        if self.higher_is_better {
            Some(self.procluster / node)
        } else {
            Some(node / self.procluster)
        }
    }
}

pub fn print_table(rows: &[Row]) {
    println!(
        "{:<40} {:>14} {:>14} {:>12}",
        "measurement", "procluster", "node", "advantage"
    );
    for row in rows {
        let node = row.node.map_or("-".to_string(), |n| format!("{n:.1}"));
        let adv = row
            .advantage()
            .map_or("-".to_string(), |a| format!("{a:.2}x"));
        println!(
            "{:<40} {:>14} {:>14} {:>12}",
            format!("{} ({})", row.name, row.unit),
            format!("{:.1}", row.procluster),
            node,
            adv
        );
    }
}

pub fn to_json(rows: &[Row]) -> serde_json::Value {
    serde_json::Value::Array(
        rows.iter()
            .map(|r| {
                serde_json::json!({
                    "name": r.name, "unit": r.unit, "procluster": r.procluster,
                    "node": r.node, "advantage": r.advantage(),
                })
            })
            .collect(),
    )
}
