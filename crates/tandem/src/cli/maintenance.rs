//! `tandem host maintenance enter|exit`: the plan first, then the mode, then the migrations
//! followed until the host is empty (enter) or its VMs are back (exit). While it follows an
//! `enter`, the leader's plan says which VMs stay (no host may take them, or their live
//! migration kept failing); with `--shutdown-unmovable` the latter are moved cold instead
//! (`coldmove`).

use super::output::{kv, Output};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use tandem::client::{Client, ClientError};
use tandem_agent::views::{EvacuationPlan, EvacuationStep, HostMode, HostModeRequest, HostModeSet, HostView, VmView};

/// How often the VMs are read while following.
const POLL: Duration = Duration::from_millis(500);
/// How long the CLI follows before it stops waiting (the coordinator goes on).
const FOLLOW_FOR: Duration = Duration::from_secs(1800);

/// How `run` goes about it.
#[derive(Clone, Copy, Debug)]
pub struct Follow {
    /// Enter even if admission control refuses or some VM cannot move.
    pub force: bool,
    /// Shut down and start elsewhere the VMs whose live migration kept failing.
    pub shutdown_unmovable: bool,
    /// Return once the mode is set.
    pub no_wait: bool,
}

/// How many VMs are not yet where the mode change takes them, and how many of those migrate,
/// from each VM's (host, home, host it migrates to). Enter: those still on `name` (those no
/// host may take stay). Exit: those not yet home — an evacuated one away, or one migrating to
/// `name` until its switchover (its home stays until then; a leader of a release before log
/// format 15 forgot it when the move began).
fn not_yet<'a>(vms: impl Iterator<Item = (Option<&'a str>, Option<&'a str>, Option<&'a str>)>, name: &str, enter: bool) -> (usize, usize) {
    let here = Some(name);
    let counted: Vec<bool> = vms
        .filter(|(host, home, to)| if enter { *host == here } else { *host != here && (*home == here || *to == here) })
        .map(|(_, _, to)| to.is_some())
        .collect();
    (counted.len(), counted.iter().filter(|m| **m).count())
}

/// The VMs that stay where they are, as the leader's plan says (the leader counts the live
/// migrations that failed): entering, those of `name` that cannot leave; leaving, those whose
/// home is `name` that it gave up moving back. `None` while the leader is unknown or does not
/// answer.
fn staying(c: &Client, name: &str, enter: bool) -> Option<Vec<EvacuationStep>> {
    let hosts: Vec<HostView> = c.get_as("/v1/hosts").ok()?;
    let leader = hosts.into_iter().find(|h| h.leader)?;
    let plan: EvacuationPlan = Client { addr: leader.api_addr, ..c.clone() }.get_as(&format!("/v1/hosts/{name}/evacuation")).ok()?;
    Some(if enter { plan.steps.into_iter().filter(|s| s.to.is_none()).collect() } else { plan.not_coming_back })
}
pub fn run(c: &Client, out: Output, enter: bool, name: &str, how: Follow) -> Result<(), ClientError> {
    let Follow { force, shutdown_unmovable, no_wait } = how;
    let table = out == Output::Table;
    if enter {
        show_plan_or_refuse(c, table, name, force)?;
    }
    let mode = if enter { HostMode::Maintenance } else { HostMode::Normal };
    let set = c.send("POST", &format!("/v1/hosts/{name}/mode"), &HostModeRequest { mode, force })?;
    if out == Output::Json && no_wait {
        println!("{set}");
        return Ok(());
    }
    if table {
        kv(&tandem::client::decode::<HostModeSet>(set)?);
    }
    if no_wait {
        return Ok(());
    }
    let started = Instant::now();
    let mut last = String::new();
    let mut moved_cold: BTreeSet<String> = BTreeSet::new();
    loop {
        let vms: Vec<VmView> = c.get_as("/v1/vms")?;
        let (left, moving) = not_yet(vms.iter().map(|v| (v.host.as_deref(), v.home.as_deref(), v.migrating_to.as_deref())), name, enter);
        let line =
            if enter { format!("{left} VM(s) left on {name}, {moving} migrating") } else { format!("{left} VM(s) still away from {name}, {moving} migrating") };
        if table && line != last {
            println!("{line}");
            last = line;
        }
        // Nothing migrating, some left: the leader's plan says which stay, and why.
        let stuck = match (moving == 0 && left > 0, enter) {
            (false, _) => false,
            (true, false) => stuck_away(c, name, left, table),
            (true, true) => match stuck_on(c, out, name, &vms, shutdown_unmovable, &mut moved_cold)? {
                Some(stuck) => stuck,
                // Some were moved cold: what is left is read afresh.
                None => continue,
            },
        };
        if left == 0 || stuck {
            if out == Output::Json {
                println!("{}", serde_json::json!({"host": name, "mode": mode, "left": left}));
            } else if left > 0 && enter {
                println!("{left} VM(s) could not move live and keep running on {name}");
            } else if left > 0 {
                println!("{left} VM(s) could not move back live and keep running away from {name}");
            } else {
                println!("{}", if enter { format!("{name} is empty and in maintenance") } else { format!("every VM evacuated from {name} is back") });
            }
            return Ok(());
        }
        if started.elapsed() > FOLLOW_FOR {
            return Err(ClientError::Unavailable(format!("stopped following after {} s; the coordinator goes on", FOLLOW_FOR.as_secs())));
        }
        std::thread::sleep(POLL);
    }
}

