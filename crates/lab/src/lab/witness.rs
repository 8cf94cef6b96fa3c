//! The lab's network witness: `tandem witness` serving the lab's cluster (named `lab`) from a
//! directory of its own, on an address of its own (in a namespace of its own when the hosts
//! are in namespaces), started and killed by the test like an agent.

use super::{kill_pid, Lab};
use anyhow::{Context, Result};
use std::path::Path;
use std::process::{Command, Stdio};

/// Where the lab's witness listens, and the namespace it runs in (if any).
#[derive(Clone, Debug)]
pub struct NetWitnessOptions {
    /// `ip:port`.
    pub addr: String,
    pub netns: Option<String>,
    /// Its certificate and key, to serve over TLS (the agents then need `[tls]` with its CA).
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// The cluster name the lab's witness serves it under.
pub const CLUSTER: &str = "lab";

impl NetWitnessOptions {
    /// The `[witness]` table of every agent's configuration.
    #[must_use]
    pub fn agent_table(&self) -> String {
        format!("[witness]\naddress = \"{}\"\ncluster = \"{CLUSTER}\"\n", self.addr)
    }

    /// Writes `ROOT/witness/witness.toml` (the witness's data beside it).
    pub fn write_config(&self, root: &Path, shared: &Path) -> Result<()> {
        let dir = root.join("witness");
        std::fs::create_dir_all(&dir)?;
        let tls = self.tls.as_ref().map(|(cert, key)| format!("tls = {{ cert = \"{}\", key = \"{}\" }}\n", cert.display(), key.display())).unwrap_or_default();
        let text = format!(
            "listen = \"{}\"\ndata_dir = \"{}\"\n{tls}[[cluster]]\nname = \"{CLUSTER}\"\nsecret_file = \"{}\"\n",
            self.addr,
            dir.join("data").display(),
            shared.join("secret").display()
        );
        std::fs::write(dir.join("witness.toml"), text)?;
        Ok(())
    }
}

impl Lab {
    /// Starts the network witness (its log: `ROOT/witness/witness.log`).
    pub fn start_witness(&mut self) -> Result<()> {
        let opts = self.opts.network_witness.clone().context("this lab has no network witness")?;
        let dir = self.root.join("witness");
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("witness.log"))?;
        let mut cmd = match &opts.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.binary);
                c
            }
            None => Command::new(&self.binary),
        };
        cmd.arg("witness").arg("--config").arg(dir.join("witness.toml")).env("TANDEM_LAB", &self.id).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        self.witness = Some(cmd.spawn().context("starting the witness")?);
        // Listening before the agents start (they start without it, but the tests mean to
        // begin with a cluster that has its witness).
        let addr: std::net::SocketAddr = opts.addr.parse().context("the witness's address")?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_millis(200)).is_err() {
            anyhow::ensure!(std::time::Instant::now() < deadline, "the witness does not listen on {addr} (its log: {})", dir.join("witness.log").display());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Ok(())
    }

    /// Kills the network witness (SIGKILL: the machine it runs on is lost).
    pub fn kill_witness(&mut self) {
        if let Some(mut c) = self.witness.take() {
            kill_pid(c.id());
            let _ = c.wait();
        }
    }
}
