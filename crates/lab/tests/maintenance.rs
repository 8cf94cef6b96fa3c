//! Maintenance by live migration with real agents: a host running several VMs enters
//! maintenance and empties itself (process workloads and QEMU guests), then gets them back when
//! it leaves it; the operator's CLI shows the plan and follows both. No VM ever runs (unpaused)
//! on two hosts at once.

use anyhow::Result;
use std::process::Command;
use tandem_lab::bench::maintenance::round;
use tandem_lab::bench::migration::test_guest;

#[test]
fn process_vms_leave_a_host_in_maintenance_and_come_back() -> Result<()> {
    let f = round("process", 4, std::path::Path::new("/nonexistent"), 76)?;
    eprintln!("{f:?}");
    assert_eq!(f.two_running, 0);
    Ok(())
}

#[test]
fn qemu_guests_leave_a_host_in_maintenance_live_and_come_back() -> Result<()> {
    let Some(g) = test_guest() else { return Ok(()) };
    let f = round("qemu", 2, &g, 77)?;
    eprintln!("{f:?}");
    assert_eq!(f.two_running, 0);
    Ok(())
}

/// The CLI: `host maintenance enter` prints the plan and follows the evacuation to its end;
/// `exit` follows the return; a VM that cannot move live makes `enter` refuse, changing nothing.
#[test]
fn the_cli_shows_the_plan_and_follows_the_evacuation() -> Result<()> {
    use tandem_lab::lab::{process_vm, Lab, LabOptions};
    let bin = tandem_lab::lab::tandem_binary()?;
    let lab = Lab::new(LabOptions { loopback_net: 78, api_port: 7900, capacity: (4, 1024), ..LabOptions::default() }, &bin)?;
    let mut lab = lab;
    lab.start_all()?;
    lab.form_cluster()?;
    let c = lab.client(0);
    for (i, mem) in [(0, 256u64), (1, 256), (2, 900)] {
        let spec = process_vm(&format!("p{i}"), mem, i);
        c.send("POST", "/v1/vms", &spec)?;
        c.send("POST", &format!("/v1/vms/p{i}/start"), &tandem_agent::views::ForceRequest::default())?;
    }
    let placed = tandem_lab::demo::wait("placed", std::time::Duration::from_secs(30), || {
        let p = lab.placement(0).ok()?;
        (p.len() == 3 && p.values().all(Option::is_some) && lab.running().len() == 3).then_some(p)
    })?;
    let host = placed["p0"].clone().unwrap_or_default();
    let cli = |args: &[&str]| Command::new(&bin).args(["--api", &lab.hosts[0].api, "--token", &lab.token()]).args(args).output();
    let out = cli(&["host", "maintenance", "enter", &host])?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    assert!(out.status.success() && text.contains("evacuation plan") && text.contains("is empty and in maintenance"), "{text}");
    assert!(lab.placement(0)?.values().all(|h| h.as_deref() != Some(host.as_str())), "nothing left on {host}");
    let out = cli(&["host", "maintenance", "exit", &host])?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && text.contains("is back"), "{text}");
    let back = lab.placement(0)?.values().filter(|h| h.as_deref() == Some(host.as_str())).count();
    let before = placed.values().filter(|h| h.as_deref() == Some(host.as_str())).count();
    assert_eq!(back, before, "every evacuated VM came back");
    // The evacuated host drove the migrations out: `tandem migrations` there lists them.
    let api = lab.hosts.iter().find(|h| h.name == host).map(|h| h.api.clone()).unwrap_or_default();
    let out = Command::new(&bin).args(["--api", &api, "--token", &lab.token(), "migrations"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success() && text.contains(&format!("last migrations driven by {host}")) && text.contains("now runs on"), "{text}");
    // p2 (900 MiB) fits on no other host (placement spread the small VMs, leaving at most
    // 768 MiB free on each): entering its host is refused with the reason, nothing changes.
    let p2_host = lab.placement(0)?.get("p2").cloned().flatten().unwrap_or_default();
    let out = cli(&["host", "maintenance", "enter", &p2_host])?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("cannot move live") && text.contains("nothing changed"), "{text}");
    let plan: tandem_agent::views::EvacuationPlan = c.get_as(&format!("/v1/hosts/{p2_host}/evacuation"))?;
    assert!(plan.steps.iter().any(|s| s.vm == "p2" && s.to.is_none() && s.why_not.is_some()), "{plan:?}");
    let vms: Vec<tandem_agent::views::VmView> = c.list_as("/v1/vms")?;
    assert!(vms.iter().all(|v| v.migrating_to.is_none()), "nothing moves");
    lab.assert_no_double_run()?;
    Ok(())
}

