//! Live migration without shared storage: a QEMU guest whose disk is on its host's own storage
//! (`local = true`, under each host's `[qemu] local_disk_dir`) moves live — its disk mirrored
//! into an NBD export of the destination's paused QEMU — while its writer appends a sequence
//! number with O_DIRECT|O_DSYNC every 5 ms. The guest never reboots, its sequence never goes
//! back, and once it is stopped the destination's own image holds every write it acknowledged.
//!
//! The disk checks are strict. The guest-level ones (it answers and writes on at its new host)
//! give way only to evidence that its memory was corrupted under it by the emulator (TCG, see
//! `guest_memory_fault`), which is printed; the disk must then still hold every write the guest
//! acknowledged before the switchover.

use anyhow::{anyhow, Result};
use std::time::Duration;
use tandem_agent::views::{ForceRequest, MigrateRequest, MigrationBegun, MigrationsView};
use tandem_core::state::{DiskSpec, Protection};
use tandem_lab::bench::migration::test_guest;
use tandem_lab::demo::{demo_vm, http_get, wait};
use tandem_lab::diskguest::{guest_memory_fault, highest_record, parse_seq};
use tandem_lab::lab::{Lab, LabOptions};

const DISK_BYTES: u64 = 64 << 20;

/// (last acknowledged, recovered at boot) from the guest's `/seq` on `ip`.
fn seq(ip: &str) -> Option<(u64, u64)> {
    let body = http_get(&format!("{ip}:8080"), "/seq", Duration::from_millis(400))?;
    parse_seq(std::time::Instant::now(), &body).map(|s| (s.last, s.recovered))
}

/// A 3-host lab whose hosts keep local disks under their own data directory, each with its own
/// copy of `web0.raw` (filled with `fill`), and `web0` running on one of them, writing.
struct LocalLab {
    lab: Lab,
    src: String,
    boot: u64,
    first: u64,
}

fn ip_of(lab: &Lab, host: &str) -> String {
    lab.hosts.iter().find(|h| h.name == host).map(|h| h.ip.clone()).unwrap_or_default()
}

fn disk_of(lab: &Lab, host: &str) -> std::path::PathBuf {
    lab.hosts.iter().find(|h| h.name == host).map(|h| h.data.join("disks/web0.raw")).unwrap_or_default()
}

fn placed(lab: &Lab) -> Result<String> {
    wait("the VM to be placed", Duration::from_secs(60), || lab.placement(0).ok()?.get("web0").cloned().flatten())
}

fn local_lab(net: u8, extra: &str, fill: impl Fn(&std::path::Path) -> Result<()>) -> Result<Option<LocalLab>> {
    local_lab_with(net, extra, None, fill)
}

/// [`local_lab`] whose agents use TLS (a `[tls]` table in `extra`) with certificates of the CA
/// in file `ca`.
fn local_lab_with(net: u8, extra: &str, ca: Option<std::path::PathBuf>, fill: impl Fn(&std::path::Path) -> Result<()>) -> Result<Option<LocalLab>> {
    let Some(g) = test_guest() else { return Ok(None) };
    let opts = LabOptions {
        hosts: 3,
        driver: "qemu".into(),
        loopback_net: net,
        api_port: 7700,
        extra_config: format!("[qemu]\naccel = \"tcg\"\nmachine = \"microvm\"\nstop_timeout_s = 5\nlocal_disk_dir = \"{{data}}/disks\"\n{extra}"),
        capacity: (4, 4096),
        ca,
        ..LabOptions::default()
    };
    let mut lab = Lab::new(opts, &tandem_lab::lab::tandem_binary()?)?;
    for h in &lab.hosts {
        std::fs::create_dir_all(h.data.join("disks"))?;
        fill(&h.data.join("disks/web0.raw"))?;
    }
    lab.start_all()?;
    lab.form_cluster()?;
    let mut spec = demo_vm(0, "qemu", &g);
    spec.protection = Protection::BestEffort;
    spec.disks = vec![DiskSpec { path: "web0.raw".into(), format: Some("raw".into()), readonly: false, local: true, mirror: false }];
    let c = lab.client(0);
    c.send("POST", "/v1/vms", &spec).map_err(|e| anyhow!("create: {e}"))?;
    c.send("POST", "/v1/vms/web0/start", &ForceRequest::default()).map_err(|e| anyhow!("start: {e}"))?;
    let src = placed(&lab)?;
    let src_ip = ip_of(&lab, &src);
    let (first, boot) = wait("the writer to write", Duration::from_secs(120), || seq(&src_ip).filter(|(last, _)| *last > 50))?;
    Ok(Some(LocalLab { lab, src, boot, first }))
}

