//! Starting workload processes so that they cannot outlive the agent, and tracking their exits.
//!
//! Linux delivers `PR_SET_PDEATHSIG` when the *thread* that forked a child exits, so every child
//! is forked by one long-lived launcher thread. If the agent dies (crash, kill -9, power cut of
//! the test harness), the kernel kills its VMs: a host whose agent is gone runs nothing that the
//! survivors might restart. A waiter thread per child records its exit.

use crate::{wall_ms, DriverError, VmExit, VmStatus};
use std::collections::BTreeMap;

/// How long a SIGKILLed workload gets to be reaped before a stop reports a timeout.
pub const KILL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};

/// The largest number of workloads one host runs at once.
pub const MAX_CHILDREN: usize = 4096;

#[derive(Debug)]
struct Record {
    status: VmStatus,
    /// Set when the agent asked for the stop, so the exit is not taken for a crash.
    stop_requested: bool,
    /// Set by a driver that learned the guest shut itself down (QMP SHUTDOWN guest=true).
    guest_shutdown: bool,
    /// Set by a driver that learned of a guest panic.
    panicked: bool,
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

/// Whether a workload's vCPUs may run from its first instant: a copy started paused (QEMU's
/// `-S`, a live migration's destination) is listed paused from its very first listing, so no
/// listing ever shows it running before it is resumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpusAtStart {
    Running,
    Held,
}

/// The launcher and the table of children it started.
#[derive(Clone)]
pub struct Launcher {
    tx: mpsc::SyncSender<SpawnRequest>,
    table: Arc<Mutex<BTreeMap<String, Record>>>,
    /// Notified when a workload's exit is recorded (see [`crate::VmDriver::exits`]).
    exited: Arc<tokio::sync::Notify>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep using it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Launcher {
    /// Starts the launcher thread.
    pub fn new() -> std::io::Result<Launcher> {
        let (tx, rx) = mpsc::sync_channel::<SpawnRequest>(64);
        std::thread::Builder::new().name("tandem-launcher".into()).spawn(move || {
            // The agent's process: a child whose parent is another is an orphan.
            let agent = std::process::id();
            for (mut cmd, reply) in rx {
                // SAFETY: the closure only calls async-signal-safe functions (prctl, getppid,
                // setsid) between fork and exec.
                unsafe {
                    cmd.pre_exec(move || {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        // The agent may have died between the fork and the prctl: then no
                        // signal will ever come, and the workload would run on without it.
                        // (An OS error code: nothing may allocate between fork and exec.)
                        if u32::try_from(libc::getppid()).ok() != Some(agent) {
                            return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                        }
                        if libc::setsid() < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        Ok(())
                    });
                }
                let _ = reply.send(cmd.spawn());
            }
        })?;
        Ok(Launcher { tx, table: Arc::new(Mutex::new(BTreeMap::new())), exited: Arc::new(tokio::sync::Notify::new()) })
    }

    /// Spawns `cmd` as VM `name`, unless a live VM of that name exists or `check` refuses.
    ///
    /// The table lock is held from `check` until the child is in the table, and `kill_all`
    /// takes the same lock: a fence that lands during a start either makes `check` refuse, or
    /// finds the new child in the table and kills it.
    pub fn spawn(&self, name: &str, generation: u64, cmd: Command, vcpus: VcpusAtStart, check: &crate::StartCheck) -> Result<u32, DriverError> {
        let mut t = lock(&self.table);
        if t.get(name).is_some_and(|r| r.status.exit.is_none()) {
            return Err(DriverError::AlreadyRunning(name.to_string()));
        }
        if t.len() >= MAX_CHILDREN {
            return Err(DriverError::Spawn { vm: name.to_string(), source: std::io::Error::other(format!("host already runs {MAX_CHILDREN} workloads")) });
        }
        check().map_err(|reason| DriverError::Refused { vm: name.to_string(), reason })?;
        let (reply_tx, reply_rx) = mpsc::channel();
        self.tx.send((cmd, reply_tx)).map_err(|_| DriverError::LauncherGone)?;
        let mut child = reply_rx.recv().map_err(|_| DriverError::LauncherGone)?.map_err(|source| DriverError::Spawn { vm: name.to_string(), source })?;
        let pid = child.id();
        t.insert(
            name.to_string(),
            Record {
                status: VmStatus {
                    name: name.to_string(),
                    generation,
                    pid,
                    started_at_ms: wall_ms(),
                    exit: None,
                    paused: vcpus == VcpusAtStart::Held,
                    shutdown_reason: None,
                },
                stop_requested: false,
                guest_shutdown: false,
                panicked: false,
            },
        );
        drop(t);
        let table = Arc::clone(&self.table);
        let exited = Arc::clone(&self.exited);
        let vm = name.to_string();
        let waiter = std::thread::Builder::new().name(format!("wait-{pid}")).spawn(move || {
            let result = child.wait();
            let mut t = lock(&table);
            if let Some(r) = t.get_mut(&vm).filter(|r| r.status.pid == pid) {
                r.status.exit = Some(if r.stop_requested {
                    VmExit::StoppedByAgent
                } else if r.panicked {
                    VmExit::Crashed { detail: "guest panicked".into() }
                } else if r.guest_shutdown {
                    VmExit::GuestShutdown
                } else {
                    match result {
                        Ok(s) if s.success() => VmExit::GuestShutdown,
                        Ok(s) => VmExit::Crashed { detail: format!("exited with {s}") },
                        Err(e) => VmExit::Crashed { detail: format!("wait failed: {e}") },
                    }
                });
            }
            drop(t);
            exited.notify_one();
        });
        if let Err(e) = waiter {
            // Without a waiter the exit would never be seen; do not leave an untracked VM.
            self.signal(name, libc::SIGKILL, true);
            return Err(DriverError::Spawn { vm: name.to_string(), source: e });
        }
        Ok(pid)
    }

    /// Spawns a helper process (not a workload: not in the table, no exit tracking) that must
    /// not outlive the agent either — a copy server, say. The caller owns and reaps the child.
    pub fn spawn_helper(&self, cmd: Command) -> std::io::Result<Child> {
        let (reply_tx, reply_rx) = mpsc::channel();
        let gone = || std::io::Error::other("the launcher thread is gone");
        self.tx.send((cmd, reply_tx)).map_err(|_| gone())?;
        reply_rx.recv().map_err(|_| gone())?
    }

    /// Notified (one stored permit) whenever a workload's exit has been recorded.
    #[must_use]
    pub fn exits(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.exited)
    }

