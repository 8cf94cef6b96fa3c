//! What the host running a site-mirrored VM does about each of its disks' links to another
//! site's copy: one decision per pass, from what QEMU, the agent's relay and committed state
//! say. No I/O here; the agent gathers the observation and executes the actions
//! (`tandem_agent::agent::mirror`). The safety rule it keeps is `state::mirror`'s: held writes
//! are let go only once the copy that lost them is committed as stale.

use serde::{Deserialize, Serialize};

/// The mirror job, as QEMU reports it (`tandem_drivers::syncmirror::MirrorSample`, without
/// its figures).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum JobPhase {
    /// No mirror job: never attached, or the VM was started again.
    Absent,
    /// Copying what the other copy lacks.
    Copying,
    /// Both copies equal; every write goes to both.
    InSync,
    /// Stopped after the other copy failed writes; its bitmap keeps what it missed.
    Stopped,
    /// The job ended; a new one must copy everything again.
    Ended,
}

/// The agent's relay to the other copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RelayPhase {
    /// No relay (not attached yet).
    None,
    /// Joined to the copy server, or waiting for QEMU to connect.
    Open,
    /// The copy stopped answering: QEMU's writes to it are held.
    Lost,
    /// Held writes were let go; new connections join again if the copy server answers.
    Released,
}

/// Which copy the VM's disk runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskPath {
    /// Its own site's copy, which answers.
    Local,
    /// Its own site's storage failed a request: the guest is paused, the request kept to be
    /// retried.
    LocalFailed,
    /// The other site's copy, since a storage path failover.
    OtherCopy,
}

/// How the VM's QEMU reaches its own site's copy of the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalReach {
    /// Opened by QEMU itself: a request that waits in hung storage cannot be taken back.
    Direct,
    /// Through a server of its own (`tandem_drivers::localcopy`), whose connection can be cut:
    /// the requests waiting in hung storage then fail at once.
    Served,
    /// Through a server that is gone — cut from hung storage, or exited: nothing reaches the
    /// copy from this QEMU any more.
    Cut,
}

/// One link, observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkObservation {
    pub job: JobPhase,
    pub relay: RelayPhase,
    /// Whether committed state counts this site's copy as current.
    pub current: bool,
    /// Whether a host of that site can serve the copy now (its agent answered).
    pub server_reachable: bool,
    pub path: DiskPath,
    /// Whether committed state counts the running site's own copy as current.
    pub local_current: bool,
    /// On the other copy: the mirror back into the site's own copy.
    pub back: JobPhase,
    /// Its own site's storage has not answered a direct read for the host's configured bound
    /// (`[mirror] hung_storage_restart_s`): requests QEMU sent it wait — QEMU's file driver has
    /// no timeout, and anything that would take them back drains them first — whether the
    /// guest's own (on its own copy) or the way back's (on the other copy, where a guest write
    /// waits for the way back's copy of the old data to land).
    pub local_hung: bool,
    pub local_reach: LocalReach,
}

