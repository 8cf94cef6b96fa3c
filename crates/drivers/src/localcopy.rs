//! Each mirrored disk's own site copy, served to its VM's QEMU by a `qemu-storage-daemon` of its
//! own — the *local copy server* — over a unix socket (NBD), instead of opened by QEMU itself.
//!
//! Why: storage that hangs. QEMU's file driver has no timeout, and nothing takes back a request
//! that waits in hung storage (whatever would — a switch, a `blockdev-del` — drains it first), so
//! a guest on hung storage could only be restarted elsewhere. QEMU's NBD client can be *cut*
//! (QMP `yank` on its node): every request it has in flight fails at once, and a mirrored disk,
//! opened with `werror=stop`, pauses the guest on the failure — which it never sees — and
//! switches to the other site's copy like after any failed request (`pathswitch`). The requests
//! that were cut reached neither copy (the write-blocking mirror writes the local copy first).
//!
//! A cut server is killed, but it may live on, stuck in the storage, and *its requests may still
//! land* when the storage answers again — after the cut, on a copy that is stale by then. So
//! nothing may write that copy again until the stuck server has exited: every server of a copy
//! — a VM's local copy server, and this site's copy server while it serves the copy to the
//! other site — holds a *claim* on it, an open-file-description lock on one byte of the image
//! ([`CLAIM_BYTE`], past QEMU's own lock bytes), which the kernel releases only when the last
//! process holding it has exited. A local copy server inherits its claim (so a stuck one keeps
//! it); the copy server's is held by the agent (the copy server dies with it). A server that
//! begins to write a copy — a VM starting on it, a way back into it, the copy server — takes it
//! sole (no other holder, on any host of the site whose storage shares the lock), then shares
//! it with one kind of joiner only: a live migration's destination, which shares it with the
//! server its source writes through (the source's own local copy server within the site; the
//! copy server its mirror writes through, from another site). (QEMU's own image locks cannot
//! say this: an NBD export shares every permission, so two exports of an image never conflict.)

use crate::launcher::Launcher;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;
use thiserror::Error;

/// The byte of an image whose lock is the claim: past the bytes QEMU's image locking uses
/// (100 and 200 onwards, one per permission).
pub const CLAIM_BYTE: i64 = 0x7a_4e44;
/// How long opening an image and taking its claim may take (its storage may hang: the attempt
/// is then given up, its thread left to end with the storage).
pub const CLAIM_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a local copy server may take to listen.
pub const LOCAL_SERVER_START_DEADLINE: Duration = Duration::from_secs(10);
/// How long a new server of a disk waits for the one it replaces to exit.
pub const REPLACED_SERVER_EXIT_WAIT: Duration = Duration::from_secs(1);
/// How long the copy server waits for a copy held by another server before it refuses to serve
/// it: right after a live move, the source's server of the copy is about to exit (its QEMU is
/// ended once the switchover is committed), and the new host's mirror asks for the copy at once.
pub const HELD_CLAIM_WAIT: Duration = Duration::from_secs(1);
/// How often a claim held by another server is tried again meanwhile.
const HELD_CLAIM_POLL: Duration = Duration::from_millis(50);
/// The export every local copy server serves its one image under.
pub const LOCAL_EXPORT: &str = "local";

/// Errors of a local copy server and of claims.
#[derive(Debug, Error)]
pub enum LocalCopyError {
    #[error("the copy {path} is held by another of its servers — a VM's on this or another host of the site, the copy server, or one stuck in storage that hung, whose late writes may still land")]
    Held { path: String },
    #[error("could not open the copy {path} to claim it")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the storage of the copy {path} does not answer")]
    NoAnswer { path: String },
    #[error("could not start the local copy server of {path} ({binary})")]
    Spawn {
        path: String,
        binary: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the local copy server of {path} did not listen within {LOCAL_SERVER_START_DEADLINE:?}: {stderr}")]
    NotListening { path: String, stderr: String },
}

/// How a server claims a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClaimKind {
    /// A server that begins to write the copy (a VM's start, a way back, the copy server): no
    /// other server may hold it; then shared with the destination of a live migration.
    Sole,
    /// The destination of a live migration: shared with the server the source writes the copy
    /// through until the switchover (its local copy server, or the copy server of the site the
    /// VM moves to).
    Shared,
}

/// A claim on a copy, held while this value (or a process that inherited it) lives.
#[derive(Debug)]
pub struct CopyClaim {
    fd: OwnedFd,
}

