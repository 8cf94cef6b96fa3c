//! Defects found by reading the code and by trying the CLI and API as a new user would, each
//! checked against real agents: joins through a follower, a join that must not leak the
//! cluster token, API input that was answered wrongly, what-if without quorum, and the audit
//! trail of API changes.

use anyhow::{anyhow, Result};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;
use tandem::client::{Client, ClientError};
use tandem_lab::lab::{Lab, LabOptions};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tandem"))
}

fn status(r: Result<Value, ClientError>) -> (u16, String) {
    match r {
        Ok(v) => (200, v.to_string()),
        Err(ClientError::Refused { status, message }) => (status, message),
        Err(e) => (0, e.to_string()),
    }
}

/// One raw HTTP/1.1 exchange, for what the client hides (content type).
fn raw(addr: &str, request: &str) -> Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(request.as_bytes())?;
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    Ok(out)
}

/// A stranger that answers a join with a made-up proof, and keeps what it was sent.
fn impostor() -> Result<(String, std::sync::mpsc::Receiver<String>)> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // Bounded: the test makes one join attempt; a second connection is not awaited.
        if let Ok((mut c, _)) = l.accept() {
            let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
            let mut buf = [0u8; 8192];
            let n = c.read(&mut buf).unwrap_or(0);
            let _ = tx.send(String::from_utf8_lossy(&buf[..n]).into_owned());
            let body = r#"{"identity":"{\"host_id\":9,\"name\":\"evil\",\"api_addr\":\"127.0.0.1:1\",\"heartbeat_addr\":\"127.0.0.1:2\",\"capacity\":{\"vcpus\":1,\"memory_mib\":64}}","proof":"00"}"#;
            let _ = write!(c, "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}", body.len());
        }
    });
    Ok((addr, rx))
}

