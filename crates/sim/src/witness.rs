//! Two hosts and a disk witness: the witness's region is one buffer of the simulated world,
//! reached by each host on its heartbeat-disk path (a host whose disk path fails, hangs or is
//! powered off reads and writes nothing there), and the faults of a two-host cluster — the
//! link between the hosts cut, alone or with one host's disk path lost, and the witness's
//! region lost alone. The partition verdict
//! keeps the lower id; a host cut off and without its disk fences; either way the other
//! restarts the lost host's VMs, never a second copy.

use super::*;
use std::sync::Mutex;
use tandem_agent::witness::{WitnessRegion, MIN_REGION_BYTES};

/// The witness region of a run, and which host opened the witness's database last.
pub struct SimRegion {
    bytes: Vec<u8>,
    opened_by: Option<u32>,
}

/// One host's path to the witness region.
pub struct SimWitness {
    pub region: Arc<Mutex<SimRegion>>,
    pub world: Arc<World>,
    pub me: u32,
}

impl std::fmt::Debug for SimWitness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SimWitness(h{})", self.me)
    }
}

impl SimWitness {
    /// A fresh region (all zeros), shared by every host of a run.
    pub fn new_region() -> Arc<Mutex<SimRegion>> {
        Arc::new(Mutex::new(SimRegion { bytes: vec![0; MIN_REGION_BYTES as usize], opened_by: None }))
    }

    fn gate(&self, read: bool) -> std::io::Result<()> {
        if lock(&self.world.cond).down.contains(&self.me) {
            return Err(std::io::Error::other("host is powered off"));
        }
        if self.world.witness_down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(std::io::Error::other("simulated witness loss: the region does not answer"));
        }
        match self.world.disk_mode(self.me) {
            DiskMode::Ok => Ok(()),
            DiskMode::WriteOnly if !read => Ok(()),
            // A hang is an error at once here: the region's trait is synchronous (the real
            // region's callers give up after their timeout).
            mode => Err(std::io::Error::other(format!("simulated witness path failure ({mode:?})"))),
        }
    }
}

impl WitnessRegion for SimWitness {
    fn read_at(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        self.gate(true)?;
        let mut r = lock(&self.region);
        if offset == 0 && out.len() == 16 {
            // The database's header, read only when a node opens it: this host holds it now.
            r.opened_by = Some(self.me);
        }
        let at = offset as usize;
        let src = r.bytes.get(at..at + out.len()).ok_or_else(|| std::io::Error::other("beyond the region"))?;
        out.copy_from_slice(src);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.gate(false)?;
        let mut r = lock(&self.region);
        let database = offset == 0 || offset >= tandem_core::witness::DATABASE_OFFSET;
        if database && r.opened_by != Some(self.me) {
            let last = r.opened_by.map_or_else(|| "no host".to_string(), |h| format!("h{h}"));
            let why = format!("h{} wrote the witness's database after {last} opened it", self.me);
            self.world.violation(crate::oracle::Violation::new(crate::oracle::Invariant::WitnessTwice, why));
        }
        let at = offset as usize;
        let dst = r.bytes.get_mut(at..at + data.len()).ok_or_else(|| std::io::Error::other("beyond the region"))?;
        dst.copy_from_slice(data);
        Ok(())
    }

    fn size(&self) -> u64 {
        MIN_REGION_BYTES
    }
}

impl Sim {
    /// Whether the run is a two-host cluster with a disk witness.
    pub(super) fn two_with_witness(&self) -> bool {
        self.opts.disk_witness
    }

    /// The host a cut of the link between the two hosts leaves fenced, whichever host the
    /// fault picked: the one away from the preferred site when one is set and has a host,
    /// else the higher id (the partition verdict's tie-breaks).
    pub(super) fn link_cut_loser(&self) -> u32 {
        let higher = (self.hosts.len() as u32).saturating_sub(1);
        let Some(preferred) = self.opts.preferred_site.as_deref() else { return higher };
        let at_preferred = |h: u32| self.opts.sites.get(h as usize).is_some_and(|s| s == preferred);
        match (0..self.hosts.len() as u32).find(|h| at_preferred(*h)) {
            Some(kept) => (0..self.hosts.len() as u32).find(|h| *h != kept).unwrap_or(higher),
            None => higher,
        }
    }

    /// The link cut while one host (drawn) loses its disk path: that host, cut off from
    /// everything, fences; the other keeps its disk and the witness and restarts its VMs.
    pub(super) async fn link_cut_disk_lost(&mut self, kind: FaultKind, hold: Duration, now: u64, until: u64) {
        let w = Arc::clone(&self.world);
        let blind = self.rand(2) as u32;
        let other = 1 - blind;
        let before = self.vms_on(blind).await;
        w.log(format!("FAULT {kind}: h0 <-/-> h1, and h{blind} loses its disk path, for {hold:?}"));
        {
            let mut c = lock(&w.cond);
            c.blocked.insert((blind, other));
            c.blocked.insert((other, blind));
        }
        w.set_disk_mode(blind, DiskMode::Fail);
        self.excuse_only(&[blind], until);
        self.run_for(hold).await;
        if hold.as_millis() as u64 > 9_000 && !before.is_empty() {
            self.check_moved_off(blind, &before, &format!("{kind} of h{blind}")).await;
            self.recoveries.owe(now, format!("{kind} of h{blind}"), &self.restartable(&before), &[]);
        }
        // The disk path comes back first and the link up to 1.5 s later: a host that fenced
        // cut off from everything is then seen again on the disk — fenced, hearing only itself
        // — before its heartbeats arrive, and must not win over the host that ran on (the
        // fault suite found it with two hosts and a network witness).
        let lag = self.rand(1_500);
        w.heal_disks();
        w.log(format!("HEAL {kind}: the disk path; the link in {lag} ms"));
        self.run_for(Duration::from_millis(lag)).await;
        lock(&w.cond).blocked.clear();
        w.log(format!("HEAL {kind}"));
    }

    /// The witness's region answers no host for `hold` (a network witness down, the heartbeat
    /// disk fine): the hosts still hear each other, so nobody may fence and nothing moves; a
    /// node held there stops at its first failed write and must be opened afresh once the
    /// region answers (later faults of the run owe recoveries that need its vote again).
    pub(super) async fn witness_loss(&mut self, kind: FaultKind, hold: Duration) {
        let w = Arc::clone(&self.world);
        w.log(format!("FAULT {kind}: the witness's region answers nobody, for {hold:?}"));
        w.witness_down.store(true, std::sync::atomic::Ordering::SeqCst);
        self.run_for(hold).await;
        w.witness_down.store(false, std::sync::atomic::Ordering::SeqCst);
        w.log(format!("HEAL {kind}"));
    }
}
