//! How the CLI prints: tables by default, the API's JSON with `--output json`.

use clap::ValueEnum;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use tandem::client::ClientError;
use tandem_agent::views::FailurePlan;

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

/// Prints an answer: its JSON unchanged with `--output json`, else as `table` renders it read
/// as the API's type `T` (an answer of another shape is a protocol error, not a guess).
pub fn show<T: DeserializeOwned>(out: Output, v: &Value, table: impl FnOnce(&T)) -> Result<(), ClientError> {
    match out {
        Output::Json => println!("{v}"),
        Output::Table => table(&tandem::client::decode(v.clone())?),
    }
    Ok(())
}

pub fn usage(message: impl std::fmt::Display) -> ClientError {
    ClientError::Usage(message.to_string())
}

pub fn print_plans(plans: &Vec<FailurePlan>) {
    for p in plans {
        println!("if {} fail{}:", p.failed.join(" and "), if p.failed.len() == 1 { "s" } else { "" });
        if let Some(note) = &p.note {
            println!("  {note}");
        }
        let mut rows = vec![["  VM", "RESTARTS ON"].map(String::from).to_vec()];
        for r in &p.restarts {
            rows.push(vec![format!("  {}", r.vm), r.host.clone()]);
        }
        for r in &p.left_down {
            rows.push(vec![format!("  {}", r.vm), format!("stays down ({})", text(&r.reason))]);
        }
        if rows.len() == 1 {
            println!("  nothing to restart");
        } else {
            print_table(&rows);
        }
    }
}

/// Prints a typed answer's fields, one `key: value` per line.
pub fn kv<T: Serialize>(t: &T) {
    if let Some(m) = serde_json::to_value(t).ok().as_ref().and_then(Value::as_object) {
        for (k, x) in m {
            println!("{k}: {}", s(x));
        }
    }
}

/// A value's JSON spelling, unquoted (enum names as the API writes them).
pub fn text<T: serde::Serialize>(t: &T) -> String {
    match serde_json::to_value(t) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(serde_json::Value::Null) => "-".into(),
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}
