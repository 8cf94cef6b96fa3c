//! The QEMU driver's side of local copy servers (`localcopy`): one per running mirrored disk,
//! started before its QEMU (a start's, a migration destination's, a way back's), cut when its
//! storage hangs, ended with the VM.

use super::QemuDriver;
use crate::localcopy::{ClaimKind, LocalCopyServer, LocalServerPhase};
use crate::DriverError;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use tandem_core::mirroring::LocalReach;
use tandem_core::state::VmSpec;

impl QemuDriver {
    /// Serves mirrored disks' own copies through local copy servers (`on`, the default), or
    /// lets QEMU open them itself (one hop less per request; a hang is then answered by a
    /// restart elsewhere, not a switch).
    #[must_use]
    pub fn with_local_copy_servers(mut self, on: bool) -> QemuDriver {
        self.local_copy_servers = on;
        self
    }

    fn serves_local_copies(&self) -> bool {
        self.local_copy_servers && self.copy_settings.is_some()
    }

    fn local_copies(&self) -> std::sync::MutexGuard<'_, HashMap<(String, usize), LocalCopyServer>> {
        self.local_copies.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Where this site's copy of a mirrored disk (`relative`) lives.
    pub(super) fn site_copy_path(&self, relative: &str) -> PathBuf {
        crate::diskcopy::local_path(Path::new(&self.cfg.site_disk_dir), relative)
    }

    /// Starts a local copy server for each mirrored disk of `spec`, each claiming its copy as
    /// `kind` says; their sockets by disk. None without `[mirror]` settings or with the servers
    /// off (QEMU then opens the copies itself).
    pub(super) async fn serve_local_copies(&self, spec: &VmSpec, kind: ClaimKind) -> Result<BTreeMap<usize, PathBuf>, DriverError> {
        let mut sockets = BTreeMap::new();
        if !self.serves_local_copies() {
            return Ok(sockets);
        }
        for (i, d) in spec.mirrored_disks() {
            match self.serve_local_copy(&spec.name, i, &d.path, kind).await {
                Ok(socket) => {
                    sockets.insert(i, socket);
                }
                Err(e) => {
                    self.end_local_copies(&spec.name);
                    return Err(e);
                }
            }
        }
        Ok(sockets)
    }

    /// Starts disk `disk` of `vm`'s local copy server on `relative`, claimed as `kind`; its
    /// socket. An earlier one of the disk is ended first (a stuck one keeps its claim, and the
    /// new claim then fails until it has exited).
    async fn serve_local_copy(&self, vm: &str, disk: usize, relative: &str, kind: ClaimKind) -> Result<PathBuf, DriverError> {
        let Some((_, binary, _)) = &self.copy_settings else {
            return Err(DriverError::Unsupported { driver: "qemu", what: "serve a VM's own copies (no [mirror] settings)" });
        };
        let key = (vm.to_string(), disk);
        let mut replaced = self.local_copies().remove(&key);
        if let Some(old) = replaced.as_mut() {
            old.end_within(crate::localcopy::REPLACED_SERVER_EXIT_WAIT).await;
        }
        let image = self.site_copy_path(relative);
        // Storage that hangs would hold the claim's open (a thread each try): read first, at
        // most one read per copy in flight however often this is tried.
        let claimed = if self.probes.probe(&image).await == crate::pathswitch::ProbeAnswer::Hangs {
            Err(crate::localcopy::LocalCopyError::NoAnswer { path: image.display().to_string() })
        } else {
            crate::localcopy::claim(&image, kind).await
        };
        let claim = match claimed {
            Ok(c) => c,
            Err(e) => {
                // Kept (a stuck one lingers): the disk's copy stays out of reach, not "direct".
                if let Some(old) = replaced {
                    self.local_copies().insert(key, old);
                }
                return Err(e.into());
            }
        };
        drop(replaced);
        // Short: a unix socket's path is at most 107 bytes.
        let socket = self.run_dir.join(format!("lc{}.nbd", self.next_relay.fetch_add(1, std::sync::atomic::Ordering::SeqCst)));
        let server = LocalCopyServer::start(binary, &self.launcher, &image, &socket, claim).await?;
        self.local_copies().insert(key, server);
        Ok(socket)
    }

    /// Ends `vm`'s local copy servers (a stuck one is reaped whenever it exits).
    pub(super) fn end_local_copies(&self, vm: &str) {
        let ended: Vec<LocalCopyServer> = {
            let mut servers = self.local_copies();
            let keys: Vec<(String, usize)> = servers.keys().filter(|(v, _)| v == vm).cloned().collect();
            keys.iter().filter_map(|k| servers.remove(k)).collect()
        };
        drop(ended);
    }

    /// Ends every local copy server (the host fences itself).
    pub(super) fn end_all_local_copies(&self) {
        let ended: Vec<LocalCopyServer> = self.local_copies().drain().map(|(_, s)| s).collect();
        drop(ended);
    }

    /// How `vm`'s QEMU reaches disk `disk`'s own copy.
    pub(super) fn local_reach_of(&self, vm: &str, disk: usize) -> LocalReach {
        match self.local_copies().get_mut(&(vm.to_string(), disk)).map(LocalCopyServer::phase) {
            None => LocalReach::Direct,
            Some(LocalServerPhase::Serving) => LocalReach::Served,
            Some(LocalServerPhase::Cut | LocalServerPhase::Gone) => LocalReach::Cut,
        }
    }

    /// Cuts disk `disk` of `vm` from its local copy server: QEMU's NBD client fails what it has
    /// in flight at once (the guest pauses on it: `werror=stop`), and the server is killed.
    pub(super) async fn cut_local_copy(&self, vm: &str, disk: usize) -> Result<(), DriverError> {
        let q = self.session(vm).await.ok_or_else(|| DriverError::NotRunning(vm.to_string()))?;
        let refused = |reason: String| DriverError::Refused { vm: vm.to_string(), reason };
        let socket = self.local_copies().get(&(vm.to_string(), disk)).map(|s| s.socket().display().to_string());
        let socket = socket.ok_or_else(|| refused(format!("disk {disk} has no local copy server to cut")))?;
        // The client is found by the server it talks to (the way back names its own).
        let qmp = |source| DriverError::Qmp { vm: vm.to_string(), source };
        let nodes = q.execute("query-named-block-nodes", json!({"flat": true}), self.qmp_timeout()).await.map_err(qmp)?;
        let node = crate::localcopy::client_of(&nodes, &socket).ok_or_else(|| refused(format!("no NBD client of disk {disk}'s local copy server")))?;
        let yank = json!({"instances": [{"type": "block-node", "node-name": node}]});
        q.execute("yank", yank, self.qmp_timeout()).await.map_err(qmp)?;
        if let Some(s) = self.local_copies().get_mut(&(vm.to_string(), disk)) {
            s.cut();
        }
        Ok(())
    }

    /// The node options of disk `disk`'s own copy (`relative`) for the way back: through a new
    /// local copy server, which claims the copy sole — refused while a server cut from it is
    /// still stuck there, whose writes could land after the way back copied. Without local
    /// copy servers, the file itself.
    pub(super) async fn local_copy_for_return(&self, vm: &str, disk: usize, relative: &str) -> Result<Value, DriverError> {
        if !self.serves_local_copies() {
            return Ok(crate::pathswitch::file_node(&self.site_copy_path(relative)));
        }
        let socket = self.serve_local_copy(vm, disk, relative, ClaimKind::Sole).await?;
        Ok(json!({"driver": "nbd", "export": crate::localcopy::LOCAL_EXPORT, "server": {"type": "unix", "path": socket.display().to_string()}}))
    }
}
