//! The QEMU driver's side of mirrored disks between sites: serving this site's copies (the copy
//! server, started on first use), each running VM's mirror into another site's copy through a
//! relay of its own, and the storage path switch to that copy and back.

use super::QemuDriver;
use crate::DriverError;
use std::path::Path;
use std::sync::Arc;

impl QemuDriver {
    /// Serves this site's copies of mirrored disks on `port` with `binary`
    /// (`qemu-storage-daemon`), and reaches other sites' copies, through the copy channel with
    /// `credentials`.
    #[must_use]
    pub fn with_copy_server(mut self, port: u16, binary: &str, credentials: Arc<crate::copychannel::CopyCredentials>) -> QemuDriver {
        self.copy_settings = Some((port, binary.to_string(), credentials));
        self
    }

    /// Serves this site's copy of a mirrored disk (`relative` to `site_disk_dir`, created empty
    /// of `bytes` if missing) as `export`; the copy server's `host:port`.
    pub(super) async fn serve_site_copy(&self, export: &str, relative: &str, bytes: u64) -> Result<String, DriverError> {
        let Some((port, binary, credentials)) = &self.copy_settings else {
            return Err(DriverError::Unsupported { driver: "qemu", what: "serve copies of mirrored disks (no [mirror] settings)" });
        };
        let path = crate::diskcopy::local_path(Path::new(&self.cfg.site_disk_dir), relative);
        // Storage that hangs would hold the copy server (all of this host's copies) in the open.
        if self.probes.probe(&path).await == crate::pathswitch::ProbeAnswer::Hangs {
            let reason = format!("this site's storage does not answer a read of {} within {:?}", path.display(), crate::pathswitch::PROBE_TIMEOUT);
            return Err(DriverError::Refused { vm: export.to_string(), reason });
        }
        match std::fs::metadata(&path) {
            Ok(m) if m.len() != bytes => {
                return Err(DriverError::Refused {
                    vm: export.to_string(),
                    reason: format!("this site's copy {} has {} bytes, the disk {bytes}", path.display(), m.len()),
                })
            }
            Ok(_) => {}
            Err(_) => crate::diskcopy::create_image(export, &self.cfg.img_binary, &path, "raw", bytes).await?,
        }
        let mut server = self.copy_server.lock().await;
        if !server.as_mut().is_some_and(crate::sitecopy::CopyServer::is_running) {
            // The old one (and its gate's port) goes first.
            *server = None;
            let cfg = crate::sitecopy::CopyServerConfig {
                binary: binary.clone(),
                run_dir: self.run_dir.clone(),
                host_ip: self.host_ip.clone(),
                port: *port,
                credentials: Arc::clone(credentials),
            };
            *server = Some(crate::sitecopy::CopyServer::start(&cfg, &self.launcher).await?);
        }
        let running = server.as_ref().ok_or(DriverError::Unsupported { driver: "qemu", what: "start its copy server" })?;
        // No other server of the copy — a VM's local copy server stuck in storage that hung
        // included, whose late writes would land behind the mirror —, and while it is served
        // none but the destination of a live move of the VM to this site (which runs on this
        // copy once the source, paused, has written its last through this server).
        let claimed = self.claims().contains_key(export);
        if !claimed {
            // After a live move the source's server is about to exit: waited for, a moment.
            let claim = crate::localcopy::claim_within(&path, crate::localcopy::ClaimKind::Sole, crate::localcopy::HELD_CLAIM_WAIT).await?;
            self.claims().insert(export.to_string(), claim);
        }
        if let Err(e) = running.serve(export, &path).await {
            self.claims().remove(export);
            return Err(e.into());
        }
        Ok(running.endpoint().to_string())
    }

