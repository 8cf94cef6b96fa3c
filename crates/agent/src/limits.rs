//! Every bound, timeout and queue size of the agent, in one place, with compile-time checks of
//! the relations between them. (Each is defined next to the code that uses it and re-exported
//! here; the core's own bounds are in `tandem_core::limits`.)

use std::time::Duration;

pub use crate::agent::witness::WITNESS_UNREACHABLE_ROUNDS;
pub use crate::agent::{
    COPY_APPLY_WAIT, COPY_REQUEST_TIMEOUT, FORWARD_TIMEOUT, HUNG_KILL_WAIT, LINK_RETRY, LOCAL_QUERY_TIMEOUT, MAX_MIRROR_LINKS, MAX_PROBES,
    PROBE_ATTEMPT_TIMEOUT, PROBE_GIVE_UP, PROBE_INTERVAL, STORAGE_PROBE_SPACING, WATCHDOG_MAX_SLEEP_MS, WATCHDOG_MIN_SLEEP_MS,
};
pub use crate::api::MAX_BODY;
pub use crate::api_limits::{MAX_CONNECTIONS, REQUEST_TIMEOUT};
pub use crate::config::MAX_HUNG_STORAGE_RESTART_S;
pub use crate::consensus::{ADMISSION_ATTEMPTS, PROPOSE_TIMEOUT, RPC_TIMEOUT, SNAPSHOT_TIMEOUT};
pub use crate::events::{EVENT_FILE_MAX, EVENT_RING, RELOAD_BYTES};
pub use crate::heavy::HEAVY_CONCURRENCY;
pub use crate::httpc::MAX_RESPONSE;
pub use crate::io::{ARRIVAL_STEP_TOLERANCE, MAX_DATAGRAMS_PER_POLL, MMSG_BATCH, RECEIVE_POLL_DIVISOR};
pub use crate::multipath::{MAX_DISK_PATHS, PATH_CHECK_TIMEOUT};
pub use crate::netwitness::{
    MAX_CLUSTERS as WITNESS_MAX_CLUSTERS, MAX_CONNECTIONS as WITNESS_MAX_CONNECTIONS, MAX_IO as WITNESS_MAX_IO, REGION_QUEUE as WITNESS_REGION_QUEUE,
    REGION_TIMEOUT as WITNESS_REGION_TIMEOUT,
};
pub use crate::tls::{ACCEPT_QUEUE, HANDSHAKE_TIMEOUT};

const fn shorter(a: Duration, b: Duration) -> bool {
    a.as_millis() < b.as_millis()
}

const _: () = assert!(shorter(FORWARD_TIMEOUT, REQUEST_TIMEOUT), "a forwarded write must answer within the API's own request deadline");
const _: () = assert!(shorter(WITNESS_REGION_TIMEOUT, REQUEST_TIMEOUT), "a witness region request gives up before the witness's own request deadline");
const _: () = assert!(shorter(SNAPSHOT_TIMEOUT, REQUEST_TIMEOUT), "a snapshot chunk must arrive within the API's request deadline");
const _: () = assert!(shorter(RPC_TIMEOUT, FORWARD_TIMEOUT), "a consensus RPC is shorter than the write waiting on it");
const _: () = assert!(shorter(PROPOSE_TIMEOUT, FORWARD_TIMEOUT), "a forwarded proposal answers, even undecided, before its forwarder gives up");
const _: () = assert!(
    LOCAL_QUERY_TIMEOUT.as_millis() < tandem_core::timing::DEFAULT_TIMINGS.peer_timeout_ms as u128,
    "the coordinator's read of a host's VMs must not hold its loop past a peer timeout"
);
const _: () = assert!(MAX_BODY as u64 <= MAX_RESPONSE as u64, "every body one agent may send, another may read back");
const _: () = assert!(RELOAD_BYTES <= EVENT_FILE_MAX, "the timeline reloads at most the file it keeps");
const _: () = assert!(shorter(COPY_REQUEST_TIMEOUT, REQUEST_TIMEOUT), "asking a host to serve a copy gives up before that host's own request deadline");
const _: () = assert!(
    STORAGE_PROBE_SPACING.as_millis() > 0 && STORAGE_PROBE_SPACING.as_millis() <= tandem_drivers::pathswitch::PROBE_TIMEOUT.as_millis(),
    "a copy is probed again within a probe's bound (a hang is seen soon); `StorageProbes` keeps one read per copy in flight"
);
const _: () = assert!(shorter(COPY_APPLY_WAIT, COPY_REQUEST_TIMEOUT), "a copy server waits for committed state less long than its caller waits for it");
const _: () = assert!(MAX_MIRROR_LINKS > 0 && LINK_RETRY.as_millis() > 0);
const _: () = assert!(RECEIVE_POLL_DIVISOR >= 2, "a heartbeat is stamped at most half an interval after it arrived");
pub use crate::consensus::{election_timeout_min_ms, raft_heartbeat_ms};
/// A leader that died is replaced within a peer timeout, and followers wait for three missed
/// leader heartbeats before they stand (every validated timing has both: the election timeout
/// is three tenths of the peer timeout, which is at least 200 ms).
const fn leader_replaced_in_time(t: &tandem_core::timing::Timings) -> bool {
    2 * election_timeout_min_ms(t) < t.peer_timeout_ms && 3 * raft_heartbeat_ms(t) <= election_timeout_min_ms(t) && raft_heartbeat_ms(t) >= 20
}
const _: () = assert!(leader_replaced_in_time(&tandem_core::timing::DEFAULT_TIMINGS));
const _: () = assert!(leader_replaced_in_time(&tandem_core::timing::LOW_LATENCY_TIMINGS));
const _: () = assert!(election_timeout_min_ms(&tandem_core::timing::DEFAULT_TIMINGS) == 900, "the defaults keep the election timeouts they had");
const _: () = assert!(
    WATCHDOG_MIN_SLEEP_MS < WATCHDOG_MAX_SLEEP_MS && 2 * WATCHDOG_MAX_SLEEP_MS <= tandem_core::timing::DEFAULT_TIMINGS.kill_grace_ms,
    "the software watchdog looks at least twice within the kill grace"
);
const _: () = assert!(HEAVY_CONCURRENCY >= 1 && ADMISSION_ATTEMPTS >= 1);
const _: () = assert!(
    shorter(PROBE_INTERVAL, PROBE_ATTEMPT_TIMEOUT) && shorter(PROBE_ATTEMPT_TIMEOUT, PROBE_GIVE_UP) && MAX_PROBES >= 1,
    "a probe tries many times before it gives up"
);