fn migrate(lab: &Lab, to: &str) -> Result<MigrationBegun> {
    let v =
        lab.client(0).send("POST", "/v1/vms/web0/migrate", &MigrateRequest { to: Some(to.to_string()), force: false }).map_err(|e| anyhow!("migrate: {e}"))?;
    Ok(serde_json::from_value(v)?)
}

fn outcome(lab: &Lab, begun: &MigrationBegun) -> Result<tandem_agent::views::MigrationOutcome> {
    let source = lab.client_at(&begun.source_api);
    wait("the migration's outcome", Duration::from_secs(180), || {
        source.get_as::<MigrationsView>("/v1/migrations").ok()?.recent.into_iter().find(|o| o.generation == begun.generation)
    })
}

/// Waits until committed state has the VM on `host`, no longer migrating (an aborted
/// migration's source).
fn settled_at(lab: &Lab, host: &str) -> Result<()> {
    wait("the VM to settle at its source", Duration::from_secs(60), || {
        let v = lab.vms(0).ok()?.into_iter().find(|v| v.name == "web0")?;
        (v.host.as_deref() == Some(host) && v.migrating_to.is_none()).then_some(())
    })
}

/// Stops the VM on `host` and returns the highest write its image there holds.
fn stop_and_read(lab: &Lab, host: &str) -> Result<u64> {
    lab.client(0).send("POST", "/v1/vms/web0/stop", &serde_json::json!({})).map_err(|e| anyhow!("stop: {e}"))?;
    wait("the VM to stop", Duration::from_secs(60), || lab.vms(0).ok()?.into_iter().find(|v| v.name == "web0").filter(|v| v.host.is_none()).map(|_| ()))?;
    wait("its QEMU to exit", Duration::from_secs(30), || (!lab.running().contains_key("web0")).then_some(()))?;
    Ok(highest_record(&disk_of(lab, host))?.unwrap_or(0))
}

/// The guest at `host`, in the same boot, writes on past `above`: the last number it
/// acknowledged there. If its memory was corrupted under it (TCG), the evidence is printed and
/// `above` (acknowledged before, so on the disk in any case) is what the disk must hold.
fn writes_on(lab: &Lab, host: &str, above: u64, boot: u64) -> Result<u64> {
    let ip = ip_of(lab, host);
    let seen = wait("the writer to write on at its new host", Duration::from_secs(60), || {
        if let Some(evidence) = guest_memory_fault(lab, host, "web0") {
            return Some(Err(evidence));
        }
        seq(&ip).filter(|(l, _)| *l > above + 20).map(Ok)
    })?;
    match seen {
        Ok((last, boot_now)) => {
            assert_eq!(boot_now, boot, "the guest did not reboot");
            Ok(last)
        }
        Err(evidence) => {
            eprintln!("the guest's memory was corrupted on {host} (TCG; not a disk or ownership fault):\n{evidence}");
            Ok(above)
        }
    }
}

fn sparse(path: &std::path::Path) -> Result<()> {
    std::fs::File::create(path)?.set_len(DISK_BYTES)?;
    Ok(())
}