    fn claims(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, crate::localcopy::CopyClaim>> {
        self.copy_claims.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Stops serving `export`; the exports served now are returned.
    pub(super) async fn withdraw_site_copy(&self, export: &str) -> Result<Vec<String>, DriverError> {
        let server = self.copy_server.lock().await;
        let served = match server.as_ref() {
            Some(running) => {
                running.withdraw(export).await?;
                running.served().await
            }
            None => Vec::new(),
        };
        // Closed (or its server gone): the copy is free for another server.
        self.claims().remove(export);
        Ok(served)
    }

    /// The exports served now.
    pub(super) async fn site_copies(&self) -> Vec<String> {
        match self.copy_server.lock().await.as_ref() {
            Some(s) => s.served().await,
            None => Vec::new(),
        }
    }

    /// Starts the mirror of `to.disk` into another site's copy, through a relay of its own that
    /// compares the first copy's writes with the chunk sums of that copy when its server can
    /// sum it (else every byte is copied).
    pub(super) async fn attach_site_mirror(&self, name: &str, to: &crate::syncmirror::MirrorTarget) -> Result<crate::syncmirror::FirstCopy, DriverError> {
        let q = self.session(name).await.ok_or_else(|| DriverError::NotRunning(name.to_string()))?;
        // A mirror left from before (the agent lost track of it) goes first.
        let _ = crate::syncmirror::detach(name, &q, self.qmp_timeout(), to.disk).await;
        let Some((_, _, credentials)) = &self.copy_settings else {
            return Err(DriverError::Unsupported { driver: "qemu", what: "mirror disks into other sites' copies (no [mirror] settings)" });
        };
        let socket = self.run_dir.join(format!("mirror{}.sock", self.next_relay.fetch_add(1, std::sync::atomic::Ordering::SeqCst)));
        let relay = Arc::new(
            crate::copyrelay::CopyRelay::start(&socket, &to.server, to.stall, Arc::clone(credentials))
                .map(|r| r.waking(Arc::clone(&self.mirror_events)))
                .map_err(|source| DriverError::Spawn { vm: name.to_string(), source })?,
        );
        self.relays().insert((name.to_string(), to.disk), Arc::clone(&relay));
        let (first, granularity) = match relay.compare_with_copy(&to.export, to.bytes).await {
            Ok(sums) => (crate::syncmirror::FirstCopy::ByChunkSums { chunk: sums.chunk(), chunks: sums.sums().len() as u64 }, Some(sums.chunk())),
            Err(e) => (crate::syncmirror::FirstCopy::Whole { why: crate::copychannel::chain(&e) }, None),
        };
        let copy = crate::syncmirror::RemoteCopy { disk: to.disk, relay: socket, export: to.export.clone(), granularity, speed: to.resync_cap };
        crate::syncmirror::attach(name, &q, self.qmp_timeout(), &copy).await?;
        Ok(first)
    }

    /// The mirror of `disk`, the mirror back (after a path switch) and the relay, sampled.
    pub(super) async fn site_mirror_status(&self, name: &str, disk: usize) -> Result<crate::syncmirror::MirrorStatus, DriverError> {
        use tandem_core::mirroring::RelayPhase;
        let q = self.session(name).await.ok_or_else(|| DriverError::NotRunning(name.to_string()))?;
        // The mirror and, after a storage path failover, the mirror back: one question.
        let jobs = crate::syncmirror::jobs(name, &q, self.qmp_timeout()).await?;
        let job = crate::syncmirror::judge(&jobs, disk);
        let back = crate::pathswitch::back_sample(name, &q, self.qmp_timeout(), disk, &jobs).await?;
        let relay = self.relays().get(&(name.to_string(), disk)).cloned();
        // Caught up: writes are sent as they come again, and what the comparison did is told
        // once, with the sample that finds the copy in sync.
        let delta = match (&relay, &job) {
            (Some(r), crate::syncmirror::MirrorSample::InSync) => r.end_delta(),
            (Some(r), _) => r.delta_stats(),
            (None, _) => None,
        };
        let health = relay.as_ref().map(|r| r.health());
        let (relay, lost) = match health {
            None => (RelayPhase::None, None),
            Some(crate::copyrelay::RelayHealth::Idle | crate::copyrelay::RelayHealth::Joined) => (RelayPhase::Open, None),
            Some(crate::copyrelay::RelayHealth::Lost { why, .. }) => (RelayPhase::Lost, Some(why)),
            Some(crate::copyrelay::RelayHealth::Released) => (RelayPhase::Released, None),
        };
        Ok(crate::syncmirror::MirrorStatus { job, back, relay, lost, delta })
    }

    /// Lets the writes held for `disk`'s other copy go (its copy is committed stale).
    pub(super) fn release_site_mirror(&self, name: &str, disk: usize) {
        if let Some(r) = self.relays().get(&(name.to_string(), disk)) {
            r.release();
        }
    }

    /// Points `disk`'s relay at `server` and resumes the stopped mirror.
    pub(super) async fn resume_site_mirror(&self, name: &str, disk: usize, server: &str) -> Result<(), DriverError> {
        if let Some(r) = self.relays().get(&(name.to_string(), disk)) {
            r.set_upstream(server);
        }
        let q = self.session(name).await.ok_or_else(|| DriverError::NotRunning(name.to_string()))?;
        Ok(crate::syncmirror::resume(name, &q, self.qmp_timeout(), disk).await?)
    }

    /// Ends `disk`'s mirror and drops its relay.
    pub(super) async fn detach_site_mirror(&self, name: &str, disk: usize) -> Result<(), DriverError> {
        let q = self.session(name).await.ok_or_else(|| DriverError::NotRunning(name.to_string()))?;
        crate::syncmirror::detach(name, &q, self.qmp_timeout(), disk).await?;
        self.relays().remove(&(name.to_string(), disk));
        Ok(())
    }

    /// The disks whose own storage failed a request (the guest paused on it).
    pub(super) async fn storage_failed_disks(&self, name: &str) -> Result<Vec<usize>, DriverError> {
        let q = self.session(name).await.ok_or_else(|| DriverError::NotRunning(name.to_string()))?;
        Ok(crate::pathswitch::failed_disks(name, &q, self.qmp_timeout()).await?)
    }

    /// Runs `disk` on the other site's copy (its mirror completed) and resumes the guest.
    pub(super) async fn switch_disk_to_copy(&self, name: &str, disk: usize) -> Result<(), DriverError> {
        let q = self.session(name).await.ok_or_else(|| DriverError::NotRunning(name.to_string()))?;
        crate::pathswitch::switch_to_copy(name, &q, self.qmp_timeout(), disk).await?;
        // (Another disk whose storage failed too pauses the guest again at its next
        // request: switched in a later pass.)
        Ok(crate::pathswitch::resume(name, &q, self.qmp_timeout()).await?)
    }

    /// One step of `disk`'s way back to this site's copy.
    pub(super) async fn return_disk_to_local(&self, name: &str, disk: usize, step: &crate::pathswitch::ReturnStep) -> Result<(), DriverError> {
        let q = self.session(name).await.ok_or_else(|| DriverError::NotRunning(name.to_string()))?;
        let local = match step {
            crate::pathswitch::ReturnStep::Start { relative, .. } | crate::pathswitch::ReturnStep::Retry { relative } => {
                let path = crate::diskcopy::local_path(Path::new(&self.cfg.site_disk_dir), relative);
                if !self.probes.answers(&path).await {
                    let path = path.display().to_string();
                    return Err(crate::pathswitch::PathSwitchError::NotAnswering { vm: name.to_string(), disk, path }.into());
                }
                match step {
                    crate::pathswitch::ReturnStep::Start { .. } => self.local_copy_for_return(name, disk, relative).await?,
                    _ => serde_json::Value::Null,
                }
            }
            _ => serde_json::Value::Null,
        };
        Ok(crate::pathswitch::return_step(name, &q, self.qmp_timeout(), disk, step, &local).await?)
    }
}
