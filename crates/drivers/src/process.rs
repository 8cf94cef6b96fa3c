//! The `process` driver: any command is the workload. For hosts without QEMU and fast tests.

use crate::launcher::Launcher;
use crate::{BoxFuture, DriverError, VmDriver, VmLaunch, VmStatus};
use std::process::{Command, Stdio};
use std::time::Duration;
use tandem_core::state::DriverSpec;

/// Runs VMs as plain processes.
pub struct ProcessDriver {
    launcher: Launcher,
    host_name: String,
    stop_timeout: Duration,
}

impl ProcessDriver {
    #[must_use]
    pub fn new(launcher: Launcher, host_name: &str, stop_timeout: Duration) -> ProcessDriver {
        ProcessDriver { launcher, host_name: host_name.to_string(), stop_timeout }
    }
}

impl VmDriver for ProcessDriver {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn start<'a>(&'a self, launch: &'a VmLaunch) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            let name = &launch.spec.name;
            let DriverSpec::Process { command } = &launch.spec.driver else {
                return Err(DriverError::WrongDriver { vm: name.clone(), needed: "qemu", have: "process" });
            };
            let (program, args) =
                command.split_first().ok_or_else(|| DriverError::Spawn { vm: name.clone(), source: std::io::Error::other("empty command") })?;
            let mut cmd = Command::new(program);
            cmd.args(args)
                .env("TANDEM_VM", name)
                .env("TANDEM_HOST", &self.host_name)
                .env("TANDEM_GENERATION", launch.generation.to_string())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            self.launcher.spawn(name, launch.generation, cmd, crate::launcher::VcpusAtStart::Running, &launch.check).map(|_| ())
        })
    }

    fn stop<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), DriverError>> {
        Box::pin(async move {
            if !self.launcher.signal(name, libc::SIGTERM, true) {
                return Err(DriverError::NotRunning(name.to_string()));
            }
            if self.launcher.wait_exit(name, self.stop_timeout).await {
                return Ok(());
            }
            self.launcher.kill_and_wait(name).await
        })
    }

    /// A process has no memory image to send: its migration is a stop here (as `stop` does) and,
    /// once the switchover commits, a fresh start at the destination (the reconciler's). Nothing
    /// runs at the destination beforehand, and nothing is left here that could run again: an
    /// aborted migration starts the process afresh here.
    fn prepare_incoming<'a>(
        &'a self,
        launch: &'a VmLaunch,
        _disks: &'a [crate::diskcopy::LocalDiskSize],
        _multifd_channels: u8,
    ) -> BoxFuture<'a, Result<crate::diskcopy::IncomingEndpoint, DriverError>> {
        Box::pin(async move { Ok(crate::diskcopy::IncomingEndpoint { uri: format!("process:{}", launch.spec.name), nbd: None }) })
    }

    fn migrate_out<'a>(
        &'a self,
        name: &'a str,
        _to: &'a crate::migration::MigrationTarget,
    ) -> BoxFuture<'a, Result<crate::migration::MigrationReport, DriverError>> {
        Box::pin(async move {
            let started = std::time::Instant::now();
            self.stop(name).await?;
            let total_ms = started.elapsed().as_millis() as u64;
            Ok(crate::migration::MigrationReport { total_ms, steps: vec!["stopped here, to start at the destination".into()], ..Default::default() })
        })
    }

    fn kill(&self, name: &str) -> Result<(), DriverError> {
        self.launcher.kill(name)
    }

    fn kill_all(&self) -> usize {
        self.launcher.kill_all()
    }

    fn exits(&self) -> Option<std::sync::Arc<tokio::sync::Notify>> {
        Some(self.launcher.exits())
    }

    fn list(&self) -> Vec<VmStatus> {
        self.launcher.list()
    }

    fn forget(&self, name: &str) {
        self.launcher.forget(name);
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::VmExit;
    use tandem_core::state::VmSpec;

    /// A process VM running `command`.
    pub(crate) fn launch(name: &str, command: &[&str]) -> VmLaunch {
        VmLaunch { spec: VmSpec::process(name, 64, 0, command), generation: 3, check: crate::always_start() }
    }

    async fn exit_of(d: &ProcessDriver, name: &str) -> Option<VmExit> {
        for _ in 0..250 {
            if let Some(s) = d.list().into_iter().find(|s| s.name == name) {
                if s.exit.is_some() {
                    return s.exit;
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        None
    }

    #[tokio::test]
    async fn start_stop_crash_and_kill_all() {
        let d = ProcessDriver::new(Launcher::new().expect("launcher"), "h0", Duration::from_secs(2));
        d.start(&launch("a", &["sleep", "100"])).await.expect("start a");
        assert!(matches!(d.start(&launch("a", &["sleep", "100"])).await, Err(DriverError::AlreadyRunning(_))));
        let st = d.list().into_iter().find(|s| s.name == "a").expect("listed");
        assert_eq!((st.generation, st.exit.clone()), (3, None));
        d.stop("a").await.expect("stop");
        assert_eq!(exit_of(&d, "a").await, Some(VmExit::StoppedByAgent));

        d.start(&launch("c", &["sh", "-c", "exit 3"])).await.expect("start c");
        assert!(matches!(exit_of(&d, "c").await, Some(VmExit::Crashed { .. })));
        d.start(&launch("g", &["true"])).await.expect("start g");
        assert_eq!(exit_of(&d, "g").await, Some(VmExit::GuestShutdown));

        d.start(&launch("x", &["sleep", "100"])).await.expect("start x");
        d.start(&launch("y", &["sleep", "100"])).await.expect("start y");
        assert_eq!(d.kill_all(), 2);
        assert_eq!(exit_of(&d, "x").await, Some(VmExit::StoppedByAgent));
        assert_eq!(exit_of(&d, "y").await, Some(VmExit::StoppedByAgent));
        d.forget("x");
        assert!(d.list().iter().all(|s| s.name != "x"));
        assert!(matches!(d.kill("x"), Err(DriverError::NotRunning(_))));
        let bad = d.start(&launch("z", &["/nonexistent/binary"])).await;
        assert!(matches!(bad, Err(DriverError::Spawn { .. })));
    }

    /// The last-instant check runs under the table lock that `kill_all` takes: a fence that
    /// lands while a start is in flight either refuses it or kills what it created.
    #[tokio::test]
    async fn a_start_racing_a_fence_is_refused_or_killed() {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let d = Arc::new(ProcessDriver::new(Launcher::new().expect("launcher"), "h0", Duration::from_secs(2)));
        let fenced = Arc::new(AtomicBool::new(false));
        let f = Arc::clone(&fenced);
        let check: crate::StartCheck = Arc::new(move || if f.load(Ordering::SeqCst) { Err("host is fenced".into()) } else { Ok(()) });
        // Refused: the fence came first.
        fenced.store(true, Ordering::SeqCst);
        let refused = d.start(&VmLaunch { check: Arc::clone(&check), ..launch("r", &["sleep", "100"]) }).await;
        assert!(matches!(&refused, Err(DriverError::Refused { reason, .. }) if reason == "host is fenced"), "{refused:?}");
        assert!(d.list().iter().all(|s| s.name != "r"), "a refused start leaves nothing behind");
        // Racing: many starts while a fencer flips the flag and kills everything. Whatever
        // passed the check before the flag was set was in the table when kill_all ran.
        fenced.store(false, Ordering::SeqCst);
        let starts: Vec<_> = (0..20)
            .map(|i| {
                let (d, check) = (Arc::clone(&d), Arc::clone(&check));
                tokio::spawn(async move { d.start(&VmLaunch { check, ..launch(&format!("v{i}"), &["sleep", "100"]) }).await })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(5)).await;
        fenced.store(true, Ordering::SeqCst);
        d.kill_all();
        for s in starts {
            let _ = s.await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let alive: Vec<String> = d.list().into_iter().filter(|s| s.exit.is_none()).map(|s| s.name).collect();
        assert!(alive.is_empty(), "started after the fence and never killed: {alive:?}");
    }
}