#[test]
fn joins_api_input_what_if_and_audit() -> Result<()> {
    let mut lab = Lab::new(LabOptions { loopback_net: 51, ..LabOptions::default() }, &binary())?;
    lab.start_all()?;
    let c0 = lab.client(0);
    for i in 0..3 {
        lab.client(i).wait_for(Duration::from_secs(30), Duration::from_millis(100), |c| c.get("/v1/status").ok())?;
    }
    c0.post("/v1/cluster/init", &json!({})).map_err(|e| anyhow!("init: {e}"))?;
    c0.wait_for(Duration::from_secs(30), Duration::from_millis(250), |c| c.post("/v1/hosts/join", &json!({ "api_addr": lab.hosts[1].api })).ok())?;
    // A join sent to a follower is forwarded to the leader on the caller's behalf (it used to be
    // forwarded without a token and fail with 401).
    let c1 = lab.client(1);
    let joined =
        c1.wait_for(Duration::from_secs(30), Duration::from_millis(250), |c| match c.post("/v1/hosts/join", &json!({ "api_addr": lab.hosts[2].api })) {
            Ok(v) => Some(Ok(v)),
            Err(ClientError::Refused { status: 401, message }) => Some(Err(anyhow!("forwarded join lost the caller's authority: {message}"))),
            Err(_) => None,
        })??;
    assert_eq!(joined["joined"], "h2");
    lab.wait_all_active(Duration::from_secs(30))?;

    // A join names an address the caller chose: it gets a challenge, never a token, and a
    // wrong proof is refused.
    let (fake, seen) = impostor()?;
    let (code, message) = status(c0.post("/v1/hosts/join", &json!({ "api_addr": fake })));
    assert_eq!(code, 409, "{message}");
    assert!(message.contains("did not prove"), "{message}");
    let request = seen.recv_timeout(Duration::from_secs(10))?;
    assert!(request.starts_with("GET /v1/join-proof?challenge="), "{request}");
    assert!(!request.to_ascii_lowercase().contains("authorization"), "a token was sent to an unproven host: {request}");
    assert_eq!(c0.list("/v1/hosts")?.len(), 3, "the impostor was not added");

    // Found by fuzzing the API: a malformed query answers the JSON error body, an array is not
    // an object, an unknown host in a query is a 400 (documented), not an undocumented 404.
    let token = lab.token();
    let api = &lab.hosts[0].api;
    let reply = raw(api, &format!("GET /v1/events?after= HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\nconnection: close\r\n\r\n"))?;
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.to_ascii_lowercase().contains("content-type: application/json"), "{reply}");
    assert!(reply.contains("\"error\""), "{reply}");
    // A name in the path that is not UTF-8 names nothing: a documented JSON 404.
    let reply = raw(api, &format!("DELETE /v1/vms/%F0%9F HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\nconnection: close\r\n\r\n"))?;
    assert!(reply.starts_with("HTTP/1.1 404"), "{reply}");
    assert!(reply.to_ascii_lowercase().contains("content-type: application/json"), "{reply}");
    let (code, message) = status(c0.call("POST", "/v1/settings", Some(&json!([null, null]))));
    assert_eq!(code, 400, "{message}");
    assert!(message.contains("JSON object"), "{message}");
    assert_eq!(status(c0.get("/v1/plan?fail=nope")).0, 400);
    // Headers are bounded (hyper's limits): a 600 KiB header is refused, not buffered.
    let huge_header = raw(api, &format!("GET /v1/status HTTP/1.1\r\nhost: x\r\nx-pad: {}\r\nconnection: close\r\n\r\n", "a".repeat(600 * 1024)))?;
    assert!(huge_header.is_empty() || huge_header.starts_with("HTTP/1.1 431"), "{}", &huge_header[..huge_header.len().min(200)]);

    // What-if without quorum: two of three hosts gone, nothing can restart, and it says so.
    c0.post(
        "/v1/vms",
        &json!({ "name": "w", "vcpus": 1, "memory_mib": 64, "protection": "protect",
                                "driver": { "kind": "process", "command": ["sleep", "100000"] } }),
    )
    .map_err(|e| anyhow!("{e}"))?;
    c0.post("/v1/vms/w/start", &json!({})).map_err(|e| anyhow!("{e}"))?;
    let placed =
        c0.wait_for(Duration::from_secs(30), Duration::from_millis(100), |c| c.get("/v1/vms/w").ok().and_then(|v| v["host"].as_str().map(str::to_string)))?;
    let others: Vec<&str> = ["h0", "h1", "h2"].into_iter().filter(|h| *h != placed).collect();
    let plan = c0.get(&format!("/v1/plan?fail={placed},{}", others[0])).map_err(|e| anyhow!("{e}"))?;
    assert_eq!(plan[0]["quorum"], false, "{plan}");
    assert_eq!(plan[0]["restarts"].as_array().map(Vec::len), Some(0), "{plan}");
    assert!(plan[0]["note"].as_str().is_some_and(|n| n.contains("no quorum")), "{plan}");
    assert_eq!(plan[0]["left_down"][0]["reason"], "no-quorum", "{plan}");
    let one = c0.get(&format!("/v1/plan?fail={placed}")).map_err(|e| anyhow!("{e}"))?;
    assert_eq!(one[0]["quorum"], true);
    assert_eq!(one[0]["restarts"][0]["vm"], "w", "{one}");

    // A protected VM no host can hold: the reason is shown (API, CLI, dashboard read the same
    // view), recorded in the timeline, and FTT says no plan exists.
    c0.post(
        "/v1/vms",
        &json!({ "name": "huge", "vcpus": 1, "memory_mib": 999_999, "protection": "protect",
                                "driver": { "kind": "process", "command": ["sleep", "100000"] } }),
    )
    .map_err(|e| anyhow!("{e}"))?;
    c0.post("/v1/vms/huge/start", &json!({})).map_err(|e| anyhow!("{e}"))?;
    let huge = c0.get("/v1/vms/huge").map_err(|e| anyhow!("{e}"))?;
    assert!(huge["waiting"].as_str().is_some_and(|w| w.starts_with("no host has 999999 MiB free; the most free is")), "{huge}");
    let ftt = c0.get("/v1/ftt").map_err(|e| anyhow!("{e}"))?;
    assert_eq!((ftt["report"]["ftt"].clone(), ftt["report"]["limited_by"].clone()), (json!(0), json!("unplaceable")), "{ftt}");
    let waiting = c0.wait_for(Duration::from_secs(10), Duration::from_millis(200), |c| {
        [c.clone(), lab.client(1), lab.client(2)]
            .iter()
            .filter_map(|c| c.list("/v1/events?kind=vm-waiting&vm=huge").ok())
            .flatten()
            .find(|e| e["detail"].as_str().is_some_and(|d| d.contains("999999 MiB")))
    })?;
    assert!(waiting["detail"].as_str().is_some_and(|d| d.starts_with("huge waits for a host: no host has 999999 MiB free")), "{waiting}");
    c0.post("/v1/vms/huge/stop", &json!({})).map_err(|e| anyhow!("{e}"))?;

    // The operator role: start, stop and clear VMs and read; nothing else, and no --force.
    let op = c0.post("/v1/tokens", &json!({ "name": "opal", "role": "operator" })).map_err(|e| anyhow!("{e}"))?;
    let as_op = Client::new(&lab.hosts[2].api).with_token(op["token"].as_str().map(str::to_string));
    // The token reaches every host through the log: wait until h2 has applied it.
    as_op.wait_for(Duration::from_secs(10), Duration::from_millis(50), |c| c.get("/v1/vms").ok())?;
    as_op.post("/v1/vms/w/stop", &json!({})).map_err(|e| anyhow!("operator stop: {e}"))?;
    as_op.post("/v1/vms/w/start", &json!({})).map_err(|e| anyhow!("operator start: {e}"))?;
    assert!(as_op.get("/v1/vms").is_ok());
    for (method, path, body) in [
        ("POST", "/v1/vms", json!({ "name": "x", "vcpus": 1, "memory_mib": 64, "driver": { "kind": "process", "command": ["true"] } })),
        ("POST", "/v1/settings", json!({ "vcpu_overcommit_pct": 300 })),
        ("POST", "/v1/tokens", json!({ "name": "evil", "role": "admin" })),
        ("POST", "/v1/vms/w/start", json!({ "force": true })),
    ] {
        let (code, message) = status(as_op.call(method, path, Some(&body)));
        assert_eq!(code, 403, "{method} {path}: {message}");
        assert!(message.contains("'opal' is operator"), "{message}");
    }

    // Every change made through the API is in the timeline with the token that made it.
    let alice = c0.post("/v1/tokens", &json!({ "name": "alice", "role": "admin" })).map_err(|e| anyhow!("{e}"))?;
    let secret = alice["token"].as_str().ok_or_else(|| anyhow!("no token in {alice}"))?.to_string();
    let as_alice = Client::new(&lab.hosts[1].api).with_token(Some(secret));
    as_alice.wait_for(Duration::from_secs(10), Duration::from_millis(50), |c| c.get("/v1/vms").ok())?;
    as_alice.post("/v1/settings", &json!({ "vcpu_overcommit_pct": 200 })).map_err(|e| anyhow!("{e}"))?;
    as_alice.post("/v1/vms/w/stop", &json!({})).map_err(|e| anyhow!("{e}"))?;
    let events = lab.client(1).list("/v1/events?kind=api-change&limit=4096")?;
    let by_alice: Vec<&str> = events.iter().filter_map(|e| e["detail"].as_str()).filter(|d| d.contains("by token 'alice'")).collect();
    assert!(by_alice.iter().any(|d| d.starts_with("set-settings")), "{events:?}");
    assert!(by_alice.iter().any(|d| d.starts_with("set-power w")), "{events:?}");
    let on_h0 = c0.list("/v1/events?kind=api-change&limit=4096")?;
    assert!(on_h0.iter().any(|e| e["detail"].as_str().is_some_and(|d| d.starts_with("set-token alice by token 'cluster'"))), "{on_h0:?}");
    drop(lab);
    Ok(())
}

