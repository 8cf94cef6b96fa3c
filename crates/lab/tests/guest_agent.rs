//! A clean stop through the QEMU guest agent: a guest whose spec says `guest_agent` is shut down
//! by its agent (`guest-shutdown`, which the test guest's agent acknowledges on its console),
//! one without it by the ACPI power button; both within the stop timeout, neither killed.

use anyhow::{anyhow, Result};
use std::time::{Duration, Instant};
use tandem_core::state::DriverSpec;
use tandem_lab::bench::migration::test_guest;
use tandem_lab::demo::{demo_vm, http_get, wait};
use tandem_lab::lab::{Lab, LabOptions};

#[test]
fn a_guest_with_an_agent_is_shut_down_by_it_and_one_without_by_the_power_button() -> Result<()> {
    let Some(g) = test_guest() else { return Ok(()) };
    let extra = "[qemu]\naccel = \"tcg\"\nmachine = \"microvm\"\nstop_timeout_s = 20\n";
    let opts = LabOptions { driver: "qemu".into(), loopback_net: 94, api_port: 7980, capacity: (4, 2048), extra_config: extra.into(), ..LabOptions::default() };
    let mut lab = Lab::new(opts, &tandem_lab::lab::tandem_binary()?)?;
    lab.start_all()?;
    lab.form_cluster()?;
    let c = lab.client(0);
    for i in 0..2 {
        let mut spec = demo_vm(i, "qemu", &g);
        if let DriverSpec::Qemu { guest_agent, .. } = &mut spec.driver {
            *guest_agent = i == 0;
        }
        c.send("POST", "/v1/vms", &spec).map_err(|e| anyhow!("create: {e}"))?;
        c.send("POST", &format!("/v1/vms/web{i}/start"), &tandem_agent::views::ForceRequest::default()).map_err(|e| anyhow!("start: {e}"))?;
    }
    let placed = wait("both guests answering", Duration::from_secs(120), || {
        let p = lab.placement(0).ok()?;
        let hosts: Vec<String> = (0..2).map(|i| p.get(&format!("web{i}")).cloned().flatten()).collect::<Option<_>>()?;
        let answering = hosts.iter().enumerate().all(|(i, h)| {
            let ip = lab.hosts.iter().find(|x| x.name == *h).map(|x| x.ip.clone()).unwrap_or_default();
            http_get(&format!("{ip}:{}", 8080 + i), "/health", Duration::from_millis(400)).is_some()
        });
        answering.then_some(hosts)
    })?;
    // Past the guest's start: its agent and acpid listen.
    std::thread::sleep(Duration::from_secs(1));
    for i in 0..2 {
        let t0 = Instant::now();
        c.send("POST", &format!("/v1/vms/web{i}/stop"), &serde_json::json!({})).map_err(|e| anyhow!("stop: {e}"))?;
        wait("the guest to stop", Duration::from_secs(60), || (!lab.running().contains_key(&format!("web{i}"))).then_some(()))?;
        let took = t0.elapsed();
        let host = lab.hosts.iter().find(|h| h.name == placed[i as usize]).ok_or_else(|| anyhow!("no host"))?;
        let serial = std::fs::read_to_string(host.data.join(format!("run/web{i}.serial")))?;
        let (by_agent, by_button) = (serial.contains("TANDEM-GUEST-AGENT-SHUTDOWN"), serial.contains("TANDEM-GUEST-POWER-BUTTON"));
        eprintln!("web{i}: stopped in {took:?}; agent {by_agent}, power button {by_button}");
        assert!(took < Duration::from_secs(20), "web{i} was shut down, not killed at the stop timeout: {took:?}");
        if i == 0 {
            assert!(by_agent && !by_button, "web0 has a guest agent, which shuts it down:\n{serial}");
        } else {
            assert!(by_button && !by_agent, "web1 has none: the power button:\n{serial}");
        }
    }
    lab.assert_no_double_run()?;
    Ok(())
}