/// A guest whose live migration cannot complete (1 MiB/s within a 2 s bound): the coordinator
/// tries it a bounded number of times and then leaves it, and `enter` says so and ends, the
/// guest running on where it was; with `--shutdown-unmovable` the CLI shuts it down cleanly
/// and it starts on another host. No VM runs on two hosts at once throughout.
#[test]
fn a_guest_that_cannot_move_live_stays_or_with_the_flag_moves_cold() -> Result<()> {
    let Some(g) = test_guest() else { return Ok(()) };
    let bin = tandem_lab::lab::tandem_binary()?;
    let (lab, host) = lab_with_web0(&bin, &g, 93, 7950, "max_bandwidth_mib_s = 1\nstall_s = 1\ntimeout_s = 2\n")?;
    let wait = |what: &str, f: &dyn Fn() -> Option<String>| tandem_lab::demo::wait(what, std::time::Duration::from_secs(120), f);
    let cli = |args: &[&str]| Command::new(&bin).args(["--api", &lab.hosts[0].api, "--token", &lab.token()]).args(args).output();
    let out = cli(&["host", "maintenance", "enter", &host])?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("stays on {host}: its live migration did not complete 3 times")) && text.contains("could not move live"), "{text}");
    assert_eq!(lab.placement(0)?.get("web0").cloned().flatten().as_deref(), Some(host.as_str()), "it runs on where it was");
    let out = cli(&["host", "maintenance", "exit", &host])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The coordinator forgets the failed attempts once it has seen the host out of maintenance
    // (a pass comes at least every fifth of the peer timeout).
    std::thread::sleep(std::time::Duration::from_secs(2));
    let out = cli(&["host", "maintenance", "enter", &host, "--shutdown-unmovable"])?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    assert!(out.status.success(), "{text}");
    assert!(text.contains("shutting it down to start it elsewhere") && text.contains("is empty and in maintenance"), "{text}");
    let now = lab.placement(0)?.get("web0").cloned().flatten().unwrap_or_default();
    assert!(!now.is_empty() && now != host, "web0 runs elsewhere: {now}");
    wait("web0 running on its new host", &|| (lab.running().get("web0") == Some(&now)).then(String::new))?;
    lab.assert_no_double_run()?;
    Ok(())
}

