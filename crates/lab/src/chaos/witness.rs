//! The suite's witness fault, injected with a network witness (`--witness network`, two
//! hosts): the witness's machine is lost (SIGKILL) for a while and comes back. Its loss alone
//! must change nothing for a healthy cluster — no host fences, no VM moves — and must be shown:
//! a `witness-unreachable` warning while it is away, `witness-reachable` once it answers again.

use super::Suite;
use anyhow::Result;
use std::time::{Duration, Instant};
use tandem_agent::views::{EventKind, StatusView};
use tandem_sim::oracle::{Invariant, Violation};

/// How long the witness stays away: past the three failed rounds that raise the warning.
const AWAY: Duration = Duration::from_secs(10);
/// How long the suite waits for each of the two events.
const EVENT_BOUND: Duration = Duration::from_secs(20);

impl Suite {
    /// Waits until the witness is a voter (the two-host cluster tolerates a failure only then).
    pub(super) fn wait_witness_votes(&mut self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) && !super::interrupted() {
            let voting = (0..self.lab.hosts.len()).find_map(|i| self.client(i).get_as::<StatusView>("/v1/status").ok());
            if voting.is_some_and(|st| st.consensus.voters.contains(&tandem_core::witness::WITNESS_NODE)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.report_finding("suite-error", "the network witness never became a voter");
    }

    /// Waits until some host recorded `kind` since `since_ms`; reports a finding if none did.
    fn expect_recorded(&mut self, kind: EventKind, since_ms: u64, why: &str) {
        let start = Instant::now();
        while start.elapsed() < EVENT_BOUND && !super::interrupted() {
            if !self.recorded_since(kind, since_ms).is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        self.report_finding("witness-warning", &format!("no {kind} event within {EVENT_BOUND:?}: {why}"));
    }

    pub(super) fn inject_witness_loss(&mut self, since_ms: u64) -> Result<()> {
        let all: Vec<usize> = (0..self.lab.hosts.len()).collect();
        let before = self.vms(&all);
        self.log(&format!("witness-loss: the network witness is killed for {:.0} s", AWAY.as_secs_f64()));
        let lost = Instant::now();
        self.lab.kill_witness();
        self.expect_recorded(EventKind::WitnessUnreachable, since_ms, "its loss must be shown as a warning");
        std::thread::sleep(AWAY.saturating_sub(lost.elapsed()));
        let back_ms = tandem_drivers::wall_ms();
        self.lab.start_witness()?;
        self.log("  the witness is back");
        self.expect_recorded(EventKind::WitnessReachable, back_ms, "its return must be shown");
        let after = self.vms(&all);
        if super::placement(&before) != super::placement(&after) {
            self.violation(Violation::new(Invariant::HealthyFenced, "VMs moved while only the witness was lost"));
        }
        Ok(())
    }
}
