//! Post-copy with real agents and QEMU guests (QEMU 7.2 has it): a VM whose spec allows it, and
//! whose guest rewrites 2 MiB of memory every few ms (`tandem.dirty=2`: at 16 MiB/s its pre-copy
//! cannot converge), switches to post-copy after the first pass over its memory — its vCPUs move to the
//! destination, the source sends the pages it still lacks, then the source's copy goes. And the
//! price of it: a source lost during that phase loses the guest, which its new host restarts
//! from scratch — never two running copies, never the spent source resumed.
//!
//! Not run by `cargo test` (ignored): under TCG, Debian's QEMU 7.2 leaves a guest that touches
//! many missing pages right after the switch hung in about one post-copy move in six, and a run
//! of the second test once saw the restarted guest not answer for 90 s. `cargo test -p
//! tandem-lab --test postcopy -- --ignored --test-threads=1` runs them; the simulator checks the
//! same ownership rules in every CI run.

use anyhow::{anyhow, Result};
use std::time::Duration;
use tandem_agent::views::{LocalView, MigrateRequest, MigrationBegun, MigrationsView};
use tandem_core::spec::Postcopy;
use tandem_lab::bench::migration::{test_guest, MigrationLab};
use tandem_lab::demo::wait;
use tandem_lab::diskguest::guest_memory_fault;

fn index(ml: &MigrationLab, host: &str) -> Result<usize> {
    ml.lab.hosts.iter().position(|h| h.name == host).ok_or_else(|| anyhow!("no host {host}"))
}

/// Where host `i`'s committed state places the VM.
fn placed_at(ml: &MigrationLab, i: usize) -> Option<String> {
    ml.lab.placement(i).ok()?.get(&ml.vm).cloned().flatten()
}

/// Whether host `i` reports a copy of the VM that has not exited.
fn has_copy(ml: &MigrationLab, i: usize) -> bool {
    ml.lab.client(i).get_as::<LocalView>("/v1/local").is_ok_and(|l| l.vms.iter().any(|v| v.name == ml.vm && v.exit.is_none()))
}

/// The VM allows post-copy after the first pass, and its guest dirties memory without pause.
fn dirtying(spec: &mut tandem_core::state::VmSpec) {
    spec.postcopy = Postcopy::AfterFirstPass;
    if let tandem_core::state::DriverSpec::Qemu { cmdline: Some(c), .. } = &mut spec.driver {
        c.push_str(" tandem.dirty=2");
    }
}

#[test]
#[ignore = "QEMU 7.2 under TCG hangs a post-copy guest in about one move in six; run with --ignored (see the README)"]
fn a_guest_switched_to_postcopy_answers_at_its_destination_and_its_source_copy_goes() -> Result<()> {
    let Some(g) = test_guest() else { return Ok(()) };
    let ml = MigrationLab::start_spec("qemu", 128, &g, 96, "[migration]\nmax_bandwidth_mib_s = 16\n", 0, dirtying)?;
    for _ in 0..2 {
        // A guest the emulator left hung (see `guest_memory_fault`) no longer dirties memory:
        // its next migration converges without post-copy, and only ownership is checked.
        let faulted_before = ml.guest_fault.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some();
        let f = ml.migrate_once()?;
        eprintln!("{f:?}");
        assert!(f.completed, "the migration {} -> {} did not complete", f.from, f.to);
        assert!(faulted_before || f.postcopy, "the migration switched to post-copy after its first pass: {f:?}");
        assert_eq!(f.two_running, 0, "the VM ran on two hosts at once");
        assert_eq!(ml.host_of()?, f.to, "committed state has the VM at its destination");
        let corrupted = ml.guest_fault.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some();
        assert!(corrupted || f.http_gap_ms.is_some_and(|g| g < 10_000), "the service came back: {f:?}");
        let from = index(&ml, &f.from)?;
        wait("the source's spent copy to go", Duration::from_secs(30), || (!has_copy(&ml, from)).then_some(()))?;
    }
    let events = ml.lab.events();
    let moved: Vec<&str> = events.iter().filter(|e| e.kind == tandem_agent::views::EventKind::MigrationCompleted).map(|e| e.detail.as_str()).collect();
    assert!(moved.len() == 2 && moved[0].contains("switched to post-copy"), "{moved:?}");
    Ok(())
}

