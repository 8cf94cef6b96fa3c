//! The serving half of site mirroring on a host: a host of another site asks this one to serve
//! its site's copy of a disk (`POST /v1/internal/copies`, with the generation it runs the VM
//! in); committed state must show the VM running in that generation at another site. Each
//! mirror pass, the exports whose VM no longer runs so are withdrawn — every export when this
//! host is not joined (fenced: it serves nobody).

use super::{lock, Agent};
use crate::views::{CopyEndpoint, CopyRequest};
use std::time::Duration;
use tandem_drivers::sitecopy::export_name;

/// How long a host asked to serve a copy waits for its committed state to show the VM running
/// in the asker's generation.
pub const COPY_APPLY_WAIT: Duration = Duration::from_secs(3);

impl Agent {
    /// The serving side of `POST /v1/internal/copies`: serves this site's copy of a disk of a
    /// VM that runs at another site in the asker's generation, or says why not.
    pub async fn serve_copy(&self, req: &CopyRequest) -> Result<CopyEndpoint, String> {
        let me = self.me;
        let deadline = tokio::time::Instant::now() + COPY_APPLY_WAIT;
        let relative = loop {
            let found = self.consensus.with_state(|s| {
                let my_site = s.hosts.get(&me).and_then(|h| h.site.clone()).ok_or("this host has no site")?;
                let v = s.vms.get(&req.name).ok_or("unknown VM")?;
                let disk = v.spec.disks.get(req.disk).filter(|d| d.mirror).ok_or("no such mirrored disk")?;
                let a = v.assignment().filter(|a| a.generation == req.generation).ok_or("not running in that generation")?;
                if s.hosts.get(&a.host).and_then(|h| h.site.as_ref()) == Some(&my_site) {
                    return Err("it runs at this host's own site");
                }
                Ok(disk.path.clone())
            });
            match found {
                Ok(path) => break path,
                Err(why) if tokio::time::Instant::now() >= deadline => {
                    return Err(format!("committed state refuses to serve {} disk {}: {why}", req.name, req.disk))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        };
        let export = export_name(&req.name, req.disk);
        let served_at = self.driver.serve_copy(&export, &relative, req.bytes).await.map_err(|e| crate::api::chain(&e))?;
        let address = self.cfg.mirror.advertise.map_or(served_at, |a| a.to_string());
        lock(&self.mirroring).served.insert(export.clone(), (req.name.clone(), req.generation));
        Ok(CopyEndpoint { address, export })
    }

    /// Withdraws every served copy whose VM no longer runs, in that generation, at another
    /// site — all of them on a host that is not joined (fenced: it serves nobody).
    pub(super) async fn sweep_served_copies(&self) {
        let me = self.me;
        let joined = self.status().joined_epoch.is_some();
        let served: Vec<(String, (String, u64))> = lock(&self.mirroring).served.iter().map(|(e, v)| (e.clone(), v.clone())).collect();
        for (export, (vm, generation)) in served {
            let keep = joined
                && self.consensus.with_state(|s| {
                    let my_site = s.hosts.get(&me).and_then(|h| h.site.clone());
                    s.vms
                        .get(&vm)
                        .and_then(|v| v.assignment())
                        .filter(|a| a.generation == generation)
                        .is_some_and(|a| s.hosts.get(&a.host).and_then(|h| h.site.clone()) != my_site)
                });
            if keep {
                continue;
            }
            match self.driver.withdraw_copy(&export).await {
                Ok(_) => {
                    lock(&self.mirroring).served.remove(&export);
                    tracing::info!("stopped serving {export}: {vm} no longer runs in generation {generation} at another site");
                }
                Err(e) => tracing::warn!("withdrawing {export}: {}", crate::api::chain(&e)),
            }
        }
    }
}