/// Takes `kind` of claim on the image at `path`.
pub async fn claim(path: &Path, kind: ClaimKind) -> Result<CopyClaim, LocalCopyError> {
    let owned = path.to_path_buf();
    let taking = tokio::task::spawn_blocking(move || claim_blocking(&owned, kind));
    match tokio::time::timeout(CLAIM_TIMEOUT, taking).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(LocalCopyError::Open { path: path.display().to_string(), source: std::io::Error::other(e) }),
        Err(_) => Err(LocalCopyError::NoAnswer { path: path.display().to_string() }),
    }
}

/// Takes `kind` of claim on the image at `path`, trying again while another server holds it, up
/// to `wait` (its storage not answering ends the attempt at once).
pub async fn claim_within(path: &Path, kind: ClaimKind, wait: Duration) -> Result<CopyClaim, LocalCopyError> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match claim(path, kind).await {
            Err(LocalCopyError::Held { .. }) if tokio::time::Instant::now() < deadline => tokio::time::sleep(HELD_CLAIM_POLL).await,
            other => return other,
        }
    }
}

fn claim_blocking(path: &Path, kind: ClaimKind) -> Result<CopyClaim, LocalCopyError> {
    let shown = || path.display().to_string();
    let file = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(|source| LocalCopyError::Open { path: shown(), source })?;
    let fd = OwnedFd::from(file);
    let first = if kind == ClaimKind::Shared { libc::F_RDLCK } else { libc::F_WRLCK };
    set_lock(&fd, first).map_err(|e| match e.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => LocalCopyError::Held { path: shown() },
        _ => LocalCopyError::Open { path: shown(), source: e },
    })?;
    if kind == ClaimKind::Sole {
        // Alone now: shared from here on, so that a migration's destination can join.
        set_lock(&fd, libc::F_RDLCK).map_err(|source| LocalCopyError::Open { path: shown(), source })?;
    }
    Ok(CopyClaim { fd })
}

/// An open-file-description lock of `kind` on [`CLAIM_BYTE`], without waiting.
fn set_lock(fd: &OwnedFd, kind: i32) -> std::io::Result<()> {
    // SAFETY: a zeroed `flock` is a valid value of the plain C struct.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = CLAIM_BYTE;
    fl.l_len = 1;
    // SAFETY: fcntl(2) on a descriptor we own, with a pointer to a live `flock`.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &fl) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Where a local copy server stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LocalServerPhase {
    /// Serving its copy to the VM's QEMU.
    Serving,
    /// Its connection was cut (its storage hung) and it was killed; it may still live, stuck.
    Cut,
    /// It exited (by itself, or after the cut): the VM's node on it can never answer again.
    Gone,
}

/// A running local copy server.
pub struct LocalCopyServer {
    /// `None` once reaped.
    child: Option<std::process::Child>,
    socket: PathBuf,
    cut: bool,
}

impl LocalCopyServer {
    /// Serves `image` on the unix socket `socket` with `binary` (`qemu-storage-daemon`),
    /// forked by `launcher` (so it dies with the agent), inheriting `claim`.
    pub async fn start(binary: &str, launcher: &Launcher, image: &Path, socket: &Path, claim: CopyClaim) -> Result<LocalCopyServer, LocalCopyError> {
        let shown = image.display().to_string();
        let pidfile = socket.with_extension("pid");
        let stderr_path = socket.with_extension("stderr");
        for stale in [socket, pidfile.as_path()] {
            let _ = std::fs::remove_file(stale);
        }
        let escape = |p: &Path| p.display().to_string().replace(',', ",,");
        let mut cmd = std::process::Command::new(binary);
        cmd.args(["--blockdev", &format!("driver=file,node-name=copy,filename={},cache.direct=on", escape(image))])
            .args(["--nbd-server", &format!("addr.type=unix,addr.path={}", escape(socket))])
            .args(["--export", &format!("type=nbd,id={LOCAL_EXPORT},node-name=copy,name={LOCAL_EXPORT},writable=on")])
            .arg("--pidfile")
            .arg(&pidfile)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).map_or(std::process::Stdio::null(), std::process::Stdio::from));
        let fd = claim.fd.as_raw_fd();
        // SAFETY: fcntl(2) is async-signal-safe; `fd` is open in the child (the parent holds it
        // until the spawn returned). Cleared in the child only, so no other child inherits it.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = launcher.spawn_helper(cmd).map_err(|source| LocalCopyError::Spawn { path: shown.clone(), binary: binary.to_string(), source })?;
        // The server holds the claim now (its own descriptor); ours goes.
        drop(claim);
        let mut server = LocalCopyServer { child: Some(child), socket: socket.to_path_buf(), cut: false };
        // The daemon writes its pid file once its export and NBD server are up.
        let deadline = tokio::time::Instant::now() + LOCAL_SERVER_START_DEADLINE;
        while !pidfile.exists() {
            if tokio::time::Instant::now() >= deadline || server.phase() == LocalServerPhase::Gone {
                let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
                return Err(LocalCopyError::NotListening { path: shown, stderr: stderr.trim().to_string() });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(server)
    }

    /// The unix socket QEMU's NBD client connects to.
    #[must_use]
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Where it stands (reaping it if it exited).
    pub fn phase(&mut self) -> LocalServerPhase {
        let running = match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        };
        if !running {
            self.child = None;
            return LocalServerPhase::Gone;
        }
        if self.cut {
            LocalServerPhase::Cut
        } else {
            LocalServerPhase::Serving
        }
    }

    /// Kills it and waits up to `bound` for it to exit (and its claim with it).
    pub async fn end_within(&mut self, bound: Duration) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
        }
        let deadline = tokio::time::Instant::now() + bound;
        while self.phase() != LocalServerPhase::Gone && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Kills it after its client's connection was cut: whatever it still holds may land
    /// until it has exited (its claim lasts as long).
    pub fn cut(&mut self) {
        self.cut = true;
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
        }
    }
}

