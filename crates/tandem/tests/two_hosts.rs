//! Two hosts, a shared heartbeat disk and a disk witness beside it, and no third machine: the
//! witness is the third Raft vote, held by one host at a time from the shared storage. The
//! power loss of either host restarts its protected VMs on the other; a cut of the link between
//! them keeps exactly one side (the lower host id) and moves the other's VMs — never two copies.
//! (`tandem-lab bench two-hosts` times the same steps.)

use anyhow::{anyhow, Result};
use std::path::PathBuf;
use std::time::Duration;
use tandem_lab::bench::twohosts::{bring_back, cut_link, lose_host, start_two_hosts, two_host_options};
use tandem_lab::lab::Lab;

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tandem"))
}

#[test]
fn either_host_of_two_survives_the_others_power_loss() -> Result<()> {
    let mut lab = Lab::new(two_host_options(87, None), &binary())?;
    let ftt = start_two_hosts(&mut lab)?;
    assert!(ftt.report.exact, "{ftt:?}");
    let running = lab.running();
    let mut hosts: Vec<&String> = running.values().collect();
    hosts.sort();
    assert_eq!(hosts, ["h0", "h1"], "one VM on each host: {running:?}");
    let secs = lose_host(&mut lab, 1)?;
    eprintln!("h1 lost power: its VM ran again on h0 {secs:.2} s later");
    lab.assert_no_double_run()?;
    // h1 returns, joins again, and runs nothing that moved.
    bring_back(&mut lab, 1)?;
    assert!(lab.running().values().all(|h| h == "h0"), "{:?}", lab.running());
    // Now the other one: h0 — which held the witness and led — loses power.
    let secs = lose_host(&mut lab, 0)?;
    eprintln!("h0 lost power: both VMs ran again on h1 {secs:.2} s later");
    let events = lab.client(1).list("/v1/events?limit=4096").map_err(|e| anyhow!("{e}"))?;
    assert!(events.iter().any(|e| e["kind"] == "witness-held"), "h1 took the witness over");
    lab.assert_no_double_run()
}

/// The link between the two hosts cut, in network namespaces (root; without it the test returns
/// early): both still write the shared disk, which decides — the lower id (h0) stays, h1 fences
/// and its VM restarts on h0; after the heal h1 joins again and runs nothing moved.
#[test]
fn a_cut_link_between_two_hosts_keeps_exactly_the_lower_id() -> Result<()> {
    if !tandem_lab::netlab::can_use_namespaces() {
        return Ok(());
    }
    let net = tandem_lab::netlab::NetLab::create(&format!("tw{}", std::process::id() % 100_000), 2)?;
    net.enter_control()?;
    let mut lab = Lab::new(two_host_options(89, Some(net.lab_hosts())), &binary())?;
    start_two_hosts(&mut lab)?;
    cut_keeping(lab, net, 0)
}

/// Cuts the link between the hosts: `keeper` must stay and run the other's VM; then the VMs run
/// as committed, once each. The lab goes before its namespaces.
fn cut_keeping(lab: Lab, net: tandem_lab::netlab::NetLab, keeper: usize) -> Result<()> {
    let secs = cut_link(&lab, &net, keeper)?;
    eprintln!("link cut: h{}'s VM ran again on h{keeper} {secs:.2} s later", 1 - keeper);
    std::thread::sleep(Duration::from_secs(2));
    lab.assert_runs_as_committed(0)?;
    lab.assert_no_double_run()?;
    drop(lab);
    drop(net);
    Ok(())
}

/// Two sites of one host each, and the cluster prefers site b (`tandem cluster set
/// --preferred-site b`): a cut of the link keeps h1 — the higher id — and fences h0, whose VM
/// restarts on h1; a site no host is at is refused with its reason, and nothing changes.
#[test]
fn a_cut_link_between_two_sites_keeps_the_preferred_site() -> Result<()> {
    if !tandem_lab::netlab::can_use_namespaces() {
        return Ok(());
    }
    let net = tandem_lab::netlab::NetLab::create(&format!("tp{}", std::process::id() % 100_000), 2)?;
    net.enter_control()?;
    let mut opts = two_host_options(109, Some(net.lab_hosts()));
    opts.sites = vec!["a".into(), "b".into()];
    let mut lab = Lab::new(opts, &binary())?;
    start_two_hosts(&mut lab)?;
    let cli = |args: &[&str]| -> Result<(bool, String)> {
        let out = std::process::Command::new(binary()).args(["--api", &lab.hosts[0].api, "--token", &lab.token()]).args(args).output()?;
        Ok((out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))))
    };
    // Sites are learned from each host's configuration: wait until both are committed.
    tandem_lab::demo::wait("both hosts' sites committed", Duration::from_secs(30), || {
        let ftt: tandem_agent::views::FttView = lab.client(0).get_as("/v1/ftt").ok()?;
        (ftt.sites.len() == 2).then_some(())
    })?;
    let (ok, text) = cli(&["cluster", "set", "--preferred-site", "c"])?;
    assert!(!ok && text.contains("no host is at site 'c'") && text.contains("a, b"), "{text}");
    let (ok, text) = cli(&["cluster", "set", "--preferred-site", "b"])?;
    assert!(ok, "{text}");
    let (ok, text) = cli(&["cluster", "settings"])?;
    assert!(ok && text.contains("preferred_site") && text.contains('b'), "{text}");
    // Every host applies the setting before the cut (the verdict is each host's own).
    tandem_lab::demo::wait("h1 to apply the preferred site", Duration::from_secs(30), || {
        let s: tandem_core::state::Settings = lab.client(1).get_as("/v1/settings").ok()?;
        (s.preferred_site.as_deref() == Some("b")).then_some(())
    })?;
    cut_keeping(lab, net, 1)
}
