//! The API over TLS: agents serve HTTPS with certificates from a test CA and talk to each other
//! over it (consensus, joins, forwarding); the CLI verifies them with `--ca`; plain HTTP and an
//! unknown CA are refused.

use anyhow::{anyhow, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use tandem_lab::lab::{Lab, LabOptions};
use tandem_lab::testca::{make_ca, openssl_available, tls_table};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tandem"))
}

/// Removes the certificate directory however the test ends.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn agents_serve_and_call_each_other_over_tls() -> Result<()> {
    if !openssl_available() {
        return Ok(());
    }
    let net = 39;
    let guard = TempDir(std::env::temp_dir().join(format!("tandem-tls-{}", std::process::id())));
    let dir = guard.0.clone();
    let other = dir.join("other");
    std::fs::create_dir_all(&other)?;
    let ips: Vec<String> = (0..3).map(|i| format!("127.{net}.0.{}", 10 + i)).collect();
    make_ca(&dir, "tandem-test-ca", &ips)?;
    make_ca(&other, "someone-else", &ips)?;
    let tls = tls_table(&dir);
    let opts = LabOptions { loopback_net: net, extra_config: tls, ca: Some(dir.join("ca.pem")), ..LabOptions::default() };
    let mut lab = Lab::new(opts, &binary())?;
    lab.start_all()?;
    // Joining hosts and electing a leader both go agent to agent, over TLS.
    lab.form_cluster()?;
    let c = lab.client(1);
    let spec = json!({ "name": "t1", "vcpus": 1, "memory_mib": 64, "protection": "protect",
                       "driver": { "kind": "process", "command": ["sleep", "1000000"] } });
    // Written through a follower or the leader alike (forwarding is TLS too).
    c.post("/v1/vms", &spec).map_err(|e| anyhow!("{e}"))?;
    c.post("/v1/vms/t1/start", &json!({})).map_err(|e| anyhow!("{e}"))?;
    c.wait_for(std::time::Duration::from_secs(20), std::time::Duration::from_millis(100), |_| lab.running().contains_key("t1").then_some(()))?;

    let cli = |ca: Option<&Path>, args: &[&str]| {
        let mut cmd = Command::new(binary());
        cmd.arg("--api").arg(&lab.hosts[0].api).env("TANDEM_TOKEN", lab.token());
        if let Some(ca) = ca {
            cmd.arg("--ca").arg(ca);
        }
        cmd.args(args).output().expect("run CLI")
    };
    let out = cli(Some(&dir.join("ca.pem")), &["--output", "json", "vm", "list"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let vms: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(vms[0]["name"], "t1");
    // Plain HTTP to a TLS port, and a certificate from another CA: no answer (exit code 3).
    let out = cli(None, &["vm", "list"]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let out = cli(Some(&other.join("ca.pem")), &["vm", "list"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("certificate"), "{}", String::from_utf8_lossy(&out.stderr));
    // A CA file that is not PEM is a usage error.
    let out = cli(Some(&dir.join("ext.cnf")), &["vm", "list"]);
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    lab.assert_no_double_run()
}
