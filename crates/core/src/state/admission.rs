//! Admission control: a change that would lower failures-to-tolerate below the configured target
//! is refused (or, forced, applied and reported).
//!
//! The verdict is an FTT search, whose answer may change between releases (a better search, a
//! different budget), so it is reached once, by the proposer, on the state at a known revision,
//! and travels in the log entry ([`Admission`]). `apply` then only checks that the state is still
//! at that revision — cheap, and the same on every host whatever its release. Entries written
//! before verdicts travelled (log formats 1 and 2) keep their meaning: admission judged inside
//! `apply` ([`AdmitMode::InApply`]).

use super::{Applied, ClusterState, Command, PowerState, StateError};
use serde::{Deserialize, Serialize};

/// The proposer's admission verdict on one command: judged on the state at `revision`; `forced`
/// holds the refusal an operator's `--force` overrode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Admission {
    pub revision: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forced: Option<String>,
}

/// How `apply` treats a command that admission control judges.
#[derive(Clone, Copy, Debug)]
pub(crate) enum AdmitMode<'a> {
    /// Judge it here (log formats 1 and 2).
    InApply,
    /// Make the change unjudged: the proposer's trial run on a copy.
    Trial,
    /// Judged by the proposer: valid only on the state it was judged on.
    Judged(&'a Admission),
}

impl Command {
    /// What admission control calls this change, and whether it was forced; `None` for a
    /// command admission control does not judge.
    fn admission_label(&self, s: &ClusterState) -> Option<(String, bool)> {
        Some(match self {
            Command::SetPower { name, desired, force } => {
                (format!("{} VM '{name}'", if *desired == PowerState::Running { "starting" } else { "stopping" }), *force)
            }
            Command::UpdateVm { spec, force } => (format!("changing VM '{}'", spec.name), *force),
            Command::SetHostMode { host, mode, force } => {
                let name = s.hosts.get(host).map_or_else(|| host.to_string(), |h| h.name.clone());
                (format!("putting host {name} in {mode} mode"), *force)
            }
            Command::SetRule { rule, force } => (format!("rule '{}'", rule.name), *force),
            Command::SetSettings { force, .. } => ("changing the cluster settings".to_string(), *force),
            Command::StartMigration { name, to, force, .. } => {
                let host = s.hosts.get(to).map_or_else(|| to.to_string(), |h| h.name.clone());
                (format!("migrating VM '{name}' to {host}"), *force)
            }
            _ => return None,
        })
    }

    /// Whether admission control judges this command.
    #[must_use]
    pub fn needs_admission(&self) -> bool {
        self.admission_label(&ClusterState::default()).is_some()
    }
}

impl ClusterState {
    /// The proposer's side: admission control's verdict on `cmd` against this state, `None` for
    /// a command it does not judge. An error is the refusal (or why the command is invalid).
    pub fn judge(&self, cmd: &Command) -> Result<Option<Admission>, StateError> {
        let Some((what, force)) = cmd.admission_label(self) else {
            return Ok(None);
        };
        let mut next = self.clone();
        next.apply_with(cmd, AdmitMode::Trial)?;
        let forced = self.verdict(&next, &what, force)?;
        Ok(Some(Admission { revision: self.revision, forced }))
    }

    /// Applies an entry of log format 3: a command that admission control judges must carry the
    /// proposer's verdict, reached on this very revision; any other must not carry one.
    pub fn apply_judged(&mut self, cmd: &Command, admission: Option<&Admission>) -> Result<Applied, StateError> {
        match (cmd.needs_admission(), admission) {
            (true, Some(a)) => self.apply_with(cmd, AdmitMode::Judged(a)),
            (false, None) => self.apply_with(cmd, AdmitMode::InApply),
            (true, None) => Err(StateError::Unjudged("the command carries no admission verdict".into())),
            (false, Some(_)) => Err(StateError::Unjudged("an admission verdict on a command admission control does not judge".into())),
        }
    }

    /// Makes `change` as `mode` says: judged here, unjudged (a trial), or on the proposer's
    /// verdict if the state is still the one it judged.
    pub(crate) fn admit(
        &mut self,
        mode: AdmitMode<'_>,
        cmd: &Command,
        change: impl FnOnce(&mut ClusterState) -> Result<(), StateError>,
    ) -> Result<Applied, StateError> {
        let (what, force) = cmd.admission_label(self).unwrap_or_else(|| ("this change".to_string(), false));
        match mode {
            AdmitMode::InApply => self.admitted(&what, force, change),
            AdmitMode::Trial => {
                change(self)?;
                Ok(Applied::Done)
            }
            AdmitMode::Judged(a) => {
                if a.revision != self.revision {
                    return Err(StateError::Stale(format!(
                        "admission control judged {what} on revision {}, but the cluster is at revision {}; propose it again",
                        a.revision, self.revision
                    )));
                }
                change(self)?;
                Ok(a.forced.clone().map_or(Applied::Done, |reason| Applied::Forced { reason }))
            }
        }
    }

    /// A copy in which every VM waiting for a host has the one the coordinator would give it,
    /// and every migrating VM is where it goes: what admission control judges, since a started
    /// VM takes its room as soon as it is placed and a migration is meant to complete.
    fn with_pending_placed(&self) -> ClusterState {
        let mut s = self.clone();
        for v in s.vms.values_mut() {
            v.end_migration(true);
        }
        let plan = s.place(&s.unplaced(), s.active_hosts(), true);
        for (name, host) in plan.placements {
            let generation = s.next_gen();
            if let Some(v) = s.vms.get_mut(&name) {
                v.place(super::Assignment { host, generation }, false);
            }
        }
        s
    }

