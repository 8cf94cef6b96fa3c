//! The heartbeat disk: a header block, then one 4 KiB slot per host, in a shared file or block
//! device formatted once with [`format`] (see `tandem_core::diskformat`).
//!
//! All I/O happens on one dedicated thread with O_DIRECT (and O_DSYNC), because shared storage
//! can hang in uninterruptible sleep instead of failing: a hung disk stalls that thread only.
//! Callers wait with a deadline and count a late answer as lost.

use crate::io::{SlotDevice, SlotRound};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc};
use std::time::Duration;
use tandem_core::diskformat::{area_image, image_slots, slot_offset, DiskHeader, HeaderError, AREA_IMAGE_LEN, DISK_SIZE, HEADER_SIZE};
use tandem_core::wire::{ClusterKey, DiskSlot, SlotRead, SLOT_RECORD_LEN, SLOT_SIZE};
use tandem_core::HostId;
use tandem_drivers::BoxFuture;
use thiserror::Error;
use tokio::sync::oneshot;

/// Heartbeat-disk failures.
#[derive(Debug, Error)]
pub enum DiskError {
    #[error("cannot open heartbeat disk {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("heartbeat disk I/O failed")]
    Io(#[from] std::io::Error),
    #[error("heartbeat disk did not answer within {0:?}")]
    Timeout(Duration),
    #[error("heartbeat disk queue is full: earlier I/O still hangs")]
    Busy,
    #[error("heartbeat disk thread is gone")]
    Gone,
    #[error("heartbeat disk {path} refused")]
    Header {
        path: String,
        #[source]
        source: Box<HeaderError>,
    },
    #[error("{path} is already formatted for this cluster; formatting it again erases every slot (use --force while no agent runs)")]
    AlreadyFormatted { path: String },
}

/// A buffer aligned for O_DIRECT.
struct Aligned {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the buffer is plain memory owned by one thread at a time.
unsafe impl Send for Aligned {}

impl Aligned {
    fn new(len: usize) -> Option<Aligned> {
        let layout = Layout::from_size_align(len, 4096).ok()?;
        // SAFETY: layout has non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        (!ptr.is_null()).then_some(Aligned { ptr, layout })
    }
    fn bytes(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for layout.size() bytes and exclusively borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { dealloc(self.ptr, self.layout) }
    }
}

enum Request {
    Write {
        slot: HostId,
        bytes: Vec<u8>,
        reply: oneshot::Sender<Result<(), std::io::Error>>,
    },
    ReadAll {
        reply: oneshot::Sender<Stamped<Vec<u8>>>,
    },
    /// A write, then a read of every slot, on one opening of the path and one wake-up of the
    /// thread (and of its caller): a liveness round's I/O.
    Round {
        slot: HostId,
        bytes: Vec<u8>,
        wrote: oneshot::Sender<Result<(), std::io::Error>>,
        read: oneshot::Sender<Stamped<Vec<u8>>>,
    },
}

/// A read's outcome and when the I/O thread had it.
type Stamped<T> = (Result<T, std::io::Error>, std::time::Instant);

/// The heartbeat area in a regular file or block device, served by one I/O thread.
pub struct FileSlotDevice {
    tx: mpsc::SyncSender<Request>,
    pub path: PathBuf,
}

fn open(path: &Path) -> std::io::Result<(std::fs::File, bool)> {
    let direct = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT | libc::O_DSYNC).open(path);
    match direct {
        Ok(f) => Ok((f, true)),
        // Some filesystems (tmpfs) refuse O_DIRECT; synchronous buffered I/O is still coherent
        // for hosts sharing one kernel, which is the only case where such a filesystem is shared.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            let f = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_DSYNC).open(path)?;
            Ok((f, false))
        }
        Err(e) => Err(e),
    }
}

