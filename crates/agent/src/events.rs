//! The event timeline: every HA decision and VM transition with its reason, kept in a bounded
//! ring for the API and appended to `events.jsonl` in the data directory.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

/// Events kept in memory.
pub const EVENT_RING: usize = 4096;

/// One recorded event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Position in this agent's timeline.
    pub seq: u64,
    /// Wall-clock milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// The host that recorded it.
    pub host: String,
    /// A short kebab-case kind: `peer-dead`, `fenced`, `failover-committed`, `vm-started`, …
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub detail: String,
}

struct Inner {
    ring: VecDeque<Event>,
    next: u64,
    file: Option<std::fs::File>,
}

/// This agent's timeline.
pub struct EventLog {
    host: String,
    inner: Mutex<Inner>,
}

impl EventLog {
    /// A timeline that also appends to `dir/events.jsonl` (when it can be opened).
    #[must_use]
    pub fn new(host: &str, dir: &Path) -> EventLog {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("events.jsonl")).ok();
        EventLog { host: host.to_string(), inner: Mutex::new(Inner { ring: VecDeque::new(), next: 1, file }) }
    }

    /// Records an event.
    pub fn record(&self, kind: &str, vm: Option<&str>, subject: Option<&str>, detail: impl Into<String>) {
        let detail = detail.into();
        tracing::info!(kind, vm, subject, "{detail}");
        let mut i = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let e = Event {
            seq: i.next,
            at_ms: tandem_drivers::wall_ms(),
            host: self.host.clone(),
            kind: kind.to_string(),
            vm: vm.map(str::to_string),
            subject: subject.map(str::to_string),
            detail,
        };
        i.next += 1;
        if let Some(f) = i.file.as_mut() {
            if let Ok(line) = serde_json::to_string(&e) {
                let _ = writeln!(f, "{line}");
            }
        }
        if i.ring.len() == EVENT_RING {
            i.ring.pop_front();
        }
        i.ring.push_back(e);
    }

    /// Events with `seq > after`, oldest first, at most `limit`.
    #[must_use]
    pub fn since(&self, after: u64, limit: usize) -> Vec<Event> {
        let i = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        i.ring.iter().filter(|e| e.seq > after).take(limit).cloned().collect()
    }
}
