//! Latency summaries and output rows (table, JSON, CSV).

use std::fmt::Write as _;
use std::time::Duration;

/// avg / p50 / p99 / max of a set of durations.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Summary {
    /// Number of samples.
    pub n: usize,
    /// Mean.
    pub avg: Duration,
    /// Median.
    pub p50: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest sample.
    pub max: Duration,
}

impl Summary {
    /// Summarises `v` (sorted in place).
    pub fn of(v: &mut [Duration]) -> Summary {
        if v.is_empty() {
            return Summary::default();
        }
        v.sort_unstable();
        let n = v.len();
        let total: Duration = v.iter().sum();
        let pick = |q: f64| v[((n as f64 * q).ceil() as usize).clamp(1, n) - 1];
        Summary {
            n,
            avg: total / n as u32,
            p50: pick(0.5),
            p99: pick(0.99),
            max: v[n - 1],
        }
    }

    /// `avg / p50 / p99` in microseconds, for tables.
    pub fn micros(&self) -> String {
        format!(
            "{:.1} / {:.1} / {:.1} us",
            us(self.avg),
            us(self.p50),
            us(self.p99)
        )
    }
}

/// Microseconds as a float.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// GB/s (10^9 bytes per second).
pub fn gbps(bytes: u64, d: Duration) -> f64 {
    if d.is_zero() {
        return 0.0;
    }
    bytes as f64 / d.as_secs_f64() / 1e9
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned table for terminals.
    Table,
    /// One JSON object (or array) on stdout.
    Json,
    /// CSV with a header line.
    Csv,
}

/// One output value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Text.
    Str(String),
    /// Number.
    Num(f64),
    /// Integer.
    Int(u64),
    /// Flag.
    Bool(bool),
}

impl Value {
    fn json(&self) -> String {
        match self {
            Value::Str(s) => format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\"")),
            Value::Num(x) if x.is_finite() => format!("{x:.6}"),
            Value::Num(_) => "null".into(),
            Value::Int(x) => x.to_string(),
            Value::Bool(b) => b.to_string(),
        }
    }

    fn text(&self) -> String {
        match self {
            Value::Str(s) => s.clone(),
            Value::Num(x) => format!("{x:.3}"),
            Value::Int(x) => x.to_string(),
            Value::Bool(b) => b.to_string(),
        }
    }
}

/// An ordered set of named values.
pub type Row = Vec<(&'static str, Value)>;

/// Renders rows as JSON (an object for one row, else an array) or CSV.
pub fn render(rows: &[Row], format: Format) -> String {
    let mut out = String::new();
    match format {
        Format::Json => {
            let objs: Vec<String> = rows
                .iter()
                .map(|r| {
                    let fields: Vec<String> = r
                        .iter()
                        .map(|(k, v)| format!("\"{k}\": {}", v.json()))
                        .collect();
                    format!("{{{}}}", fields.join(", "))
                })
                .collect();
            if objs.len() == 1 {
                out.push_str(&objs[0]);
            } else {
                let _ = write!(out, "[{}]", objs.join(",\n "));
            }
            out.push('\n');
        }
        Format::Csv => {
            if let Some(first) = rows.first() {
                let head: Vec<&str> = first.iter().map(|(k, _)| *k).collect();
                out.push_str(&head.join(","));
                out.push('\n');
            }
            for r in rows {
                let vals: Vec<String> = r
                    .iter()
                    .map(|(_, v)| {
                        let t = v.text();
                        if t.contains(',') || t.contains('"') {
                            format!("\"{}\"", t.replace('"', "\"\""))
                        } else {
                            t
                        }
                    })
                    .collect();
                out.push_str(&vals.join(","));
                out.push('\n');
            }
        }
        Format::Table => {
            if rows.is_empty() {
                return out;
            }
            let heads: Vec<&str> = rows[0].iter().map(|(k, _)| *k).collect();
            let cells: Vec<Vec<String>> = rows
                .iter()
                .map(|r| r.iter().map(|(_, v)| v.text()).collect())
                .collect();
            let widths: Vec<usize> = (0..heads.len())
                .map(|i| {
                    cells
                        .iter()
                        .map(|c| c[i].len())
                        .chain([heads[i].len()])
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let line = |vals: Vec<&str>| {
                vals.iter()
                    .zip(&widths)
                    .map(|(v, w)| format!("{v:>w$}"))
                    .collect::<Vec<_>>()
                    .join("  ")
            };
            out.push_str(&line(heads.clone()));
            out.push('\n');
            for c in &cells {
                out.push_str(&line(c.iter().map(|s| s.as_str()).collect()));
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let mut v: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        let s = Summary::of(&mut v);
        assert_eq!(s.p50, Duration::from_micros(50));
        assert_eq!(s.p99, Duration::from_micros(99));
        assert_eq!(s.max, Duration::from_micros(100));
        assert_eq!(Summary::of(&mut []).n, 0);
    }

    #[test]
    fn renders_json_and_csv() {
        let rows = vec![vec![
            ("a", Value::Int(1)),
            ("b", Value::Str("x,\"y\"".into())),
        ]];
        assert_eq!(
            render(&rows, Format::Json),
            "{\"a\": 1, \"b\": \"x,\\\"y\\\"\"}\n"
        );
        assert_eq!(render(&rows, Format::Csv), "a,b\n1,\"x,\"\"y\"\"\"\n");
    }
}
