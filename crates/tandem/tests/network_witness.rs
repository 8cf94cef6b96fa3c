//! Two hosts and a network witness (`tandem witness`), no shared storage at all: the witness
//! keeps the heartbeat area and the third Raft vote's region. The witness's loss alone changes
//! nothing (a warning in the timeline); either host's power loss restarts its VMs on the other;
//! a cut of the link between the hosts keeps the lower id, and a host cut off from everything
//! fences while the other restarts its VMs — never two copies.

use anyhow::{anyhow, Result};
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tandem_lab::bench::twohosts::{both_on, bring_back, cut_link, lose_host, network_witness_options, start_two_hosts};
use tandem_lab::demo::wait;
use tandem_lab::lab::Lab;

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tandem"))
}

fn events(lab: &Lab, host: usize) -> Vec<Value> {
    lab.client(host).list("/v1/events?limit=4096").unwrap_or_default()
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[test]
fn two_hosts_and_a_network_witness_survive_the_witness_and_either_host() -> Result<()> {
    let mut lab = Lab::new(network_witness_options(99, None, "127.99.0.9:7400"), &binary())?;
    let ftt = start_two_hosts(&mut lab)?;
    assert!(ftt.report.exact, "{ftt:?}");
    let before = lab.running();

    // The witness lost: a warning, nothing else.
    let lost_at = now_ms();
    lab.kill_witness();
    wait("a witness-unreachable warning", Duration::from_secs(30), || {
        (0..2).any(|h| events(&lab, h).iter().any(|e| e["kind"] == "witness-unreachable")).then_some(())
    })?;
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(lab.fences_since(0, lost_at), Vec::<String>::new(), "h0 fenced without the witness");
    assert_eq!(lab.fences_since(1, lost_at), Vec::<String>::new(), "h1 fenced without the witness");
    assert_eq!(lab.running(), before, "the VMs stay where they ran");
    assert!(!events(&lab, 0).iter().any(|e| e["kind"] == "failover-committed"), "nothing failed over");
    lab.start_witness()?;
    wait("witness-reachable", Duration::from_secs(30), || (0..2).any(|h| events(&lab, h).iter().any(|e| e["kind"] == "witness-reachable")).then_some(()))?;

    // Either host's power loss.
    bring_back_ftt(&lab)?;
    let secs = lose_host(&mut lab, 1)?;
    eprintln!("h1 lost power: its VM ran again on h0 {secs:.2} s later");
    lab.assert_no_double_run()?;
    bring_back(&mut lab, 1)?;
    let secs = lose_host(&mut lab, 0)?;
    eprintln!("h0 lost power: both VMs ran again on h1 {secs:.2} s later");
    assert!(events(&lab, 1).iter().any(|e| e["kind"] == "witness-held"), "h1 took the witness over");
    lab.assert_no_double_run()
}

fn bring_back_ftt(lab: &Lab) -> Result<()> {
    wait("FTT 1 with the witness back", Duration::from_secs(60), || {
        lab.client(0).get_as::<tandem_agent::views::FttView>("/v1/ftt").ok().filter(|f| f.report.ftt == 1).map(|_| ())
    })
    .map_err(|e| anyhow!("{e}"))
}

/// In network namespaces (root; without it the test returns early), the witness in the control
/// namespace: the link between the hosts cut (both still reach the witness: h0, the lower id,
/// stays), healed, then h1 cut off from everything (it fences; h0 restarts its VM), then h0 (it
/// fences; h1 restarts its VM and, once h0 is back, fenced, stays).
#[test]
fn a_network_witness_settles_a_cut_link_and_an_isolated_host() -> Result<()> {
    if !tandem_lab::netlab::can_use_namespaces() {
        return Ok(());
    }
    let net = tandem_lab::netlab::NetLab::create(&format!("nw{}", std::process::id() % 100_000), 2)?;
    net.enter_control()?;
    let witness = format!("{}:7462", net.control_ip());
    let mut lab = Lab::new(network_witness_options(101, Some(net.lab_hosts()), &witness), &binary())?;
    start_two_hosts(&mut lab)?;
    let secs = cut_link(&lab, &net, 0)?;
    eprintln!("link cut: h1's VM ran again on h0 {secs:.2} s later");
    bring_back_ftt(&lab)?;
    lab.assert_runs_as_committed(0)?;

    // Move one VM back to h1, then cut h1 off from everything, the witness included.
    let c = lab.client(0);
    c.post("/v1/vms/p1/migrate", &serde_json::json!({ "to": "h1" })).map_err(|e| anyhow!("{e}"))?;
    wait("p1 back on h1", Duration::from_secs(60), || (lab.running().get("p1").map(String::as_str) == Some("h1")).then_some(()))?;
    let isolated_at = now_ms();
    let isolated = Instant::now();
    net.cut(1)?;
    let secs = both_on(&lab, 0, isolated)?;
    eprintln!("h1 isolated: its VM ran again on h0 {secs:.2} s later");
    assert_eq!(lab.fences_since(0, isolated_at), Vec::<String>::new(), "h0 fenced");
    lab.assert_no_double_run()?;
    net.heal(1)?;
    lab.wait_all_active(Duration::from_secs(60))?;
    // Read once h1 answers again (nobody reaches it while it is cut off).
    assert!(!lab.fences_since(1, isolated_at).is_empty(), "the isolated h1 did not fence");
    std::thread::sleep(Duration::from_secs(2));
    lab.assert_no_double_run()?;

    // Then h0, the lower id, cut off from everything: it fences and h1 runs both VMs. Back, h0
    // is fenced (and its slot may reach the witness before its heartbeats reach h1): h1, which
    // runs everything, must not lose the verdict to it.
    bring_back_ftt(&lab)?;
    let isolated_at = now_ms();
    let isolated = Instant::now();
    net.cut(0)?;
    let secs = both_on(&lab, 1, isolated)?;
    eprintln!("h0 isolated: its VM ran again on h1 {secs:.2} s later");
    net.heal(0)?;
    lab.wait_all_active(Duration::from_secs(60))?;
    std::thread::sleep(Duration::from_secs(3));
    assert!(!lab.fences_since(0, isolated_at).is_empty(), "the isolated h0 did not fence");
    assert_eq!(lab.fences_since(1, isolated_at), Vec::<String>::new(), "h1 fenced for a fenced h0 back");
    assert!(["p0", "p1"].iter().all(|v| lab.running().get(*v).map(String::as_str) == Some("h1")), "both VMs stay on h1: {:?}", lab.running());
    lab.assert_no_double_run()?;
    drop(lab);
    drop(net);
    Ok(())
}

/// Agents with `[tls]` reach a witness that serves TLS with a certificate of their CA: the
/// witness votes (FTT 1) and a host's loss is survived; a client without TLS, or trusting
/// another CA, gets nothing from it.
#[test]
fn a_network_witness_serves_over_tls_to_the_clusters_ca_only() -> Result<()> {
    use tandem_agent::io::SlotDevice;
    use tandem_agent::netwitness::client::{NetSlotDevice, WitnessClient};
    if !tandem_lab::testca::openssl_available() {
        return Ok(());
    }
    let net = 102;
    /// Removes the certificates' directory however the test ends.
    struct Scratch(PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let scratch = Scratch(std::env::temp_dir().join(format!("tandem-nw-tls-{}", std::process::id())));
    let dir = scratch.0.clone();
    let other = dir.join("other");
    let ips: Vec<String> = [9, 10, 11].iter().map(|i| format!("127.{net}.0.{i}")).collect();
    tandem_lab::testca::make_ca(&dir, "tandem-test-ca", &ips)?;
    tandem_lab::testca::make_ca(&other, "someone-else", &ips)?;
    let addr = format!("127.{net}.0.9:7400");
    let mut opts = network_witness_options(net, None, &addr);
    opts.extra_config = tandem_lab::testca::tls_table(&dir);
    opts.ca = Some(dir.join("ca.pem"));
    if let Some(w) = opts.network_witness.as_mut() {
        w.tls = Some((dir.join("agent.pem"), dir.join("agent.key")));
    }
    let mut lab = Lab::new(opts, &binary())?;
    start_two_hosts(&mut lab)?;

    let key = tandem_core::wire::ClusterKey::new(&std::fs::read(lab.shared.join("secret"))?)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let read = |tls: Option<tandem_agent::tls::ClientTls>| {
        let witness = tandem_agent::config::NetworkWitness { address: addr.clone(), cluster: "lab".into() };
        let dev = NetSlotDevice::new(WitnessClient::new(&witness, key.peer_token(), tls), Duration::from_secs(2));
        rt.block_on(dev.read_all()).map(|_| ())
    };
    assert!(read(Some(tandem_agent::tls::ClientTls::load(&dir.join("ca.pem"))?)).is_ok(), "a client of the cluster's CA reads the area");
    assert!(read(None).is_err(), "a client without TLS read the area");
    assert!(read(Some(tandem_agent::tls::ClientTls::load(&other.join("ca.pem"))?)).is_err(), "a client of another CA read the area");

    let secs = lose_host(&mut lab, 1)?;
    eprintln!("over TLS, h1 lost power: its VM ran again on h0 {secs:.2} s later");
    lab.assert_no_double_run()?;
    drop(lab);
    drop(scratch);
    Ok(())
}