/// What to do about one link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkAction {
    /// Ask a host of the site to serve the copy, open a relay to it and start the mirror (a
    /// full copy).
    Attach,
    /// Propose `mirror-synced`: the copy is in sync and every write goes to both.
    ProposeSynced,
    /// Propose `mirror-degraded`: the copy is lost and the guest's writes wait for this commit.
    ProposeDegraded,
    /// Let held writes go: committed state already counts the copy as stale.
    Release,
    /// The copy answers again: point the relay at a host that serves it and resume the job,
    /// which copies only what it missed.
    Resume,
    /// The job ended: remove it, and attach again.
    Reattach,
    /// The local copy failed and the other is in sync: propose `mirror-switched` (the guest
    /// waits, paused, for this commit).
    ProposeSwitch,
    /// Committed state counts only the other copy current: switch the disk onto it and resume
    /// the guest.
    Switch,
    /// On the other copy: open the site's own copy again (if its storage answers) and mirror
    /// the disk back into it.
    StartReturn,
    /// The mirror back is in sync: pause the guest, propose `mirror-synced` for the site's own
    /// copy, then run the disk on it again (mirrored into the other copy) and resume.
    Return,
    /// The mirror back stopped or ended (the storage failed again), or its copy was cut: give
    /// it up (a guest paused on a write the cut failed goes on, on the other copy).
    AbandonReturn,
    /// The local copy failed and cannot be left for the other (not in sync): resume the guest
    /// on it once its storage answers again (the failed request is retried there).
    RetryLocal,
    /// On the other copy, that copy is lost too: no copy is left to go on with here. Kill the
    /// VM (its held writes were never acknowledged) and give it up, so that the cluster starts
    /// it again where a copy is current, once one answers.
    GiveUp,
    /// The local copy hangs and the other is in sync: propose `mirror-switched` (only the other
    /// copy current), then restart elsewhere — the guest's requests cannot be taken back from
    /// hung storage, but the other copy holds every write it saw acknowledged.
    ProposeRestartElsewhere,
    /// The local copy hangs, the other is in sync and the local copy is served: cut the disk's
    /// connection to its server. The requests waiting there fail — they reached neither copy —
    /// and the guest pauses on them, unaware, to go on on the other copy like after any failed
    /// request (`ProposeSwitch`, `Switch`): no restart.
    CutLocal,
    /// Committed state counts only the other copy current and the local copy hangs: kill the
    /// VM, wait until none of its threads can run again, and give it up, so that the cluster
    /// starts it again where its copy is current (vSphere's answer to "all paths down").
    RestartElsewhere,
}

