//! Every bound and default the core's decisions depend on, in one place, with compile-time
//! checks of the relations between them. (Each is defined next to the code that uses it and
//! re-exported here; the relations are asserted here.)

pub use crate::diskformat::{AREA_IMAGE_LEN, DISK_LAYOUT, DISK_SIZE, HEADER_SIZE};
pub use crate::hostset::MAX_HOSTS;
pub use crate::liveness::{CALM_COPY_TICKS, CALM_ROUND_TICKS, CALM_WRITES_PER_PEER_TIMEOUT};
pub use crate::logformat::LOG_FORMAT;
pub use crate::placement::DEFAULT_FTT_BUDGET;
pub use crate::reconcile::{MAX_LOCAL_RESTARTS, RESTART_WINDOW_MS};
pub use crate::state::{BEST_EFFORT_RETRIES, BEST_EFFORT_RETRY_INTERVAL_MS, DEFAULT_GROUP_DELAY_MS, MAX_GROUP_DELAY_MS, MAX_RELOCATIONS, MAX_RESTART_GROUP};
pub use crate::timing::DEFAULT_TIMINGS;
pub use crate::wire::{MAX_HEARTBEAT_LEN, SLOT_SIZE};

/// The hardware watchdog timeout an agent configures by default, in seconds (`watchdog.timeout_s`).
pub const DEFAULT_WATCHDOG_TIMEOUT_S: u64 = 1;

/// The longest silence the agent keeps feeding its hardware watchdog through: it stops once a
/// reset `timeout_s` later would come after its lease's end plus `kill_grace_ms`, so a host
/// that hangs is reset no later than a running one kills its VMs.
#[must_use]
pub const fn watchdog_feed_window_ms(t: &crate::timing::Timings, timeout_s: u64) -> u64 {
    (t.self_fence_ms + t.kill_grace_ms).saturating_sub(timeout_s * 1000)
}

/// Whether a watchdog of `timeout_s` fits timings `t`: a hung host must be reset by its lease's
/// end plus `kill_grace_ms` — the moment peers count their fence deadline towards (from the
/// last evidence of its life, which is no earlier than its last renewal) — and a healthy host,
/// whose proof of life is a few heartbeats old, must go on feeding it: the feed window must
/// cover five heartbeat intervals. (The agent checks its configuration with the same rule.)
#[must_use]
pub const fn watchdog_resets_in_time(t: &crate::timing::Timings, timeout_s: u64) -> bool {
    timeout_s >= 1 && watchdog_feed_window_ms(t, timeout_s) >= 5 * t.heartbeat_interval_ms
}

const _: () =
    assert!(watchdog_resets_in_time(&DEFAULT_TIMINGS, DEFAULT_WATCHDOG_TIMEOUT_S), "the default watchdog must reset a hung host before any fence deadline");
const _: () = assert!(
    watchdog_resets_in_time(&crate::timing::LOW_LATENCY_TIMINGS, DEFAULT_WATCHDOG_TIMEOUT_S),
    "the default watchdog must fit the low-latency profile too"
);
const _: () = assert!(DEFAULT_TIMINGS.self_fence_ms >= 5 * DEFAULT_TIMINGS.heartbeat_interval_ms, "default timings must pass their own validation");
const _: () = assert!(DEFAULT_TIMINGS.peer_timeout_ms >= 10 * DEFAULT_TIMINGS.heartbeat_interval_ms, "default timings must pass their own validation");
// Validation keeps the peer timeout at 10 intervals or more: calm rounds spaced by the longer of
// CALM_ROUND_TICKS ticks and a fifth of the peer timeout (in whole ticks) are never more than a
// fifth apart, so every writer's slot still advances 5 times within it (`Liveness::disk_shared`).
const _: () = assert!(
    CALM_ROUND_TICKS >= 1 && CALM_ROUND_TICKS * CALM_WRITES_PER_PEER_TIMEOUT <= 10 && CALM_WRITES_PER_PEER_TIMEOUT == 5,
    "calm rounds must leave 5 slot writes per peer timeout"
);
const _: () = assert!(CALM_COPY_TICKS == 2, "a paced copy says that exactly one sequence number was left out before it");
const _: () = assert!(DEFAULT_TIMINGS.partition_confirm_ms < DEFAULT_TIMINGS.peer_timeout_ms, "default timings must pass their own validation");
const _: () = assert!(HEADER_SIZE + SLOT_SIZE * MAX_HOSTS == DISK_SIZE, "the disk holds a header and one slot per host");
// 64 hosts' acks with their ages: one IPv4 datagram on a 1500-byte MTU (over IPv6 the sender
// fragments the largest ones, which a LAN passes).
const _: () = assert!(MAX_HEARTBEAT_LEN <= 1472, "a heartbeat fits one IPv4 datagram on a 1500-byte MTU");
const _: () = assert!(MAX_HOSTS <= 64, "a HostSet is one u64");
