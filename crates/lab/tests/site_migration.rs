//! Live moves of a VM whose disk is mirrored between two sites, across the sites, with real
//! agents in network namespaces and the disk-backed test guest (see `sitelab`).
//!
//! The guest at site a writes a's copy and, through its write-blocking mirror, b's — served by
//! the copy server at site b. A move to site b starts the destination's QEMU paused on b's copy
//! through a local copy server that shares the copy with that copy server (the source's mirror
//! still writes through it); at the switchover the source has written its last write to both,
//! so the destination resumes on a copy holding every write the guest acknowledged. Committed
//! state then counts only b's copy current, and the destination's mirror catches a's copy up by
//! chunk sums — only what the guest wrote since the move crosses back.
//!
//! - There and back: the same boot of the guest (no restart), never two running copies, both
//!   copies current again after each move, nothing acknowledged lost.
//! - The destination's site loses power in the middle of the move: the move fails, the guest
//!   runs on at site a in the same QEMU (b's copy committed stale first), nothing lost.
//! - Maintenance of site a's only host: the guest leaves live for site b and comes home after.

use anyhow::{anyhow, Result};
use serde_json::json;
use std::time::{Duration, Instant};
use tandem_agent::views::{MigrateRequest, MigrationBegun, MigrationOutcome, MigrationsView, VmView};
use tandem_lab::bench::migration::doubly_running;
use tandem_lab::demo::wait;
use tandem_lab::lab::Lab;
use tandem_lab::sitelab::{copies_are, judge_sequence, start_site_lab, with_sites, SiteLab, SiteLabSpec, WitnessAt};

/// Begins the move of `db` to `to` through host `via`; what began.
fn begin_move(lab: &Lab, via: usize, to: &str) -> Result<MigrationBegun> {
    let v = lab.client(via).send("POST", "/v1/vms/db/migrate", &MigrateRequest { to: Some(to.into()), force: false }).map_err(|e| anyhow!("migrate: {e}"))?;
    Ok(serde_json::from_value(v)?)
}

/// How the move `begun` ended, as its source tells.
fn outcome(lab: &Lab, begun: &MigrationBegun) -> Result<MigrationOutcome> {
    let source = lab.client_at(&begun.source_api);
    wait("the move's outcome", Duration::from_secs(180), || {
        source.get_as::<MigrationsView>("/v1/migrations").ok()?.recent.into_iter().find(|o| o.name == "db" && o.generation == begun.generation)
    })
}

/// Samples both hosts' local views while `during` runs: how many sweeps showed the guest
/// running on both at once.
fn two_copies_while<T>(lab: &Lab, during: impl FnOnce() -> Result<T>) -> Result<(T, usize)> {
    let clients: Vec<_> = (0..2).map(|i| lab.client(i)).collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut two = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if doubly_running(&clients).iter().any(|vm| vm == "db") {
                    two += 1;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            two
        });
        let result = during();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let two = sampler.join().map_err(|_| anyhow!("the sampler panicked"))?;
        Ok((result?, two))
    })
}

/// Moves `db` live to `to` and checks where it ends: there, in the same boot, writing on; then
/// both copies current again. The move's outcome.
fn move_and_check(site: &mut SiteLab, via: usize, to: &str, to_site: &str) -> Result<MigrationOutcome> {
    let boot = site.seq.samples().last().map(|s| s.recovered).ok_or_else(|| anyhow!("the guest's writer never answered"))?;
    let before = site.seq.highest();
    let (done, two) = two_copies_while(&site.lab, || {
        let begun = begin_move(&site.lab, via, to)?;
        outcome(&site.lab, &begun)
    })?;
    assert_eq!(done.result, "completed", "{done:?}");
    assert_eq!(two, 0, "two hosts reported the guest running at once");
    let c = site.lab.client(via);
    let vm: VmView = c.get_as("/v1/vms/db").map_err(|e| anyhow!("{e}"))?;
    assert_eq!(vm.host.as_deref(), Some(to));
    // The copy it ran on is left behind at the switchover, then caught up from the new site.
    assert!(vm.copies.iter().any(|s| s == to_site), "the destination's site's copy is current: {:?}", vm.copies);
    let after = site.seq.wait_past(before + 10, Duration::from_secs(60)).map_err(|e| anyhow!("the guest does not write on after its move: {e}"))?;
    assert_eq!(after.recovered, boot, "the guest booted again: it moved live, in the same boot");
    let caught_up = Instant::now();
    wait("both copies current again", Duration::from_secs(120), || copies_are(&c, &["a", "b"]))?;
    let report = done.report.as_ref();
    eprintln!(
        "moved live to {to} in {:.2} s, downtime {:?} ms; both copies current {:.2} s after",
        report.map_or(0.0, |r| r.total_ms as f64 / 1000.0),
        report.and_then(|r| r.downtime_ms),
        caught_up.elapsed().as_secs_f64()
    );
    Ok(done)
}