/// The one action for a link this pass, if any.
#[must_use]
pub fn decide(o: LinkObservation) -> Option<LinkAction> {
    match o.path {
        // On the other copy there is nothing left to mirror into: if it is lost too, no copy is
        // left to go on with here (its writes stay held until the VM is killed). While it
        // answers, the way back.
        DiskPath::OtherCopy if o.relay == RelayPhase::Lost => return Some(LinkAction::GiveUp),
        DiskPath::OtherCopy if o.relay != RelayPhase::Open => return None,
        // A way back into storage that hangs holds the guest's writes, and giving it up drains
        // them: a served copy is cut from its server (its requests fail; the way back is then
        // given up, and the guest goes on), one opened directly leaves only a restart where the
        // copy the disk runs on is, the only current one.
        DiskPath::OtherCopy if o.local_hung && matches!(o.back, JobPhase::Copying | JobPhase::InSync) => {
            return Some(match o.local_reach {
                LocalReach::Served => LinkAction::CutLocal,
                LocalReach::Cut => LinkAction::AbandonReturn,
                LocalReach::Direct => LinkAction::RestartElsewhere,
            });
        }
        // Cut from the copy it was going back into: nothing reaches it any more.
        DiskPath::OtherCopy if o.local_reach == LocalReach::Cut && matches!(o.back, JobPhase::Copying | JobPhase::InSync) => {
            return Some(LinkAction::AbandonReturn);
        }
        DiskPath::OtherCopy => {
            return match o.back {
                JobPhase::Absent => Some(LinkAction::StartReturn),
                JobPhase::InSync => Some(LinkAction::Return),
                JobPhase::Stopped | JobPhase::Ended => Some(LinkAction::AbandonReturn),
                JobPhase::Copying => None,
            };
        }
        // The local copy failed: switch while the other copy holds every acknowledged write
        // (in sync, answering, current) — committed first, then the switch.
        DiskPath::LocalFailed if o.relay == RelayPhase::Open && o.job == JobPhase::InSync && o.current => {
            return Some(if o.local_current { LinkAction::ProposeSwitch } else { LinkAction::Switch });
        }
        // Not switchable, and the local copy out of reach for good (its server cut or gone):
        // nothing is left to go on with in this QEMU. Killed (the requests it had were never
        // acknowledged) and given up, the VM starts again where a copy is current.
        DiskPath::LocalFailed if o.local_reach == LocalReach::Cut => return Some(LinkAction::GiveUp),
        // Not switchable: the guest waits, paused, for its own storage (a lost copy's writes
        // are still released the usual way first).
        DiskPath::LocalFailed if o.relay != RelayPhase::Lost => return Some(LinkAction::RetryLocal),
        // Hung, on the same terms as a switch: a served copy is cut from its server (the guest
        // then pauses on the failed requests and switches); one opened by QEMU itself is left
        // for a restart where the other copy is. (Not in sync, or that copy lost: the guest
        // waits for its storage, the mirror as usual.)
        DiskPath::Local if o.local_hung && o.relay == RelayPhase::Open && o.job == JobPhase::InSync && o.current => {
            return match o.local_reach {
                LocalReach::Served => Some(LinkAction::CutLocal),
                // Cut already: the guest pauses on the failed requests at once.
                LocalReach::Cut => None,
                LocalReach::Direct if o.local_current => Some(LinkAction::ProposeRestartElsewhere),
                LocalReach::Direct => Some(LinkAction::RestartElsewhere),
            };
        }
        DiskPath::LocalFailed | DiskPath::Local => {}
    }
    match (o.relay, o.job) {
        // Held writes: only a committed stale copy lets them go — and never the last current
        // copy (after a switch by another of the VM's disks, this site's is not).
        (RelayPhase::Lost, _) if o.current && !o.local_current => None,
        (RelayPhase::Lost, _) if o.current => Some(LinkAction::ProposeDegraded),
        (RelayPhase::Lost, _) => Some(LinkAction::Release),
        (RelayPhase::None, _) | (_, JobPhase::Absent) if o.server_reachable => Some(LinkAction::Attach),
        (RelayPhase::None, _) | (_, JobPhase::Absent) => None,
        // A job that ended by itself (QEMU ends a mirror whose source read failed; the ones we
        // end go with their link) sent no write since: a copy still counted current is stale,
        // committed so first — as a lost copy is — and only then attached again.
        (_, JobPhase::Ended) if o.current && o.local_current => Some(LinkAction::ProposeDegraded),
        (_, JobPhase::Ended) if o.current => None,
        (_, JobPhase::Ended) => Some(LinkAction::Reattach),
        (_, JobPhase::Stopped) if o.server_reachable => Some(LinkAction::Resume),
        (RelayPhase::Open, JobPhase::InSync) if !o.current => Some(LinkAction::ProposeSynced),
        _ => None,
    }
}

/// How a link reads for the operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum LinkState {
    /// Not attached (the other site has no host to serve its copy).
    Detached,
    /// Copying what the other copy lacks: `copied` of `total` bytes of this pass.
    Resyncing { copied: u64, total: u64 },
    /// Every write goes to both copies.
    InSync,
    /// The other copy is lost: writes wait until it is committed as stale.
    Holding,
    /// Running on this site's copy alone; the other misses what was written since.
    Degraded,
    /// This site's storage failed and the disk runs on the other site's copy (no mirror).
    OnOtherCopy,
    /// On the other copy, mirroring back into this site's copy (its storage answers again):
    /// `copied` of `total` bytes.
    Returning { copied: u64, total: u64 },
    /// This site's storage failed and the other copy is not in sync: the guest stays paused.
    PathLost,
}

impl LinkState {
    /// Whether the disk runs on the other site's copy (switched there, returning or not).
    #[must_use]
    pub fn on_other_copy(&self) -> bool {
        matches!(self, LinkState::OnOtherCopy | LinkState::Returning { .. })
    }
}

