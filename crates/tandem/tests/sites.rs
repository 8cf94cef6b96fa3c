//! Sites with real agents: five hosts in three sites (a, a, b, b and a witness-like host in w),
//! each naming its site in its own configuration. Committed state learns them, `whatif` and
//! the FTT report answer "the loss of site a", admission control holds the target "survive one
//! site", and the power loss of every host of site a restarts its protected VMs in the others.

use anyhow::{anyhow, Result};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;
use tandem_agent::views::{FailurePlan, FttView, HostView};
use tandem_lab::demo::wait;
use tandem_lab::lab::{Lab, LabOptions};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tandem"))
}

fn process_vm(name: &str, memory_mib: u64) -> Value {
    json!({ "name": name, "vcpus": 1, "memory_mib": memory_mib, "protection": "protect",
            "driver": { "kind": "process", "command": ["sleep", "1000000"] } })
}

#[test]
fn a_site_is_learned_planned_for_guarded_and_survived() -> Result<()> {
    let sites = ["a", "a", "b", "b", "w"].map(String::from).to_vec();
    let opts = LabOptions { hosts: 5, loopback_net: 70, capacity: (4, 1024), sites, ..LabOptions::default() };
    let mut lab = Lab::new(opts, &binary())?;
    lab.start_all()?;
    lab.form_cluster()?;
    let c = lab.client(4);
    // Each host's site, from its own configuration.
    let hosts: Vec<HostView> = wait("every host's site in committed state", Duration::from_secs(30), || {
        let hosts: Vec<HostView> = c.get_as("/v1/hosts").ok()?;
        (hosts.len() == 5 && hosts.iter().all(|h| h.site.is_some())).then_some(hosts)
    })?;
    let site_of = |name: &str| hosts.iter().find(|h| h.name == name).and_then(|h| h.site.clone());
    assert_eq!((site_of("h0").as_deref(), site_of("h3").as_deref(), site_of("h4").as_deref()), (Some("a"), Some("b"), Some("w")));
    // Two VMs on site a's hosts (placed by the coordinator: start them with only h0 and h1 in
    // normal mode, the others in maintenance, then back).
    for h in ["h2", "h3", "h4"] {
        c.post(&format!("/v1/hosts/{h}/mode"), &json!({ "mode": "maintenance" })).map_err(|e| anyhow!("{e}"))?;
    }
    for vm in ["p0", "p1"] {
        c.post("/v1/vms", &process_vm(vm, 512)).map_err(|e| anyhow!("{e}"))?;
        c.post(&format!("/v1/vms/{vm}/start"), &json!({})).map_err(|e| anyhow!("{e}"))?;
    }
    wait("p0 and p1 running in site a", Duration::from_secs(30), || {
        let running = lab.running();
        ["p0", "p1"].iter().all(|vm| running.get(*vm).is_some_and(|h| h == "h0" || h == "h1")).then_some(())
    })?;
    for h in ["h2", "h3", "h4"] {
        c.post(&format!("/v1/hosts/{h}/mode"), &json!({ "mode": "normal" })).map_err(|e| anyhow!("{e}"))?;
    }
    // What the loss of site a would do: three of five hosts left, a majority; both restart.
    let plans: Vec<FailurePlan> = c.get_as("/v1/plan?fail_site=a").map_err(|e| anyhow!("{e}"))?;
    assert_eq!(plans.len(), 1);
    assert!(plans[0].quorum, "{plans:?}");
    assert_eq!(plans[0].failed, ["h0", "h1"]);
    assert_eq!(plans[0].restarts.len(), 2, "{plans:?}");
    assert!(c.get_as::<Vec<FailurePlan>>("/v1/plan?fail_site=nowhere").is_err(), "an unknown site is refused");
    let ftt: FttView = c.get_as("/v1/ftt").map_err(|e| anyhow!("{e}"))?;
    assert_eq!(ftt.sites.iter().map(|l| (l.site.as_str(), l.survived)).collect::<Vec<_>>(), [("a", true), ("b", true), ("w", true)]);
    let metrics = c.get("/metrics").map_err(|e| anyhow!("{e}"))?.as_str().unwrap_or_default().to_string();
    assert!(metrics.contains("tandem_site_loss_survived{site=\"a\"} 1"), "{metrics}");
    // The target "survive one site": met now; a VM no other site could take is refused.
    c.post("/v1/settings", &json!({ "survive_site_loss": true })).map_err(|e| anyhow!("{e}"))?;
    c.post("/v1/vms", &process_vm("big", 1024)).map_err(|e| anyhow!("{e}"))?;
    c.post("/v1/vms", &process_vm("big2", 1024)).map_err(|e| anyhow!("{e}"))?;
    c.post("/v1/vms/big/start", &json!({})).map_err(|e| anyhow!("{e}"))?;
    let refused = c.post("/v1/vms/big2/start", &json!({}));
    let why = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(why.contains("surviving the loss of a site"), "the second 1 GiB VM breaks the site target: {why}");
    // Site a loses power: both hosts at once. Its protected VMs restart in b or w.
    let lost = std::time::Instant::now();
    lab.power_off(0);
    lab.power_off(1);
    wait("p0 and p1 restarted outside site a", Duration::from_secs(40), || {
        let running = lab.running();
        ["p0", "p1"].iter().all(|vm| running.get(*vm).is_some_and(|h| ["h2", "h3", "h4"].contains(&h.as_str()))).then_some(())
    })?;
    eprintln!("site a lost: its protected VMs ran again in b or w {:.2} s later", lost.elapsed().as_secs_f64());
    lab.assert_no_double_run()
}

