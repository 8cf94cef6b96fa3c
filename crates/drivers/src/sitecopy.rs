//! This site's copies of site-mirrored disks, served to the other site over NBD: one
//! `qemu-storage-daemon` per host (QEMU's own block layer, without a guest), started on first
//! use, exporting — writable, one export per (VM, disk) — the image that this site's storage
//! holds for a VM that runs in the other site. The VM's QEMU there mirrors every write into it
//! (see `syncmirror`).
//!
//! The daemon opens each image with QEMU's image locking, as a VM's QEMU would: while a copy is
//! served nobody at this site can start the VM on it, and a served copy is withdrawn
//! (`withdraw`) before the VM starts here. The daemon is forked by the launcher thread, so it
//! dies with the agent.
//!
//! The daemon's NBD server listens on a unix socket only; the network side is the copy gate
//! (`copychannel`), which lets through only relays that prove they hold the cluster secret.

use crate::copychannel::{CopyCredentials, CopyGate};
use crate::launcher::Launcher;
use crate::qmp::{Qmp, QmpError};
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;

/// How long the daemon may take to answer on its QMP socket after it was started.
pub const COPY_SERVER_START_DEADLINE: Duration = Duration::from_secs(10);
/// Timeout of each QMP call to the daemon.
pub const COPY_SERVER_QMP_TIMEOUT: Duration = Duration::from_secs(5);
/// The most copies one host serves at once.
pub const MAX_SERVED_COPIES: usize = 1024;

