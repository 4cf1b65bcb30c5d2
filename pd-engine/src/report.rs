//! The report a run prints: rows of named values, as text lines or one JSON object.

use std::time::Duration;

use clap::ValueEnum;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Human-readable lines.
    Text,
    /// One JSON object on stdout.
    Json,
}

/// One report line's value.
pub enum Value {
    Int(usize),
    Float(f64),
    Text(String),
    Tokens(Vec<u32>),
}

pub fn render(rows: &[(&str, Value)], format: Format) -> String {
    match format {
        Format::Json => {
            let fields: Vec<String> = rows
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::Int(i) => i.to_string(),
                        Value::Float(f) if f.is_finite() => format!("{f:.6}"),
                        Value::Float(_) => "null".into(),
                        Value::Text(s) => {
                            format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
                        }
                        Value::Tokens(t) => format!(
                            "[{}]",
                            t.iter()
                                .map(|x| x.to_string())
                                .collect::<Vec<_>>()
                                .join(",")
                        ),
                    };
                    format!("\"{k}\": {v}")
                })
                .collect();
            format!("{{{}}}", fields.join(", "))
        }
        Format::Text => rows
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Value::Int(i) => i.to_string(),
                    Value::Float(f) => format!("{f:.3}"),
                    Value::Text(s) => s.clone(),
                    Value::Tokens(t) => t
                        .iter()
                        .map(|x| x.to_string())
                        .collect::<Vec<_>>()
                        .join(" "),
                };
                format!("{k:<24} {v}")
            })
            .collect::<Vec<_>>()
            .join("\n"),
    }
}

pub fn per_s(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// The `q`-quantile (nearest rank) of `xs`, in seconds.
pub fn quantile(xs: &mut [Duration], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_unstable();
    let i = ((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1;
    xs[i].as_secs_f64()
}
