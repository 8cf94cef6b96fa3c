//! A heartbeat disk reached by more than one path (a second mount of the same NAS export, a
//! second block-device path to the same LUN): I/O goes to one path at a time, and a path that
//! fails — an I/O error, a path that no longer resolves, a request that hangs — gives the next
//! round to the next path. Each path has its own I/O thread, so a path hung in the kernel holds
//! up only itself.
//!
//! Safety rests where it always did: every path must carry this cluster's header (checked at
//! start, header record for header record), and a path that leads to another disk — a stale
//! copy, a wrong mount — is never trusted as shared, because the liveness core counts a disk as
//! shared only while a majority of the members' slots advance on it.

use crate::disk::{DiskError, FileSlotDevice};
use crate::io::{SlotDevice, SlotRound, StampedRead};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tandem_core::diskformat::HEADER_RECORD_LEN;
use tandem_core::hostset::HostId;
use tandem_drivers::BoxFuture;

/// The most paths one heartbeat disk may have.
pub const MAX_DISK_PATHS: usize = 4;
/// How long the start-up check may read each path.
pub const PATH_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// Several paths to one heartbeat disk, one in use at a time.
pub struct MultipathSlotDevice {
    paths: Vec<FileSlotDevice>,
    active: AtomicUsize,
}

impl MultipathSlotDevice {
    /// Opens every path (each must exist) and starts their I/O threads.
    pub fn open(paths: &[PathBuf]) -> Result<MultipathSlotDevice, DiskError> {
        let paths = paths.iter().take(MAX_DISK_PATHS).map(|p| FileSlotDevice::open(p)).collect::<Result<Vec<_>, _>>()?;
        Ok(MultipathSlotDevice { paths, active: AtomicUsize::new(0) })
    }

    /// The path in use now.
    #[must_use]
    pub fn active_path(&self) -> &Path {
        &self.paths[self.active.load(Ordering::SeqCst) % self.paths.len()].path
    }

    /// Every path must show the header record the first one shows: the same disk, formatted for
    /// this cluster (the first path's header is checked as a single path's is). A path that
    /// cannot be read now is let be — it is a path that failed, not a wrong one — and warned of.
    pub async fn check_paths_agree(&self, timeout: Duration) -> Result<(), DiskError> {
        let header = |area: &[u8]| area.get(..HEADER_RECORD_LEN).map(<[u8]>::to_vec);
        let mut first: Option<Vec<u8>> = None;
        for dev in &self.paths {
            let read = tokio::time::timeout(timeout, dev.read_all()).await.unwrap_or(Err(DiskError::Timeout(timeout)));
            match (read.map(|a| header(&a)), &first) {
                (Ok(h), None) => first = h,
                (Ok(h), Some(f)) if h.as_ref() == Some(f) => {}
                (Ok(_), Some(_)) => {
                    let source = std::io::Error::other("its header differs from the first path's: not the same heartbeat disk");
                    return Err(DiskError::Open { path: dev.path.display().to_string(), source });
                }
                (Err(e), _) => tracing::warn!(path = %dev.path.display(), "heartbeat disk path unreadable at start: {e}"),
            }
        }
        Ok(())
    }

    /// Path `failed` failed: the next one takes over (unless another request already moved on).
    fn fail_over(&self, failed: usize, e: &dyn std::fmt::Display) -> usize {
        let next = (failed + 1) % self.paths.len();
        if self.active.compare_exchange(failed, next, Ordering::SeqCst, Ordering::SeqCst).is_ok() {
            tracing::warn!(
                failed = %self.paths[failed].path.display(),
                next = %self.paths[next].path.display(),
                "heartbeat disk path failed ({e}); using the next path"
            );
        }
        self.active.load(Ordering::SeqCst)
    }
}

/// Whether a failed request may be tried again on the next path at once: an error that came
/// quickly. A timeout already spent the round's time; the next round uses the next path.
fn retry_now(e: &DiskError) -> bool {
    !matches!(e, DiskError::Timeout(_))
}

impl SlotDevice for MultipathSlotDevice {
    fn path_in_use(&self) -> Option<PathBuf> {
        Some(self.active_path().to_path_buf())
    }

