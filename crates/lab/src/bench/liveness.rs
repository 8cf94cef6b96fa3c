//! `tandem-lab bench liveness`: does a busy agent keep heartbeating? One real agent process runs on
//! the largest state a cluster holds (64 hosts, 100,000 VMs by default, FTT target 1), while
//! this process plays its 63 peers (a "chorus" that heartbeats for them and acknowledges the
//! agent's heartbeats, so the agent holds its lease from the network) and keeps the agent busy:
//! `/v1/plan`, `/v1/ftt` and `/metrics` in a loop, and a VM stopped and started again and
//! again (each a command that admission control judges). The chorus timestamps every heartbeat
//! the agent sends; the figures are the gaps between them. Prints figures, asserts nothing.

use crate::lab::{Lab, LabOptions};
use anyhow::{anyhow, Context, Result};
use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tandem::client::Client;
use tandem_agent::views::{EmptyRequest, StatusView};
use tandem_core::state::{Assignment, Capacity, ClusterState, DriverSpec, HostMode, HostRecord, HostStatus, Protection, VmPhase, VmRecord, VmSpec};
use tandem_core::wire::{Ack, ClusterKey, HeardAges, Heartbeat, MAX_HEARTBEAT_LEN};
use tandem_core::{HostId, HostSet, MAX_HOSTS};

const LOOPBACK_NET: u8 = 93;
const API_PORT: u16 = 7640;
/// The chorus's address: every played peer heartbeats from it.
const CHORUS: &str = "127.93.0.200:7641";
/// The agent's heartbeat interval (the default timings).
const INTERVAL: Duration = Duration::from_millis(200);

/// What the run is made of.
#[derive(Clone, Copy, Debug)]
pub struct LivenessBench {
    pub vms: usize,
    pub seconds: u64,
    /// Concurrent clients requesting the heavy endpoints.
    pub readers: usize,
}

/// The state the agent starts on: hosts 1..64 are the played peers, active in epoch 1, each with
/// its share of the VMs (256 MiB, 1 vCPU; nine in ten protected); host 0, the real agent, joins
/// through `cluster init` and is given nothing, so it starts no processes.
fn synthetic_state(vms: usize) -> ClusterState {
    let mut s = ClusterState::default();
    let peers = MAX_HOSTS as u32 - 1;
    for i in 1..=peers {
        let id = HostId(i);
        s.hosts.insert(
            id,
            HostRecord {
                id,
                name: format!("p{i}"),
                // Nothing listens there: the played peers only heartbeat.
                api_addr: format!("127.{LOOPBACK_NET}.0.201:9"),
                heartbeat_addr: CHORUS.to_string(),
                capacity: Capacity { vcpus: 4096, memory_mib: 512 * 1024 },
                status: HostStatus::Active,
                epoch: 1,
                mode: HostMode::Normal,
                site: None,
            },
        );
    }
    for i in 0..vms {
        let spec = VmSpec {
            name: format!("v{i}"),
            vcpus: 1,
            memory_mib: 256,
            disks: vec![],
            network: None,
            protection: if i % 10 == 0 { Protection::BestEffort } else { Protection::Protect },
            priority: (i % 5) as i32,
            restart_group: 0,
            driver: DriverSpec::Process { command: vec!["sleep".into(), "1000".into()] },
            probe: None,
            postcopy: tandem_core::spec::Postcopy::Off,
        };
        let host = HostId(1 + (i as u32) % peers);
        let record = VmRecord {
            spec,
            phase: VmPhase::Placed { at: Assignment { host, generation: i as u64 + 1 } },
            failed_on: vec![],
            home: None,
            disk_host: None,
            copies: vec![],
        };
        s.vms.insert(record.spec.name.clone(), record);
    }
    s.next_generation = vms as u64 + 1;
    s.settings.ftt_target = Some(1);
    s
}

/// What the chorus heard from the agent: (arrival, seq, fenced) per heartbeat.
type Heard = Arc<Mutex<Vec<(Instant, u64, bool)>>>;

