//! What the operator sees of this host's mirror links: the timeline events of their changes of
//! state, and the links as `GET /v1/local` lists them (state, the resync cap in force, and a
//! resync's pace).

use super::pace::ResyncPace;
use super::{Agent, Link, LinkKey};
use crate::agent::lock;
use crate::events::EventKind;
use crate::views::MirrorLinkView;
use tandem_core::mirroring::LinkState;
use tandem_drivers::copyrelay::DeltaStats;

impl Link {
    /// Follows the pace of a resync or a way back through the link's new state (a new one
    /// begins whenever the link enters either).
    pub(super) fn track_pace(&mut self, state: &LinkState) {
        let now = std::time::Instant::now();
        self.pace = match (state, self.pace) {
            (LinkState::Resyncing { copied, total } | LinkState::Returning { copied, total }, Some(mut p)) => {
                p.observe(*copied, *total, now);
                Some(p)
            }
            (LinkState::Resyncing { copied, total } | LinkState::Returning { copied, total }, None) => Some(ResyncPace::begin(*copied, *total, now)),
            _ => None,
        };
    }
}

impl Agent {
    /// Timeline events for a link's changes of state.
    pub(super) fn note_link_change(&self, key: &LinkKey, before: &LinkState, now: &LinkState, why: &str, delta: Option<DeltaStats>) {
        let (vm, disk, site) = key;
        match (before, now) {
            (LinkState::Holding, LinkState::Holding) => {}
            (_, LinkState::Holding) => {
                self.events.record(
                    EventKind::MirrorHolding,
                    Some(vm),
                    Some(site),
                    format!("disk {disk}: {site}'s copy is lost ({why}); writes wait until it is committed as stale"),
                );
            }
            (LinkState::Resyncing { .. }, LinkState::InSync) => match delta {
                Some(d) => {
                    let detail = format!(
                        "disk {disk}: {site}'s copy caught up ({} KiB of writes crossed the link; {} KiB matched its chunk sums and stayed here); every write goes to both",
                        d.sent >> 10,
                        d.matched >> 10
                    );
                    self.events.record_resync(vm, site, detail, d);
                }
                None => {
                    self.events.record(EventKind::MirrorInSync, Some(vm), Some(site), format!("disk {disk}: {site}'s copy caught up; every write goes to both"))
                }
            },
            (LinkState::PathLost, LinkState::PathLost) => {}
            (_, LinkState::PathLost) => {
                let detail = format!("disk {disk}: this site's storage failed and {site}'s copy is not in sync: the guest stays paused");
                self.events.record(EventKind::StoragePathLost, Some(vm), Some(site), detail);
            }
            _ => {}
        }
    }

    /// The links of the VMs running here, for `GET /v1/local`.
    #[must_use]
    pub fn mirror_links(&self) -> Vec<MirrorLinkView> {
        let cap = self.cfg.mirror.resync_cap_mib_s();
        lock(&self.mirroring)
            .links
            .iter()
            .map(|((vm, disk, site), l)| MirrorLinkView {
                vm: vm.clone(),
                disk: *disk,
                site: site.clone(),
                server: l.server.clone(),
                state: l.state.clone(),
                compared: l.delta,
                resync_cap_mib_s: cap,
                pace: l.pace.and_then(|p| p.pace()),
            })
            .collect()
    }
}