/// Post-copy with a local disk: QEMU pauses before the switch (`pre-switchover`), the mirror
/// concludes in sync with the guest stopped, then the switch goes on; the VM runs at its
/// destination on the destination's own copy.
#[test]
#[ignore = "QEMU 7.2 under TCG hangs a post-copy guest in about one move in six; run with --ignored (see the README)"]
fn a_guest_with_a_local_disk_switches_to_postcopy_after_its_mirror_concluded() -> Result<()> {
    let Some(g) = test_guest() else { return Ok(()) };
    let ml = MigrationLab::start_spec("qemu", 128, &g, 98, "[migration]\nmax_bandwidth_mib_s = 16\n", 64, dirtying)?;
    let f = ml.migrate_once()?;
    eprintln!("{f:?}");
    assert!(f.completed, "the migration {} -> {} did not complete", f.from, f.to);
    assert!(f.postcopy, "the migration switched to post-copy after its first pass: {f:?}");
    assert!(f.disk_copy_ms.is_some(), "the local disk was mirrored: {f:?}");
    assert_eq!(f.two_running, 0, "the VM ran on two hosts at once");
    assert_eq!(ml.host_of()?, f.to, "committed state has the VM at its destination");
    let corrupted = ml.guest_fault.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some();
    assert!(corrupted || f.http_gap_ms.is_some_and(|g| g < 10_000), "the service came back: {f:?}");
    Ok(())
}

/// The source loses power while it still sends the pages: the destination owns the VM (the
/// switchover committed at the switch), its copy can never be whole, so it is killed and the VM
/// started afresh there — a new QEMU, answering again; the spent source never ran it again.
#[test]
#[ignore = "QEMU 7.2 under TCG: flaky, see the README; run with --ignored"]
fn a_source_lost_in_postcopy_costs_a_restart_at_the_destination() -> Result<()> {
    let Some(g) = test_guest() else { return Ok(()) };
    // The post-copy phase slowed down so that the power loss falls inside it.
    let extra = "[migration]\nmax_bandwidth_mib_s = 16\npostcopy_bandwidth_mib_s = 1\n";
    let mut ml = MigrationLab::start_spec("qemu", 128, &g, 97, extra, 0, dirtying)?;
    // From wherever it runs to the next host: the source may be the leader too (the destination
    // owns the VM from the commit on, and restarts it without any coordinator).
    let src = ml.host_of()?;
    let src_i = index(&ml, &src)?;
    let dst_i = (src_i + 1) % ml.lab.hosts.len();
    let dst = ml.lab.hosts[dst_i].name.clone();
    let copies = ml.watch_copies();
    let v = ml.lab.client(dst_i).send("POST", &format!("/v1/vms/{}/migrate", ml.vm), &MigrateRequest { to: Some(dst.clone()), force: true })?;
    let begun: MigrationBegun = serde_json::from_value(v)?;
    let source = ml.lab.client_at(&begun.source_api);
    let mut seen = String::new();
    wait("the post-copy phase, committed at the destination", Duration::from_secs(60), || {
        let v: MigrationsView = source.get_as("/v1/migrations").ok()?;
        let last = v.recent.last().map(|o| (o.result.clone(), o.reason.clone(), o.report.as_ref().map(|r| (r.postcopy, r.total_ms, r.steps.clone()))));
        let now = format!(
            "{:?} placed {:?}, last {last:?}",
            v.active.iter().map(|m| (m.phase.clone(), m.progress.as_ref().map(|p| p.status.clone()))).collect::<Vec<_>>(),
            placed_at(&ml, dst_i)
        );
        if !seen.ends_with(&now) {
            seen = format!("{seen} | {now}");
        }
        let serving = v.active.iter().find(|m| m.generation == begun.generation)?.phase.as_deref()?.starts_with("post-copy");
        (serving && placed_at(&ml, dst_i)? == dst).then_some(())
    })
    .map_err(|e| anyhow!("{e}; last seen: {seen}"))?;
    let pid_in_postcopy = ml.lab.workload_pids(dst_i).into_iter().find(|(_, vm)| *vm == ml.vm).map(|(p, _)| p);
    eprintln!("post-copy from {src} to {dst} (destination QEMU {pid_in_postcopy:?}); {src} loses power");
    ml.lab.power_off(src_i);
    let again = wait("the VM started afresh at its destination", Duration::from_secs(90), || {
        let pid = ml.lab.workload_pids(dst_i).into_iter().find(|(_, vm)| *vm == ml.vm).map(|(p, _)| p);
        let answers = ml.answers_on(&dst);
        seen = format!("pid {pid:?}, answering {answers}, placed {:?}", placed_at(&ml, dst_i));
        (pid.is_some() && pid != pid_in_postcopy && (answers || guest_memory_fault(&ml.lab, &dst, &ml.vm).is_some())).then_some(pid)
    })
    .map_err(|e| anyhow!("{e}; last seen: {seen}"))?;
    std::thread::sleep(Duration::from_millis(500));
    let two = copies.finish();
    eprintln!("the VM runs again on {dst} (QEMU {again:?})");
    assert_eq!(two, 0, "two hosts reported the VM running at once");
    assert_eq!(placed_at(&ml, dst_i), Some(dst.clone()), "the destination keeps the VM it owns");
    let events = ml.lab.client(dst_i).get("/v1/events?kind=vm-exited&limit=64")?;
    assert!(events.to_string().contains(&ml.vm), "the lost copy's exit is on the destination's timeline: {events}");
    Ok(())
}
