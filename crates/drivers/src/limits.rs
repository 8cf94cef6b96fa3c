//! Every bound and timeout of the drivers, in one place, with compile-time checks of the
//! relations between them. (Each is defined next to the code that uses it and re-exported here;
//! the agent's are in `tandem_agent::limits`, the core's in `tandem_core::limits`.)

use std::time::Duration;

pub use crate::bridge::TAP_SETUP_TIMEOUT;
pub use crate::chunksums::{MAX_CHUNK, MAX_SUM_CHUNKS, MIN_CHUNK};
pub use crate::copychannel::{GATE_HANDSHAKE_TIMEOUT, MAX_GATE_CONNECTIONS, SUMS_BASE_TIMEOUT, SUMS_MIN_RATE};
pub use crate::copyrelay::{DEFAULT_STALL, MAX_DELTA_WRITE, MAX_TRACKED_REQUESTS, UPSTREAM_CONNECT_TIMEOUT};
pub use crate::launcher::{KILL_WAIT, MAX_CHILDREN};
pub use crate::localcopy::{CLAIM_TIMEOUT, LOCAL_SERVER_START_DEADLINE, REPLACED_SERVER_EXIT_WAIT};
pub use crate::probe::MAX_PROBE_ANSWER;
pub use crate::qemu::{DEFAULT_QMP_TIMEOUT_MS, DEFAULT_STOP_TIMEOUT_S, QMP_CONNECT_DEADLINE, QMP_CONNECT_RETRY, QUIT_WAIT};
pub use crate::qmp::{MAX_IN_FLIGHT, MAX_LINE};
pub use crate::sitecopy::{COPY_SERVER_QMP_TIMEOUT, COPY_SERVER_START_DEADLINE, MAX_SERVED_COPIES};
pub use crate::syncmirror::DETACH_WAIT;

const _: () = assert!(
    (DEFAULT_QMP_TIMEOUT_MS as u128) < QMP_CONNECT_DEADLINE.as_millis(),
    "one QMP attempt must fit in the start's connection deadline, or a start never retries"
);
const _: () = assert!(QMP_CONNECT_RETRY.as_millis() < QMP_CONNECT_DEADLINE.as_millis());
const _: () = assert!(TAP_SETUP_TIMEOUT.as_millis() < QMP_CONNECT_DEADLINE.as_millis(), "a start's network setup is bounded like its QMP connection");
const _: () = assert!(QUIT_WAIT.as_millis() <= KILL_WAIT.as_millis(), "asking QEMU to quit waits no longer than a kill is given to be reaped");
const _: () = assert!(COPY_SERVER_QMP_TIMEOUT.as_millis() < COPY_SERVER_START_DEADLINE.as_millis(), "one QMP attempt fits in the copy server's start deadline");
const _: () =
    assert!(UPSTREAM_CONNECT_TIMEOUT.as_millis() > DEFAULT_STALL.as_millis(), "a relay gives a copy server's connection longer than it gives an answer");
const _: () = assert!(
    GATE_HANDSHAKE_TIMEOUT.as_millis() >= UPSTREAM_CONNECT_TIMEOUT.as_millis(),
    "a copy gate gives a relay's handshake at least the time the relay gives it"
);
const _: () = assert!(
    SUMS_BASE_TIMEOUT.as_millis() > GATE_HANDSHAKE_TIMEOUT.as_millis() + crate::sitecopy::COPY_SERVER_QMP_TIMEOUT.as_millis(),
    "summing a copy is given the handshake and the wait for its earlier writes to land"
);
const _: () = assert!(MIN_CHUNK.is_power_of_two() && MAX_CHUNK.is_power_of_two() && MIN_CHUNK <= MAX_CHUNK && SUMS_MIN_RATE > 0);
const _: () = assert!(MAX_DELTA_WRITE as u64 >= MIN_CHUNK, "a write of a whole chunk can be compared");
const _: () = assert!(MAX_GATE_CONNECTIONS >= 2, "a gate carries a mirror's connection while its replacement comes in");
const _: () = assert!(MAX_SERVED_COPIES > 0 && DETACH_WAIT.as_millis() > 0);
const _: () = assert!(
    CLAIM_TIMEOUT.as_millis() < LOCAL_SERVER_START_DEADLINE.as_millis() && LOCAL_SERVER_START_DEADLINE.as_millis() <= COPY_SERVER_START_DEADLINE.as_millis(),
    "claiming a copy fits in its server's start, which is bounded like the copy server's"
);
const _: () = assert!(
    REPLACED_SERVER_EXIT_WAIT.as_millis() > 0 && REPLACED_SERVER_EXIT_WAIT.as_millis() < LOCAL_SERVER_START_DEADLINE.as_millis(),
    "a new local copy server waits less for the one it replaces than for itself to listen"
);
const _: () = assert!(DEFAULT_STOP_TIMEOUT_S > 0 && MAX_IN_FLIGHT > 0 && MAX_CHILDREN > 0);
const _: () = assert!(MAX_LINE >= 64 * 1024, "a QMP answer (query-status, an event) fits in one line");

/// How long a graceful stop can take at most with the default settings: the guest's power-down,
/// then `quit`, then a kill reaped.
pub const DEFAULT_STOP_BOUND: Duration = Duration::from_secs(DEFAULT_STOP_TIMEOUT_S + QUIT_WAIT.as_secs() + KILL_WAIT.as_secs());
