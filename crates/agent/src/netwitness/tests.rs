//! The witness server and its clients over a real socket: the heartbeat area (formatted for
//! the cluster, one request per round), the region in spans, authentication, bounds, and
//! durability across a restart.

use super::client::{NetSlotDevice, NetWitnessRegion, WitnessClient};
use super::server::{serve, WitnessConfig};
use super::{MAX_IO, REGION_BYTES};
use crate::disk::{DiskError, HeartbeatDisk};
use crate::io::SlotDevice;
use crate::witness::WitnessRegion;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tandem_core::diskformat::{image_slots, HEADER_RECORD_LEN};
use tandem_core::wire::{ClusterKey, SLOT_RECORD_LEN, SLOT_SIZE};
use tandem_core::HostId;

const ADDR: &str = "127.100.0.9:7471";

/// A fresh directory of this test's own, removed when dropped.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> TestDir {
        let p = std::env::temp_dir().join(format!("tandem-netwitness-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("test dir");
        TestDir(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn secret(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("secret");
    std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
    p
}

fn config(dir: &Path, clusters: &str) -> std::io::Result<PathBuf> {
    let p = dir.join("witness.toml");
    std::fs::write(&p, format!("listen = \"{ADDR}\"\ndata_dir = \"{}\"\n{clusters}", dir.join("data").display()))?;
    Ok(p)
}

/// Serves `cfg` until the returned sender is dropped or fired.
async fn start(cfg: WitnessConfig) -> tokio::sync::oneshot::Sender<()> {
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        serve(cfg, async {
            let _ = stopped.await;
        })
        .await
        .expect("serve")
    });
    // Until it answers.
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(ADDR).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop
}

#[test]
fn a_configuration_names_each_cluster_once() {
    let dir = TestDir::new("config");
    let s = secret(dir.path(), "s", "a-long-enough-cluster-secret-0123");
    let entry = |name: &str| format!("[[cluster]]\nname = \"{name}\"\nsecret_file = \"{}\"\n", s.display());
    for bad in [String::new(), entry("a") + &entry("a"), entry("no spaces"), entry("a") + "surprise = 1\n"] {
        let p = config(dir.path(), &bad).expect("write");
        assert!(WitnessConfig::load(&p).is_err(), "accepted: {bad}");
    }
    let p = config(dir.path(), &(entry("a") + &entry("b"))).expect("write");
    assert_eq!(WitnessConfig::load(&p).expect("two clusters").cluster.len(), 2);
}

#[tokio::test]
async fn agents_of_a_cluster_use_its_areas_and_nobody_else_can() {
    let dir = TestDir::new("serve");
    let (sa, sb) = (secret(dir.path(), "sa", "cluster-a-secret-0123456789abcdef"), secret(dir.path(), "sb", "cluster-b-secret-0123456789abcdef"));
    let clusters = format!("[[cluster]]\nname = \"a\"\nsecret_file = \"{}\"\n[[cluster]]\nname = \"b\"\nsecret_file = \"{}\"\n", sa.display(), sb.display());
    let path = config(dir.path(), &clusters).expect("write");
    let stop = start(WitnessConfig::load(&path).expect("config")).await;
    let key_a = ClusterKey::new(&std::fs::read(&sa).expect("read")).expect("key");
    let key_b = ClusterKey::new(&std::fs::read(&sb).expect("read")).expect("key");
    let client = |cluster: &str, key: &ClusterKey| {
        WitnessClient::new(&crate::config::NetworkWitness { address: ADDR.into(), cluster: cluster.into() }, key.peer_token(), None)
    };
    let timeout = Duration::from_secs(2);

    // The heartbeat area was formatted for each cluster by the witness.
    let a = Arc::new(NetSlotDevice::new(client("a", &key_a), timeout));
    let disk = HeartbeatDisk::new(Arc::clone(&a) as Arc<dyn SlotDevice>, key_a.clone(), timeout);
    disk.check_header("witness a").await.expect("cluster a's header");
    let b_as_a = HeartbeatDisk::new(Arc::new(NetSlotDevice::new(client("b", &key_b), timeout)), key_a.clone(), timeout);
    assert!(matches!(b_as_a.check_header("witness b").await, Err(DiskError::Header { .. })), "cluster b's area is not a's");

    // A round writes the slot and reads every slot's record back, in one request.
    let mut slot = vec![0u8; SLOT_SIZE];
    slot[..SLOT_RECORD_LEN].fill(0x5A);
    let round = a.write_then_read_all(HostId(3), slot, timeout).await;
    assert!(round.write.is_ok(), "{:?}", round.write.err());
    let image = round.read.expect("image");
    let records: Vec<&[u8]> = image_slots(&image).collect();
    assert!(records[3].iter().all(|b| *b == 0x5A) && records[2].iter().all(|b| *b == 0), "slot 3 written, slot 2 not");
    assert!(image.len() > HEADER_RECORD_LEN);
    assert!(a.write_slot(HostId(64), vec![0u8; SLOT_SIZE]).await.is_err(), "no slot for host id 64");
    assert!(a.write_slot(HostId(1), vec![0u8; 10]).await.is_err(), "a slot is a whole slot");

    // Wrong token, unknown cluster: refused alike.
    let forged = NetSlotDevice::new(client("a", &key_b), timeout);
    assert!(forged.read_all().await.is_err(), "cluster b's token opens cluster a's area");
    let unknown = NetSlotDevice::new(client("c", &key_a), timeout);
    let err = unknown.read_all().await.expect_err("an unknown cluster");
    assert!(err.to_string().contains("heartbeat disk I/O failed"), "{err}");

    // The region: spans longer than one request, bounds.
    let region = NetWitnessRegion::open(client("a", &key_a)).expect("region");
    assert_eq!(region.size(), REGION_BYTES);
    let data: Vec<u8> = (0..(2 * MAX_IO + 12_345)).map(|i| (i % 251) as u8).collect();
    tokio::task::spawn_blocking(move || {
        region.write_at(3 * 4096 + 7, &data).expect("write");
        let mut back = vec![0u8; data.len()];
        region.read_at(3 * 4096 + 7, &mut back).expect("read");
        assert!(back == data, "the region reads back what was written");
        let mut past = vec![0u8; 8192];
        assert!(region.read_at(REGION_BYTES - 4096, &mut past).is_err(), "a read past the region's end");
    })
    .await
    .expect("join");
    let other = NetWitnessRegion::open(client("b", &key_b)).expect("region b");
    let untouched = tokio::task::spawn_blocking(move || {
        let mut b = vec![1u8; 4096];
        other.read_at(3 * 4096, &mut b).map(|()| b)
    })
    .await
    .expect("join")
    .expect("read b");
    assert!(untouched.iter().all(|x| *x == 0), "cluster b's region is its own");

    // Written durably: a restarted witness serves the same areas.
    let _ = stop.send(());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stop = start(WitnessConfig::load(&path).expect("config")).await;
    let image = a.read_all().await.expect("read after restart");
    assert!(image_slots(&image).nth(3).is_some_and(|r| r.iter().all(|b| *b == 0x5A)), "slot 3 kept");
    disk.check_header("witness a").await.expect("the header kept (not formatted again)");
    let _ = stop.send(());
}