/// Errors of the copy server.
#[derive(Debug, Error)]
pub enum SiteCopyError {
    #[error("could not start the copy server ({binary})")]
    Spawn {
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the copy server did not answer on {socket} within {COPY_SERVER_START_DEADLINE:?}")]
    NoAnswer {
        socket: String,
        #[source]
        source: QmpError,
    },
    #[error("the copy server refused to {what}")]
    Qmp {
        what: String,
        #[source]
        source: QmpError,
    },
    #[error("the copy gate could not listen on {addr}")]
    Gate {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the copy server already serves {MAX_SERVED_COPIES} copies")]
    Full,
    #[error("the copy {path} does not exist at this site")]
    Missing { path: String },
}

/// Where and how the copy server listens.
#[derive(Clone, Debug)]
pub struct CopyServerConfig {
    /// `qemu-storage-daemon`.
    pub binary: String,
    /// Its QMP socket and pid file go here.
    pub run_dir: PathBuf,
    /// The copy gate's address (this host's cluster address) and port.
    pub host_ip: String,
    pub port: u16,
    /// What the gate asks of a relay (and shows it in turn).
    pub credentials: Arc<CopyCredentials>,
}

/// The name under which disk `disk` of `vm` is exported.
#[must_use]
pub fn export_name(vm: &str, disk: usize) -> String {
    format!("{vm}-disk{disk}")
}

/// A running copy server.
pub struct CopyServer {
    child: std::process::Child,
    exports: Arc<Exports>,
    /// The network side, which ends with the server.
    _gate: CopyGate,
    endpoint: String,
}

/// The daemon's exports, shared with the gate (which sums a copy, `chunksums`).
struct Exports {
    qmp: Qmp,
    /// Export name → the image it serves.
    served: std::sync::Mutex<BTreeMap<String, PathBuf>>,
    /// Held while an export is added or removed: one change at a time.
    changing: tokio::sync::Mutex<()>,
}

impl Drop for CopyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qmp_err(what: impl Into<String>) -> impl FnOnce(QmpError) -> SiteCopyError {
    let what = what.into();
    move |source| SiteCopyError::Qmp { what, source }
}

impl CopyServer {
    /// Starts the daemon (forked by `launcher`, so it dies with the agent) and connects to it.
    pub async fn start(cfg: &CopyServerConfig, launcher: &Launcher) -> Result<CopyServer, SiteCopyError> {
        std::fs::create_dir_all(&cfg.run_dir).map_err(|source| SiteCopyError::Spawn { binary: cfg.binary.clone(), source })?;
        let socket = cfg.run_dir.join("copy-server.qmp");
        let pidfile = cfg.run_dir.join("copy-server.pid");
        kill_stale(&pidfile);
        let _ = std::fs::remove_file(&socket);
        // Plain NBD on a unix socket: the gate in front authenticates (and, with TLS, encrypts);
        // the relay in front of the mirror reads the conversation (`copyrelay`).
        let nbd_socket = cfg.run_dir.join("copy-server.nbd");
        let _ = std::fs::remove_file(&nbd_socket);
        let nbd = format!("addr.type=unix,addr.path={}", nbd_socket.display());
        let mut cmd = std::process::Command::new(&cfg.binary);
        cmd.args(["--chardev", &format!("socket,id=qmp,path={},server=on,wait=off", socket.display())])
            .args(["--monitor", "chardev=qmp", "--nbd-server", &nbd])
            .arg("--pidfile")
            .arg(&pidfile)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(cfg.run_dir.join("copy-server.stderr")).map_or(std::process::Stdio::null(), std::process::Stdio::from));
        let mut child = launcher.spawn_helper(cmd).map_err(|source| SiteCopyError::Spawn { binary: cfg.binary.clone(), source })?;
        let deadline = tokio::time::Instant::now() + COPY_SERVER_START_DEADLINE;
        let qmp = loop {
            match Qmp::connect(&socket, COPY_SERVER_QMP_TIMEOUT, |_| {}).await {
                Ok(q) => break q,
                Err(source) if tokio::time::Instant::now() >= deadline || matches!(child.try_wait(), Ok(Some(_))) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(SiteCopyError::NoAnswer { socket: socket.display().to_string(), source });
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let endpoint = format!("{}:{}", cfg.host_ip, cfg.port);
        let exports = Arc::new(Exports { qmp, served: std::sync::Mutex::default(), changing: tokio::sync::Mutex::new(()) });
        let quiet = Arc::clone(&exports);
        let sums: crate::copychannel::SumsSource = Arc::new(move |export: String| {
            let quiet = Arc::clone(&quiet);
            Box::pin(async move { quiet.quiesce(&export).await.map_err(|e| crate::copychannel::chain(&e)) })
        });
        let gate = match CopyGate::start(&endpoint, &nbd_socket, Arc::clone(&cfg.credentials), Some(sums)).await {
            Ok(g) => g,
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(SiteCopyError::Gate { addr: endpoint, source });
            }
        };
        let endpoint = gate.addr().to_string();
        Ok(CopyServer { child, exports, _gate: gate, endpoint })
    }

    /// The copy gate's `host:port` (the port the system chose, if `port` was 0).
    #[must_use]
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The daemon's process id.
    #[must_use]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the daemon is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Serves `image` (which must exist) as `export`, writable. Serving the same image under the
    /// same name again is a no-op.
    pub async fn serve(&self, export: &str, image: &Path) -> Result<(), SiteCopyError> {
        let e = &self.exports;
        let _changing = e.changing.lock().await;
        let (same, count, other) = {
            let served = lock(&e.served);
            (served.get(export).is_some_and(|p| p == image), served.len(), served.contains_key(export))
        };
        if same {
            return Ok(());
        }
        if count >= MAX_SERVED_COPIES {
            return Err(SiteCopyError::Full);
        }
        if !image.exists() {
            return Err(SiteCopyError::Missing { path: image.display().to_string() });
        }
        if other {
            lock(&e.served).remove(export);
            e.remove(export).await?;
        }
        e.add(export, image).await?;
        lock(&e.served).insert(export.to_string(), image.to_path_buf());
        Ok(())
    }

    /// Stops serving `export` and closes its image (its lock is released): the VM may start on
    /// this copy. Withdrawing a copy that is not served is a no-op.
    pub async fn withdraw(&self, export: &str) -> Result<(), SiteCopyError> {
        let e = &self.exports;
        let _changing = e.changing.lock().await;
        let was = lock(&e.served).remove(export);
        if was.is_some() {
            e.remove(export).await?;
        }
        Ok(())
    }

    /// The exports served now.
    pub async fn served(&self) -> Vec<String> {
        lock(&self.exports.served).keys().cloned().collect()
    }
}

impl Exports {
    /// Opens `image` and exports it, writable, as `export`, writing through: each write is
    /// flushed to stable storage before it is answered. The guest makes its writes durable with
    /// flushes, and QEMU's mirror passes a flush to the local copy alone, so without this a
    /// write the guest acknowledged could sit in this storage's volatile cache and be lost with
    /// its power — while committed state still counts this copy current.
    async fn add(&self, export: &str, image: &Path) -> Result<(), SiteCopyError> {
        let node = json!({"driver": "raw", "node-name": node_name(export),
            "file": {"driver": "file", "filename": image.display().to_string(), "cache": {"direct": true}}});
        self.qmp.execute("blockdev-add", node, COPY_SERVER_QMP_TIMEOUT).await.map_err(qmp_err(format!("open {}", image.display())))?;
        let add = json!({"type": "nbd", "id": export, "node-name": node_name(export), "name": export, "writable": true, "writethrough": true});
        if let Err(e) = self.qmp.execute("block-export-add", add, COPY_SERVER_QMP_TIMEOUT).await {
            let _ = self.qmp.execute("blockdev-del", json!({"node-name": node_name(export)}), COPY_SERVER_QMP_TIMEOUT).await;
            return Err(qmp_err(format!("export {export}"))(e));
        }
        Ok(())
    }

    /// Makes sure no write can still reach a served copy that was sent before now, and says
    /// which image it is: the export is withdrawn — its clients cut off, and the image closed
    /// only once every request they had sent has completed — then served again. A resync sums
    /// the copy after this, so that the sums say what the copy holds until its own mirror
    /// writes (a connection of an earlier mirror, cut off by the source's host but with writes
    /// still on their way here, would otherwise change a chunk behind the sums).
    async fn quiesce(&self, export: &str) -> Result<PathBuf, SiteCopyError> {
        let _changing = self.changing.lock().await;
        let image = lock(&self.served).get(export).cloned().ok_or_else(|| SiteCopyError::Missing { path: format!("export {export}") })?;
        self.remove(export).await?;
        if let Err(e) = self.add(export, &image).await {
            lock(&self.served).remove(export);
            return Err(e);
        }
        Ok(image)
    }

    async fn remove(&self, export: &str) -> Result<(), SiteCopyError> {
        // `hard`: a client still connected (the other site's QEMU) is cut off at once.
        let del = json!({"id": export, "mode": "hard"});
        match self.qmp.execute("block-export-del", del, COPY_SERVER_QMP_TIMEOUT).await {
            Ok(_) => {}
            Err(QmpError::Command { .. }) => {} // not exported any more
            Err(e) => return Err(qmp_err(format!("withdraw {export}"))(e)),
        }
        // The export goes away asynchronously; its node can be closed once it has.
        let deadline = tokio::time::Instant::now() + COPY_SERVER_QMP_TIMEOUT;
        loop {
            match self.qmp.execute("blockdev-del", json!({"node-name": node_name(export)}), COPY_SERVER_QMP_TIMEOUT).await {
                Ok(_) => return Ok(()),
                Err(e @ QmpError::Command { .. }) if tokio::time::Instant::now() >= deadline => return Err(qmp_err(format!("close {export}"))(e)),
                Err(QmpError::Command { .. }) => tokio::time::sleep(Duration::from_millis(20)).await,
                Err(e) => return Err(qmp_err(format!("close {export}"))(e)),
            }
        }
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn node_name(export: &str) -> String {
    format!("copy-{export}")
}

/// A daemon left by an earlier agent of this host (one killed before it could end it) still
/// holds its images' locks: it is ended before a new one starts.
fn kill_stale(pidfile: &Path) {
    let Some(pid) = std::fs::read_to_string(pidfile).ok().and_then(|s| s.trim().parse::<i32>().ok()) else { return };
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    if comm.trim_end() == "qemu-storage-d" || comm.trim_end() == "qemu-storage-daemon" {
        // SAFETY: kill(2) with a pid read from our own pid file, checked to be the daemon.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
        }
    }
}
