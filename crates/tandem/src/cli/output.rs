//! How the CLI prints: tables by default, the API's JSON with `--output json`.

use clap::ValueEnum;
use serde_json::Value;
use tandem::client::ClientError;

/// `--output`: tables for people, the API's JSON for scripts.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Table,
    Json,
}

/// Wall-clock milliseconds since the Unix epoch as HH:MM:SS.mmm (UTC).
pub fn clock_time(ms: u64) -> String {
    let day_ms = ms % 86_400_000;
    format!("{:02}:{:02}:{:02}.{:03}", day_ms / 3_600_000, day_ms / 60_000 % 60, day_ms / 1000 % 60, day_ms % 1000)
}

pub fn print_table(rows: &[Vec<String>]) {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(String::len).max().unwrap_or(0)).collect();
    for r in rows {
        let line: Vec<String> = r.iter().enumerate().map(|(i, s)| format!("{s:<w$}", w = widths[i])).collect();
        println!("{}", line.join("  ").trim_end());
    }
}

pub fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(x) => x.clone(),
        other => other.to_string(),
    }
}

pub fn show(out: Output, v: &Value, table: impl FnOnce(&Value)) {
    match out {
        Output::Json => println!("{v}"),
        Output::Table => table(v),
    }
}

pub fn usage(message: impl std::fmt::Display) -> ClientError {
    ClientError::Usage(message.to_string())
}

pub fn print_plans(v: &Value) {
    for p in v.as_array().into_iter().flatten() {
        let failed: Vec<String> = p["failed"].as_array().into_iter().flatten().map(s).collect();
        println!("if {} fail{}:", failed.join(" and "), if failed.len() == 1 { "s" } else { "" });
        if let Some(note) = p["note"].as_str() {
            println!("  {note}");
        }
        let mut rows = vec![["  VM", "RESTARTS ON"].map(String::from).to_vec()];
        for r in p["restarts"].as_array().into_iter().flatten() {
            rows.push(vec![format!("  {}", s(&r["vm"])), s(&r["host"])]);
        }
        for r in p["left_down"].as_array().into_iter().flatten() {
            rows.push(vec![format!("  {}", s(&r["vm"])), format!("stays down ({})", s(&r["reason"]))]);
        }
        if rows.len() == 1 {
            println!("  nothing to restart");
        } else {
            print_table(&rows);
        }
    }
}

/// Prints an object's fields, one `key: value` per line.
pub fn kv(v: &Value) {
    if let Some(m) = v.as_object() {
        for (k, x) in m {
            println!("{k}: {}", s(x));
        }
    }
}
