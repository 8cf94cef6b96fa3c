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
    // The target "survive one site": met now; a VM no other site could take is refused.
    c.post("/v1/settings", &json!({ "survive_site_loss": true })).map_err(|e| anyhow!("{e}"))?;
    c.post("/v1/vms", &process_vm("big", 1024)).map_err(|e| anyhow!("{e}"))?;
    c.post("/v1/vms", &process_vm("big2", 1024)).map_err(|e| anyhow!("{e}"))?;
    c.post("/v1/vms/big/start", &json!({})).map_err(|e| anyhow!("{e}"))?;
    let refused = c.post("/v1/vms/big2/start", &json!({}));
    let why = refused.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(why.contains("surviving the loss of a site"), "the second 1 GiB VM breaks the site target: {why}");
    // Site a loses power: both hosts at once. Its protected VMs restart in b or w.
    lab.power_off(0);
    lab.power_off(1);
    wait("p0 and p1 restarted outside site a", Duration::from_secs(40), || {
        let running = lab.running();
        ["p0", "p1"].iter().all(|vm| running.get(*vm).is_some_and(|h| ["h2", "h3", "h4"].contains(&h.as_str()))).then_some(())
    })?;
    lab.assert_no_double_run()
}