impl Drop for LocalCopyServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            // Reaped on a thread of its own: a server stuck in hung storage exits only when the
            // storage lets it go, and nothing here waits for that.
            let reaped = std::thread::Builder::new().name("tandem-local-copy-reaper".into()).spawn(move || {
                let _ = c.wait();
            });
            if let Err(e) = reaped {
                tracing::warn!("a local copy server is left unreaped: {e}");
            }
        }
        for file in [self.socket.clone(), self.socket.with_extension("pid"), self.socket.with_extension("stderr")] {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// The node name of disk `disk`'s NBD client on its local copy server, as a VM starts.
#[must_use]
pub fn client_node(disk: usize) -> String {
    format!("tandem-lc{disk}")
}

/// The NBD client node, in a `query-named-block-nodes` answer (`flat`), that talks to the
/// server on `socket`.
#[must_use]
pub fn client_of(nodes: &serde_json::Value, socket: &str) -> Option<String> {
    use serde_json::Value;
    let talks_to = |n: &Value| {
        n.get("drv").and_then(Value::as_str) == Some("nbd")
            && (n.get("file").and_then(Value::as_str).is_some_and(|f| f.contains(socket))
                || n.pointer("/image/filename").and_then(Value::as_str).is_some_and(|f| f.contains(socket)))
    };
    nodes.as_array()?.iter().find(|n| talks_to(n)).and_then(|n| n.get("node-name")?.as_str()).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Claims on one image: a sole claim (a VM's start, the copy server) excludes any other
    /// holder and then shares with a migration's destination only; a claim goes with its holder.
    #[tokio::test]
    async fn claims_exclude_each_other_as_their_kinds_say() {
        let scratch = crate::testdir::TestDir::new("tandem-claims");
        let dir = scratch.path();
        let image = dir.join("a.img");
        std::fs::write(&image, [0u8; 4096]).expect("image");
        let held = |r: Result<CopyClaim, LocalCopyError>| matches!(r, Err(LocalCopyError::Held { .. }));
        let vm = claim(&image, ClaimKind::Sole).await.expect("a sole claim on a free copy");
        assert!(held(claim(&image, ClaimKind::Sole).await), "a second start on the copy, or the copy server while a VM runs on it");
        let destination = claim(&image, ClaimKind::Shared).await.expect("a migration's destination shares it");
        drop(vm);
        assert!(held(claim(&image, ClaimKind::Sole).await), "the destination still holds it");
        drop(destination);
        let server = claim(&image, ClaimKind::Sole).await.expect("free again: the copy server takes it");
        assert!(held(claim(&image, ClaimKind::Sole).await), "no VM starts on a copy being served");
        let destination = claim(&image, ClaimKind::Shared).await.expect("a live move to the copy's site joins the copy server");
        drop(server);
        assert!(held(claim(&image, ClaimKind::Sole).await), "the destination, now running, still holds it");
        drop(destination);
        assert!(claim(&image, ClaimKind::Sole).await.is_ok());
        // A holder about to go: waited for, within the bound.
        let going = claim(&image, ClaimKind::Sole).await.expect("free");
        assert!(held(claim_within(&image, ClaimKind::Sole, Duration::from_millis(120)).await), "held past the wait");
        let release = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(150)).await;
            drop(going);
        });
        assert!(claim_within(&image, ClaimKind::Sole, HELD_CLAIM_WAIT).await.is_ok(), "the holder went within the wait");
        release.await.expect("released");
        let missing = claim(&dir.join("none.img"), ClaimKind::Sole).await;
        assert!(matches!(missing, Err(LocalCopyError::Open { .. })), "{missing:?}");
    }
}