/// Plays hosts 1..64: every interval, one heartbeat per played host, each acknowledging the last
/// heartbeat heard from the agent; records the agent's heartbeats as they arrive.
fn chorus(key: ClusterKey, agent: SocketAddr, stop: Arc<AtomicBool>, heard: Heard) -> Result<std::thread::JoinHandle<()>> {
    let sock = UdpSocket::bind(CHORUS).with_context(|| format!("binding the chorus at {CHORUS}"))?;
    sock.set_read_timeout(Some(Duration::from_millis(5)))?;
    let thread = std::thread::Builder::new().name("bench-chorus".into()).spawn(move || {
        let mut buf = vec![0u8; MAX_HEARTBEAT_LEN + 1];
        let mut seq = 0u64;
        let mut last: Option<(u64, u64)> = None;
        let mut next_send = Instant::now();
        let all: HostSet = (0..MAX_HOSTS as u32).map(HostId).collect();
        while !stop.load(Ordering::SeqCst) {
            if let Ok((n, _)) = sock.recv_from(&mut buf) {
                if let Ok((hb, _)) = Heartbeat::decode(&buf[..n], &key, HostId(1)) {
                    // The agent sends one copy per played peer; the first one counts.
                    if hb.from == HostId(0) && last.is_none_or(|(inc, seq)| (hb.incarnation, hb.seq) > (inc, seq)) {
                        if let Ok(mut h) = heard.lock() {
                            h.push((Instant::now(), hb.seq, hb.fenced));
                        }
                        last = Some((hb.incarnation, hb.seq));
                    }
                }
            }
            if Instant::now() < next_send {
                continue;
            }
            next_send += INTERVAL;
            seq += 1;
            let ack = last.map(|(incarnation, seq)| Ack { incarnation, seq });
            for p in 1..MAX_HOSTS as u32 {
                let hb = Heartbeat {
                    from: HostId(p),
                    incarnation: 1,
                    seq,
                    epoch: 1,
                    heard: all,
                    fenced: false,
                    to: HostId(0),
                    ack,
                    ages: HeardAges::default(),
                    paced: false,
                };
                let _ = sock.send_to(&hb.encode(&key), agent);
            }
        }
    })?;
    Ok(thread)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Requests the heavy endpoints in turn until `stop`; returns (path, latency) of each answer.
fn read_load(c: Client, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<(&'static str, Duration, bool)>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let paths = ["/v1/plan?fail=p1", "/v1/ftt", "/metrics"];
        let mut i = 0;
        while !stop.load(Ordering::SeqCst) {
            let path = paths[i % paths.len()];
            i += 1;
            let t = Instant::now();
            let ok = c.get(path).is_ok();
            out.push((path, t.elapsed(), ok));
        }
        out
    })
}

/// Stops and starts one VM in turn until `stop`: each is a committed command judged by admission
/// control against the FTT target.
fn write_load(c: Client, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<(&'static str, Duration, bool)>> {
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let mut running = true;
        while !stop.load(Ordering::SeqCst) {
            let path = if running { "/v1/vms/v1/stop" } else { "/v1/vms/v1/start" };
            let t = Instant::now();
            let ok = c.send("POST", path, &EmptyRequest {}).is_ok();
            out.push((if running { "stop" } else { "start" }, t.elapsed(), ok));
            running = !running;
            std::thread::sleep(Duration::from_millis(200));
        }
        out
    })
}

/// Runs the benchmark and prints its figures.
pub fn run(b: LivenessBench) -> Result<()> {
    let binary = crate::lab::tandem_binary()?;
    let opts = LabOptions { hosts: 1, loopback_net: LOOPBACK_NET, api_port: API_PORT, capacity: (4, 2048), ..LabOptions::default() };
    let mut lab = Lab::new(opts, &binary)?;
    let t = Instant::now();
    let state = synthetic_state(b.vms);
    tandem_agent::consensus::seed_applied_state(&lab.hosts[0].data, state)?;
    println!("busy-agent benchmark: {} hosts (63 played), {} VMs, FTT target 1; state written in {:.1} s", MAX_HOSTS, b.vms, t.elapsed().as_secs_f64());
    let key = ClusterKey::new(&std::fs::read(lab.shared.join("secret"))?)?;
    let agent_hb: SocketAddr = format!("127.{LOOPBACK_NET}.0.10:{}", API_PORT + 1).parse()?;
    let stop_chorus = Arc::new(AtomicBool::new(false));
    let heard: Heard = Arc::default();
    let chorus = chorus(key, agent_hb, Arc::clone(&stop_chorus), Arc::clone(&heard))?;
    let result = measure(&mut lab, b, &heard);
    stop_chorus.store(true, Ordering::SeqCst);
    let _ = chorus.join();
    result
}