/// There and back: the move to site b completes without a restart, b's copy carries the guest
/// on, and a's copy is caught up by chunk sums (only what changed crosses); the move back the
/// same way. Nothing acknowledged is lost; one boot throughout.
#[test]
fn a_mirrored_guest_moves_live_to_the_other_site_and_back_without_a_restart() -> Result<()> {
    with_sites("tandem-site-move", |storage, guest| there_and_back(storage, guest, &SiteLabSpec::new("tsm", 121, WitnessAt::First)))
}

/// The same with no shared storage at all — a network witness in a third place — and the
/// sites 5 ms apart (the mirrors' traffic through the lab's delay relay there).
#[test]
fn a_mirrored_guest_moves_live_between_sites_5_ms_apart_with_a_network_witness() -> Result<()> {
    let spec = SiteLabSpec { delay: Some(Duration::from_millis(5)), ..SiteLabSpec::new("tsx", 124, WitnessAt::ThirdPlace) };
    with_sites("tandem-site-move-far", |storage, guest| there_and_back(storage, guest, &spec))
}

fn there_and_back(storage: &std::path::Path, guest: &std::path::Path, spec: &SiteLabSpec) -> Result<()> {
    let mut site = start_site_lab(storage, guest, spec)?;
    move_and_check(&mut site, 0, "h1", "b")?;
    // a's copy was caught up by chunk sums from b: only what the guest wrote since the move (and
    // what the comparison's chunks round it to) crossed back, not the disk.
    let events = site.lab.events();
    let chunked = events.iter().any(|e| e.kind.to_string() == "mirror-resyncing" && e.host == "h1" && e.detail.contains("compared with its chunk sums"));
    assert!(chunked, "a's copy was not caught up by chunk sums");
    let delta = events.iter().filter(|e| e.kind.to_string() == "mirror-in-sync" && e.host == "h1").find_map(|e| e.resync);
    let delta = delta.ok_or_else(|| anyhow!("no resync figures for a's copy"))?;
    eprintln!("a's copy caught up: {} KiB crossed, {} KiB matched", delta.sent >> 10, delta.matched >> 10);
    assert!(delta.sent < tandem_lab::sitelab::DISK_BYTES / 4 && delta.matched > delta.sent, "{delta:?}");
    move_and_check(&mut site, 1, "h0", "a")?;
    judge_sequence(site.seq, 1);
    Ok(())
}

