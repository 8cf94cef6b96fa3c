//! The QEMU guest agent, for a clean shutdown the guest itself carries out. A VM whose spec says
//! `guest_agent` gets a virtio-serial port named `org.qemu.guest_agent.0`, whose host end is a
//! Unix socket beside its QMP socket. A stop connects there, sends `guest-sync` with a fresh id
//! and waits (bounded) for that id to come back — the protocol's way to skip stale answers and
//! to learn that an agent listens at all — then `guest-shutdown`, which the agent does not
//! answer. A guest whose agent does not answer in time gets the ACPI power button instead.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// How long the guest agent gets to answer `guest-sync`.
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest answer line read from a guest agent (a guest is not trusted to bound it).
pub const MAX_ANSWER_LEN: usize = 4096;

/// Why the guest agent could not be asked.
#[derive(Debug, Error)]
pub enum QgaError {
    #[error("guest agent socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("guest agent socket {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no guest agent answered on {path} within {timeout:?}")]
    Silent { path: String, timeout: Duration },
    #[error("the guest agent on {path} sent a line longer than {MAX_ANSWER_LEN} bytes")]
    Overlong { path: String },
}

/// Where VM `name`'s guest-agent socket is, in the driver's run directory.
#[must_use]
pub fn socket_path(run_dir: &Path, name: &str) -> PathBuf {
    run_dir.join(format!("{name}.qga"))
}

/// The QEMU options of a guest-agent channel on `bus` (`device` for microvm's virtio-mmio,
/// `pci` otherwise), its host end at `socket`.
#[must_use]
pub fn channel_args(socket: &Path, bus: &str) -> Vec<String> {
    vec![
        "-chardev".into(),
        format!("socket,id=qga0,path={},server=on,wait=off", crate::qemu::escape_option_value(&socket.display().to_string())),
        "-device".into(),
        format!("virtio-serial-{bus},id=vser0"),
        "-device".into(),
        "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0".into(),
    ]
}

/// Makes every `guest-sync` id of this process distinct.
static SYNC_IDS: AtomicU64 = AtomicU64::new(1);

/// Asks the guest agent at `socket` to power the guest off: `Ok` once the agent answered the
/// sync and the shutdown request was sent (the guest's exit is the caller's to wait for).
pub async fn shutdown(socket: &Path, timeout: Duration) -> Result<(), QgaError> {
    let path = socket.display().to_string();
    let io = |source| QgaError::Io { path: path.clone(), source };
    let stream = match tokio::time::timeout(timeout, tokio::net::UnixStream::connect(socket)).await {
        Ok(Ok(s)) => s,
        Ok(Err(source)) => return Err(QgaError::Connect { path, source }),
        Err(_) => return Err(QgaError::Silent { path, timeout }),
    };
    let (read, mut write) = stream.into_split();
    // A process-wide counter mixed with the process id: a stale answer from an earlier
    // connection cannot carry it.
    let id = (u64::from(std::process::id()) << 32) | (SYNC_IDS.fetch_add(1, Ordering::Relaxed) & 0xffff_ffff);
    // Older agents may hold a partial command from someone else: a 0xFF byte resets their parser.
    write.write_all(&[0xff]).await.map_err(io)?;
    write.write_all(format!("{{\"execute\":\"guest-sync\",\"arguments\":{{\"id\":{id}}}}}\n").as_bytes()).await.map_err(io)?;
    let mut lines = BufReader::new(read);
    let synced = async {
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut lines).take(MAX_ANSWER_LEN as u64 + 1).read_until(b'\n', &mut line).await.map_err(io)?;
            if n == 0 {
                return Err(QgaError::Silent { path: path.clone(), timeout });
            }
            if n > MAX_ANSWER_LEN {
                return Err(QgaError::Overlong { path: path.clone() });
            }
            let answer: Option<serde_json::Value> = serde_json::from_slice(&line).ok();
            if answer.as_ref().and_then(|a| a.get("return")).and_then(serde_json::Value::as_u64) == Some(id) {
                return Ok(());
            }
        }
    };
    match tokio::time::timeout(timeout, synced).await {
        Ok(r) => r?,
        Err(_) => return Err(QgaError::Silent { path, timeout }),
    }
    write.write_all(b"{\"execute\":\"guest-shutdown\",\"arguments\":{\"mode\":\"powerdown\"}}\n").await.map_err(io)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent that answers the sync gets the shutdown request; a socket where nobody
    /// answers, or a stale answer, is `Silent` within the timeout (the caller then presses the
    /// power button).
    #[tokio::test]
    async fn the_shutdown_is_sent_only_after_the_agent_echoed_the_fresh_sync_id() {
        let dir = std::env::temp_dir().join(format!("tandem-qga-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = socket_path(&dir, "vm");
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).expect("bind");
        let agent = tokio::spawn(async move {
            // First connection: a stale answer, then silence.
            let (mut s, _) = listener.accept().await.expect("accept");
            s.write_all(b"{\"return\": 7}\n").await.expect("write");
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf).await;
            // Second: a real agent.
            let (s, _) = listener.accept().await.expect("accept");
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            let mut line = Vec::new();
            r.read_until(b'\n', &mut line).await.expect("sync");
            // The parser reset byte comes first.
            assert_eq!(line.first(), Some(&0xff));
            let v: serde_json::Value = serde_json::from_slice(&line[1..]).expect("json");
            let id = v["arguments"]["id"].as_u64().expect("id");
            w.write_all(format!("{{\"return\": {id}}}\n").as_bytes()).await.expect("answer");
            line.clear();
            r.read_until(b'\n', &mut line).await.expect("shutdown");
            String::from_utf8_lossy(&line).to_string()
        });
        let silent = shutdown(&path, Duration::from_millis(300)).await;
        assert!(matches!(silent, Err(QgaError::Silent { .. })), "{silent:?}");
        shutdown(&path, Duration::from_secs(2)).await.expect("agent answered");
        let request = agent.await.expect("agent");
        assert!(request.contains("guest-shutdown") && request.contains("powerdown"), "{request}");
        let missing = shutdown(&dir.join("none.qga"), Duration::from_millis(300)).await;
        assert!(matches!(missing, Err(QgaError::Connect { .. })), "{missing:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
