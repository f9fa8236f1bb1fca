//! How the reports print numbers and labels.

use serde::Serialize;

/// `40595178` -> `40,595,178`.
pub fn thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    if n < 0 {
        out.insert(0, '-');
    }
    out
}

/// `7108000000` -> `7.108 G` (three decimals, SI prefix).
pub fn si(n: f64) -> String {
    let (value, prefix) = match n.abs() {
        x if x >= 1e9 => (n / 1e9, "G"),
        x if x >= 1e6 => (n / 1e6, "M"),
        x if x >= 1e3 => (n / 1e3, "k"),
        _ => (n, ""),
    };
    format!("{value:.3} {prefix}")
}

/// A unit enum's serialised name (`tutorial`, `bf16`, ...).
pub fn serde_label(value: &impl Serialize) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

/// A number with `digits` decimals, or a dash for none.
pub fn opt(value: Option<f64>, digits: usize) -> String {
    value.map_or_else(|| "—".into(), |v| format!("{v:.digits$}"))
}