impl FileSlotDevice {
    /// Opens an existing heartbeat disk and starts its I/O thread. Nothing is created: a disk
    /// that is missing is an error, and [`HeartbeatDisk::check_header`] refuses one that
    /// [`format`] did not prepare for this cluster.
    pub fn open(path: &Path) -> Result<FileSlotDevice, DiskError> {
        let err = |source| DiskError::Open { path: path.display().to_string(), source };
        let (_, direct) = open(path).map_err(err)?;
        if !direct {
            tracing::warn!(path = %path.display(), "heartbeat disk does not support O_DIRECT; using O_DSYNC only");
        }
        let disk_path = path.to_path_buf();
        // Two requests may queue behind one in progress; more means the disk hangs.
        let (tx, rx) = mpsc::sync_channel::<Request>(2);
        std::thread::Builder::new()
            .name("hb-disk".into())
            .spawn(move || {
                let (Some(mut slot_buf), Some(mut all_buf)) = (Aligned::new(SLOT_SIZE), Aligned::new(DISK_SIZE)) else {
                    return;
                };
                // The path is opened for every request: shared storage that is remounted or
                // failed over is picked up again, and a path that stops resolving is a failure.
                let mut write = |f: &std::fs::File, slot: HostId, bytes: &[u8]| {
                    let buf = slot_buf.bytes();
                    buf.copy_from_slice(&bytes[..SLOT_SIZE]);
                    f.write_all_at(buf, slot_offset(slot))
                };
                let mut read = |f: &std::fs::File| {
                    let buf = all_buf.bytes();
                    f.read_exact_at(buf, 0).map(|()| area_image(buf))
                };
                for req in rx {
                    match req {
                        Request::Write { slot, bytes, reply } => {
                            let _ = reply.send(open(&disk_path).and_then(|(f, _)| write(&f, slot, &bytes)));
                        }
                        Request::ReadAll { reply } => {
                            let r = open(&disk_path).and_then(|(f, _)| read(&f));
                            let _ = reply.send((r, std::time::Instant::now()));
                        }
                        Request::Round { slot, bytes, wrote, read: reply } => match open(&disk_path) {
                            Ok((f, _)) => {
                                let _ = wrote.send(write(&f, slot, &bytes));
                                let r = read(&f);
                                let _ = reply.send((r, std::time::Instant::now()));
                            }
                            Err(e) => {
                                // The write's answer first: the caller wakes on the read's and
                                // then only looks for the write's (a missing one is a timeout).
                                let read_err = std::io::Error::new(e.kind(), e.to_string());
                                let _ = wrote.send(Err(e));
                                let _ = reply.send((Err(read_err), std::time::Instant::now()));
                            }
                        },
                    }
                }
            })
            .map_err(err)?;
        Ok(FileSlotDevice { tx, path: path.to_path_buf() })
    }

    async fn roundtrip<T>(&self, req: Request, rx: oneshot::Receiver<Result<T, std::io::Error>>) -> Result<T, DiskError> {
        self.send(req)?;
        Ok(rx.await.map_err(|_| DiskError::Gone)??)
    }

    /// [`FileSlotDevice::roundtrip`] for a read, with when the I/O thread had it.
    async fn stamped_roundtrip<T>(&self, req: Request, rx: oneshot::Receiver<Stamped<T>>) -> (Result<T, DiskError>, Option<std::time::Instant>) {
        if let Err(e) = self.send(req) {
            return (Err(e), None);
        }
        match rx.await {
            Ok((r, at)) => (r.map_err(DiskError::Io), Some(at)),
            Err(_) => (Err(DiskError::Gone), None),
        }
    }

    fn send(&self, req: Request) -> Result<(), DiskError> {
        self.tx.try_send(req).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => DiskError::Busy,
            mpsc::TrySendError::Disconnected(_) => DiskError::Gone,
        })
    }
}

/// A slot image must be exactly one slot.
fn check_slot_image(bytes: &[u8]) -> Result<(), DiskError> {
    if bytes.len() == SLOT_SIZE {
        Ok(())
    } else {
        Err(DiskError::Io(std::io::Error::other(format!("slot image is {} bytes, not {SLOT_SIZE}", bytes.len()))))
    }
}

