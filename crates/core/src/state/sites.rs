//! Sites: where hosts stand (a data centre, a room, a building), and what the loss of a whole
//! site would do.
//!
//! A host carries the `site` its own configuration names, committed by `set-host-site` (log
//! format 11). The loss of a site is planned like any failure set — its hosts fail together —
//! by the same planner the coordinator runs ([`ClusterState::plan_what_if`]), quorum
//! included: with two sites of equal size and no third vote, losing either leaves no majority,
//! and nothing could restart (which is what the cluster reports). The settings' target
//! `survive_site_loss` makes admission control refuse a change after which some site's loss
//! would leave a protected VM down.

use super::{Applied, ClusterState, Protection, StateError};
use crate::hostset::{HostId, HostSet};
use crate::placement::LeftDown;
use serde::Serialize;
use std::collections::BTreeMap;

/// What the loss of one whole site would do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SiteLoss {
    pub site: String,
    /// Its hosts (every member that names it).
    pub hosts: Vec<HostId>,
    /// Whether the hosts left would still be a majority of the voting hosts.
    pub quorum: bool,
    /// The protected VMs that would stay down, and why.
    pub protected_down: Vec<(String, LeftDown)>,
}

impl SiteLoss {
    /// Whether every protected VM of the site would run again elsewhere.
    #[must_use]
    pub fn survived(&self) -> bool {
        self.protected_down.is_empty()
    }
}

impl ClusterState {
    /// The sites the hosts name, each with its hosts.
    #[must_use]
    pub fn sites(&self) -> BTreeMap<String, Vec<HostId>> {
        let mut out: BTreeMap<String, Vec<HostId>> = BTreeMap::new();
        for h in self.hosts.values() {
            if let Some(site) = &h.site {
                out.entry(site.clone()).or_default().push(h.id);
            }
        }
        out
    }

    /// The hosts at the preferred site (`settings.preferred_site`): the side a split keeps
    /// when no side holds a majority (see [`crate::partition::decide`]). Empty when none is
    /// set, or no host names it.
    #[must_use]
    pub fn preferred_hosts(&self) -> HostSet {
        let Some(preferred) = self.settings.preferred_site.as_deref() else { return HostSet::EMPTY };
        let mut out = HostSet::EMPTY;
        for h in self.hosts.values().filter(|h| h.site.as_deref() == Some(preferred)) {
            out.insert(h.id);
        }
        out
    }

    /// What the loss of `site` (all its hosts at once) would do; `None` for a site no host
    /// names.
    #[must_use]
    pub fn site_loss(&self, site: &str) -> Option<SiteLoss> {
        let hosts = self.sites().remove(site)?;
        Some(self.loss_of(site.to_string(), hosts))
    }

    /// The loss of each site, in name order.
    #[must_use]
    pub fn site_losses(&self) -> Vec<SiteLoss> {
        self.sites().into_iter().map(|(site, hosts)| self.loss_of(site, hosts)).collect()
    }

    fn loss_of(&self, site: String, hosts: Vec<HostId>) -> SiteLoss {
        let (plan, quorum) = self.plan_what_if(&hosts);
        let protected = |name: &str| self.vms.get(name).is_some_and(|v| v.spec.protection == Protection::Protect);
        let protected_down = plan.left_down.into_iter().filter(|(n, _)| protected(n)).collect();
        SiteLoss { site, hosts, quorum, protected_down }
    }

    /// Why the `survive_site_loss` target is not met, in words, or `None` if it is (or is not
    /// set). Counts the protected VMs left down by the worst site.
    #[must_use]
    pub fn site_target_shortfall(&self) -> Option<(usize, String)> {
        if !self.settings.survive_site_loss {
            return None;
        }
        let worst = self.site_losses().into_iter().filter(|l| !l.survived()).max_by_key(|l| l.protected_down.len())?;
        let names: Vec<&str> = worst.protected_down.iter().map(|(n, _)| n.as_str()).collect();
        let why = if worst.quorum { "could not restart" } else { "could not restart: the hosts left would not be a majority" };
        Some((worst.protected_down.len(), format!("if site {} were lost, protected VM(s) {} {why}", worst.site, names.join(", "))))
    }

    pub(crate) fn set_host_site(&mut self, host: HostId, site: Option<&str>) -> Result<Applied, StateError> {
        if let Some(s) = site.filter(|s| !crate::spec::valid_name(s)) {
            return Err(StateError::BadSite(s.to_string()));
        }
        let h = self.hosts.get_mut(&host).ok_or(StateError::UnknownHost(host))?;
        h.site = site.map(str::to_string);
        Ok(Applied::Done)
    }
}