    /// Admission control's verdict on going from this state to `next`: `Ok(None)` admitted,
    /// `Ok(Some(why))` refused but forced, `Err` refused. Each state is copied with its pending
    /// placements at most once (a copy of the whole state), and not at all without a target.
    fn verdict(&self, next: &ClusterState, what: &str, force: bool) -> Result<Option<String>, StateError> {
        let (ftt_target, site_target) = (next.settings.ftt_target, next.settings.survive_site_loss);
        if ftt_target.is_none() && !site_target {
            return Ok(None);
        }
        let after = next.with_pending_placed();
        let before = std::cell::OnceCell::new();
        let why = ftt_target
            .and_then(|target| self.ftt_refusal(&after, &before, target, what))
            .or_else(|| site_target.then(|| self.site_refusal(&after, &before, what)).flatten());
        match why {
            None => Ok(None),
            Some(why) if force => Ok(Some(why)),
            Some(why) => Err(StateError::Admission(why)),
        }
    }

    /// Why going to `after` (with its pending placements) breaks the "survive one site" target,
    /// if it does: some site's loss would leave a protected VM down, and this change made that
    /// so or worse. `before` is this state with its pending placements, made when first needed.
    fn site_refusal(&self, after: &ClusterState, before: &std::cell::OnceCell<ClusterState>, what: &str) -> Option<String> {
        let (down, why) = after.site_target_shortfall()?;
        if self.settings.survive_site_loss {
            if let Some((was_down, _)) = before.get_or_init(|| self.with_pending_placed()).site_target_shortfall() {
                if down <= was_down {
                    // Already short of the target, and this does not make it worse.
                    return None;
                }
            }
        }
        Some(format!("{what} would break the target of surviving the loss of a site: {why}"))
    }

    /// Why going to `after` (with its pending placements) lowers failures-to-tolerate below
    /// `target`, if it does.
    fn ftt_refusal(&self, after: &ClusterState, before: &std::cell::OnceCell<ClusterState>, target: u32, what: &str) -> Option<String> {
        let after = after.ftt();
        if after.ftt >= target {
            return None;
        }
        let before = before.get_or_init(|| self.with_pending_placed()).ftt();
        if after.ftt >= before.ftt && self.settings.ftt_target == Some(target) {
            // Already below target, and this does not make it worse.
            return None;
        }
        Some(match &after.counterexample {
            Some((set, vms)) => {
                let names: Vec<String> = set.iter().map(|h| self.host_name(*h)).collect();
                format!(
                    "{what} would lower failures-to-tolerate to {} (target {target}): if {} failed, protected VM(s) {} could not restart",
                    after.ftt,
                    names.join(" and "),
                    vms.join(", ")
                )
            }
            None => format!("{what} would lower failures-to-tolerate to {} (target {target}, limited by {})", after.ftt, after.limited_by),
        })
    }

    /// Runs `change` on a copy; if a configured FTT target is met before but not after, the
    /// change is refused (or, forced, applied and reported). Otherwise it is applied.
    fn admitted(&mut self, what: &str, force: bool, change: impl FnOnce(&mut ClusterState) -> Result<(), StateError>) -> Result<Applied, StateError> {
        let mut next = self.clone();
        change(&mut next)?;
        let forced = self.verdict(&next, what, force)?;
        *self = next;
        Ok(forced.map_or(Applied::Done, |reason| Applied::Forced { reason }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::tests::three_hosts_near_target;

    /// The proposer's verdict applies only to the revision it was reached on, gives the same
    /// result as judging in `apply`, and a command that needs a verdict is refused without one.
    #[test]
    fn a_verdict_holds_only_for_the_state_it_judged() {
        let (s, fits, breaks) = three_hosts_near_target();
        // Judged by the proposer, then applied: the same as judging inside apply.
        let mut judged = s.clone();
        let verdict = s.judge(&fits).expect("admitted").expect("judged");
        assert_eq!(judged.apply_judged(&fits, Some(&verdict)), s.clone().apply(&fits));
        assert_eq!(judged.revision, s.revision + 1);
        // Refused by the proposer exactly as apply would refuse it.
        assert!(matches!(s.judge(&breaks), Err(StateError::Admission(_))));
        assert!(matches!(s.clone().apply(&breaks), Err(StateError::Admission(_))));
        // A verdict on an older revision is stale: something committed in between.
        let mut moved_on = judged.clone();
        assert!(matches!(moved_on.apply_judged(&fits, Some(&verdict)), Err(StateError::Stale(_))));
        assert_eq!(moved_on, judged, "a refused entry changes nothing");
        // No verdict where one is needed; a verdict where none is.
        assert!(matches!(s.clone().apply_judged(&fits, None), Err(StateError::Unjudged(_))));
        let join = Command::HostJoined { host: crate::HostId(0) };
        assert!(matches!(s.clone().apply_judged(&join, Some(&verdict)), Err(StateError::Unjudged(_))));
    }

    /// A forced change carries its refusal in the verdict and reports it when applied.
    #[test]
    fn a_forced_verdict_is_applied_and_reported() {
        let (s, _, breaks) = three_hosts_near_target();
        let forced = match breaks {
            Command::SetPower { name, desired, .. } => Command::SetPower { name, desired, force: true },
            other => other,
        };
        let verdict = s.judge(&forced).expect("forced").expect("judged");
        assert!(verdict.forced.as_deref().is_some_and(|w| w.contains("failures-to-tolerate")), "{verdict:?}");
        let mut t = s.clone();
        assert!(matches!(t.apply_judged(&forced, Some(&verdict)), Ok(Applied::Forced { .. })));
    }
}