impl SlotDevice for FileSlotDevice {
    fn write_slot(&self, slot: HostId, bytes: Vec<u8>) -> BoxFuture<'_, Result<(), DiskError>> {
        Box::pin(async move {
            check_slot_image(&bytes)?;
            let (reply, rx) = oneshot::channel();
            self.roundtrip(Request::Write { slot, bytes, reply }, rx).await
        })
    }

    fn read_all(&self) -> BoxFuture<'_, Result<Vec<u8>, DiskError>> {
        Box::pin(async move { self.read_all_stamped().await.0 })
    }

    fn read_all_stamped(&self) -> BoxFuture<'_, crate::io::StampedRead> {
        Box::pin(async move {
            let (reply, rx) = oneshot::channel();
            self.stamped_roundtrip(Request::ReadAll { reply }, rx).await
        })
    }

    fn write_then_read_all(&self, slot: HostId, bytes: Vec<u8>, timeout: Duration) -> BoxFuture<'_, SlotRound> {
        Box::pin(async move {
            if let Err(e) = check_slot_image(&bytes) {
                let again = DiskError::Io(std::io::Error::other(e.to_string()));
                return SlotRound { write: Err(e), read: Err(again), read_done: None };
            }
            let (wrote, mut wrote_rx) = oneshot::channel();
            let (read, read_rx) = oneshot::channel();
            // The read's answer comes last: waiting for it alone wakes the caller once, and
            // the write's answer is then already there (or is as late as the read).
            let (read, read_done) = match tokio::time::timeout(2 * timeout, self.stamped_roundtrip(Request::Round { slot, bytes, wrote, read }, read_rx)).await
            {
                Ok(r) => r,
                Err(_) => (Err(DiskError::Timeout(timeout)), None),
            };
            let write = match wrote_rx.try_recv() {
                Ok(r) => r.map_err(DiskError::Io),
                Err(oneshot::error::TryRecvError::Empty) => Err(DiskError::Timeout(timeout)),
                Err(oneshot::error::TryRecvError::Closed) => Err(DiskError::Gone),
            };
            SlotRound { write, read, read_done }
        })
    }
}

/// Formats `path` as this cluster's heartbeat disk: the header, then empty slots. A regular file
/// is created if missing; a block device must exist. A disk that already carries a valid header
/// (of this cluster or another) is left alone unless `force`: formatting erases live slots.
pub fn format(path: &Path, key: &ClusterKey, force: bool) -> Result<(), DiskError> {
    use std::io::Read;
    let name = path.display().to_string();
    let err = |source| DiskError::Open { path: name.clone(), source };
    let mut f = std::fs::OpenOptions::new().read(true).write(true).create(!path.exists()).truncate(false).open(path).map_err(err)?;
    let mut head = vec![0u8; HEADER_SIZE];
    let have = f.read(&mut head).map_err(err)?;
    if !force && have == HEADER_SIZE {
        match DiskHeader::check(&head, key) {
            Ok(_) => return Err(DiskError::AlreadyFormatted { path: name }),
            Err(HeaderError::Unformatted) => {}
            Err(source) => return Err(DiskError::Header { path: name, source: Box::new(source) }),
        }
    }
    let mut area = DiskHeader::for_cluster(key).encode(key);
    area.resize(DISK_SIZE, 0);
    f.write_all_at(&area, 0).map_err(err)?;
    f.sync_all().map_err(err)?;
    Ok(())
}

/// Slots of the heartbeat disk as the agent sees them: encoded and authenticated with the
/// cluster key, and every I/O bounded by a deadline (a late answer counts as lost).
#[derive(Clone)]
pub struct HeartbeatDisk {
    dev: Arc<dyn SlotDevice>,
    key: ClusterKey,
    timeout: Duration,
    /// Each slot's record as of the previous read and what it decoded to: a record that did
    /// not change decodes to the same thing, so only changed slots are authenticated again.
    /// Only the record is kept and compared (`SLOT_RECORD_LEN` bytes, not the 4 KiB block): a
    /// slot whose record is not all zeros decodes from those bytes alone; one whose record is
    /// all zeros is decoded afresh (empty, or damaged further on).
    decoded: Arc<std::sync::Mutex<Vec<DecodedSlot>>>,
}

