//! Two sites, one host each, a disk witness, real agents in network namespaces, and the
//! disk-backed test guest whose disk is mirrored between the sites (`mirror = true`): each
//! site's storage is a directory of its own, and the other site's copy is served by the agent
//! there (qemu-storage-daemon over NBD) and written synchronously by the guest's QEMU.
//!
//! - In sync: committed state counts both copies current; no write the guest acknowledged is
//!   missing from the other site's copy.
//! - Site a loses power (its host, and with it its copy): the guest restarts at site b from b's
//!   copy, its writer finds every number it had acknowledged, and only b's copy is current.

use anyhow::{anyhow, Result};
use serde_json::json;
use std::time::{Duration, Instant};
use tandem_agent::views::{ForceRequest, LocalView, VmView};
use tandem_core::mirroring::LinkState;
use tandem_core::state::{DiskSpec, NetworkSpec, Protection, ServiceProbe};
use tandem_lab::bench::migration::test_guest;
use tandem_lab::bench::twohosts::two_host_options;
use tandem_lab::demo::{http_get, wait};
use tandem_lab::diskguest::{highest_record, judge, SeqWatch};
use tandem_lab::lab::Lab;
use tandem_lab::netlab::{can_use_namespaces, NetLab, VM_BRIDGE};

const DISK_BYTES: u64 = 64 << 20;

#[test]
fn a_site_lost_with_its_storage_restarts_the_guest_on_the_other_sites_copy_with_every_acknowledged_write() -> Result<()> {
    if !can_use_namespaces() {
        return Ok(());
    }
    let Some(guest) = test_guest() else { return Ok(()) };
    let storage = std::env::temp_dir().join(format!("tandem-site-failover-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&storage);
    for site in ["a", "b"] {
        std::fs::create_dir_all(storage.join(format!("site-{site}")))?;
    }
    let result = scenario(&storage, &guest);
    let _ = std::fs::remove_dir_all(&storage);
    result
}

fn scenario(storage: &std::path::Path, guest: &std::path::Path) -> Result<()> {
    let image_a = storage.join("site-a/db.raw");
    std::fs::File::create(&image_a)?.set_len(DISK_BYTES)?;
    let image_b = storage.join("site-b/db.raw");
    let mut net = NetLab::create(&format!("tsf{}", std::process::id() % 10_000), 2)?;
    net.add_vm_network()?;
    net.enter_control()?;
    let mut opts = two_host_options(104, Some(net.lab_hosts()));
    opts.driver = "qemu".into();
    opts.capacity = (4, 2048);
    opts.sites = vec!["a".into(), "b".into()];
    opts.extra_config = format!(
        "[qemu]\naccel = \"tcg\"\nmachine = \"microvm\"\nstop_timeout_s = 5\nbridges = [\"{VM_BRIDGE}\"]\nsite_disk_dir = \"{}/site-{{site}}\"\n[mirror]\nstall_ms = 1000\n",
        storage.display()
    );
    let mut lab = Lab::new(opts, &tandem_lab::lab::tandem_binary()?)?;
    if std::env::var_os("TANDEM_KEEP_LAB").is_some() {
        lab.keep_files();
        eprintln!("lab directory: {}", lab.root.display());
    }
    lab.start_all()?;
    lab.form_cluster()?;
    let c = lab.client(0);
    // The guest starts at site a: site b's host in maintenance meanwhile.
    c.post("/v1/hosts/h1/mode", &json!({ "mode": "maintenance" })).map_err(|e| anyhow!("{e}"))?;
    let ip = NetLab::vm_ip(0);
    let bare = ip.split('/').next().unwrap_or_default().to_string();
    let mut spec = tandem_lab::demo::demo_vm(0, "qemu", guest);
    spec.name = "db".into();
    spec.memory_mib = 128;
    spec.protection = Protection::Protect;
    spec.disks = vec![DiskSpec { path: "db.raw".into(), format: Some("raw".into()), readonly: false, local: false, mirror: true }];
    spec.network = Some(NetworkSpec::Bridge { bridge: VM_BRIDGE.into(), mac: "52:54:00:18:00:68".into(), address: Some(ip) });
    spec.probe = Some(ServiceProbe::Http { address: format!("{bare}:80"), path: "/seq".into(), expect: None });
    c.send("POST", "/v1/vms", &spec).map_err(|e| anyhow!("create: {e}"))?;
    c.send("POST", "/v1/vms/db/start", &ForceRequest::default()).map_err(|e| anyhow!("start: {e}"))?;
    let addr = format!("{bare}:80");
    wait("the guest's writer to answer", Duration::from_secs(120), || http_get(&addr, "/seq", Duration::from_millis(400)))?;
    c.post("/v1/hosts/h1/mode", &json!({ "mode": "normal" })).map_err(|e| anyhow!("{e}"))?;
    let seq = SeqWatch::start(&addr);

    // The mirror into site b's copy catches up, and committed state counts both copies.
    let copies = |want: &[&str]| {
        let vm: VmView = c.get_as("/v1/vms/db").ok()?;
        (vm.copies == want).then_some(vm)
    };
    wait("both copies current", Duration::from_secs(120), || copies(&["a", "b"]))?;
    let local: LocalView = c.get_as("/v1/local").map_err(|e| anyhow!("{e}"))?;
    assert!(local.mirrors.iter().any(|m| m.vm == "db" && m.site == "b" && m.state == LinkState::InSync), "{:?}", local.mirrors);
    for _ in 0..5 {
        let acknowledged = seq.highest();
        let there = highest_record(&image_b)?.unwrap_or(0);
        assert!(there >= acknowledged, "site b's copy holds {there}, the guest acknowledged {acknowledged}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Site a loses power: its host, its QEMU, its copy (nothing of it is used again).
    let acknowledged = seq.highest();
    let lost = Instant::now();
    lab.power_off(0);
    std::fs::remove_file(&image_a)?;
    let first_boot = seq.samples().first().map(|s| s.recovered);
    let back = wait("the guest to boot again at site b and write", Duration::from_secs(120), || {
        seq.samples().into_iter().find(|s| s.at > lost && Some(s.recovered) != first_boot && s.writes > 0)
    })?;
    let restarted_in = back.at.saturating_duration_since(lost);
    let verdict = judge(&seq.finish());
    eprintln!("site a lost: the guest wrote again at site b after {restarted_in:?}; {verdict:?}");
    assert!(back.recovered >= acknowledged, "the restarted guest found {} on its disk, it had acknowledged {acknowledged}", back.recovered);
    assert!(verdict.lost.is_empty(), "{verdict:?}");
    let c1 = lab.client(1);
    let vm: VmView = wait("committed state to count only b's copy", Duration::from_secs(30), || {
        let vm: VmView = c1.get_as("/v1/vms/db").ok()?;
        (vm.copies == ["b"]).then_some(vm)
    })?;
    assert_eq!(vm.host.as_deref(), Some("h1"));
    Ok(())
}
