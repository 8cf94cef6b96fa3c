//! `tandem-lab demo --scenario site-loss`: two sites of one host each (h0 in a, h1 in b) and a
//! disk witness, the disk-backed test guests' disks mirrored between the sites (each site's
//! storage a directory of its own; the other site's copy served by its host and written by the
//! guest's QEMU synchronously). Site a loses its power — its host, and the copies it holds stay
//! as the cut left them — and the guests run again at site b from their copies. The timeline,
//! each writer's check (the number it finds on its disk at least the last one it acknowledged
//! before the cut); then site a comes back, and each guest's new mirror brings its stale copy up
//! to date by chunk sums (what crossed the link is shown); and one JSON line.

use super::{check_interrupt, guest_dir, http_get, install_interrupt_handler, qemu_present, secs, timings_table, wait, DemoArgs};
use crate::lab::Lab;
use anyhow::{anyhow, bail, Result};
use serde_json::json;
use std::time::{Duration, Instant};
use tandem_agent::views::{Event, EventKind, ForceRequest, VmView};
use tandem_core::state::DiskSpec;

/// Each guest's disk (the writer uses its first 4 MiB).
const DISK_BYTES: u64 = 64 << 20;

/// The last number guest `i`'s writer acknowledged, and the one it found on its disk at boot,
/// asked on `ip`.
fn seq(ip: &str, i: u32) -> Option<(u64, u64)> {
    let body = http_get(&format!("{ip}:{}", 8080 + i), "/seq", Duration::from_millis(400))?;
    let mut it = body.split_whitespace().map(str::parse::<u64>);
    Some((it.next()?.ok()?, it.next()?.ok()?))
}

/// Removes the sites' storage when the demo ends (however it ends).
struct Storage(std::path::PathBuf);

impl Drop for Storage {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) fn act(args: &DemoArgs) -> Result<()> {
    install_interrupt_handler();
    let guest = guest_dir(args);
    if !qemu_present() || !guest.join("vmlinuz").exists() {
        bail!("the site-loss scenario needs QEMU and the disk-writing test guest in {} (scripts/setup.sh)", guest.display());
    }
    let storage = Storage(std::env::temp_dir().join(format!("tandem-demo-sites-{}", std::process::id())));
    for site in ["a", "b"] {
        std::fs::create_dir_all(storage.0.join(format!("site-{site}")))?;
    }
    let mut opts = crate::bench::twohosts::two_host_options(107, None);
    opts.driver = "qemu".into();
    opts.capacity = (4, 2048);
    opts.sites = vec!["a".into(), "b".into()];
    opts.extra_config = format!(
        "[qemu]\naccel = \"tcg\"\nmachine = \"microvm\"\nstop_timeout_s = 5\nsite_disk_dir = \"{}/site-{{site}}\"\n[mirror]\nstall_ms = 1000\n{}",
        storage.0.display(),
        timings_table(&args.timings)
    );
    let mut lab = Lab::new(opts, &crate::lab::tandem_binary()?)?;
    if args.keep {
        lab.keep_files();
        println!("lab directory: {}", lab.root.display());
    }
    println!("Starting 2 agents: h0 in site a, h1 in site b, a disk witness as the third vote ...");
    lab.start_all()?;
    lab.form_cluster()?;
    check_interrupt()?;
    let c0 = lab.client(0);
    // The guests start at site a: site b's host is in maintenance meanwhile.
    c0.post("/v1/hosts/h1/mode", &json!({ "mode": "maintenance" })).map_err(|e| anyhow!("{e}"))?;
    for i in 0..args.vms {
        let name = format!("web{i}");
        std::fs::File::create(storage.0.join(format!("site-a/{name}.raw")))?.set_len(DISK_BYTES)?;
        let mut spec = super::demo_vm(i, "qemu", &guest);
        spec.disks = vec![DiskSpec { path: format!("{name}.raw"), format: Some("raw".into()), readonly: false, local: false, mirror: true }];
        c0.send("POST", "/v1/vms", &spec).map_err(|e| anyhow!("create {name}: {e}"))?;
        c0.send("POST", &format!("/v1/vms/{name}/start"), &ForceRequest::default()).map_err(|e| anyhow!("start {name}: {e}"))?;
    }
    let (ip_a, ip_b) = (lab.hosts[0].ip.clone(), lab.hosts[1].ip.clone());
    println!("Created {} protected guest(s) whose disk is mirrored between the sites; waiting for them at site a ...", args.vms);
    wait("every guest's writer to answer at site a", Duration::from_secs(120), || (0..args.vms).all(|i| seq(&ip_a, i).is_some()).then_some(()))?;
    c0.post("/v1/hosts/h1/mode", &json!({ "mode": "normal" })).map_err(|e| anyhow!("{e}"))?;
    let synced = Instant::now();
    wait("each guest's copy at site b to be in sync", Duration::from_secs(180), || {
        let vms: Vec<VmView> = c0.list_as("/v1/vms").ok()?;
        vms.iter().all(|v| v.copies == ["a", "b"]).then_some(())
    })?;
    println!("Both sites' copies are current after {:.1} s: every write now goes to both before the guest sees it done.", synced.elapsed().as_secs_f64());
    check_interrupt()?;