/// A slot's record as last read (`None`: decoded afresh every read), and what it decoded to.
type DecodedSlot = (Option<[u8; SLOT_RECORD_LEN]>, SlotRead);

impl HeartbeatDisk {
    #[must_use]
    pub fn new(dev: Arc<dyn SlotDevice>, key: ClusterKey, timeout: Duration) -> HeartbeatDisk {
        HeartbeatDisk { dev, key, timeout, decoded: Arc::default() }
    }

    /// The path the disk is reached through now, when it has several (`heartbeat_disk_paths`).
    #[must_use]
    pub fn path_in_use(&self) -> Option<PathBuf> {
        self.dev.path_in_use()
    }

    /// Writes this host's slot.
    pub async fn write(&self, slot: &DiskSlot) -> Result<(), DiskError> {
        let bytes = slot.encode(&self.key);
        tokio::time::timeout(self.timeout, self.dev.write_slot(slot.host, bytes)).await.map_err(|_| DiskError::Timeout(self.timeout))?
    }

    /// Reads the header and checks that this is the cluster's heartbeat disk: an agent refuses
    /// to start on any other.
    pub async fn check_header(&self, path: &str) -> Result<DiskHeader, DiskError> {
        let bytes = tokio::time::timeout(self.timeout, self.dev.read_all()).await.map_err(|_| DiskError::Timeout(self.timeout))??;
        DiskHeader::check_image(&bytes, &self.key).map_err(|source| DiskError::Header { path: path.to_string(), source: Box::new(source) })
    }

    /// Reads and decodes every slot. The header is checked at every read: a disk swapped
    /// underneath (a mount that appeared or vanished) reads as failed.
    pub async fn read_all(&self) -> Result<Vec<SlotRead>, DiskError> {
        self.read_all_stamped().await.0
    }

    /// [`HeartbeatDisk::read_all`], with when the read completed if the device stamped it
    /// (see `SlotRound::read_done`).
    pub async fn read_all_stamped(&self) -> (Result<Vec<SlotRead>, DiskError>, Option<std::time::Instant>) {
        match tokio::time::timeout(self.timeout, self.dev.read_all_stamped()).await {
            Ok((read, done)) => (read.and_then(|bytes| self.decode_area(&bytes)), done),
            Err(_) => (Err(DiskError::Timeout(self.timeout)), None),
        }
    }

    /// Writes this host's slot, then reads and decodes every slot (as [`HeartbeatDisk::write`]
    /// and [`HeartbeatDisk::read_all`], in one request to the device); the read's completion
    /// stamp if the device has one.
    pub async fn round(&self, slot: &DiskSlot) -> (Result<(), DiskError>, Result<Vec<SlotRead>, DiskError>, Option<std::time::Instant>) {
        let round = self.dev.write_then_read_all(slot.host, slot.encode(&self.key), self.timeout).await;
        (round.write, round.read.and_then(|bytes| self.decode_area(&bytes)), round.read_done)
    }

