//! The web dashboard in headless Chromium (Debian's `chromium`), driven over the DevTools
//! protocol: the page shows the cluster, and when a host loses power the same page — never
//! reloaded — shows it dead and its VMs on the survivors. A screenshot is kept in
//! `target/test-artifacts/dashboard.png`.

use anyhow::{anyhow, bail, Result};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tandem_lab::lab::{Lab, LabOptions};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tandem"))
}

/// A DevTools connection over a minimal WebSocket client (text frames, client-masked).
struct Devtools {
    sock: TcpStream,
    next_id: u64,
}

impl Devtools {
    fn connect(port: u16, path: &str) -> Result<Devtools> {
        let mut sock = TcpStream::connect(("127.0.0.1", port))?;
        sock.set_read_timeout(Some(Duration::from_secs(20)))?;
        write!(
            sock,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGFuZGVtLWRhc2hib2FyZA==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            sock.read_exact(&mut byte)?;
            head.push(byte[0]);
        }
        if !head.starts_with(b"HTTP/1.1 101") {
            bail!("no websocket upgrade: {}", String::from_utf8_lossy(&head));
        }
        Ok(Devtools { sock, next_id: 1 })
    }

    fn send(&mut self, text: &str) -> Result<()> {
        let data = text.as_bytes();
        let mut frame = vec![0x81u8];
        match data.len() {
            n if n < 126 => frame.push(0x80 | n as u8),
            n if n <= 0xffff => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        let mask = [0x5a, 0x17, 0xc3, 0x08];
        frame.extend_from_slice(&mask);
        frame.extend(data.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        Ok(self.sock.write_all(&frame)?)
    }

    fn receive(&mut self) -> Result<String> {
        let mut message = Vec::new();
        loop {
            let mut h = [0u8; 2];
            self.sock.read_exact(&mut h)?;
            let len = match h[1] & 0x7f {
                126 => {
                    let mut b = [0u8; 2];
                    self.sock.read_exact(&mut b)?;
                    u64::from(u16::from_be_bytes(b))
                }
                127 => {
                    let mut b = [0u8; 8];
                    self.sock.read_exact(&mut b)?;
                    u64::from_be_bytes(b)
                }
                n => u64::from(n),
            };
            let mut payload = vec![0u8; usize::try_from(len)?];
            self.sock.read_exact(&mut payload)?;
            message.extend_from_slice(&payload);
            if h[0] & 0x80 != 0 {
                return Ok(String::from_utf8(message)?);
            }
        }
    }

    /// Calls a DevTools method and returns its result.
    fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        self.send(&json!({ "id": id, "method": method, "params": params }).to_string())?;
        loop {
            let v: Value = serde_json::from_str(&self.receive()?)?;
            if v["id"] == id {
                if !v["error"].is_null() {
                    bail!("{method}: {}", v["error"]);
                }
                return Ok(v["result"].clone());
            }
        }
    }

    /// Evaluates a JavaScript expression in the page and returns its JSON value.
    fn eval(&mut self, expression: &str) -> Result<Value> {
        let r = self.call("Runtime.evaluate", json!({ "expression": expression, "returnByValue": true }))?;
        Ok(r["result"]["value"].clone())
    }
}

fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let digits: Vec<u8> = text.bytes().filter_map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, d)| acc | (u32::from(*d) << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}

/// Chromium, ended by PID when dropped.
struct Browser {
    child: Child,
    profile: PathBuf,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Chromium's helper processes may still write into the profile as they exit: retry.
        for _ in 0..20 {
            if std::fs::remove_dir_all(&self.profile).is_ok() || !self.profile.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

const VIEW: &str = "JSON.stringify({
  hosts: [...document.querySelectorAll('#hosts tbody tr[data-host]')].map(r => [r.dataset.host, r.querySelector('.liveness').textContent]),
  sites: [...document.querySelectorAll('#hosts tbody tr[data-site]')].map(r => [r.dataset.site, r.textContent]),
  vms: [...document.querySelectorAll('#vms tbody tr')].map(r => [r.dataset.vm, r.dataset.host]),
  ftt: document.getElementById('ftt').textContent,
  events: document.querySelectorAll('#events tbody tr').length,
  failovers: [...document.querySelectorAll('#failovers tbody tr')].map(r => [r.dataset.failover, r.cells[3].textContent]),
  status: document.getElementById('status').textContent })";

