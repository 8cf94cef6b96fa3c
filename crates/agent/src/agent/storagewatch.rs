//! The watch on this site's storage under each running mirrored disk: storage that *answers
//! with errors* pauses the guest and switches the disk onto the other site's copy (`mirror`),
//! but storage that *hangs* leaves the guest's requests waiting — until the disk is cut from its
//! local copy server (`tandem_drivers::localcopy`), which fails them. So that a hang is seen
//! soon and never silent, each disk's copy is read directly (one 4 KiB `O_DIRECT` read on a
//! thread of its own, at most one per copy at a time, at most one a `STORAGE_PROBE_SPACING`,
//! 0.5 s); one that does not answer within the probe's bound raises a `storage-path-hung` alert
//! (and wakes the mirror loop), and the copy answering again `storage-path-responsive`. A hang
//! that lasts `[mirror] hung_storage_switch_ms` under a served copy — the disk's, or a way
//! back's — is told to the core (`LinkObservation::local_hung`): the copy is cut, and the disk
//! goes on on its other copy (if in sync), or the way back is given up, without a restart.
//! Where only a restart can answer it — a copy QEMU opened itself — the bound is
//! `hung_storage_restart_s`, and the VM is restarted where its other copy is
//! (`mirror::restart_elsewhere`).

use super::{lock, Agent};
use crate::events::EventKind;
use std::sync::Arc;
use std::time::Duration;
use tandem_drivers::pathswitch::ProbeAnswer;
use tokio::time::Instant;

/// The least time between two probes of one copy (the agent's passes come faster). Short, so
/// that a hang is seen soon after it begins; a copy that hangs still holds one read, not a
/// queue (`StorageProbes` lets one read per copy be in flight, and a probe meeting it waits).
pub const STORAGE_PROBE_SPACING: Duration = Duration::from_millis(500);

/// What can answer a hang of a disk's own storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum HangAnswer {
    /// Cutting the disk from its local copy server, then the switch to the other copy.
    Switch,
    /// Only a restart where the other copy is.
    Restart,
}

/// Where one disk's watch stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum StorageWatch {
    /// Not probed yet.
    #[default]
    Unprobed,
    /// A probe is under way; `hung_since`: as after the last one.
    Probing { hung_since: Option<Instant> },
    /// The last probe, ended at `at`, got an answer (`hung_since` none) or none in time — the
    /// copy has not answered since the start of the first probe that got none.
    Probed { hung_since: Option<Instant>, at: Instant },
}

impl StorageWatch {
    /// Since when the copy has not answered, if it does not.
    pub(super) fn hung_since(&self) -> Option<Instant> {
        match *self {
            StorageWatch::Unprobed => None,
            StorageWatch::Probing { hung_since } | StorageWatch::Probed { hung_since, .. } => hung_since,
        }
    }
}

impl Agent {
    /// Whether disk `disk` of `vm`'s own copy has not answered for as long as the answer to
    /// the hang needs (never when that is 0): `[mirror] hung_storage_switch_ms` where the hang
    /// is answered by a switch, `hung_storage_restart_s` where only a restart can answer it.
    pub(super) fn local_copy_hung(&self, vm: &str, disk: usize, answer: HangAnswer) -> bool {
        let bound = match answer {
            HangAnswer::Switch => Duration::from_millis(self.cfg.mirror.hung_storage_switch_ms),
            HangAnswer::Restart => Duration::from_secs(self.cfg.mirror.hung_storage_restart_s),
        };
        let since = lock(&self.mirroring).storage.get(&(vm.to_string(), disk)).and_then(StorageWatch::hung_since);
        !bound.is_zero() && since.is_some_and(|t| t.elapsed() >= bound)
    }

    /// Disk `disk` of `vm`'s own copy was just seen answering (the way back opened it, or the
    /// guest's failed request was retried on it): whatever the watch last saw is stale — a
    /// restart away from a hang needs a hang seen since.
    pub(super) fn storage_answered(&self, vm: &str, disk: usize) {
        if let Some(s) = lock(&self.mirroring).storage.get_mut(&(vm.to_string(), disk)) {
            *s = StorageWatch::Unprobed;
        }
    }

    /// Probes, in the background, the local copy of each mirrored disk of `running` (VM, disk,
    /// copy's path relative to the storage of this host's site, `site`) that is not being
    /// probed.
    pub(super) fn watch_site_storage(self: &Arc<Self>, running: Vec<(String, usize, String)>, site: &str) {
        {
            // Disks no longer wanted are forgotten.
            let mut m = lock(&self.mirroring);
            m.storage.retain(|k, _| running.iter().any(|(vm, disk, _)| (vm, disk) == (&k.0, &k.1)));
        }
        for (vm, disk, relative) in running {
            // A driver without copies of its own (the simulator's) has nothing to watch.
            if self.driver.probe_site_copy(&relative).is_none() {
                return;
            }
            let key = (vm.clone(), disk);
            let hung_since = {
                let mut m = lock(&self.mirroring);
                let state = m.storage.entry(key.clone()).or_default();
                match *state {
                    StorageWatch::Probing { .. } => continue,
                    StorageWatch::Probed { at, .. } if at.elapsed() < STORAGE_PROBE_SPACING => continue,
                    StorageWatch::Probed { .. } | StorageWatch::Unprobed => {}
                }
                let hung_since = state.hung_since();
                *state = StorageWatch::Probing { hung_since };
                hung_since
            };
            let (a, site) = (Arc::clone(self), site.to_string());
            tokio::spawn(async move {
                let Some(probe) = a.driver.probe_site_copy(&relative) else { return };
                let started = Instant::now();
                let now_hung = probe.await == ProbeAnswer::Hangs;
                let since = if now_hung { Some(hung_since.unwrap_or(started)) } else { None };
                // Unless the copy was seen answering meanwhile (`storage_answered`): a read begun
                // in the hang must not make it hung again.
                match lock(&a.mirroring).storage.get_mut(&key) {
                    Some(s) if *s == StorageWatch::Probing { hung_since } => *s = StorageWatch::Probed { hung_since: since, at: Instant::now() },
                    _ => return,
                }
                if now_hung {
                    // A hang may have just passed its bound: the mirror loop acts now, not at
                    // its next round.
                    if let Some(wake) = a.driver.mirror_events() {
                        wake.notify_one();
                    }
                }
                match (hung_since.is_some(), now_hung) {
                    (false, true) => {
                        let answer = if a.driver.local_reach(&vm, disk) == tandem_core::mirroring::LocalReach::Served {
                            "past [mirror] hung_storage_switch_ms they are cut and the disk goes on on the other copy, if that is in sync".to_string()
                        } else {
                            "and no switch to the other copy can take them back — storage should answer a lost path with errors (NFS soft mounts, multipath no_path_retry), which switch at once".to_string()
                        };
                        let detail = format!(
                            "disk {disk}: this site's storage does not answer a read within {:?} ({relative}); the guest's requests to it wait; {answer}",
                            tandem_drivers::pathswitch::PROBE_TIMEOUT
                        );
                        a.events.record(EventKind::StoragePathHung, Some(&vm), Some(&site), detail);
                    }
                    (true, false) => {
                        let detail = format!("disk {disk}: this site's storage answers again ({relative})");
                        a.events.record(EventKind::StoragePathResponsive, Some(&vm), Some(&site), detail);
                    }
                    _ => {}
                }
            });
        }
    }
}