fn measure(lab: &mut Lab, b: LivenessBench, heard: &Heard) -> Result<()> {
    lab.start(0)?;
    let c = lab.client(0);
    let t = Instant::now();
    c.wait_for(Duration::from_secs(120), Duration::from_millis(200), |c| c.get("/v1/status").ok())?;
    c.send("POST", "/v1/cluster/init", &EmptyRequest {}).map_err(|e| anyhow!("cluster init: {e}"))?;
    c.wait_for(Duration::from_secs(60), Duration::from_millis(200), |c| c.get_as::<StatusView>("/v1/status").ok()?.runtime.joined_epoch.map(|_| ()))?;
    println!("agent up and joined in {:.1} s; loading it for {} s with {} reader(s) and one writer", t.elapsed().as_secs_f64(), b.seconds, b.readers);
    let from = heard.lock().map_err(|_| anyhow!("poisoned"))?.len();
    let stop = Arc::new(AtomicBool::new(false));
    let mut loads: Vec<_> = (0..b.readers).map(|_| read_load(c.clone(), Arc::clone(&stop))).collect();
    loads.push(write_load(c.clone(), Arc::clone(&stop)));
    std::thread::sleep(Duration::from_secs(b.seconds));
    stop.store(true, Ordering::SeqCst);
    let mut answers: BTreeMap<&str, (Vec<f64>, usize)> = BTreeMap::new();
    for l in loads {
        for (what, took, ok) in l.join().map_err(|_| anyhow!("a load thread panicked"))? {
            let e = answers.entry(what).or_default();
            e.0.push(took.as_secs_f64() * 1e3);
            e.1 += usize::from(!ok);
        }
    }
    let beats: Vec<(Instant, u64, bool)> = heard.lock().map_err(|_| anyhow!("poisoned"))?[from..].to_vec();
    let status = c.get_as::<StatusView>("/v1/status").ok();
    report(&beats, &answers, b, status.as_ref());
    Ok(())
}

fn report(beats: &[(Instant, u64, bool)], answers: &BTreeMap<&str, (Vec<f64>, usize)>, b: LivenessBench, status: Option<&StatusView>) {
    let mut gaps: Vec<f64> = beats.windows(2).map(|w| w[1].0.duration_since(w[0].0).as_secs_f64() * 1e3).collect();
    gaps.sort_by(f64::total_cmp);
    let lost = beats.windows(2).map(|w| w[1].1.saturating_sub(w[0].1).saturating_sub(1)).sum::<u64>();
    let jitter: Vec<f64> = {
        let mut j: Vec<f64> = gaps.iter().map(|g| (g - INTERVAL.as_secs_f64() * 1e3).abs()).collect();
        j.sort_by(f64::total_cmp);
        j
    };
    println!(
        "heartbeats sent: {} in {} s ({} sequence numbers never arrived); gap between heartbeats (interval {} ms): median {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        beats.len(),
        b.seconds,
        lost,
        INTERVAL.as_millis(),
        percentile(&gaps, 0.5),
        percentile(&gaps, 0.99),
        gaps.last().copied().unwrap_or(0.0)
    );
    println!(
        "send jitter |gap - interval|: median {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        percentile(&jitter, 0.5),
        percentile(&jitter, 0.99),
        jitter.last().copied().unwrap_or(0.0)
    );
    for (what, (lat, failed)) in answers {
        let mut lat = lat.clone();
        lat.sort_by(f64::total_cmp);
        println!(
            "  {what:<18} {:>5} answered, {failed} failed; latency median {:.0} ms, max {:.0} ms",
            lat.len(),
            percentile(&lat, 0.5),
            lat.last().copied().unwrap_or(0.0)
        );
    }
    let fenced_beats = beats.iter().filter(|b| b.2).count();
    let fenced_now = status.and_then(|s| s.runtime.fenced);
    println!(
        "fenced: {} (heartbeats announcing a fence: {fenced_beats}; status now: {})",
        if fenced_beats > 0 || fenced_now.is_some() { "YES" } else { "no" },
        match (status, fenced_now) {
            (None, _) => "agent did not answer".to_string(),
            (Some(_), None) => "not fenced".to_string(),
            (Some(_), Some(reason)) => format!("fenced: {reason}"),
        }
    );
}