#[test]
fn a_vm_on_local_storage_moves_live_with_its_disk() -> Result<()> {
    let Some(LocalLab { lab, src, boot, first }) = local_lab(76, "", sparse)? else { return Ok(()) };
    let dst = lab.hosts.iter().map(|h| h.name.clone()).find(|h| *h != src).ok_or_else(|| anyhow!("no other host"))?;
    let begun = migrate(&lab, &dst)?;
    let done = outcome(&lab, &begun)?;
    assert_eq!(done.result, "completed", "{done:?}");
    assert!(done.report.as_ref().is_some_and(|r| r.disks.is_some()), "the report says the disk was copied: {done:?}");
    assert_eq!(placed(&lab)?, dst);
    let last = writes_on(&lab, &dst, first, boot)?;
    // Stopped: the destination's image holds every write acknowledged before.
    let on_dst = stop_and_read(&lab, &dst)?;
    let on_src = highest_record(&disk_of(&lab, &src))?.unwrap_or(0);
    eprintln!("acknowledged {last} at least; destination image holds {on_dst}; the source's old copy {on_src}; {done:?}");
    assert!(on_dst >= last, "an acknowledged write is missing on the destination's disk: {on_dst} < {last}");
    assert!(on_src < on_dst, "the source's copy is the older one");
    Ok(())
}

/// The destination loses power while the disk is still being copied (the copy slowed to
/// 4 MiB/s over an image full of data): the migration is aborted, the guest runs on at its
/// source — the same QEMU, its writes never lost — and a later migration elsewhere, which
/// recreates its own copy from scratch, completes.
#[test]
fn a_destination_lost_during_the_disk_copy_leaves_the_vm_whole_at_its_source() -> Result<()> {
    let full = |path: &std::path::Path| -> Result<()> {
        // Not zeroes: the mirror must really carry every byte.
        let block: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
        let mut f = std::fs::File::create(path)?;
        for _ in 0..(DISK_BYTES >> 20) {
            std::io::Write::write_all(&mut f, &block)?;
        }
        Ok(())
    };
    let Some(LocalLab { mut lab, src, boot, .. }) = local_lab(77, "[migration]\nmax_bandwidth_mib_s = 4\n", full)? else { return Ok(()) };
    let others: Vec<String> = lab.hosts.iter().map(|h| h.name.clone()).filter(|h| *h != src).collect();
    let src_i = lab.hosts.iter().position(|h| h.name == src).unwrap_or(0);
    let pid_before = lab.workload_pids(src_i).into_iter().find(|(_, vm)| vm == "web0").map(|(p, _)| p);
    // The victim must not be the host the test talks to (host 0).
    let (victim, last_host) = if lab.hosts[0].name == others[0] { (others[1].clone(), others[0].clone()) } else { (others[0].clone(), others[1].clone()) };
    let begun = migrate(&lab, &victim)?;
    let source = lab.client_at(&begun.source_api);
    wait("the disk copy under way", Duration::from_secs(30), || {
        let v: MigrationsView = source.get_as("/v1/migrations").ok()?;
        v.active
            .iter()
            .find(|m| m.generation == begun.generation)?
            .progress
            .as_ref()
            .filter(|p| p.status == "copying disks" && p.transferred_bytes > 4 << 20)
            .map(|_| ())
    })?;
    let vi = lab.hosts.iter().position(|h| h.name == victim).unwrap_or(0);
    lab.power_off(vi);
    let done = outcome(&lab, &begun)?;
    assert_eq!(done.result, "aborted", "{done:?}");
    settled_at(&lab, &src)?;
    let pid_after = lab.workload_pids(src_i).into_iter().find(|(_, vm)| vm == "web0").map(|(p, _)| p);
    assert_eq!(pid_before, pid_after, "the same QEMU runs on at the source");
    let src_ip = ip_of(&lab, &src);
    let (mid, boot_mid) = wait("the writer at its source", Duration::from_secs(30), || seq(&src_ip))?;
    assert_eq!(boot_mid, boot, "the guest did not reboot");
    let mid = writes_on(&lab, &src, mid, boot)?;
    // Elsewhere, now: the copy starts from nothing there and completes.
    let begun = migrate(&lab, &last_host)?;
    let done = outcome(&lab, &begun)?;
    assert_eq!(done.result, "completed", "{done:?}");
    let last = writes_on(&lab, &last_host, mid, boot)?;
    let on_disk = stop_and_read(&lab, &last_host)?;
    eprintln!("acknowledged {last} at least; the new host's image holds {on_disk}; {done:?}");
    assert!(on_disk >= last, "an acknowledged write is missing: {on_disk} < {last}");
    Ok(())
}