    /// Sends `sig` to the VM's process group; `requested` marks the coming exit as ours.
    /// Returns whether a live VM was signalled.
    pub fn signal(&self, name: &str, sig: i32, requested: bool) -> bool {
        let mut t = lock(&self.table);
        let Some(r) = t.get_mut(name).filter(|r| r.status.exit.is_none()) else { return false };
        if requested {
            r.stop_requested = true;
        }
        let pid = r.status.pid as i32;
        // SAFETY: kill(2) on a process group we created with setsid; no memory is touched.
        unsafe {
            libc::kill(-pid, sig);
            libc::kill(pid, sig);
        }
        true
    }

    /// Marks the live VM's vCPUs as stopped (or running again) by a live migration.
    pub fn set_paused(&self, name: &str, paused: bool) {
        if let Some(r) = lock(&self.table).get_mut(name).filter(|r| r.status.exit.is_none()) {
            r.status.paused = paused;
        }
    }

    /// SIGKILLs every live VM; returns how many.
    pub fn kill_all(&self) -> usize {
        let names: Vec<String> = lock(&self.table).values().filter(|r| r.status.exit.is_none()).map(|r| r.status.name.clone()).collect();
        names.iter().filter(|n| self.signal(n, libc::SIGKILL, true)).count()
    }

    /// Marks that the guest shut itself down / panicked (learned from QMP).
    pub fn note_guest_event(&self, name: &str, pid: u32, panicked: bool) {
        if let Some(r) = lock(&self.table).get_mut(name).filter(|r| r.status.pid == pid) {
            if panicked {
                r.panicked = true;
            } else {
                r.guest_shutdown = true;
            }
        }
    }

    /// Records QEMU's reason for a shutdown of this process (kept with its exit).
    pub fn note_shutdown_reason(&self, name: &str, pid: u32, reason: &str) {
        if let Some(r) = lock(&self.table).get_mut(name).filter(|r| r.status.pid == pid) {
            r.status.shutdown_reason = Some(reason.chars().take(64).collect());
        }
    }

