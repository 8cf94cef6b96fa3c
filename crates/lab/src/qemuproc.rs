//! A bare QEMU process for the lab's benches and block-layer tests (no agent): spawned, its QMP
//! socket connected within a deadline, killed and reaped when dropped.

use anyhow::{anyhow, Context, Result};
use std::path::Path;
use std::time::{Duration, Instant};
use tandem_drivers::qmp::Qmp;

/// How long a fresh QEMU may take to answer on its QMP socket.
const QMP_CONNECT_DEADLINE: Duration = Duration::from_secs(10);

/// A QEMU process and its QMP session.
pub struct QemuProcess {
    child: std::process::Child,
    pub qmp: Qmp,
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl QemuProcess {
    /// Spawns `cmd` (which must serve QMP on `qmp_path`, `server=on,wait=off`) and connects to
    /// it; `timeout` bounds each QMP call.
    pub async fn spawn(mut cmd: std::process::Command, qmp_path: &Path, timeout: Duration) -> Result<QemuProcess> {
        let _ = std::fs::remove_file(qmp_path);
        // QEMU's own complaints (a block job's error is reported only there) go beside its
        // QMP socket, for the test that fails to show.
        let stderr = std::fs::File::create(qmp_path.with_extension("stderr")).map(std::process::Stdio::from).unwrap_or_else(|_| std::process::Stdio::null());
        let mut child = cmd.stdout(std::process::Stdio::null()).stderr(stderr).spawn().context("qemu-system-x86_64")?;
        let deadline = Instant::now() + QMP_CONNECT_DEADLINE;
        loop {
            match Qmp::connect(qmp_path, timeout, |_| {}).await {
                Ok(qmp) => return Ok(QemuProcess { child, qmp }),
                Err(e) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(anyhow!("QMP of QEMU at {}: {e}", qmp_path.display()));
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}