/// Site b loses power while the guest's memory is on its way there (the copy slowed to 8 MiB/s):
/// its host — the destination, and the server of b's copy — is gone. The move fails; the guest,
/// whose writes wait on the lost copy until it is committed stale, runs on at site a in the same
/// QEMU, and nothing it acknowledged is lost.
#[test]
fn the_destinations_site_lost_during_a_move_across_sites_leaves_the_guest_running_at_its_source() -> Result<()> {
    with_sites("tandem-site-move-loss", |storage, guest| {
        let spec = SiteLabSpec { migration_extra: "max_bandwidth_mib_s = 8\n", ..SiteLabSpec::new("tsn", 122, WitnessAt::First) };
        let site = start_site_lab(storage, guest, &spec)?;
        let boot = site.seq.samples().last().map(|s| s.recovered).ok_or_else(|| anyhow!("the guest's writer never answered"))?;
        let pid = site.lab.workload_pids(0).into_iter().find(|(_, vm)| vm == "db").map(|(p, _)| p);
        let begun = begin_move(&site.lab, 0, "h1")?;
        let source = site.lab.client_at(&begun.source_api);
        wait("memory on its way", Duration::from_secs(60), || {
            let v: MigrationsView = source.get_as("/v1/migrations").ok()?;
            v.active.iter().find(|m| m.generation == begun.generation)?.progress.as_ref().filter(|p| p.transferred_bytes > 16 << 20).map(|_| ())
        })?;
        let mut lab = site.lab;
        lab.power_off(1);
        let done = outcome(&lab, &begun)?;
        assert_ne!(done.result, "completed", "{done:?}");
        let c = lab.client(0);
        wait("only a's copy current", Duration::from_secs(60), || copies_are(&c, &["a"]))?;
        let before = site.seq.highest();
        let after = site.seq.wait_past(before + 10, Duration::from_secs(60)).map_err(|e| anyhow!("the guest does not write on at site a: {e}"))?;
        assert_eq!(after.recovered, boot, "the guest booted again");
        let pid_after = lab.workload_pids(0).into_iter().find(|(_, vm)| vm == "db").map(|(p, _)| p);
        assert_eq!(pid, pid_after, "the same QEMU runs on at site a");
        let vm: VmView = c.get_as("/v1/vms/db").map_err(|e| anyhow!("{e}"))?;
        assert_eq!(vm.host.as_deref(), Some("h0"));
        eprintln!("the move failed: {}", done.reason.unwrap_or_default());
        judge_sequence(site.seq, 1);
        Ok(())
    })
}

/// Maintenance of site a's host, the only one there: its mirrored guest leaves live for site b
/// (b's copy current), and once the host is back in normal mode it comes home — after a's copy,
/// left behind by the first move, was caught up. One boot, never two running copies, nothing
/// lost.
#[test]
fn maintenance_of_a_sites_only_host_moves_its_mirrored_guest_live_to_the_other_site_and_home() -> Result<()> {
    with_sites("tandem-site-maint", |storage, guest| {
        let site = start_site_lab(storage, guest, &SiteLabSpec::new("tsq", 123, WitnessAt::First))?;
        let c = site.lab.client(1);
        let at = |host: &'static str| {
            let c = &c;
            move || {
                let vm: VmView = c.get_as("/v1/vms/db").ok()?;
                (vm.host.as_deref() == Some(host) && vm.migrating_to.is_none()).then_some(vm)
            }
        };
        let ((), two) = two_copies_while(&site.lab, || {
            // Forced: one host left cannot take a second one's loss (admission control says so).
            c.post("/v1/hosts/h0/mode", &json!({ "mode": "maintenance", "force": true })).map_err(|e| anyhow!("{e}"))?;
            let vm = wait("the guest to leave h0 for site b", Duration::from_secs(120), at("h1"))?;
            assert_eq!(vm.copies, ["b"], "a's copy left behind at the switchover");
            let before = site.seq.highest();
            site.seq.wait_past(before + 10, Duration::from_secs(60)).map_err(|e| anyhow!("the guest does not write on at site b: {e}"))?;
            c.post("/v1/hosts/h0/mode", &json!({ "mode": "normal" })).map_err(|e| anyhow!("{e}"))?;
            wait("the guest to come home to h0", Duration::from_secs(180), at("h0"))?;
            wait("both copies current again", Duration::from_secs(120), || copies_are(&c, &["a", "b"]))?;
            Ok(())
        })?;
        assert_eq!(two, 0, "two hosts reported the guest running at once");
        let moved = site.lab.events().into_iter().filter(|e| e.kind.to_string() == "migration-completed").count();
        assert!(moved >= 2, "the guest left and came home live: {moved} completed moves");
        judge_sequence(site.seq, 1);
        Ok(())
    })
}