/// Six protected process VMs named PREFIX0.. started on a 3-host lab; the names placed on h1.
fn six_protected_vms(lab: &Lab, prefix: &str) -> Result<Vec<String>> {
    let c0 = lab.client(0);
    for i in 0..6 {
        let name = format!("{prefix}{i}");
        c0.post(
            "/v1/vms",
            &json!({ "name": name, "vcpus": 1, "memory_mib": 64, "protection": "protect",
                                    "driver": { "kind": "process", "command": ["sleep", "100000"] } }),
        )
        .map_err(|e| anyhow!("{e}"))?;
        c0.post(&format!("/v1/vms/{name}/start"), &json!({})).map_err(|e| anyhow!("{e}"))?;
    }
    c0.wait_for(Duration::from_secs(30), Duration::from_millis(100), |_| (lab.running().len() == 6).then_some(()))?;
    let on_h1: Vec<String> = lab.running().into_iter().filter(|(_, h)| h == "h1").map(|(v, _)| v).collect();
    assert!(!on_h1.is_empty(), "placement spreads six VMs over three hosts");
    Ok(on_h1)
}

/// SIGTERM (`systemctl stop`) with a request held open: the agent kills its VMs and confirms
/// their exits, announces its fence so the peers restart them at once, then stops its loops,
/// and exits within a bounded time although the request never completes. No VM runs twice.
#[test]
fn sigterm_gives_the_vms_up_before_the_agent_goes() -> Result<()> {
    let mut lab = Lab::new(LabOptions { loopback_net: 52, ..LabOptions::default() }, &binary())?;
    lab.start_all()?;
    lab.form_cluster()?;
    let c0 = lab.client(0);
    let on_h1 = six_protected_vms(&lab, "s")?;

    // A request that never completes: headers sent without their final blank line.
    let mut held = std::net::TcpStream::connect(&lab.hosts[1].api)?;
    held.write_all(b"GET /v1/status HTTP/1.1\r\nhost: x\r\n")?;
    let pid = lab.agent_pid(1).ok_or_else(|| anyhow!("h1 agent"))?;
    let t0 = std::time::Instant::now();
    // SAFETY: kill(2) on the agent process this lab started.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let emptied = c0.wait_for(Duration::from_secs(10), Duration::from_millis(20), |_| lab.running().values().all(|h| h != "h1").then(|| t0.elapsed()))?;
    let back = c0.wait_for(Duration::from_secs(30), Duration::from_millis(50), |_| {
        let running = lab.running();
        on_h1.iter().all(|v| running.get(v).is_some_and(|h| h != "h1")).then(|| t0.elapsed())
    })?;
    let exited = c0.wait_for(Duration::from_secs(20), Duration::from_millis(50), |_| lab.reap(1).then(|| t0.elapsed()))?;
    drop(held);
    let h1_events = std::fs::read_to_string(lab.hosts[1].data.join("events.jsonl")).unwrap_or_default();
    assert!(h1_events.contains("\"agent-stopping\"") && h1_events.contains("\"fence-confirmed\""), "{h1_events}");
    let mut decided = c0.list("/v1/events?kind=failover-decided&limit=4096")?;
    decided.extend(lab.client(2).list("/v1/events?kind=failover-decided&limit=4096")?);
    assert!(
        decided.iter().any(|e| e["subject"] == "h1" && e["detail"].as_str().is_some_and(|d| d.contains("reports itself fenced"))),
        "the peers must restart the VMs on h1's own word, not after its fence deadline: {decided:?}"
    );
    eprintln!(
        "SIGTERM: VMs killed after {:.2} s, back on the survivors after {:.2} s, agent exited after {:.2} s",
        emptied.as_secs_f64(),
        back.as_secs_f64(),
        exited.as_secs_f64()
    );
    lab.assert_no_double_run()?;
    Ok(())
}

