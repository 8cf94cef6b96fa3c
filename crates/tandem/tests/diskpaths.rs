//! A heartbeat disk with two paths, with real agents: every host reaches the shared disk by a
//! first path and a second one (`heartbeat_disk_paths`). The first path stops resolving on
//! every host at once (a mount gone); the hosts go on writing and reading their slots through
//! the second, so each still sees every peer's disk heartbeat advance — with one path only,
//! every disk heartbeat would go stale.

use anyhow::{anyhow, Result};
use std::path::PathBuf;
use std::time::Duration;
use tandem_agent::views::HostView;
use tandem_lab::demo::wait;
use tandem_lab::lab::{Lab, LabOptions};

fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tandem"))
}

/// Removes a scratch directory when dropped, so a failing test leaves nothing behind.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_heartbeat_disk_path_that_fails_gives_way_to_the_second() -> Result<()> {
    let net = 85u8;
    // The lab's shared disk, where `Lab::new` formats it; the two paths are links to it.
    let disk = std::env::temp_dir().join(format!("tandem-lab-{}-{net}", std::process::id())).join("shared/heartbeat.disk");
    let scratch = Scratch(std::env::temp_dir().join(format!("tandem-diskpaths-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&scratch.0);
    std::fs::create_dir_all(&scratch.0)?;
    let (first, second) = (scratch.0.join("first"), scratch.0.join("second"));
    std::os::unix::fs::symlink(&disk, &first)?;
    std::os::unix::fs::symlink(&disk, &second)?;
    let opts = LabOptions {
        loopback_net: net,
        disk_paths: (0..3).map(|i| (i, first.clone())).collect(),
        extra_config: format!("heartbeat_disk_paths = [\"{}\"]\n", second.display()),
        ..LabOptions::default()
    };
    let mut lab = Lab::new(opts, &binary())?;
    lab.start_all()?;
    lab.form_cluster()?;
    let c = lab.client(0);
    let fresh = |c: &tandem::client::Client| -> Option<()> {
        let hosts: Vec<HostView> = c.get_as("/v1/hosts").ok()?;
        let peers: Vec<&HostView> = hosts.iter().filter(|h| h.name != "h0").collect();
        (peers.len() == 2 && peers.iter().all(|h| h.disk_age_ms.is_some_and(|a| a < 1_000))).then_some(())
    };
    wait("every peer's disk heartbeat fresh", Duration::from_secs(30), || fresh(&c))?;
    std::fs::remove_file(&first)?;
    // Past a peer timeout (3 s) with the first path gone, the disk heartbeats are still fresh.
    std::thread::sleep(Duration::from_secs(4));
    for i in 0..3 {
        let hosts: Vec<HostView> = lab.client(i).get_as("/v1/hosts").map_err(|e| anyhow!("{e}"))?;
        for h in hosts.iter().filter(|h| h.name != format!("h{i}")) {
            assert!(h.disk_age_ms.is_some_and(|a| a < 1_000), "h{i} sees {}'s disk heartbeat {:?} ms old", h.name, h.disk_age_ms);
        }
        // And the switch is in its timeline.
        let events = lab.client(i).list("/v1/events?limit=4096").map_err(|e| anyhow!("{e}"))?;
        let switched = events.iter().filter(|e| e["kind"] == "disk-path-changed").filter_map(|e| e["detail"].as_str()).collect::<Vec<_>>();
        assert!(switched.len() == 1 && switched[0].contains("second"), "h{i}: {switched:?}");
    }
    lab.assert_no_double_run()
}
