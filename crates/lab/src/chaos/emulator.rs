//! The fault suite's stand-in for watchdog hardware (this machine has none).

use super::{signal, WATCHDOG_TIMEOUT};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Stands in for watchdog hardware, which keeps counting while the host's software is frozen:
/// a host whose watchdog file has not been written for [`WATCHDOG_TIMEOUT`] is reset (its agent
/// and workloads get SIGKILL). Like the hardware, it is armed by the first feed after a reset.
pub(super) struct WatchdogEmulator {
    stop: Arc<AtomicBool>,
    resets: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WatchdogEmulator {
    pub(super) fn start(lab_id: String, hosts: Vec<(String, PathBuf, PathBuf)>) -> WatchdogEmulator {
        let stop = Arc::new(AtomicBool::new(false));
        let resets = Arc::new(Mutex::new(Vec::new()));
        let (s, r) = (Arc::clone(&stop), Arc::clone(&resets));
        let thread = std::thread::spawn(move || {
            // Per host: last modification seen, when it changed, whether the watchdog is armed.
            let mut seen: Vec<(Option<std::time::SystemTime>, Instant, bool)> = vec![(None, Instant::now(), false); hosts.len()];
            while !s.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(50));
                for (i, (name, file, config)) in hosts.iter().enumerate() {
                    let m = std::fs::metadata(file).and_then(|m| m.modified()).ok();
                    let st = &mut seen[i];
                    if m != st.0 {
                        *st = (m, Instant::now(), true);
                        continue;
                    }
                    if !st.2 || st.1.elapsed() < WATCHDOG_TIMEOUT {
                        continue;
                    }
                    st.2 = false;
                    let config = config.display().to_string();
                    for (pid, env) in crate::lab::lab_processes(&lab_id) {
                        let agent = !env.contains_key("TANDEM_HOST")
                            && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).contains(&config));
                        if agent || env.get("TANDEM_HOST") == Some(name) {
                            signal(pid, libc::SIGKILL);
                        }
                    }
                    r.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(name.clone());
                }
            }
        });
        WatchdogEmulator { stop, resets, thread: Some(thread) }
    }

    /// Hosts reset so far, in order.
    pub(super) fn resets(&self) -> Vec<String> {
        self.resets.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

impl Drop for WatchdogEmulator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