/// Removes the certificate directory however the test ends.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// On a cluster that uses TLS, a migration's disk copy and memory stream use it too, both ends
/// verified: a destination whose QEMU credentials are of another CA is refused (the migration
/// is aborted, the guest runs on at its source unharmed), and a destination of the cluster's
/// CA receives the guest and its disk, the report saying the stream was TLS. The credentials
/// are loaded afresh for each migration, which is what lets the test swap them on one host.
#[test]
fn migrations_go_over_tls_and_a_destination_of_another_ca_is_refused() -> Result<()> {
    if !tandem_lab::testca::openssl_available() {
        return Ok(());
    }
    let net = 95;
    let certs = TempDir(std::env::temp_dir().join(format!("tandem-migration-tls-{}", std::process::id())));
    let ips: Vec<String> = (0..3).map(|i| format!("127.{net}.0.{}", 10 + i)).collect();
    tandem_lab::testca::make_ca(&certs.0, "tandem-test-ca", &ips)?;
    let other = certs.0.join("other");
    tandem_lab::testca::make_ca(&other, "someone-else", &ips)?;
    let tls = tandem_lab::testca::tls_table(&certs.0);
    let Some(LocalLab { lab, src, boot, first }) = local_lab_with(net, &tls, Some(certs.0.join("ca.pem")), sparse)? else { return Ok(()) };
    let others: Vec<String> = lab.hosts.iter().map(|h| h.name.clone()).filter(|h| *h != src).collect();
    let (bad, good) = (others[0].clone(), others[1].clone());
    let creds = lab.hosts.iter().find(|h| h.name == bad).map(|h| h.data.join("qemu-tls")).ok_or_else(|| anyhow!("no host {bad}"))?;
    let files = [
        ("ca-cert.pem", "ca.pem"),
        ("server-cert.pem", "agent.pem"),
        ("server-key.pem", "agent.key"),
        ("client-cert.pem", "agent.pem"),
        ("client-key.pem", "agent.key"),
    ];
    for (link, file) in files {
        std::fs::remove_file(creds.join(link))?;
        std::os::unix::fs::symlink(other.join(file), creds.join(link))?;
    }
    let begun = migrate(&lab, &bad)?;
    let refused = outcome(&lab, &begun)?;
    assert_eq!(refused.result, "aborted", "a destination of another CA must not receive the guest: {refused:?}");
    settled_at(&lab, &src)?;
    let mid = writes_on(&lab, &src, first, boot)?;
    let begun = migrate(&lab, &good)?;
    let done = outcome(&lab, &begun)?;
    assert_eq!(done.result, "completed", "{done:?}");
    let report = done.report.clone().ok_or_else(|| anyhow!("no report: {done:?}"))?;
    assert!(report.tls, "the stream went over TLS: {done:?}");
    assert!(report.disks.is_some(), "the disk was copied (over TLS too): {done:?}");
    let last = writes_on(&lab, &good, mid, boot)?;
    let on_disk = stop_and_read(&lab, &good)?;
    eprintln!("refused: {:?}; acknowledged {last} at least, the destination's image holds {on_disk}; {done:?}", refused.reason);
    assert!(on_disk >= last, "an acknowledged write is missing: {on_disk} < {last}");
    Ok(())
}