#[cfg(test)]
mod tests {
    use crate::hostset::HostId;
    use crate::state::tests::{cluster, process_vm, run_on};
    use crate::state::{Command, Protection, Settings, StateError};

    fn sited(s: &mut crate::state::ClusterState, sites: &[&str]) {
        for (i, site) in sites.iter().enumerate() {
            s.apply(&Command::SetHostSite { host: HostId(i as u32), site: Some((*site).to_string()) }).expect("site");
        }
    }

    /// Two sites of two hosts each and no third vote: losing either leaves no majority, so the
    /// report says nothing restarts; a fifth host in a third site gives the survivors a majority
    /// and the protected VMs restart (room allowing).
    #[test]
    fn a_site_loss_is_planned_like_its_hosts_failing_together_quorum_included() {
        let mut s = cluster(4, 4096);
        sited(&mut s, &["a", "a", "b", "b"]);
        run_on(&mut s, process_vm("p", Protection::Protect, 0, 1024), 0);
        run_on(&mut s, process_vm("q", Protection::Protect, 0, 1024), 2);
        run_on(&mut s, process_vm("e", Protection::BestEffort, 0, 1024), 1);
        let losses = s.site_losses();
        assert_eq!(losses.iter().map(|l| l.site.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        let a = &losses[0];
        assert_eq!(a.hosts, vec![HostId(0), HostId(1)]);
        assert!(!a.quorum && !a.survived());
        assert_eq!(a.protected_down, vec![("p".to_string(), crate::placement::LeftDown::NoQuorum)], "best-effort VMs are not counted");
        let mut five = cluster(5, 4096);
        sited(&mut five, &["a", "a", "b", "b", "w"]);
        run_on(&mut five, process_vm("p", Protection::Protect, 0, 1024), 0);
        let a = five.site_loss("a").expect("site a");
        assert!(a.quorum && a.survived(), "{a:?}");
        assert!(five.site_loss("nowhere").is_none());
        assert!(matches!(five.apply(&Command::SetHostSite { host: HostId(0), site: Some("bad site".into()) }), Err(StateError::BadSite(_))));
    }

    /// With the target set, admission control refuses a start that a site's loss could not
    /// restart, and says which site and VM; forced, it applies and says so.
    #[test]
    fn the_site_target_refuses_what_a_site_loss_would_leave_down() {
        let mut s = cluster(3, 2048);
        sited(&mut s, &["a", "b", "w"]);
        run_on(&mut s, process_vm("p", Protection::Protect, 0, 1536), 0);
        let target = Settings { survive_site_loss: true, ..Settings::default() };
        s.apply(&Command::SetSettings { settings: target, force: false }).expect("met: p restarts in b or w");
        assert_eq!(s.site_target_shortfall(), None);
        s.apply(&Command::CreateVm { spec: process_vm("q", Protection::Protect, 0, 1536) }).expect("create");
        s.apply(&Command::CreateVm { spec: process_vm("r", Protection::Protect, 0, 1536) }).expect("create");
        s.apply(&Command::SetPower { name: "q".into(), desired: crate::state::PowerState::Running, force: false }).expect("q fits the target");
        let refused = s.apply(&Command::SetPower { name: "r".into(), desired: crate::state::PowerState::Running, force: false });
        let Err(StateError::Admission(why)) = refused else { panic!("{refused:?}") };
        assert!(why.contains("if site") && why.contains("could not restart"), "{why}");
        let forced = s.apply(&Command::SetPower { name: "r".into(), desired: crate::state::PowerState::Running, force: true });
        assert!(matches!(forced, Ok(crate::state::Applied::Forced { .. })), "{forced:?}");
    }

    fn site_rule(name: &str, site: &str, hard: bool, vms: &[&str]) -> Command {
        let rule = crate::state::Rule {
            name: name.into(),
            kind: crate::placement::RuleKind::Site,
            hard,
            vms: vms.iter().map(|v| (*v).to_string()).collect(),
            site: Some(site.into()),
        };
        Command::SetRule { rule, force: false }
    }

    /// A hard site rule: its VM is placed in the site or nowhere — a failover of its host keeps
    /// it in the site, a site without room leaves it down, and an assignment outside is refused
    /// when applied. A soft one prefers the site and goes elsewhere when the site is full.
    #[test]
    fn site_rules_keep_vms_in_their_site_or_prefer_it() {
        let mut s = cluster(4, 2048);
        sited(&mut s, &["a", "a", "b", "b"]);
        for vm in ["db", "web"] {
            s.apply(&Command::CreateVm { spec: process_vm(vm, Protection::Protect, 0, 1536) }).expect("create");
        }
        assert!(matches!(s.apply(&site_rule("db-in-b", "nowhere", true, &["db"])), Err(StateError::RuleInfeasible { .. })));
        let set = s.apply(&site_rule("db-in-b", "b", true, &["db"])).expect("rule");
        assert_eq!(set, crate::state::Applied::RuleSet { violations: vec![] });
        assert!(matches!(s.apply(&site_rule("db-in-a", "a", true, &["db"])), Err(StateError::RuleConflict { .. })), "in two sites at once");
        s.apply(&site_rule("web-near-a", "a", false, &["web"])).expect("soft rule");
        for vm in ["db", "web"] {
            s.apply(&Command::SetPower { name: vm.into(), desired: crate::state::PowerState::Running, force: false }).expect("start");
        }
        let plan = s.place(&s.unplaced(), s.active_hosts(), true);
        let host = |vm: &str| plan.placements.iter().find(|(n, _)| n == vm).map(|(_, h)| *h);
        assert!(matches!(host("db"), Some(HostId(2 | 3))), "{plan:?}");
        assert!(matches!(host("web"), Some(HostId(0 | 1))), "{plan:?}");
        assert!(matches!(s.apply(&Command::Assign { name: "db".into(), host: HostId(0) }), Err(StateError::BreaksHardRule { .. })));
        s.apply(&Command::Assign { name: "db".into(), host: HostId(2) }).expect("in site b");
        // Its host fails: it restarts on the other host of site b, never in site a.
        let failover = crate::recovery::plan_failover(&s, HostId(2), s.members());
        assert_eq!(failover.placements, vec![("db".to_string(), HostId(3))]);
        // Both hosts of site b gone: it stays down, by its rule.
        let both = s.plan_failure(&[HostId(2), HostId(3)], s.members());
        assert_eq!(both.left_down, vec![("db".to_string(), crate::placement::LeftDown::HardRule)]);
        // The soft rule gives way when site a is full: web goes to site b.
        let mut full = s.clone();
        for (i, h) in [0u32, 1].iter().enumerate() {
            let filler = format!("fill{i}");
            full.apply(&Command::CreateVm { spec: process_vm(&filler, Protection::Off, 0, 2048) }).expect("create");
            full.apply(&Command::SetPower { name: filler.clone(), desired: crate::state::PowerState::Running, force: true }).expect("start");
            full.apply(&Command::Assign { name: filler, host: HostId(*h) }).expect("fill");
        }
        let plan = full.place(&["web".to_string()], full.active_hosts(), true);
        assert!(matches!(plan.placements.first(), Some((_, HostId(3)))), "{plan:?}");
    }

    /// A site rule added while its member runs elsewhere is reported broken, and `rebalance`
    /// moves the member into the site.
    #[test]
    fn rebalancing_moves_a_vm_into_its_site() {
        let mut s = cluster(4, 4096);
        sited(&mut s, &["a", "a", "b", "b"]);
        run_on(&mut s, process_vm("db", Protection::Protect, 0, 1024), 0);
        let set = s.apply(&site_rule("db-in-b", "b", true, &["db"])).expect("rule");
        assert_eq!(set, crate::state::Applied::RuleSet { violations: vec!["db".into()] });
        let plan = crate::rebalance::rebalance_plan(&s, &crate::rebalance::RebalanceScope { rule: Some("db-in-b".into()), balance: false });
        assert_eq!(plan.moves.len(), 1, "{plan:?}");
        assert!(matches!(plan.moves[0].to, HostId(2 | 3)), "{plan:?}");
    }

    /// The preferred site names the hosts a split without a majority keeps; a bad name is
    /// refused and changes nothing.
    #[test]
    fn the_preferred_site_names_its_hosts() {
        let mut s = cluster(4, 4096);
        sited(&mut s, &["a", "a", "b", "b"]);
        assert!(s.preferred_hosts().is_empty(), "none set");
        let prefer = |site: &str| Command::SetSettings { settings: Settings { preferred_site: Some(site.into()), ..Settings::default() }, force: false };
        s.apply(&prefer("b")).expect("set");
        assert_eq!(s.preferred_hosts(), [HostId(2), HostId(3)].into_iter().collect());
        assert_eq!(s.apply(&prefer("no site!")), Err(StateError::BadSite("no site!".into())));
        assert_eq!(s.settings.preferred_site.as_deref(), Some("b"), "unchanged by the refusal");
    }
}
