//! Injecting one fault: the kind drawn from the seed (or `--only`), its target and hold, what the
//! world does, and the healing — and, for the faults that must move a cut-off host's VMs, the
//! check that they did. The faults that stop a host or part of it are in `stalls`; the planned
//! operations (live migration, maintenance) in `planned`.

use super::*;

impl Sim {
    /// One fault, drawn from the seed; returns after it healed.
    pub(super) async fn fault(&mut self) {
        let kinds = if self.two_with_witness() {
            fault_kinds_with_witness()
        } else if self.opts.sites.is_empty() {
            fault_kinds()
        } else {
            fault_kinds_with_sites()
        };
        let drawn = kinds[self.rand(kinds.len() as u64) as usize];
        let mut kind = self.opts.only.unwrap_or(drawn);
        let late = self.hosts.iter().position(|h| !h.member).map(|i| i as u32);
        if kind == FaultKind::HostJoin && late.is_none() {
            kind = FaultKind::Operator;
        }
        let n = self.hosts.len() as u32;
        let up = self.up();
        let target = up.get(self.rand(up.len() as u64) as usize).copied().unwrap_or(0);
        let hold = Duration::from_millis(3_000 + self.rand(9_000));
        let now = self.world.now_ms();
        let until = now + hold.as_millis() as u64 + 15_000;
        *self.faults.entry(kind.name()).or_default() += 1;
        let w = Arc::clone(&self.world);
        match kind {
            FaultKind::PartitionFull | FaultKind::PartitionOneWay => {
                // The host whose VMs must move: the one cut off, or with two hosts the higher id.
                let loser = if self.two_with_witness() { self.link_cut_loser() } else { target };
                let before = self.vms_on(loser).await;
                w.log(format!("FAULT {kind} h{target} for {hold:?}"));
                {
                    let mut c = lock(&w.cond);
                    for o in (0..n).filter(|o| *o != target) {
                        c.blocked.insert((target, o));
                        if kind == FaultKind::PartitionFull {
                            c.blocked.insert((o, target));
                        }
                    }
                }
                self.excuse(&[target], until);
                self.run_for(hold).await;
                if hold.as_millis() as u64 > 9_000 && !before.is_empty() {
                    // The majority has had time to fence-wait and restart them: they must run.
                    if kind == FaultKind::PartitionFull || loser != target {
                        self.check_moved_off(loser, &before, &format!("{kind} of h{target}")).await;
                    }
                    self.recoveries.owe(now, format!("{kind} of h{target}"), &self.restartable(&before), &[]);
                }
                lock(&w.cond).blocked.clear();
                w.log(format!("HEAL {kind} h{target}"));
            }
            FaultKind::PartitionPair => {
                let other = (target + 1 + self.rand(u64::from(n - 1)) as u32) % n;
                w.log(format!("FAULT {kind} h{target} <-/-> h{other} for {hold:?}"));
                {
                    let mut c = lock(&w.cond);
                    c.blocked.insert((target, other));
                    c.blocked.insert((other, target));
                }
                self.excuse(&[target, other], until);
                self.run_for(hold).await;
                lock(&w.cond).blocked.clear();
                w.log(format!("HEAL {kind}"));
            }
            FaultKind::GuestShutdownInPartition => {
                // A guest on a follower powers off as the follower is cut off: the follower's
                // reconcile pass forwards the stop to the leader and waits for the forward's
                // timeout, while the follower fences, the majority fails it over, the cut heals
                // and it rejoins. The pass then goes on with what it read before all that.
                let leader = self.leader().await;
                let mut follower: Option<(u32, Vec<String>)> = None;
                for h in up.iter().copied().filter(|h| Some(*h) != leader) {
                    let on = self.vms_on(h).await;
                    if follower.as_ref().is_none_or(|(_, best)| on.len() > best.len()) {
                        follower = Some((h, on));
                    }
                }
                let Some((f, on)) = follower else { return };
                let Some(victim) = on.first().cloned() else { return };
                let hold = Duration::from_millis(6_000 + self.rand(2_000));
                w.log(format!("FAULT {kind}: {victim} on h{f} shuts down as h{f} is cut off for {hold:?}"));
                self.recoveries.forgive(&victim);
                self.hosts[f as usize].driver.guest_shutdown(&victim);
                self.isolate(f, false);
                self.excuse(&[f], now + hold.as_millis() as u64 + 15_000);
                self.run_for(hold).await;
                lock(&w.cond).blocked.clear();
                w.log(format!("HEAL {kind} h{f}"));
                self.run_for(Duration::from_secs(6)).await;
            }
            FaultKind::MessageLoss => {
                w.log(format!("FAULT {kind}: one datagram in three lost for {hold:?}"));
                lock(&w.cond).loss_permille = 333;
                self.run_for(hold).await;
                lock(&w.cond).loss_permille = 0;
                w.log(format!("HEAL {kind}"));
            }
            FaultKind::DuplicationAndDelay => {
                w.log(format!("FAULT {kind}: 10% duplicated, up to 150 ms delay for {hold:?}"));
                {
                    let mut c = lock(&w.cond);
                    c.dup_permille = 100;
                    c.max_delay_ms = 150;
                }
                self.run_for(hold).await;
                {
                    let mut c = lock(&w.cond);
                    c.dup_permille = 0;
                    c.max_delay_ms = 2;
                }
                w.log(format!("HEAL {kind}"));
            }
            FaultKind::DiskErrorOne | FaultKind::DiskHangOne | FaultKind::DiskErrorAll => {
                let mode = if kind == FaultKind::DiskHangOne { DiskMode::Hang } else { DiskMode::Fail };
                let hosts: Vec<u32> = if kind == FaultKind::DiskErrorAll { (0..n).collect() } else { vec![target] };
                w.log(format!("FAULT {kind} {hosts:?} for {hold:?}"));
                for h in &hosts {
                    w.set_disk_mode(*h, mode);
                }
                // Losing the disk alone must fence nobody: no excuse.
                self.run_for(hold).await;
                w.heal_disks();
                w.log(format!("HEAL {kind}"));
            }
            FaultKind::DiskPrivateOne | FaultKind::DiskWriteOnlyOne => {
                // The host's disk is not the shared one (a private copy), or it can write its
                // slot but not read: alone it must fence nobody; cut off from the network as
                // well, it must fence itself before the others restart its VMs.
                let mode = if kind == FaultKind::DiskPrivateOne { DiskMode::Private } else { DiskMode::WriteOnly };
                let cut = self.rand(2) == 0;
                let before = self.vms_on(target).await;
                w.log(format!("FAULT {kind} h{target}{} for {hold:?}", if cut { " and cut off from the network" } else { "" }));
                w.set_disk_mode(target, mode);
                if cut {
                    self.isolate(target, false);
                    self.excuse(&[target], until);
                }
                self.run_for(hold).await;
                if cut && hold.as_millis() as u64 > 9_000 {
                    self.check_moved_off(target, &before, &format!("{kind} of h{target}")).await;
                }
                lock(&w.cond).blocked.clear();
                w.heal_disks();
                w.log(format!("HEAL {kind}"));
            }
            FaultKind::PowerLoss | FaultKind::LeaderLoss | FaultKind::CrashRestart => {
                let leader = self.leader().await;
                let victim = if kind == FaultKind::LeaderLoss { leader.unwrap_or(target) } else { target };
                let before = self.vms_on(victim).await;
                let role = if leader == Some(victim) { ", the leader" } else { "" };
                w.log(format!("FAULT {kind} h{victim}{role} ({} VM(s)) for {hold:?}", before.len()));
                self.excuse(&[victim], until);
                self.power_off(victim).await;
                if !before.is_empty() {
                    self.recoveries.owe(now, format!("{kind} of h{victim}"), &self.restartable(&before), &[]);
                }
                let down_for = if kind == FaultKind::CrashRestart { Duration::from_millis(500 + self.rand(2_000)) } else { hold };
                self.run_for(down_for).await;
                self.boot(victim).await;
                // Its VMs with a local disk waited, parked, for it: back, it runs them again.
                let parked: Vec<String> = before.iter().filter(|v| self.local_disk_vms.contains(*v)).cloned().collect();
                if !parked.is_empty() {
                    self.recoveries.owe(w.now_ms(), format!("{kind} of h{victim}: back"), &parked, &[]);
                }
                self.run_for(hold.saturating_sub(down_for)).await;
            }
            FaultKind::SitePowerLoss => self.site_power_loss(kind, target, hold, now, until).await,
            FaultKind::SiteLinkCut => self.site_link_cut(kind, target, hold, until, false).await,
            FaultKind::SiteLinkOneWay => self.site_link_cut(kind, target, hold, until, true).await,
            FaultKind::SiteStorageLoss => self.site_storage_loss(kind, target, hold).await,
            FaultKind::SiteStorageHang => self.site_storage_hang(kind, target, hold).await,
            FaultKind::LinkCutDiskLost => self.link_cut_disk_lost(kind, hold, now, until).await,
            FaultKind::WitnessLoss => self.witness_loss(kind, hold).await,
            FaultKind::PartitionUnevenHeal => self.partition_uneven_heal(kind, target, hold, now).await,
            FaultKind::HostFreeze => self.host_freeze(kind, target, hold, now, until).await,
            FaultKind::AgentStall => self.agent_stall(kind, target, hold, now, until).await,
            FaultKind::LivenessStallInPartition => self.liveness_stall_in_partition(kind, target, now).await,
            FaultKind::ClockJump => {
                // Within the configured bound: the clock margin, less what drift may use.
                let bound = tandem_core::timing::Timings::default().clock_margin_ms - 50;
                let jump = 1 + self.rand(bound);
                w.log(format!("FAULT {kind}: h{target}'s clock jumps {jump} ms forward"));
                *lock(&w.cond).clock_jump_ms.entry(target).or_default() += jump;
                self.run_for(hold).await;
            }
            FaultKind::HostJoin => {
                let j = late.unwrap_or(0);
                self.boot(j).await;
                self.run_for(Duration::from_secs(1)).await;
                let at = self.leader().await.unwrap_or(0);
                let api = w.addrs[j as usize].0.clone();
                let r = self.send(at, "POST", "/v1/hosts/join", &JoinRequest { api_addr: api }).await;
                w.log(format!("operator: join h{j} -> {:?}", r.as_ref().map(|r| r.0)));
                // Joined or not, it is a member from now on: it takes part in faults and is
                // booted at the end; if the join was refused, it simply never gets VMs.
                self.hosts[j as usize].member = true;
                self.run_for(hold).await;
            }
            FaultKind::ClockDrift => {
                let ppm = self.rand(2_001) as i64 - 1_000;
                w.log(format!("FAULT {kind}: h{target} clock runs {ppm} ppm off (from its next boot)"));
                self.hosts[target as usize].drift_ppm = ppm;
                self.run_for(hold).await;
            }
            FaultKind::LiveMigration => self.live_migration(kind, now, until, hold).await,
            FaultKind::MaintenanceCycle => self.maintenance_cycle(kind, target).await,
            FaultKind::PlannedStop => self.planned_stop(kind, now, until, target).await,
            FaultKind::AgentKill | FaultKind::WorkloadKill | FaultKind::HostHiccup => {
                w.harness_error(format!("{kind} is injected by the fault suite only"));
            }
            FaultKind::Operator => {
                let on = up.first().copied().unwrap_or(0);
                match self.rand(3) {
                    0 => self.create_vm(on).await,
                    1 => {
                        let names: Vec<String> = self.created.iter().cloned().collect();
                        if let Some(name) = names.get(self.rand(names.len() as u64) as usize) {
                            self.recoveries.forgive(name);
                            let r = self.send(on, "POST", &format!("/v1/vms/{name}/stop"), &EmptyRequest {}).await;
                            w.log(format!("operator: stop {name} -> {:?}", r.map(|r| r.0)));
                            self.run_for(Duration::from_secs(2)).await;
                            let r = self.send(on, "POST", &format!("/v1/vms/{name}/start"), &ForceRequest::default()).await;
                            w.log(format!("operator: start {name} -> {:?}", r.map(|r| r.0)));
                        }
                    }
                    _ => {
                        let names: Vec<String> = self.created.iter().cloned().collect();
                        if let Some(name) = names.get(self.rand(names.len() as u64) as usize) {
                            self.recoveries.forgive(name);
                            let r = self.send(on, "POST", &format!("/v1/vms/{name}/stop"), &EmptyRequest {}).await;
                            self.run_for(Duration::from_secs(3)).await;
                            let d = self.api(on, "DELETE", &format!("/v1/vms/{name}"), None).await;
                            w.log(format!("operator: stop+delete {name} -> {:?} {:?}", r.map(|r| r.0), d.as_ref().map(|r| r.0)));
                            if matches!(d, Some((200, _))) {
                                self.created.remove(name);
                            }
                        }
                    }
                }
                self.run_for(hold).await;
            }
        }
        self.run_for(Duration::from_secs(2)).await;
    }
}
