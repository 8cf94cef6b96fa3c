//! Every bound and default the core's decisions depend on, in one place, with compile-time
//! checks of the relations between them. (Each is defined next to the code that uses it and
//! re-exported here; the relations are asserted here.)

pub use crate::diskformat::{DISK_LAYOUT, DISK_SIZE, HEADER_SIZE};
pub use crate::hostset::MAX_HOSTS;
pub use crate::logformat::LOG_FORMAT;
pub use crate::placement::DEFAULT_FTT_BUDGET;
pub use crate::reconcile::{MAX_LOCAL_RESTARTS, RESTART_WINDOW_MS};
pub use crate::state::{BEST_EFFORT_RETRIES, BEST_EFFORT_RETRY_INTERVAL_MS, DEFAULT_GROUP_DELAY_MS, MAX_GROUP_DELAY_MS, MAX_RELOCATIONS, MAX_RESTART_GROUP};
pub use crate::timing::DEFAULT_TIMINGS;
pub use crate::wire::{MAX_HEARTBEAT_LEN, SLOT_SIZE};

/// The hardware watchdog timeout an agent configures by default, in seconds (`watchdog.timeout_s`).
pub const DEFAULT_WATCHDOG_TIMEOUT_S: u64 = 2;

/// Whether a hung host whose watchdog has `timeout_s` is reset before any peer may restart its
/// VMs, with `t`: its last liveness tick is at most `self_fence_ms` before the watchdog stops
/// being fed, plus the clock margin; peers restart no earlier than `peer_timeout_ms +
/// fence_wait_ms` after its last heartbeat. (The agent checks its configuration with the same
/// rule at start.)
#[must_use]
pub const fn watchdog_resets_in_time(t: &crate::timing::Timings, timeout_s: u64) -> bool {
    t.self_fence_ms + timeout_s * 1000 + t.clock_margin_ms < t.peer_timeout_ms + t.fence_wait_ms()
}

const _: () =
    assert!(watchdog_resets_in_time(&DEFAULT_TIMINGS, DEFAULT_WATCHDOG_TIMEOUT_S), "the default watchdog must reset a hung host before any fence deadline");
const _: () = assert!(DEFAULT_TIMINGS.self_fence_ms >= 5 * DEFAULT_TIMINGS.heartbeat_interval_ms, "default timings must pass their own validation");
const _: () = assert!(DEFAULT_TIMINGS.peer_timeout_ms >= 10 * DEFAULT_TIMINGS.heartbeat_interval_ms, "default timings must pass their own validation");
const _: () = assert!(DEFAULT_TIMINGS.partition_confirm_ms < DEFAULT_TIMINGS.peer_timeout_ms, "default timings must pass their own validation");
const _: () = assert!(HEADER_SIZE + SLOT_SIZE * MAX_HOSTS == DISK_SIZE, "the disk holds a header and one slot per host");
const _: () = assert!(MAX_HEARTBEAT_LEN <= 1400, "a heartbeat fits one datagram on any usual MTU");
const _: () = assert!(MAX_HOSTS <= 64, "a HostSet is one u64");