/// A move back home that fails (here the operator cancels it) leaves the guest away with its
/// home remembered, and the coordinator moves it back again — at most three times: then `host
/// maintenance exit` says where it stays and why, and ends. Once the host it stays on enters
/// maintenance itself (another move, counted afresh) it leaves, and it ends on its home, which
/// it then forgets. No VM runs on two hosts at once throughout.
#[test]
fn a_guest_whose_moves_back_home_fail_stays_away_said_and_comes_home_later() -> Result<()> {
    use tandem_agent::views::{HostModeRequest, VmView};
    use tandem_core::state::HostMode;
    let Some(g) = test_guest() else { return Ok(()) };
    let bin = tandem_lab::lab::tandem_binary()?;
    // Slow enough that a move can be caught under way, fast enough to converge.
    let (lab, home) = lab_with_web0(&bin, &g, 98, 7930, "max_bandwidth_mib_s = 4\ntimeout_s = 60\n")?;
    let c = lab.client(0);
    let wait = |what: &str, f: &dyn Fn() -> Option<String>| tandem_lab::demo::wait(what, std::time::Duration::from_secs(120), f);
    let web0 = || c.list_as::<VmView>("/v1/vms").ok()?.into_iter().find(|v| v.name == "web0");
    let mode = |host: &str, mode: HostMode| c.send("POST", &format!("/v1/hosts/{host}/mode"), &HostModeRequest { mode, force: false });
    let evacuate = || -> Result<String> {
        mode(&home, HostMode::Maintenance)?;
        let away = wait("web0 evacuated", &|| web0().filter(|v| v.migrating_to.is_none() && v.host.as_deref() != Some(home.as_str())).and_then(|v| v.host))?;
        assert_eq!(web0().and_then(|v| v.home).as_deref(), Some(home.as_str()));
        mode(&home, HostMode::Normal)?;
        Ok(away)
    };
    let mut away = evacuate()?;
    // Three moves back cancelled in a row. A cancel that lands after the switchover cannot
    // cancel: the guest is home (and forgot it) — sent away again, the count starts afresh, as
    // the coordinator's does for a new move.
    let (mut cancelled, mut tries) = (0, 0);
    while cancelled < 3 {
        tries += 1;
        anyhow::ensure!(tries <= 8, "no three cancels in a row landed before the switchover");
        wait(&format!("web0's move back {} under way", cancelled + 1), &|| web0()?.migrating_to.filter(|h| *h == home))?;
        c.send("DELETE", "/v1/vms/web0/migrate", &serde_json::json!({}))?;
        let host = wait("the cancelled move back ended", &|| web0().filter(|v| v.migrating_to.is_none()).map(|v| v.host.unwrap_or_default()))?;
        let kept = web0().and_then(|v| v.home);
        if host == home {
            assert_eq!(kept, None, "home again, it forgets its home");
            eprintln!("the cancel came after the switchover (web0 is home): sent away again");
            away = evacuate()?;
            cancelled = 0;
            continue;
        }
        assert_eq!(kept.as_deref(), Some(home.as_str()), "a move back that failed keeps the home (attempt {})", cancelled + 1);
        assert_eq!(host, away);
        cancelled += 1;
    }
    // Given up: the CLI says so and ends.
    let out = Command::new(&bin).args(["--api", &lab.hosts[0].api, "--token", &lab.token(), "host", "maintenance", "exit", &home]).output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    eprintln!("{text}");
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("stays on {away}: its live migration back did not complete 3 times")) && text.contains("could not move back live"),
        "{text}"
    );
    // The host it stays on enters maintenance: it leaves (another move), and ends at home.
    mode(&away, HostMode::Maintenance)?;
    wait("web0 off its host in maintenance", &|| {
        web0().filter(|v| v.migrating_to.is_none() && v.host.as_deref() != Some(away.as_str())).map(|_| String::new())
    })?;
    mode(&away, HostMode::Normal)?;
    wait("web0 back home", &|| web0().filter(|v| v.host.as_deref() == Some(home.as_str()) && v.migrating_to.is_none()).map(|_| String::new()))?;
    wait("web0 running at home", &|| (lab.running().get("web0") == Some(&home)).then(String::new))?;
    assert_eq!(web0().and_then(|v| v.home), None, "back home, it forgets its home");
    lab.assert_no_double_run()?;
    Ok(())
}

/// Three agents running TCG guests with `migration` as their `[migration]` settings, and the
/// test guest `web0` started: the lab and web0's host.
fn lab_with_web0(bin: &std::path::Path, g: &std::path::Path, net: u8, api_port: u16, migration: &str) -> Result<(tandem_lab::lab::Lab, String)> {
    use tandem_lab::lab::{Lab, LabOptions};
    let extra = format!("[qemu]\naccel = \"tcg\"\nmachine = \"microvm\"\nstop_timeout_s = 5\n[migration]\n{migration}");
    let opts = LabOptions { driver: "qemu".into(), loopback_net: net, api_port, capacity: (4, 2048), extra_config: extra, ..LabOptions::default() };
    let mut lab = Lab::new(opts, bin)?;
    lab.start_all()?;
    lab.form_cluster()?;
    lab.judge_paused_copies();
    let c = lab.client(0);
    c.send("POST", "/v1/vms", &tandem_lab::demo::demo_vm(0, "qemu", g))?;
    c.send("POST", "/v1/vms/web0/start", &tandem_agent::views::ForceRequest::default())?;
    let host = tandem_lab::demo::wait("web0 placed and running", std::time::Duration::from_secs(120), || {
        lab.placement(0).ok()?.get("web0").cloned().flatten().filter(|h| lab.running().get("web0") == Some(h))
    })?;
    Ok((lab, host))
}