#[test]
fn dashboard_shows_the_cluster_and_follows_a_host_failure_live() -> Result<()> {
    if Command::new("chromium").arg("--version").output().is_err() {
        // scripts/test.sh installs it; only a developer machine without it may skip.
        assert!(std::env::var("CI").is_err(), "CI must run the dashboard test: chromium missing");
        eprintln!("skipping: chromium is not installed");
        return Ok(());
    }
    // Each host in its own site: the page groups them, each under what its site's loss would do.
    let sites = ["north", "south", "west"].map(String::from).to_vec();
    let mut lab = Lab::new(LabOptions { loopback_net: 38, sites, ..LabOptions::default() }, &binary())?;
    lab.start_all()?;
    lab.form_cluster()?;
    let c = lab.client(0);
    for name in ["d1", "d2", "d3"] {
        let spec = json!({ "name": name, "vcpus": 1, "memory_mib": 128, "protection": "protect",
                           "driver": { "kind": "process", "command": ["sleep", "1000000"] } });
        c.post("/v1/vms", &spec).map_err(|e| anyhow!("{e}"))?;
        c.post(&format!("/v1/vms/{name}/start"), &json!({})).map_err(|e| anyhow!("{e}"))?;
    }
    let profile = std::env::temp_dir().join(format!("tandem-chromium-{}", std::process::id()));
    std::fs::create_dir_all(&profile)?;
    let url = format!("http://{}/#token={}", lab.hosts[0].api, lab.token());
    let child = Command::new("chromium")
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--remote-debugging-port=0", "--window-size=1280,1000"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(&url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let browser = Browser { child, profile };
    // Chromium writes the port it chose into DevToolsActivePort.
    let end = Instant::now() + Duration::from_secs(30);
    let port: u16 = loop {
        if let Some(p) = std::fs::read_to_string(browser.profile.join("DevToolsActivePort")).ok().and_then(|t| t.lines().next()?.parse().ok()) {
            break p;
        }
        if Instant::now() > end {
            bail!("chromium did not open its DevTools port");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let list = rt.block_on(tandem_agent::httpc::request(None, "GET", &format!("127.0.0.1:{port}"), "/json/list", None, None, Duration::from_secs(5)))?;
    let targets: Value = serde_json::from_slice(&list.body)?;
    let ws = targets
        .as_array()
        .into_iter()
        .flatten()
        .find(|t| t["type"] == "page")
        .and_then(|t| t["webSocketDebuggerUrl"].as_str())
        .ok_or_else(|| anyhow!("no page target in {targets}"))?;
    let path = ws.split_once(&format!("127.0.0.1:{port}")).map(|(_, p)| p.to_string()).ok_or_else(|| anyhow!("odd url {ws}"))?;
    let mut dt = Devtools::connect(port, &path)?;
    let view = |dt: &mut Devtools| -> Result<Value> { Ok(serde_json::from_str(dt.eval(VIEW)?.as_str().unwrap_or("{}"))?) };
    let wait = |dt: &mut Devtools, what: &str, ok: &dyn Fn(&Value) -> bool| -> Result<Value> {
        let end = Instant::now() + Duration::from_secs(40);
        loop {
            let v = view(dt)?;
            if ok(&v) {
                return Ok(v);
            }
            if Instant::now() > end {
                bail!("the page never showed {what}: {v}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    let host_of = |v: &Value, vm: &str| v["vms"].as_array().into_iter().flatten().find(|r| r[0] == vm).and_then(|r| r[1].as_str().map(str::to_string));
    let liveness_of = |v: &Value, h: &str| v["hosts"].as_array().into_iter().flatten().find(|r| r[0] == h).and_then(|r| r[1].as_str().map(str::to_string));
    // The cluster as the page shows it: three hosts alive, three VMs placed, FTT, a timeline.
    let before = wait(&mut dt, "three live hosts and three placed VMs", &|v| {
        v["hosts"].as_array().map(Vec::len) == Some(3)
            && ["h1", "h2"].iter().all(|h| liveness_of(v, h).as_deref() == Some("alive"))
            && ["d1", "d2", "d3"].iter().all(|vm| host_of(v, vm).is_some_and(|h| !h.is_empty()))
            && v["ftt"] != "–"
            && v["events"].as_u64() > Some(0)
            && v["sites"].as_array().is_some_and(|s| s.len() == 3 && s.iter().all(|r| r[1].as_str().is_some_and(|t| t.ends_with("its loss is survived"))))
    })?;
    // Power off a host other than the one serving the page, holding a VM if one does.
    let victim = ["h1", "h2"].into_iter().find(|h| ["d1", "d2", "d3"].iter().any(|vm| host_of(&before, vm).as_deref() == Some(*h))).unwrap_or("h2");
    let victim_index = lab.hosts.iter().position(|h| h.name == victim).ok_or_else(|| anyhow!("victim"))?;
    lab.power_off(victim_index);
    let moved = ["d1", "d2", "d3"].iter().filter(|vm| host_of(&before, vm).as_deref() == Some(victim)).count();
    let after = wait(&mut dt, &format!("{victim} dead, its VMs elsewhere, and its failover's phases"), &|v| {
        liveness_of(v, victim).as_deref() == Some("dead")
            && ["d1", "d2", "d3"].iter().all(|vm| host_of(v, vm).is_some_and(|h| !h.is_empty() && h != victim))
            && v["failovers"].as_array().into_iter().flatten().any(|r| {
                let words = r[1].as_str().unwrap_or_default();
                r[0] == victim && words.contains("committed +") && words.contains(&format!("{moved} of {moved} started"))
            })
    })?;
    eprintln!("before: {before}\nafter: {after}");
    let shot = dt.call("Page.captureScreenshot", json!({ "format": "png" }))?;
    let png = base64_decode(shot["data"].as_str().unwrap_or_default());
    assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/test-artifacts");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("dashboard.png"), &png)?;
    drop(browser);
    lab.assert_no_double_run()
}
