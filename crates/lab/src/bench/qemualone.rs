//! `tandem-lab bench qemu-alone`: the floor under `bench migration`'s HTTP gap. Two QEMU
//! processes on this machine and no Tandem at all: the test guest migrates from one to the
//! other over loopback, the destination is resumed the instant QEMU reports the migration
//! complete, and a client polls each process's port forward every 20 ms, as `bench migration`
//! does. What this gap is, no orchestration can take away; under TCG it is mostly the
//! destination's guest answering slowly after its arrival (its translated code is not carried
//! over), which a stop and `cont` of one process does not show — measured beside it.

use super::migration::HTTP_POLL;
use crate::demo::http_get;
use crate::qemuproc::QemuProcess as Guest;
use anyhow::{anyhow, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The guest's port forward of each process (loopback only).
const ADDRS: [&str; 2] = ["127.68.0.1:8080", "127.68.0.2:8080"];
const MIGRATION_PORT: u16 = 47_311;
const QMP_TIMEOUT: Duration = Duration::from_secs(5);

async fn launch(dir: &Path, guest: &Path, memory_mib: u64, slot: usize, incoming: bool) -> Result<Guest> {
    let qmp_path = dir.join(format!("q{slot}.qmp"));
    let (ip, port) = ADDRS[slot].split_once(':').ok_or_else(|| anyhow!("address"))?;
    let mut cmd = std::process::Command::new("qemu-system-x86_64");
    cmd.args(["-accel", "tcg", "-M", "microvm", "-nodefaults", "-no-user-config", "-cpu", "qemu64", "-display", "none", "-smp", "1"])
        .args(["-m", &memory_mib.to_string()])
        .args(["-qmp", &format!("unix:{},server=on,wait=off", qmp_path.display())])
        .args(["-serial", &format!("file:{}", dir.join(format!("q{slot}.serial")).display())])
        .args(["-kernel", &guest.join("vmlinuz").display().to_string(), "-initrd", &guest.join("initrd.img").display().to_string()])
        .args(["-append", "console=ttyS0 quiet tsc_early_khz=2000000 mitigations=off tandem.vm=web0"])
        .args(["-netdev", &format!("user,id=net0,hostfwd=tcp:{ip}:{port}-:80"), "-device", "virtio-net-device,netdev=net0"]);
    if incoming {
        cmd.args(["-S", "-incoming", "defer"]);
    }
    Guest::spawn(cmd, &qmp_path, QMP_TIMEOUT).await.map_err(|e| anyhow!("the QEMU in slot {slot}: {e}"))
}

async fn qmp(g: &Guest, command: &str, args: Value) -> Result<Value> {
    g.qmp.execute(command, args, QMP_TIMEOUT).await.map_err(|e| anyhow!("{command}: {e}"))
}

/// One migration from `from` (running) into a new paused QEMU in the other slot; the gap seen
/// by the pollers and the time from `cont` to the first answer asked after it.
async fn migrate(from: &Guest, to: &Guest, answers: &Mutex<Vec<Instant>>) -> Result<(u64, u64, u64)> {
    qmp(to, "migrate-incoming", json!({"uri": format!("tcp:127.0.0.1:{MIGRATION_PORT}")})).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    qmp(from, "migrate", json!({"uri": format!("tcp:127.0.0.1:{MIGRATION_PORT}")})).await?;
    let info = loop {
        let info = qmp(from, "query-migrate", Value::Null).await?;
        match info.get("status").and_then(Value::as_str) {
            Some("completed") => break info,
            Some("failed" | "cancelled") => return Err(anyhow!("the migration failed: {info}")),
            _ => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    };
    qmp(to, "cont", Value::Null).await?;
    let resumed = Instant::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mut seen = super::migration::lock(answers).clone();
    seen.sort();
    let gap = seen.windows(2).filter(|w| w[1] >= t0).map(|w| w[1].duration_since(w[0]).as_millis() as u64).max().ok_or_else(|| anyhow!("no answers"))?;
    let first = seen.iter().find(|t| **t >= resumed).ok_or_else(|| anyhow!("the guest never answered after its arrival"))?;
    Ok((gap, first.duration_since(resumed).as_millis() as u64, info.get("downtime").and_then(Value::as_u64).unwrap_or(0)))
}

/// Runs the baseline: `rounds` migrations back and forth, and as many stops of 50 ms.
pub fn run(memory_mib: u64, rounds: usize, guest: &Path) -> Result<()> {
    if !guest.join("vmlinuz").exists() {
        return Err(anyhow!("the test guest is not in {} (scripts/build-guest.sh)", guest.display()));
    }
    let dir: PathBuf = std::env::temp_dir().join(format!("tandem-qemu-alone-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let result = rt.block_on(measure(&dir, guest, memory_mib, rounds));
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn measure(dir: &Path, guest: &Path, memory_mib: u64, rounds: usize) -> Result<()> {
    let answers = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let pollers: Vec<std::thread::JoinHandle<()>> = ADDRS
        .iter()
        .map(|addr| {
            let (answers, stop, addr) = (Arc::clone(&answers), Arc::clone(&stop), addr.to_string());
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let t = Instant::now();
                    if http_get(&addr, "/health", Duration::from_millis(100)).is_some() {
                        super::migration::lock(&answers).push(t);
                    }
                    std::thread::sleep(HTTP_POLL.saturating_sub(t.elapsed()));
                }
            })
        })
        .collect();
    let outcome = async {
        let mut running = launch(dir, guest, memory_mib, 0, false).await?;
        let booted = Instant::now();
        while http_get(ADDRS[0], "/health", Duration::from_millis(400)).is_none() {
            if booted.elapsed() > Duration::from_secs(60) {
                return Err(anyhow!("the guest did not answer within 60 s"));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (mut gaps, mut firsts, mut pauses) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..rounds {
            let slot = (round + 1) % 2;
            let incoming = launch(dir, guest, memory_mib, slot, true).await?;
            let (gap, first, downtime) = migrate(&running, &incoming, &answers).await?;
            println!("round {}: migration gap {gap} ms (QEMU downtime {downtime} ms), first answer asked {first} ms after cont", round + 1);
            gaps.push(gap);
            firsts.push(first);
            running = incoming;
            // The same pause without a migration: 50 ms stopped, on the warm process.
            let t0 = Instant::now();
            qmp(&running, "stop", Value::Null).await?;
            tokio::time::sleep(Duration::from_millis(50)).await;
            qmp(&running, "cont", Value::Null).await?;
            tokio::time::sleep(Duration::from_millis(800)).await;
            let mut seen = super::migration::lock(&answers).clone();
            seen.sort();
            pauses.push(seen.windows(2).filter(|w| w[1] >= t0).map(|w| w[1].duration_since(w[0]).as_millis() as u64).max().unwrap_or(u64::MAX));
        }
        Ok((gaps, firsts, pauses))
    }
    .await;
    stop.store(true, Ordering::SeqCst);
    for p in pollers {
        let _ = p.join();
    }
    let (gaps, firsts, pauses) = outcome?;
    println!("\nQEMU alone, a {memory_mib} MiB test guest migrated over loopback, resumed at once: {rounds} round(s)");
    println!("{:<40} {:>9} {:>9} {:>9}", "", "median", "min", "max");
    for (name, v) in [("longest HTTP gap, migration", gaps), ("first answer after cont", firsts), ("longest HTTP gap, 50 ms stop/cont", pauses)] {
        let mut v = v;
        v.sort_unstable();
        if let (Some(min), Some(max)) = (v.first(), v.last()) {
            println!("{name:<40} {:>9} {min:>9} {max:>9}  ms", v[v.len() / 2]);
        }
    }
    Ok(())
}