/// SIGTERM under `[shutdown] policy = "migrate"`: the host enters maintenance and its VMs leave
/// live before the agent stops (none is killed to be restarted: every one moved by a completed
/// migration); started again, the host joins, leaves maintenance, and its VMs come back.
#[test]
fn sigterm_with_the_migrate_policy_moves_the_vms_live_and_they_come_back() -> Result<()> {
    let extra = "[shutdown]\npolicy = \"migrate\"\nevacuate_timeout_s = 60\n".to_string();
    let mut lab = Lab::new(LabOptions { loopback_net: 53, extra_config: extra, ..LabOptions::default() }, &binary())?;
    lab.start_all()?;
    lab.form_cluster()?;
    let c0 = lab.client(0);
    let on_h1 = six_protected_vms(&lab, "m")?;
    let pid = lab.agent_pid(1).ok_or_else(|| anyhow!("h1 agent"))?;
    // SAFETY: kill(2) on the agent process this lab started.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    c0.wait_for(Duration::from_secs(60), Duration::from_millis(50), |_| lab.reap(1).then_some(()))?;
    let h1_events = std::fs::read_to_string(lab.hosts[1].data.join("events.jsonl")).unwrap_or_default();
    let moved = h1_events.lines().filter(|l| l.contains("\"migration-completed\"")).count();
    assert_eq!(moved, on_h1.len(), "every VM of h1 left by a completed migration: {h1_events}");
    let running = lab.running();
    assert!(on_h1.iter().all(|v| running.get(v).is_some_and(|h| h != "h1")), "they run elsewhere: {running:?}");
    let mut vms: Vec<tandem_agent::views::VmView> = c0.list_as("/v1/vms")?;
    assert!(vms.iter().filter(|v| on_h1.contains(&v.name)).all(|v| v.home.as_deref() == Some("h1")), "they remember their home");
    // Back: it joins, leaves maintenance, and its VMs return.
    lab.start(1)?;
    c0.wait_for(Duration::from_secs(60), Duration::from_millis(200), |c| {
        vms = c.list_as("/v1/vms").ok()?;
        on_h1.iter().all(|n| vms.iter().any(|v| v.name == *n && v.host.as_deref() == Some("h1") && v.migrating_to.is_none())).then_some(())
    })?;
    let hosts: Vec<tandem_agent::views::HostView> = c0.list_as("/v1/hosts")?;
    assert!(hosts.iter().all(|h| h.mode == tandem_agent::views::HostMode::Normal), "h1 left maintenance");
    lab.assert_no_double_run()?;
    Ok(())
}
