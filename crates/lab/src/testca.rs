//! A throwaway certificate authority for tests that run the cluster on TLS: a CA and one agent
//! certificate naming every lab address, made with the `openssl` command.

use anyhow::{bail, Result};
use std::path::Path;
use std::process::Command;

/// Whether `openssl` can be run here. Outside CI a test without it skips; CI must have it.
#[must_use]
pub fn openssl_available() -> bool {
    let present = Command::new("openssl").arg("version").output().is_ok_and(|o| o.status.success());
    if !present {
        assert!(std::env::var("CI").is_err(), "CI must run the TLS tests: openssl missing");
        eprintln!("skipping: openssl is not installed");
    }
    present
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl").current_dir(dir).args(args).output()?;
    if !out.status.success() {
        bail!("openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Writes `ca.pem` (a CA called `cn`), and `agent.pem` and `agent.key`: one agent certificate
/// that names every address in `ips` and serves for both ends of a TLS connection (the agents'
/// QEMUs present it as migration clients too).
pub fn make_ca(dir: &Path, cn: &str, ips: &[String]) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    openssl(dir, &[&["req", "-x509"], &ec[..], &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", &format!("/CN={cn}")]].concat())?;
    openssl(dir, &[&["req"], &ec[..], &["-keyout", "agent.key", "-out", "agent.csr", "-subj", "/CN=tandem-agent"]].concat())?;
    let sans: Vec<String> = ips.iter().map(|ip| format!("IP:{ip}")).collect();
    std::fs::write(dir.join("ext.cnf"), format!("subjectAltName={}\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n", sans.join(",")))?;
    openssl(
        dir,
        &["x509", "-req", "-in", "agent.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "agent.pem", "-days", "2", "-extfile", "ext.cnf"],
    )
}

/// The agents' `[tls]` table for the files [`make_ca`] wrote to `dir`.
#[must_use]
pub fn tls_table(dir: &Path) -> String {
    format!("[tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n", dir.join("agent.pem").display(), dir.join("agent.key").display(), dir.join("ca.pem").display())
}