/// Prints where each VM of `name` would go; refuses, changing nothing, if one cannot move live
/// and `force` was not given.
fn show_plan_or_refuse(c: &Client, table: bool, name: &str, force: bool) -> Result<(), ClientError> {
    let plan: EvacuationPlan = c.get_as(&format!("/v1/hosts/{name}/evacuation"))?;
    if table {
        println!("evacuation plan for {name} ({} VM(s)):", plan.steps.len());
        for s in &plan.steps {
            match (&s.to, &s.why_not) {
                (Some(to), _) => println!("  {:<20} -> {to}", s.vm),
                (None, why) => println!("  {:<20} cannot move live: {}", s.vm, why.as_deref().unwrap_or("no host may take it")),
            }
        }
    }
    let unmovable: Vec<&str> = plan.steps.iter().filter(|s| s.to.is_none()).map(|s| s.vm.as_str()).collect();
    if unmovable.is_empty() || force {
        return Ok(());
    }
    Err(ClientError::Refused {
        status: 409,
        message: format!(
            "{} cannot move live ({}); nothing changed. --force enters anyway and leaves them running on {name}",
            unmovable.len(),
            unmovable.join(", ")
        ),
    })
}

/// Leaving maintenance, nothing migrating: whether every one of the `left` VMs still away is
/// one the leader gave up moving back (each printed, with where it stays and why).
fn stuck_away(c: &Client, name: &str, left: usize, table: bool) -> bool {
    let Some(stay) = staying(c, name, false) else { return false };
    let stuck = stay.len() == left;
    if stuck && table {
        for s in &stay {
            let at = s.to.as_deref().unwrap_or("another host");
            println!("  {:<20} stays on {at}: {}", s.vm, s.why_not.as_deref().unwrap_or("it cannot move back live"));
        }
    }
    stuck
}

/// Entering maintenance, nothing migrating: whether every VM left on `name` stays there, as
/// the leader's plan says (each printed, with why). With `shutdown_unmovable`, those given up
/// on are first shut down and started elsewhere (`None`: some were, read the VMs again).
fn stuck_on(
    c: &Client,
    out: Output,
    name: &str,
    vms: &[VmView],
    shutdown_unmovable: bool,
    moved_cold: &mut BTreeSet<String>,
) -> Result<Option<bool>, ClientError> {
    let Some(stay) = staying(c, name, true) else { return Ok(Some(false)) };
    let on: BTreeSet<&str> = vms.iter().filter(|v| v.host.as_deref() == Some(name)).map(|v| v.name.as_str()).collect();
    let stay: Vec<EvacuationStep> = stay.into_iter().filter(|s| on.contains(s.vm.as_str())).collect();
    let cold: Vec<&EvacuationStep> = stay.iter().filter(|s| shutdown_unmovable && s.live_failed.is_some() && !moved_cold.contains(&s.vm)).collect();
    if !cold.is_empty() {
        for s in cold {
            moved_cold.insert(s.vm.clone());
            super::coldmove::run(c, out, &s.vm, name, s.why_not.as_deref().unwrap_or("it cannot move live"))?;
        }
        return Ok(None);
    }
    let stuck = stay.len() == on.len();
    if stuck && out == Output::Table {
        for s in &stay {
            println!("  {:<20} stays on {name}: {}", s.vm, s.why_not.as_deref().unwrap_or("no host may take it"));
        }
    }
    Ok(Some(stuck))
}

#[cfg(test)]
mod tests {
    use super::not_yet;

    /// Leaving maintenance, a VM whose move back has begun (its home forgotten, migrating to
    /// the host) is not back yet — the CLI once said "every VM ... is back" while it migrated.
    #[test]
    fn a_vm_migrating_home_is_not_back_yet() {
        let vms = [
            (Some("h1"), Some("h0"), None),
            (Some("h1"), None, Some("h0")),
            (Some("h0"), None, None),
            (Some("h1"), None, None),
            (Some("h2"), None, Some("h1")),
        ];
        assert_eq!(not_yet(vms.into_iter(), "h0", false), (2, 1));
        assert_eq!(not_yet([(Some("h0"), None, None)].into_iter(), "h0", false), (0, 0), "arrived");
        // Entering: what is still on the host, and how much of it migrates.
        let on = [(Some("h0"), None, Some("h1")), (Some("h0"), None, None), (Some("h1"), Some("h0"), None)];
        assert_eq!(not_yet(on.into_iter(), "h0", true), (2, 1));
    }
}
