//! CPU-heavy work — FTT searches, failover plans, admission verdicts, the metrics page — on a
//! large state takes hundreds of milliseconds. It runs here: off the async runtime's workers (on
//! tokio's blocking pool), one computation at a time, on a snapshot of committed state that no
//! lock protects, so neither the API nor consensus waits behind it. (The liveness path runs on
//! its own thread and never comes here.) A simulator, which must stay deterministic, runs the
//! work inline instead.

use thiserror::Error;
use tokio::sync::Semaphore;

/// Heavy computations that run at once; the rest wait their turn (their number is bounded by
/// the API's connection cap and the coordinator's single loop).
pub const HEAVY_CONCURRENCY: usize = 1;

/// Why a heavy computation gave no answer.
#[derive(Debug, Error)]
pub enum HeavyError {
    #[error("heavy computation panicked or was cancelled: {0}")]
    Failed(String),
    #[error("the agent is stopping")]
    Closed,
}

/// Where heavy work runs.
pub struct HeavyWork {
    /// Whether the blocking pool may be used (production) or the work runs inline (simulator).
    threads: bool,
    permits: Semaphore,
}

impl HeavyWork {
    #[must_use]
    pub fn new(threads: bool) -> HeavyWork {
        HeavyWork { threads, permits: Semaphore::new(HEAVY_CONCURRENCY) }
    }

    /// Runs `f` when its turn comes, off the runtime's workers when threads are allowed.
    pub async fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T, HeavyError> {
        let _turn = self.permits.acquire().await.map_err(|_| HeavyError::Closed)?;
        if self.threads {
            tokio::task::spawn_blocking(f).await.map_err(|e| HeavyError::Failed(e.to_string()))
        } else {
            Ok(f())
        }
    }
}

impl Default for HeavyWork {
    /// Inline: what a consensus instance opened on its own (tests, benchmarks) uses.
    fn default() -> Self {
        HeavyWork::new(false)
    }
}