    /// Whether the VM is running (started and not exited).
    #[must_use]
    pub fn is_running(&self, name: &str) -> bool {
        lock(&self.table).get(name).is_some_and(|r| r.status.exit.is_none())
    }

    /// The live VM's pid.
    #[must_use]
    pub fn pid(&self, name: &str) -> Option<u32> {
        lock(&self.table).get(name).filter(|r| r.status.exit.is_none()).map(|r| r.status.pid)
    }

    #[must_use]
    pub fn list(&self) -> Vec<VmStatus> {
        lock(&self.table).values().map(|r| r.status.clone()).collect()
    }

    pub fn forget(&self, name: &str) {
        let mut t = lock(&self.table);
        if t.get(name).is_some_and(|r| r.status.exit.is_some()) {
            t.remove(name);
        }
    }
    /// SIGKILL to `name`'s process group, counted as requested (not a crash).
    pub fn kill(&self, name: &str) -> Result<(), DriverError> {
        if self.signal(name, libc::SIGKILL, true) {
            Ok(())
        } else {
            Err(DriverError::NotRunning(name.to_string()))
        }
    }

    /// The last step of every graceful stop: SIGKILL, then wait (bounded) for the exit.
    pub async fn kill_and_wait(&self, name: &str) -> Result<(), DriverError> {
        self.signal(name, libc::SIGKILL, true);
        if self.wait_exit(name, KILL_WAIT).await {
            Ok(())
        } else {
            Err(DriverError::StopTimeout(name.to_string()))
        }
    }

    /// SIGKILL, then waits (polling every 20 ms) up to `bound` until the VM exited or every
    /// thread it has left is in uninterruptible sleep — stuck in I/O to storage that hangs. A
    /// thread leaving that sleep with SIGKILL pending dies before it returns to user space (or
    /// enters a guest), so none of the VM's vCPUs can run again, though the process lives on
    /// until the storage lets its requests go.
    pub async fn kill_until_inert(&self, name: &str, bound: std::time::Duration) -> Result<(), DriverError> {
        let Some(pid) = self.pid(name) else { return Err(DriverError::NotRunning(name.to_string())) };
        self.signal(name, libc::SIGKILL, true);
        if !wait_while(bound, || self.is_running(name) && !only_stuck_threads(pid)).await {
            return Err(DriverError::StopTimeout(name.to_string()));
        }
        // Still there, its vCPUs gone for good: listed as a copy that does not run.
        self.set_paused(name, true);
        Ok(())
    }

    /// Waits (polling every 20 ms) up to `timeout` for the VM to exit.
    pub async fn wait_exit(&self, name: &str, timeout: std::time::Duration) -> bool {
        wait_while(timeout, || self.is_running(name)).await
    }
}

/// Polls `busy` every 20 ms for up to `timeout`: whether it turned false in time.
async fn wait_while(timeout: std::time::Duration, busy: impl Fn() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    while busy() {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    true
}

/// Whether every thread of process `pid` left is in uninterruptible sleep (`D`) or dead (`Z`,
/// `X`): false when any can run, and when its threads cannot be read.
fn only_stuck_threads(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return false };
    let mut any = false;
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
        // The state follows the command name, which may itself hold ") ".
        let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
        if !matches!(state, Some('D' | 'Z' | 'X')) {
            return false;
        }
        any = true;
    }
    any
}

#[cfg(test)]
mod tests {
    use super::only_stuck_threads;

    /// A process with a thread that can run is not inert; a dead one (a zombie not yet reaped)
    /// is; one that cannot be read is not.
    #[test]
    fn only_a_process_none_of_whose_threads_can_run_counts_as_inert() {
        assert!(!only_stuck_threads(std::process::id()), "this test's own threads run");
        let mut sleeper = std::process::Command::new("sleep").arg("30").spawn().expect("sleep");
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!only_stuck_threads(sleeper.id()), "a sleeping process wakes up and runs");
        let _ = sleeper.kill();
        // Killed and not reaped yet: a zombie.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !only_stuck_threads(sleeper.id()) {
            assert!(std::time::Instant::now() < deadline, "the killed process never showed as dead");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let _ = sleeper.wait();
        assert!(!only_stuck_threads(sleeper.id()), "reaped: nothing to read");
    }
}