/// The operator's reading of an observation (`copied`/`total`: the job's figures), after
/// `before`. QEMU counts a write in flight as left to copy, so a job in sync shows a little
/// left now and then: once in sync, a link stays so until the job stops or the copy is lost
/// (no range is left behind without one of those).
#[must_use]
pub fn link_state(o: LinkObservation, copied: u64, total: u64, before: &LinkState) -> LinkState {
    match o.path {
        DiskPath::OtherCopy if o.back == JobPhase::Copying => return LinkState::Returning { copied, total },
        DiskPath::OtherCopy => return LinkState::OnOtherCopy,
        DiskPath::LocalFailed if !matches!(decide(o), Some(LinkAction::ProposeSwitch | LinkAction::Switch)) => return LinkState::PathLost,
        DiskPath::LocalFailed | DiskPath::Local => {}
    }
    match (o.relay, o.job) {
        (RelayPhase::Lost, _) => LinkState::Holding,
        (RelayPhase::None, _) | (_, JobPhase::Absent) => LinkState::Detached,
        (_, JobPhase::Stopped | JobPhase::Ended) | (RelayPhase::Released, _) => LinkState::Degraded,
        (_, JobPhase::InSync) => LinkState::InSync,
        (RelayPhase::Open, JobPhase::Copying) if *before == LinkState::InSync => LinkState::InSync,
        (_, JobPhase::Copying) => LinkState::Resyncing { copied, total },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obs(job: JobPhase, relay: RelayPhase, current: bool, server_reachable: bool) -> LinkObservation {
        LinkObservation {
            job,
            relay,
            current,
            server_reachable,
            path: DiskPath::Local,
            local_current: true,
            back: JobPhase::Absent,
            local_hung: false,
            local_reach: LocalReach::Direct,
        }
    }

    /// A served local copy that hangs is cut from its server — only from a mirror in sync into
    /// a current copy that answers (the failed requests then switch the disk there); a cut
    /// copy that cannot switch gives the VM up; a cut copy never retries locally.
    #[test]
    fn a_hung_served_copy_is_cut_and_switched_and_a_cut_copy_never_retries() {
        let served = |job, relay, current| LinkObservation { local_hung: true, local_reach: LocalReach::Served, ..obs(job, relay, current, true) };
        assert_eq!(decide(served(JobPhase::InSync, RelayPhase::Open, true)), Some(LinkAction::CutLocal));
        for job in [JobPhase::Absent, JobPhase::Copying, JobPhase::Stopped, JobPhase::Ended, JobPhase::InSync] {
            for relay in [RelayPhase::None, RelayPhase::Open, RelayPhase::Lost, RelayPhase::Released] {
                for current in [false, true] {
                    let o = served(job, relay, current);
                    let eligible = job == JobPhase::InSync && relay == RelayPhase::Open && current;
                    assert_eq!(decide(o) == Some(LinkAction::CutLocal), eligible, "{o:?}");
                    assert!(!matches!(decide(o), Some(LinkAction::ProposeRestartElsewhere | LinkAction::RestartElsewhere)), "{o:?}");
                    // Cut: the failed requests switch it if they can, else the VM is given up.
                    let cut = LinkObservation { path: DiskPath::LocalFailed, local_reach: LocalReach::Cut, ..o };
                    let switched = matches!(decide(cut), Some(LinkAction::ProposeSwitch | LinkAction::Switch));
                    assert_eq!(switched, eligible, "{cut:?}");
                    if !eligible {
                        assert_eq!(decide(cut), Some(LinkAction::GiveUp), "{cut:?}");
                    }
                    assert_ne!(decide(cut), Some(LinkAction::RetryLocal), "{cut:?}");
                }
            }
        }
        // Cut, the guest not paused yet: wait for the failed requests.
        let cut_running = LinkObservation { local_reach: LocalReach::Cut, ..served(JobPhase::InSync, RelayPhase::Open, true) };
        assert_eq!(decide(cut_running), None);
        // Its storage failing with errors (not hung): a served copy retries like a direct one.
        let failed = LinkObservation { path: DiskPath::LocalFailed, local_reach: LocalReach::Served, ..obs(JobPhase::Copying, RelayPhase::Open, false, true) };
        assert_eq!(decide(failed), Some(LinkAction::RetryLocal));
    }

    /// The local copy hangs: a restart elsewhere only from a mirror in sync into a current copy
    /// that answers, committed first; otherwise the link goes on as if the copy answered (the
    /// guest waits for its storage), a lost copy's writes the usual way.
    #[test]
    fn a_hung_local_copy_restarts_elsewhere_only_from_a_mirror_in_sync_and_after_the_commit() {
        let hung = |job, relay, current, local_current| LinkObservation { local_hung: true, local_current, ..obs(job, relay, current, true) };
        assert_eq!(decide(hung(JobPhase::InSync, RelayPhase::Open, true, true)), Some(LinkAction::ProposeRestartElsewhere));
        assert_eq!(decide(hung(JobPhase::InSync, RelayPhase::Open, true, false)), Some(LinkAction::RestartElsewhere));
        for job in [JobPhase::Absent, JobPhase::Copying, JobPhase::Stopped, JobPhase::Ended, JobPhase::InSync] {
            for relay in [RelayPhase::None, RelayPhase::Open, RelayPhase::Lost, RelayPhase::Released] {
                for current in [false, true] {
                    for local_current in [false, true] {
                        let o = hung(job, relay, current, local_current);
                        let eligible = job == JobPhase::InSync && relay == RelayPhase::Open && current;
                        let restarts = matches!(decide(o), Some(LinkAction::ProposeRestartElsewhere | LinkAction::RestartElsewhere));
                        assert_eq!(restarts, eligible, "{o:?}");
                        if !eligible {
                            let answering = LinkObservation { local_hung: false, ..o };
                            assert_eq!(decide(o), decide(answering), "{o:?}");
                            assert_eq!(link_state(o, 1, 2, &LinkState::InSync), link_state(answering, 1, 2, &LinkState::InSync));
                        }
                    }
                }
            }
        }
    }

    /// The local copy failed: the switch only from a mirror in sync into a current copy that
    /// answers, committed before it is made; never from a lost, stopped or copying mirror.
    #[test]
    fn a_failed_local_copy_switches_only_to_a_copy_in_sync_and_after_the_commit() {
        let failed = |job, relay, current, local_current| LinkObservation { path: DiskPath::LocalFailed, local_current, ..obs(job, relay, current, true) };
        assert_eq!(decide(failed(JobPhase::InSync, RelayPhase::Open, true, true)), Some(LinkAction::ProposeSwitch));
        assert_eq!(decide(failed(JobPhase::InSync, RelayPhase::Open, true, false)), Some(LinkAction::Switch));
        for job in [JobPhase::Absent, JobPhase::Copying, JobPhase::Stopped, JobPhase::Ended] {
            for relay in [RelayPhase::None, RelayPhase::Open, RelayPhase::Lost, RelayPhase::Released] {
                for current in [false, true] {
                    for local_current in [false, true] {
                        let o = failed(job, relay, current, local_current);
                        assert!(!matches!(decide(o), Some(LinkAction::ProposeSwitch | LinkAction::Switch)), "{o:?}");
                    }
                }
            }
        }
        assert_ne!(decide(failed(JobPhase::InSync, RelayPhase::Lost, true, true)), Some(LinkAction::Switch));
        assert_ne!(decide(failed(JobPhase::InSync, RelayPhase::Open, false, true)), Some(LinkAction::ProposeSwitch), "the other copy not current");
        // Not switchable: wait for the site's own storage; a lost copy's writes still go the
        // usual way.
        assert_eq!(decide(failed(JobPhase::Copying, RelayPhase::Open, false, true)), Some(LinkAction::RetryLocal));
        assert_eq!(decide(failed(JobPhase::Stopped, RelayPhase::Released, false, true)), Some(LinkAction::RetryLocal));
        assert_eq!(decide(failed(JobPhase::InSync, RelayPhase::Lost, true, true)), Some(LinkAction::ProposeDegraded));
        assert_eq!(
            link_state(failed(JobPhase::Copying, RelayPhase::Open, false, true), 1, 2, &LinkState::Resyncing { copied: 1, total: 2 }),
            LinkState::PathLost
        );
        // Switched: if that copy is lost too, the VM is given up (never released: no copy would
        // be left current).
        let lost = LinkObservation { path: DiskPath::OtherCopy, local_current: false, ..obs(JobPhase::Absent, RelayPhase::Lost, true, true) };
        assert_eq!(decide(lost), Some(LinkAction::GiveUp));
        assert_eq!(link_state(lost, 0, 0, &LinkState::InSync), LinkState::OnOtherCopy);
        // Another disk of the VM switched (this site's copy no longer current): a lost copy's
        // writes stay held, the last current copy is never committed stale.
        let o = LinkObservation { local_current: false, ..obs(JobPhase::InSync, RelayPhase::Lost, true, false) };
        assert_eq!(decide(o), None);
    }

    /// On the other copy: back into the site's own copy — opened, mirrored back, and returned
    /// to only once that mirror is in sync (never while the other copy is lost).
    #[test]
    fn the_way_back_returns_only_from_a_mirror_in_sync() {
        let on = |back, relay| LinkObservation { path: DiskPath::OtherCopy, local_current: false, back, ..obs(JobPhase::Absent, relay, true, true) };
        assert_eq!(decide(on(JobPhase::Absent, RelayPhase::Open)), Some(LinkAction::StartReturn));
        assert_eq!(decide(on(JobPhase::Copying, RelayPhase::Open)), None);
        assert_eq!(link_state(on(JobPhase::Copying, RelayPhase::Open), 3, 8, &LinkState::OnOtherCopy), LinkState::Returning { copied: 3, total: 8 });
        assert_eq!(decide(on(JobPhase::InSync, RelayPhase::Open)), Some(LinkAction::Return));
        assert_eq!(decide(on(JobPhase::Stopped, RelayPhase::Open)), Some(LinkAction::AbandonReturn));
        assert_eq!(decide(on(JobPhase::Ended, RelayPhase::Open)), Some(LinkAction::AbandonReturn));
        for back in [JobPhase::Absent, JobPhase::Copying, JobPhase::InSync, JobPhase::Stopped, JobPhase::Ended] {
            for relay in [RelayPhase::None, RelayPhase::Released] {
                assert_eq!(decide(on(back, relay)), None, "{back:?} {relay:?}");
            }
            assert_eq!(decide(on(back, RelayPhase::Lost)), Some(LinkAction::GiveUp));
        }
        // The site's storage hangs during the way back: its writes wait there, and the guest's
        // with them, and giving the way back up would drain them — restart where the copy is.
        // With no way back under way, or one that stopped, nothing waits on that storage.
        let hung = |back| LinkObservation { local_hung: true, ..on(back, RelayPhase::Open) };
        assert_eq!(decide(hung(JobPhase::Copying)), Some(LinkAction::RestartElsewhere));
        assert_eq!(decide(hung(JobPhase::InSync)), Some(LinkAction::RestartElsewhere));
        for back in [JobPhase::Absent, JobPhase::Stopped, JobPhase::Ended] {
            assert_eq!(decide(hung(back)), decide(on(back, RelayPhase::Open)), "{back:?}");
        }
        assert_eq!(decide(LinkObservation { local_hung: true, ..on(JobPhase::Copying, RelayPhase::Lost) }), Some(LinkAction::GiveUp));
        // Served by its local copy server: the hung way back is cut, then given up — no restart.
        let served = |back, reach| LinkObservation { local_reach: reach, ..hung(back) };
        for back in [JobPhase::Copying, JobPhase::InSync] {
            assert_eq!(decide(served(back, LocalReach::Served)), Some(LinkAction::CutLocal), "{back:?}");
            assert_eq!(decide(served(back, LocalReach::Cut)), Some(LinkAction::AbandonReturn), "{back:?}");
            let answering = LinkObservation { local_hung: false, ..served(back, LocalReach::Cut) };
            assert_eq!(decide(answering), Some(LinkAction::AbandonReturn), "cut, the storage answering again: {back:?}");
        }
        // Given up: a new way back (its new server claims the copy once the cut one is gone).
        assert_eq!(decide(served(JobPhase::Absent, LocalReach::Cut)), Some(LinkAction::StartReturn));
    }

    #[test]
    fn held_writes_go_only_once_the_copy_is_committed_stale() {
        for job in [JobPhase::Copying, JobPhase::InSync, JobPhase::Stopped] {
            for reachable in [false, true] {
                assert_eq!(decide(obs(job, RelayPhase::Lost, true, reachable)), Some(LinkAction::ProposeDegraded));
                assert_eq!(decide(obs(job, RelayPhase::Lost, false, reachable)), Some(LinkAction::Release));
            }
        }
        // Nothing else ever releases.
        for job in [JobPhase::Absent, JobPhase::Copying, JobPhase::InSync, JobPhase::Stopped, JobPhase::Ended] {
            for relay in [RelayPhase::None, RelayPhase::Open, RelayPhase::Released] {
                for current in [false, true] {
                    for reachable in [false, true] {
                        assert_ne!(decide(obs(job, relay, current, reachable)), Some(LinkAction::Release));
                    }
                }
            }
        }
    }

    #[test]
    fn a_link_attaches_catches_up_and_is_declared_in_sync() {
        assert_eq!(decide(obs(JobPhase::Absent, RelayPhase::None, false, true)), Some(LinkAction::Attach));
        assert_eq!(decide(obs(JobPhase::Absent, RelayPhase::None, false, false)), None, "nobody serves the copy");
        assert_eq!(decide(obs(JobPhase::Copying, RelayPhase::Open, false, true)), None);
        assert_eq!(decide(obs(JobPhase::InSync, RelayPhase::Open, false, true)), Some(LinkAction::ProposeSynced));
        assert_eq!(decide(obs(JobPhase::InSync, RelayPhase::Open, true, true)), None);
        assert_eq!(decide(obs(JobPhase::Stopped, RelayPhase::Released, false, true)), Some(LinkAction::Resume));
        assert_eq!(decide(obs(JobPhase::Stopped, RelayPhase::Released, false, false)), None);
        assert_eq!(decide(obs(JobPhase::Ended, RelayPhase::Open, false, true)), Some(LinkAction::Reattach));
        // An ended job wrote nothing since: its copy is committed stale before a new mirror.
        assert_eq!(decide(obs(JobPhase::Ended, RelayPhase::Open, true, true)), Some(LinkAction::ProposeDegraded));
        let other_copy_only = LinkObservation { local_current: false, ..obs(JobPhase::Ended, RelayPhase::Open, true, true) };
        assert_eq!(decide(other_copy_only), None, "never the last current copy");
        let resyncing = LinkState::Resyncing { copied: 5, total: 10 };
        assert_eq!(link_state(obs(JobPhase::Copying, RelayPhase::Open, false, true), 5, 10, &LinkState::Detached), resyncing);
        assert_eq!(link_state(obs(JobPhase::Copying, RelayPhase::Open, true, true), 5, 10, &LinkState::InSync), LinkState::InSync, "a write in flight");
        assert_eq!(link_state(obs(JobPhase::Copying, RelayPhase::Open, false, true), 5, 10, &LinkState::Degraded), resyncing);
        assert_eq!(link_state(obs(JobPhase::InSync, RelayPhase::Lost, true, false), 0, 0, &LinkState::InSync), LinkState::Holding);
        assert_eq!(link_state(obs(JobPhase::Stopped, RelayPhase::Released, false, false), 0, 0, &LinkState::Holding), LinkState::Degraded);
    }
}