    /// Decodes an area image (see `AREA_IMAGE_LEN`): the header, then every slot's record.
    fn decode_area(&self, bytes: &[u8]) -> Result<Vec<SlotRead>, DiskError> {
        if bytes.len() != AREA_IMAGE_LEN {
            return Err(DiskError::Io(std::io::Error::other(format!("heartbeat area image is {} bytes, not {AREA_IMAGE_LEN}", bytes.len()))));
        }
        DiskHeader::check_image(bytes, &self.key).map_err(|source| DiskError::Header { path: "heartbeat disk".into(), source: Box::new(source) })?;
        let mut cache = self.decoded.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut slots = Vec::with_capacity(tandem_core::MAX_HOSTS);
        for (i, b) in image_slots(bytes).enumerate() {
            if cache.len() <= i {
                cache.push((None, SlotRead::Empty));
            }
            let entry = &mut cache[i];
            let record: Option<[u8; SLOT_RECORD_LEN]> =
                b.get(..SLOT_RECORD_LEN).and_then(|r| r.try_into().ok()).filter(|r: &[u8; SLOT_RECORD_LEN]| r.iter().any(|x| *x != 0));
            if record.is_none() || entry.0 != record {
                *entry = (record, DiskSlot::decode(b, HostId(i as u32), &self.key));
            }
            slots.push(entry.1);
        }
        Ok(slots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::HostSet;

    #[tokio::test]
    async fn write_read_and_detect_corruption() {
        let dir = std::env::temp_dir().join(format!("tandem-disk-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("hb");
        let key = ClusterKey::new(b"disk-test-secret-0123").expect("key");
        format(&path, &key, false).expect("format");
        let disk = HeartbeatDisk::new(Arc::new(FileSlotDevice::open(&path).expect("open")), key.clone(), Duration::from_secs(2));
        assert_eq!(std::fs::metadata(&path).expect("meta").len() as usize, DISK_SIZE);
        disk.check_header("hb").await.expect("formatted for this cluster");
        let slot = DiskSlot { host: HostId(3), incarnation: 1, counter: 9, epoch: 2, heard: HostSet(0b1000), fenced: false, written_at_ms: 5 };
        disk.write(&slot).await.expect("write");
        let all = disk.read_all().await.expect("read");
        assert_eq!(all.len(), tandem_core::MAX_HOSTS);
        assert_eq!(all[3], SlotRead::Valid(slot));
        assert_eq!(all[0], SlotRead::Empty);
        // Damage slot 3 behind the agent's back: it is reported corrupt, and slot 4 stays empty.
        let f = std::fs::OpenOptions::new().write(true).open(&path).expect("open raw");
        f.write_all_at(b"garbage", slot_offset(HostId(3)) + 8).expect("damage");
        let all = disk.read_all().await.expect("read");
        assert!(matches!(all[3], SlotRead::Corrupt(_)));
        assert_eq!(all[4], SlotRead::Empty);
        // Reads decode only the slots that changed since the previous read: a slot written
        // again reads as what was written, unchanged slots as before.
        let next = DiskSlot { counter: 10, ..slot };
        disk.write(&next).await.expect("write");
        let all = disk.read_all().await.expect("read");
        assert_eq!((&all[3], &all[4]), (&SlotRead::Valid(next), &SlotRead::Empty));
        assert_eq!(disk.read_all().await.expect("read again")[3], SlotRead::Valid(next));
        // Padding past the record changes nothing for a written slot, and makes an empty
        // slot's block damaged, read after read (the area image marks it: `area_image`).
        f.write_all_at(b"tail", slot_offset(HostId(3)) + 4000).expect("pad");
        f.write_all_at(b"tail", slot_offset(HostId(4)) + 4000).expect("pad");
        for _ in 0..2 {
            let all = disk.read_all().await.expect("read");
            assert_eq!(all[3], SlotRead::Valid(next));
            assert!(matches!(all[4], SlotRead::Corrupt(_)), "{:?}", all[4]);
        }
        f.write_all_at(&[0u8; 4], slot_offset(HostId(4)) + 4000).expect("clean");
        assert_eq!(disk.read_all().await.expect("read")[4], SlotRead::Empty);
        // A liveness round writes, then reads what it wrote.
        let third = DiskSlot { counter: 11, ..slot };
        let (written, read, _) = disk.round(&third).await;
        written.expect("round write");
        assert_eq!(read.expect("round read")[3], SlotRead::Valid(third));
        // The I/O thread stamps when each read completed: taken later (the liveness thread's
        // next poll), the answer still says when the read ended, not when it was taken.
        for stamped in [0, 1] {
            let sent = std::time::Instant::now();
            let (read, done) = if stamped == 0 {
                let (_, read, done) = disk.round(&DiskSlot { counter: 12, ..slot }).await;
                (read, done)
            } else {
                disk.read_all_stamped().await
            };
            let done = done.expect("the file device stamps its reads");
            std::thread::sleep(Duration::from_millis(30));
            read.expect("read");
            assert!(done >= sent && done + Duration::from_millis(30) <= std::time::Instant::now(), "the stamp is the read's end");
        }
        // A disk whose header is replaced underneath (another disk mounted over the path) reads
        // as failed, never as a silent cluster.
        f.write_all_at(&[0u8; 16], 0).expect("wipe header");
        assert!(matches!(disk.read_all().await, Err(DiskError::Header { source, .. }) if *source == HeaderError::Unformatted));
        // A path that stops resolving is a failed I/O, not a hang.
        std::fs::remove_file(&path).expect("remove");
        assert!(matches!(disk.read_all().await, Err(DiskError::Io(_))));
        // So is either half of a round, every time (the round's two answers once raced: its
        // write half read as a timeout, which kept a multipath disk from retrying at once).
        for n in 0..50 {
            let (written, read, _) = disk.round(&DiskSlot { counter: 100 + n, ..slot }).await;
            assert!(matches!((&written, &read), (Err(DiskError::Io(_)), Err(DiskError::Io(_)))), "round {n}: {written:?} {read:?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The disk is never created implicitly, and only an explicit format prepares one: a missing
    /// path, an unformatted file, another cluster's disk and a second format are all refused
    /// with a message that says which.
    #[tokio::test]
    async fn only_a_disk_formatted_for_this_cluster_is_accepted() {
        let dir = std::env::temp_dir().join(format!("tandem-disk-fmt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let key = ClusterKey::new(b"disk-test-secret-0123").expect("key");
        let other = ClusterKey::new(b"another-cluster-secret").expect("key");
        let missing = dir.join("typo");
        assert!(matches!(FileSlotDevice::open(&missing), Err(DiskError::Open { .. })));
        assert!(!missing.exists(), "opening must not create the disk");

        let local = dir.join("local");
        std::fs::write(&local, vec![0u8; DISK_SIZE]).expect("local file");
        let d = HeartbeatDisk::new(Arc::new(FileSlotDevice::open(&local).expect("open")), key.clone(), Duration::from_secs(2));
        let e = d.check_header("local").await.expect_err("unformatted");
        assert!(crate::api::chain(&e).contains("not formatted"), "{e}");

        let theirs = dir.join("theirs");
        format(&theirs, &other, false).expect("format");
        let d = HeartbeatDisk::new(Arc::new(FileSlotDevice::open(&theirs).expect("open")), key.clone(), Duration::from_secs(2));
        let e = d.check_header("theirs").await.expect_err("other cluster");
        assert!(crate::api::chain(&e).contains("another cluster"), "{e}");
        assert!(matches!(format(&theirs, &key, false), Err(DiskError::Header { source, .. }) if matches!(*source, HeaderError::OtherCluster { .. })));

        let ours = dir.join("ours");
        format(&ours, &key, false).expect("format");
        assert!(matches!(format(&ours, &key, false), Err(DiskError::AlreadyFormatted { .. })));
        format(&ours, &key, true).expect("forced format");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A device whose I/O never completes, like shared storage that hangs.
    struct HungDevice;

    impl SlotDevice for HungDevice {
        fn write_slot(&self, _slot: HostId, _bytes: Vec<u8>) -> BoxFuture<'_, Result<(), DiskError>> {
            Box::pin(std::future::pending())
        }
        fn read_all(&self) -> BoxFuture<'_, Result<Vec<u8>, DiskError>> {
            Box::pin(std::future::pending())
        }
    }

    #[tokio::test]
    async fn a_hung_device_times_out_instead_of_stalling_the_caller() {
        let key = ClusterKey::new(b"disk-test-secret-0123").expect("key");
        let disk = HeartbeatDisk::new(Arc::new(HungDevice), key, Duration::from_millis(100));
        let slot = DiskSlot { host: HostId(1), incarnation: 1, counter: 1, epoch: 1, heard: HostSet(0b10), fenced: false, written_at_ms: 0 };
        let started = std::time::Instant::now();
        assert!(matches!(disk.write(&slot).await, Err(DiskError::Timeout(_))));
        assert!(matches!(disk.read_all().await, Err(DiskError::Timeout(_))));
        let (written, read, _) = disk.round(&slot).await;
        assert!(matches!((written, read), (Err(DiskError::Timeout(_)), Err(DiskError::Timeout(_)))), "a round on a hung device times out both halves");
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
    }
}