    fn write_slot(&self, slot: HostId, bytes: Vec<u8>) -> BoxFuture<'_, Result<(), DiskError>> {
        Box::pin(async move {
            let i = self.active.load(Ordering::SeqCst);
            match self.paths[i].write_slot(slot, bytes.clone()).await {
                Err(e) if self.paths.len() > 1 => {
                    let next = self.fail_over(i, &e);
                    if retry_now(&e) {
                        self.paths[next].write_slot(slot, bytes).await
                    } else {
                        Err(e)
                    }
                }
                r => r,
            }
        })
    }

    fn read_all(&self) -> BoxFuture<'_, Result<Vec<u8>, DiskError>> {
        Box::pin(async move { self.read_all_stamped().await.0 })
    }

    fn read_all_stamped(&self) -> BoxFuture<'_, StampedRead> {
        Box::pin(async move {
            let i = self.active.load(Ordering::SeqCst);
            match self.paths[i].read_all_stamped().await {
                (Err(e), _) if self.paths.len() > 1 => {
                    let next = self.fail_over(i, &e);
                    if retry_now(&e) {
                        self.paths[next].read_all_stamped().await
                    } else {
                        (Err(e), None)
                    }
                }
                r => r,
            }
        })
    }

    fn write_then_read_all(&self, slot: HostId, bytes: Vec<u8>, timeout: Duration) -> BoxFuture<'_, SlotRound> {
        Box::pin(async move {
            let i = self.active.load(Ordering::SeqCst);
            let round = self.paths[i].write_then_read_all(slot, bytes.clone(), timeout).await;
            let Some(e) = round.write.as_ref().err().or(round.read.as_ref().err()).filter(|_| self.paths.len() > 1) else { return round };
            let (retry, next) = (retry_now(e), self.fail_over(i, e));
            if retry {
                self.paths[next].write_then_read_all(slot, bytes, timeout).await
            } else {
                round
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::HeartbeatDisk;
    use tandem_core::wire::{ClusterKey, DiskSlot, SlotRead};
    use tandem_core::HostSet;

    /// Two symlinks to one heartbeat disk: the first stops resolving (a mount gone), and the
    /// rounds go on through the second — the same round that met the failure included.
    #[tokio::test]
    async fn a_failed_path_gives_the_round_to_the_next_one() {
        let dir = std::env::temp_dir().join(format!("tandem-multipath-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let disk = dir.join("hb");
        let key = ClusterKey::new(b"multipath test key, long enough").expect("key");
        crate::disk::format(&disk, &key, false).expect("format");
        let (a, b) = (dir.join("path-a"), dir.join("path-b"));
        std::os::unix::fs::symlink(&disk, &a).expect("link a");
        std::os::unix::fs::symlink(&disk, &b).expect("link b");
        let dev = MultipathSlotDevice::open(&[a.clone(), b.clone()]).expect("open");
        dev.check_paths_agree(Duration::from_secs(2)).await.expect("one disk");
        let dev = std::sync::Arc::new(dev);
        let hb = HeartbeatDisk::new(dev.clone(), key.clone(), Duration::from_secs(2));
        let slot = |counter| DiskSlot { host: HostId(1), incarnation: 1, counter, epoch: 1, heard: HostSet(0b10), fenced: false, written_at_ms: counter };
        assert!(matches!(hb.round(&slot(1)).await, (Ok(()), Ok(_), _)));
        assert_eq!(dev.active_path(), a.as_path());
        std::fs::remove_file(&a).expect("path a gone");
        let (wrote, read, _) = hb.round(&slot(2)).await;
        assert!(wrote.is_ok() && read.is_ok(), "the round went on through path b: {wrote:?}");
        assert_eq!(dev.active_path(), b.as_path());
        assert_eq!(hb.read_all().await.expect("read")[1], SlotRead::Valid(slot(2)));
        // A path to another disk is refused at start.
        let other = dir.join("other");
        crate::disk::format(&other, &ClusterKey::new(b"another cluster's key, also long").expect("key"), false).expect("format");
        let wrong = MultipathSlotDevice::open(&[b.clone(), other]).expect("open");
        assert!(wrong.check_paths_agree(Duration::from_secs(2)).await.is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
