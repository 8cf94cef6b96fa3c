//! Service probes: after this host starts a VM whose spec names a probe, it tries the probe
//! until the service first answers and records that moment (`vm-answering`), which a failover's
//! phases show as "answering". Observation only: a probe that never succeeds changes nothing
//! but the timeline (`vm-not-answering` once it gives up).

use super::*;
use std::collections::BTreeSet;

/// Time between two attempts of one VM's probe.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// One attempt's deadline: connection, request and answer.
pub const PROBE_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// How long after a start the probe keeps trying before it records that the service never
/// answered (a guest that boots from a large disk may well take minutes).
pub const PROBE_GIVE_UP: Duration = Duration::from_secs(600);
/// Probes running at once on one host; a start beyond it is recorded unprobed (each probe is a
/// sleeping task and one connection at a time, but a mass failover of thousands of VMs must not
/// open thousands of connections every interval).
pub const MAX_PROBES: usize = 512;
/// A probe checks that its VM's instance still runs here every this many attempts (once a
/// second), not at every attempt.
const INSTANCE_CHECK_EVERY: u64 = 10;

/// The VMs this host is probing now.
#[derive(Default)]
pub(super) struct Probing {
    vms: BTreeSet<String>,
}

impl Agent {
    /// Probes VM `spec.name`, started here at `generation`, until it answers, stops running
    /// here, or the probe gives up.
    pub(super) fn spawn_probe(self: &Arc<Self>, spec: &tandem_core::state::VmSpec, generation: u64) {
        let Some(probe) = spec.probe.clone() else { return };
        let name = spec.name.clone();
        {
            let mut p = lock(&self.probing);
            if p.vms.len() >= MAX_PROBES {
                tracing::warn!("{name} started unprobed: {MAX_PROBES} probes already run on this host");
                return;
            }
            if !p.vms.insert(name.clone()) {
                return;
            }
        }
        let a = Arc::clone(self);
        tokio::spawn(
            async move {
                a.probe_until_answered(&name, generation, &probe).await;
                lock(&a.probing).vms.remove(&name);
            }
            .in_current_span(),
        );
    }

    async fn probe_until_answered(&self, name: &str, generation: u64, probe: &tandem_core::state::ServiceProbe) {
        let host_ip = self.cfg.api_addr.ip().to_string();
        let started = self.clock.now();
        let give_up = Millis(started.0 + PROBE_GIVE_UP.as_millis() as u64);
        let mut last_error = String::new();
        // Only the instance this host started: once it is killed, moved or restarted, this probe
        // has nothing left to time. Checked every `INSTANCE_CHECK_EVERY` attempts (the driver's
        // list is every VM of the host) and before an answer is recorded.
        let runs = || self.driver.list().iter().any(|v| v.name == name && v.generation == generation && v.exit.is_none());
        let mut attempt: u64 = 0;
        while !self.stopping.load(Ordering::SeqCst) && self.clock.now() < give_up {
            if attempt.is_multiple_of(INSTANCE_CHECK_EVERY) && !runs() {
                return;
            }
            attempt += 1;
            match self.driver.probe(name, probe, &host_ip, PROBE_ATTEMPT_TIMEOUT).await {
                Ok(()) if !runs() => return,
                Ok(()) => {
                    let after = self.clock.now().0.saturating_sub(started.0);
                    let detail =
                        format!("{name} answers on {} ({:.2} s after its start, generation {generation})", probe.address_on(&host_ip), after as f64 / 1000.0);
                    self.events.record(crate::events::EventKind::VmAnswering, Some(name), Some(&self.cfg.name), detail);
                    return;
                }
                Err(e) => last_error = e.to_string(),
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
        if !self.stopping.load(Ordering::SeqCst) {
            let detail = format!("{name} did not answer its probe within {} s of its start: {last_error}", PROBE_GIVE_UP.as_secs());
            self.events.record(crate::events::EventKind::VmNotAnswering, Some(name), Some(&self.cfg.name), detail);
        }
    }
}