    let acked: Vec<u64> = (0..args.vms).map(|i| seq(&ip_a, i).map_or(0, |(last, _)| last)).collect();
    println!("\nCutting the power of site a: h0, its guests and its copies (left as the cut leaves them) ...");
    let wall0 = tandem_drivers::wall_ms() as i64;
    let t0 = Instant::now();
    lab.power_off(0);
    let mut back = vec![None; args.vms as usize];
    wait("every guest to write again at site b", Duration::from_secs(120), || {
        for i in 0..args.vms {
            if back[i as usize].is_none() {
                back[i as usize] = seq(&ip_b, i).map(|(_, recovered)| (t0.elapsed().as_secs_f64(), recovered));
            }
        }
        back.iter().all(Option::is_some).then_some(())
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let events = lab.events();
    let rel = |e: &Event| e.at_ms as i64 - wall0;
    let interesting = [
        EventKind::PeerDead,
        EventKind::PeerPartitioned,
        EventKind::FailoverCommitted,
        EventKind::VmStarted,
        EventKind::VmAnswering,
        EventKind::MirrorResyncing,
    ];
    println!("\nTimeline (seconds after the power cut):");
    println!("  {:>6.2}  site a (h0) loses power", 0.0);
    for e in events.iter().filter(|e| rel(e) >= 0 && interesting.contains(&e.kind)) {
        println!("  {:>6.2}  [{}] {}", secs(rel(e)), e.host, e.detail);
    }
    let mut lost = 0;
    for (i, b) in back.iter().enumerate() {
        let Some((at, recovered)) = b else { continue };
        let whole = *recovered >= acked[i];
        lost += usize::from(!whole);
        println!(
            "  {at:>6.2}  web{i} writes again at site b: its disk holds write {recovered}, it had acknowledged {} before the cut{}",
            acked[i],
            if whole { "" } else { " — WRITES LOST" }
        );
    }
    check_interrupt()?;
    let (failback_s, crossed_kib) = site_a_back(&mut lab, args.vms)?;
    let double_runs = lab.recorder.double_run_count();
    let service_back = back.iter().flatten().map(|(t, _)| *t).fold(0.0_f64, f64::max);
    println!("\nNo guest ran at both sites at once: {}", if double_runs == 0 { "confirmed (process table sampled every 10 ms)" } else { "VIOLATED" });
    println!(
        "{{\"scenario\":\"site-loss\",\"vms\":{},\"recovered\":{},\"service_back_s\":{},\"writes_lost\":{lost},\"double_runs\":{double_runs},\"both_copies_current_again_s\":{},\"resync_crossed_kib\":{crossed_kib}}}",
        args.vms,
        back.iter().flatten().count(),
        (service_back * 100.0).round() / 100.0,
        (failback_s * 100.0).round() / 100.0
    );
    if double_runs > 0 || lost > 0 {
        bail!("a guest ran twice or lost acknowledged writes");
    }
    Ok(())
}

/// Site a back: h0 starts again with its copies as the power cut left them; each guest's mirror
/// at site b brings its copy up to date, compared with the copy's chunk sums. The seconds until
/// every copy is current again, and the KiB of writes that crossed the link in all.
fn site_a_back(lab: &mut Lab, vms: u32) -> Result<(f64, u64)> {
    println!("\nSite a comes back: h0 starts again, its copies as the power cut left them ...");
    let wall0 = tandem_drivers::wall_ms() as i64;
    let t0 = Instant::now();
    lab.start(0)?;
    let c1 = lab.client(1);
    wait("every guest's copy at site a to be current again", Duration::from_secs(180), || {
        let vms: Vec<VmView> = c1.list_as("/v1/vms").ok()?;
        vms.iter().all(|v| v.copies == ["a", "b"]).then_some(())
    })?;
    let took = t0.elapsed().as_secs_f64();
    let events = lab.events();
    let mut crossed = 0;
    for e in events.iter().filter(|e| e.at_ms as i64 >= wall0 && matches!(e.kind, EventKind::MirrorResyncing | EventKind::MirrorInSync)) {
        println!("  {:>6.2}  [{}] {}: {}", secs(e.at_ms as i64 - wall0), e.host, e.vm.as_deref().unwrap_or("-"), e.detail);
        crossed += e.resync.map_or(0, |r| r.sent >> 10);
    }
    println!("Both sites' copies of the {vms} guest(s) are current again {took:.1} s after h0 started; {crossed} KiB of writes crossed the link.");
    Ok((took, crossed))
}
