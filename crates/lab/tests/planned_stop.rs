//! Host–guest coordinated planned stops with real agents, through the operator's CLI:
//! `freeze` shuts the host's VMs down cleanly and parks them — nothing fails over, nobody is
//! fenced — and they start again on the host when it returns; `shutdown` (set for the whole
//! cluster, over the hosts' own `kill`) parks them too, and once the host has stayed away longer
//! than `restart_elsewhere_after_s` they run elsewhere.

use anyhow::Result;
use std::process::Command;
use std::time::Duration;
use tandem_agent::views::{EventKind, ForceRequest, HostModeRequest};
use tandem_core::state::HostMode;
use tandem_lab::demo::wait;
use tandem_lab::lab::{process_vm, Lab, LabOptions};

const VMS: [&str; 3] = ["s0", "s1", "s2"];

fn on(lab: &Lab, host: &str) -> usize {
    lab.running().iter().filter(|(vm, h)| VMS.contains(&vm.as_str()) && h.as_str() == host).count()
}

#[test]
fn freeze_parks_the_vms_until_the_host_returns_and_shutdown_lets_them_go_elsewhere() -> Result<()> {
    let bin = tandem_lab::lab::tandem_binary()?;
    let opts = LabOptions {
        loopback_net: 81,
        api_port: 7980,
        capacity: (8, 2048),
        extra_config: "[shutdown]\nrestart_elsewhere_after_s = 2\n".into(),
        ..LabOptions::default()
    };
    let mut lab = Lab::new(opts, &bin)?;
    lab.start_all()?;
    lab.form_cluster()?;
    let c = lab.client(0);
    for h in ["h0", "h2"] {
        c.send("POST", &format!("/v1/hosts/{h}/mode"), &HostModeRequest { mode: HostMode::Maintenance, force: true })?;
    }
    for (i, vm) in VMS.iter().enumerate() {
        c.send("POST", "/v1/vms", &process_vm(vm, 256, i as i32))?;
        c.send("POST", &format!("/v1/vms/{vm}/start"), &ForceRequest::default())?;
    }
    wait("the VMs running on h1", Duration::from_secs(30), || (on(&lab, "h1") == 3).then_some(()))?;
    for h in ["h0", "h2"] {
        c.send("POST", &format!("/v1/hosts/{h}/mode"), &HostModeRequest { mode: HostMode::Normal, force: false })?;
    }
    let (api, token) = (lab.hosts[0].api.clone(), lab.token());
    let cli = |args: &[&str]| Command::new(&bin).args(["--api", &api, "--token", &token]).args(args).output();
    let said = |o: &std::process::Output| String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);

    // freeze: parked, and nothing moves for longer than a failover would take.
    let out = cli(&["host", "shutdown", "h1", "--policy", "freeze"])?;
    let text = said(&out);
    eprintln!("{text}");
    assert!(out.status.success() && text.contains("h1 is left") && text.contains("planned stop"), "{text}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !lab.reap(1) {
        assert!(std::time::Instant::now() < deadline, "h1's agent did not exit");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(8));
    assert_eq!(lab.running().keys().filter(|vm| VMS.contains(&vm.as_str())).count(), 0, "parked VMs run nowhere: {:?}", lab.running());
    let events = lab.events();
    assert!(!events.iter().any(|e| e.kind == EventKind::FailoverCommitted), "no failover of a host that left");
    assert!(!events.iter().any(|e| e.kind == EventKind::Fenced && e.host != "h1"), "nobody else fenced");
    // Back: the VMs start on h1 again.
    lab.start(1)?;
    wait("the parked VMs back on h1", Duration::from_secs(60), || (on(&lab, "h1") == 3).then_some(()))?;
    // h1's own timeline (read now that it answers again) has its leave.
    assert!(lab.events().iter().any(|e| e.kind == EventKind::HostLeft && e.host == "h1"), "the leave is in the timeline");

    // shutdown with a 2 s hold, set for the whole cluster (the hosts' own policy is kill) and
    // followed by a stop asked without a policy: parked, then released to the other hosts.
    let out = cli(&["cluster", "set", "--shutdown-policy", "shutdown"])?;
    assert!(out.status.success() && said(&out).contains("shutdown"), "{}", said(&out));
    let out = cli(&["host", "shutdown", "h1"])?;
    assert!(out.status.success() && said(&out).contains("policy shutdown"), "{}", said(&out));
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !lab.reap(1) {
        assert!(std::time::Instant::now() < deadline, "h1's agent did not exit");
        std::thread::sleep(Duration::from_millis(100));
    }
    wait("the VMs running elsewhere after the hold", Duration::from_secs(60), || (on(&lab, "h0") + on(&lab, "h2") == 3).then_some(()))?;
    assert!(lab.events().iter().any(|e| e.kind == EventKind::ParkedReleased));
    // h1 returns: the VMs stay where they run now.
    lab.start(1)?;
    lab.wait_all_active(Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(on(&lab, "h1"), 0);
    assert_eq!(on(&lab, "h0") + on(&lab, "h2"), 3);
    lab.assert_no_double_run()?;
    Ok(())
}

/// QEMU guests under the `shutdown` policy: each guest powers itself down on the ACPI power
/// button (its kernel says so in its serial log), the host leaves, and the guests start on it
/// again when its agent returns; never two copies. Then a guest that powers itself off on its
/// own stays stopped, with QEMU's reason in the timeline.
#[test]
fn qemu_guests_shut_down_cleanly_with_their_host_and_come_back() -> Result<()> {
    let Some(g) = tandem_lab::bench::migration::test_guest() else { return Ok(()) };
    let f = tandem_lab::bench::plannedstop::round("qemu", 2, "shutdown", &g, 82)?;
    eprintln!("{f:?}");
    assert_eq!(f.powered_down, 2, "every guest powered down cleanly: {f:?}");
    assert_eq!(f.two_running, 0);
    Ok(())
}

/// A guest that powers itself off (from inside: the test guest's `/cgi-bin/poweroff`) stays
/// stopped — not restarted, not failed over — and the timeline has QEMU's reason.
#[test]
fn a_guest_that_shuts_itself_down_stays_stopped_with_qemus_reason() -> Result<()> {
    let Some(g) = tandem_lab::bench::migration::test_guest() else { return Ok(()) };
    let ml = tandem_lab::bench::migration::MigrationLab::start("qemu", 128, &g, 83)?;
    let host = ml.host_of()?;
    let ip = ml.lab.hosts.iter().find(|h| h.name == host).map(|h| h.ip.clone()).unwrap_or_default();
    let answer = tandem_lab::demo::http_get(&format!("{ip}:8080"), "/cgi-bin/poweroff", Duration::from_secs(2));
    assert!(answer.is_some_and(|a| a.contains("powering off")), "the guest's poweroff page answers");
    wait("the VM to be marked stopped", Duration::from_secs(60), || {
        let vms: Vec<tandem_agent::views::VmView> = ml.lab.client(0).get_as("/v1/vms").ok()?;
        vms.iter().find(|v| v.name == "web0").filter(|v| v.desired == tandem_core::state::PowerState::Stopped && v.host.is_none()).map(|_| ())
    })?;
    let said = wait("the exit in the timeline", Duration::from_secs(30), || {
        ml.lab.events().into_iter().find(|e| e.kind == EventKind::VmExited && e.detail.contains("shut itself down")).map(|e| e.detail)
    })?;
    assert!(said.contains("QEMU: guest-shutdown"), "{said}");
    std::thread::sleep(Duration::from_secs(5));
    assert!(!ml.lab.running().contains_key("web0"), "it stays stopped");
    Ok(())
}