/// The link between sites a and b cut, in network namespaces (root; without it the test returns
/// early): hosts a, a, b, b and w, where w still hears both sides. Both sides with w are
/// majorities; the partition decision picks the one with the lowest host id (a + w), so site b's
/// hosts fence themselves and their VMs restart in a or w — never two copies — and after the
/// heal site b rejoins, running nothing assigned elsewhere.
#[test]
fn a_cut_between_two_sites_keeps_one_side_with_the_third_and_moves_the_others_vms() -> Result<()> {
    if !tandem_lab::netlab::can_use_namespaces() {
        return Ok(());
    }
    let net = tandem_lab::netlab::NetLab::create(&format!("ts{}", std::process::id() % 100_000), 5)?;
    net.enter_control()?;
    let sites = ["a", "a", "b", "b", "w"].map(String::from).to_vec();
    let opts = LabOptions { hosts: 5, loopback_net: 86, netns: Some(net.lab_hosts()), capacity: (4, 2048), sites, ..LabOptions::default() };
    let mut lab = Lab::new(opts, &binary())?;
    lab.start_all()?;
    lab.form_cluster()?;
    let c = lab.client(4);
    wait("every host's site", Duration::from_secs(30), || {
        let hosts: Vec<HostView> = c.get_as("/v1/hosts").ok()?;
        (hosts.len() == 5 && hosts.iter().all(|h| h.site.is_some())).then_some(())
    })?;
    // Two VMs on site b's hosts (the others in maintenance while they are placed).
    for h in ["h0", "h1", "h4"] {
        c.post(&format!("/v1/hosts/{h}/mode"), &json!({ "mode": "maintenance" })).map_err(|e| anyhow!("{e}"))?;
    }
    for vm in ["b0", "b1"] {
        c.post("/v1/vms", &process_vm(vm, 256)).map_err(|e| anyhow!("{e}"))?;
        c.post(&format!("/v1/vms/{vm}/start"), &json!({})).map_err(|e| anyhow!("{e}"))?;
    }
    let in_b = |h: &String| h == "h2" || h == "h3";
    wait("b0 and b1 running in site b", Duration::from_secs(30), || {
        let running = lab.running();
        ["b0", "b1"].iter().all(|vm| running.get(*vm).is_some_and(in_b)).then_some(())
    })?;
    for h in ["h0", "h1", "h4"] {
        c.post(&format!("/v1/hosts/{h}/mode"), &json!({ "mode": "normal" })).map_err(|e| anyhow!("{e}"))?;
    }
    let cut_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as u64;
    for a in [0, 1] {
        net.block_hosts(a, &[2, 3])?;
    }
    for b in [2, 3] {
        net.block_hosts(b, &[0, 1])?;
    }
    let cut = std::time::Instant::now();
    wait("b0 and b1 restarted in site a or w", Duration::from_secs(40), || {
        let running = lab.running();
        ["b0", "b1"].iter().all(|vm| running.get(*vm).is_some_and(|h| ["h0", "h1", "h4"].contains(&h.as_str()))).then_some(())
    })?;
    eprintln!("a–b link cut: site b's VMs ran again in a or w {:.2} s later", cut.elapsed().as_secs_f64());
    for i in [0, 1, 4] {
        let fenced = lab.fences_since(i, cut_at);
        assert!(fenced.is_empty(), "h{i}, on the side that stays, fenced: {fenced:?}");
    }
    for i in [2, 3] {
        assert!(!lab.fences_since(i, cut_at).is_empty(), "h{i}, in the site cut off from the majority, did not fence");
    }
    for h in [0, 1, 2, 3] {
        net.unblock(h)?;
    }
    lab.wait_all_active(Duration::from_secs(40))?;
    std::thread::sleep(Duration::from_secs(2));
    lab.assert_runs_as_committed(4)?;
    lab.assert_no_double_run()?;
    drop(lab);
    drop(net);
    Ok(())
}
