//! A FUSE view of the shared heartbeat disk, one file per host, through which the fault suite
//! makes one host's heartbeat disk fail or hang for real: the agent's own I/O thread blocks in
//! the kernel exactly as it would on a hung SAN path, while every other host's view keeps
//! working.
//!
//! Every file passes reads and writes through to one backing file. Files are opened with
//! `FOPEN_DIRECT_IO`, so the page cache never answers for us and every I/O reaches this process.
//! A hung request is parked (its reply is kept) and completed, late, once the mode goes back to
//! normal, as a storage path that recovers would do.
//!
//! The storage can also have a volatile write cache ([`FuseDisk::set_volatile_cache`]): writes
//! not yet followed by an `fsync` are lost when its power goes ([`FuseDisk::lose_power`]), as
//! a disk's or an array's cache without a battery loses them.

use std::collections::VecDeque;
use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use fuser::{FileAttr, FileType, Filesystem, ReplyAttr, ReplyData, ReplyDirectory, ReplyEntry, ReplyOpen, ReplyWrite, Request};

/// How one host's view of the disk behaves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ViewMode {
    Normal,
    /// Every open, read and write fails with EIO.
    Fail,
    /// Every open, read and write waits until the mode changes.
    Hang,
    /// Opens and reads are served at once; writes one per [`SLOW_WRITE_EVERY`], in order (a
    /// storage path that has come back slow: a copy into it takes its time).
    SlowWrites,
}

/// How often a view in [`ViewMode::SlowWrites`] completes one write.
pub const SLOW_WRITE_EVERY: Duration = Duration::from_millis(250);

/// A request waiting for its hung view to recover.
enum Parked {
    Open(ReplyOpen),
    Read { offset: i64, size: u32, reply: ReplyData },
    Write { offset: i64, data: Vec<u8>, reply: ReplyWrite },
}

struct Shared {
    backing: std::fs::File,
    /// Bytes written through the views so far.
    written: u64,
    modes: Vec<ViewMode>,
    parked: Vec<VecDeque<Parked>>,
    /// With a volatile write cache: what each write since the last `fsync` overwrote (offset,
    /// old bytes), oldest first — what a power loss would leave instead. `None`: no cache.
    unsynced: Option<VecDeque<(u64, Vec<u8>)>>,
    /// `fsync`s served so far.
    syncs: u64,
}

fn lock(m: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Bound on parked requests per view: the agent's I/O thread has at most one in flight, so
/// more means something else is hammering the file; fail those rather than grow.
const MAX_PARKED: usize = 64;
/// Bound on the writes a volatile cache holds: past it the oldest is written back (kept).
const MAX_UNSYNCED: usize = 1 << 16;
const ROOT: u64 = 1;
const TTL: Duration = Duration::from_millis(100);
/// `FOPEN_DIRECT_IO`: bypass the page cache for this open file.
const FOPEN_DIRECT_IO: u32 = 1;

struct ViewFs {
    shared: Arc<Mutex<Shared>>,
    size: u64,
}

impl ViewFs {
    fn view_of(&self, ino: u64) -> Option<usize> {
        let i = usize::try_from(ino.checked_sub(2)?).ok()?;
        (i < lock(&self.shared).modes.len()).then_some(i)
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let dir = ino == ROOT;
        FileAttr {
            ino,
            size: if dir { 0 } else { self.size },
            blocks: if dir { 0 } else { self.size.div_ceil(512) },
            atime: SystemTime::UNIX_EPOCH,
            mtime: SystemTime::UNIX_EPOCH,
            ctime: SystemTime::UNIX_EPOCH,
            crtime: SystemTime::UNIX_EPOCH,
            kind: if dir { FileType::Directory } else { FileType::RegularFile },
            perm: if dir { 0o755 } else { 0o600 },
            nlink: if dir { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 512,
            flags: 0,
        }
    }

    /// Parks the request if the view hangs, answers EIO if it fails, or hands it back to be
    /// served now.
    fn gate(&self, view: usize, req: Parked) -> Option<Parked> {
        let mut s = lock(&self.shared);
        match s.modes[view] {
            ViewMode::Normal => Some(req),
            ViewMode::Fail => {
                fail(req);
                None
            }
            ViewMode::Hang if s.parked[view].len() >= MAX_PARKED => {
                fail(req);
                None
            }
            ViewMode::Hang => {
                s.parked[view].push_back(req);
                None
            }
            ViewMode::SlowWrites if matches!(req, Parked::Write { .. }) && s.parked[view].len() >= MAX_PARKED => {
                fail(req);
                None
            }
            ViewMode::SlowWrites if matches!(req, Parked::Write { .. }) => {
                s.parked[view].push_back(req);
                None
            }
            ViewMode::SlowWrites => Some(req),
        }
    }
}

fn fail(req: Parked) {
    match req {
        Parked::Open(r) => r.error(libc::EIO),
        Parked::Read { reply, .. } => reply.error(libc::EIO),
        Parked::Write { reply, .. } => reply.error(libc::EIO),
    }
}

/// With a volatile cache, keeps what a write of `len` bytes at `offset` is about to overwrite.
fn remember_unsynced(s: &mut Shared, offset: u64, len: usize) -> std::io::Result<()> {
    let Some(log) = s.unsynced.as_mut() else { return Ok(()) };
    let mut old = vec![0u8; len];
    let n = s.backing.read_at(&mut old, offset)?;
    old.truncate(n);
    if log.len() >= MAX_UNSYNCED {
        log.pop_front();
    }
    log.push_back((offset, old));
    Ok(())
}

fn serve(s: &mut Shared, req: Parked) {
    let backing = &s.backing;
    match req {
        Parked::Open(r) => r.opened(0, FOPEN_DIRECT_IO),
        Parked::Read { offset, size, reply } => {
            let mut buf = vec![0u8; size as usize];
            match backing.read_at(&mut buf, offset.max(0) as u64) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => reply.error(e.raw_os_error().unwrap_or(libc::EIO)),
            }
        }
        Parked::Write { offset, data, reply } => {
            match remember_unsynced(s, offset.max(0) as u64, data.len()).and_then(|()| s.backing.write_all_at(&data, offset.max(0) as u64)) {
                Ok(()) => {
                    s.written += data.len() as u64;
                    reply.written(data.len() as u32);
                }
                Err(e) => reply.error(e.raw_os_error().unwrap_or(libc::EIO)),
            }
        }
    }
}

impl Filesystem for ViewFs {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let view = name.to_str().and_then(|n| n.strip_prefix('h')).and_then(|n| n.strip_suffix(".disk")).and_then(|n| n.parse::<u64>().ok());
        match view.map(|v| v + 2).filter(|ino| parent == ROOT && self.view_of(*ino).is_some()) {
            Some(ino) => reply.entry(&TTL, &self.attr(ino), 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        if ino == ROOT || self.view_of(ino).is_some() {
            reply.attr(&TTL, &self.attr(ino));
        } else {
            reply.error(libc::ENOENT);
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        let Some(view) = self.view_of(ino) else { return reply.error(libc::ENOENT) };
        if let Some(r) = self.gate(view, Parked::Open(reply)) {
            serve(&mut lock(&self.shared), r);
        }
    }

    fn read(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, size: u32, _flags: i32, _lock: Option<u64>, reply: ReplyData) {
        let Some(view) = self.view_of(ino) else { return reply.error(libc::ENOENT) };
        if let Some(r) = self.gate(view, Parked::Read { offset, size, reply }) {
            serve(&mut lock(&self.shared), r);
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock: Option<u64>,
        reply: ReplyWrite,
    ) {
        let Some(view) = self.view_of(ino) else { return reply.error(libc::ENOENT) };
        if let Some(r) = self.gate(view, Parked::Write { offset, data: data.to_vec(), reply }) {
            serve(&mut lock(&self.shared), r);
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock_owner: u64, reply: fuser::ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _datasync: bool, reply: fuser::ReplyEmpty) {
        let mut s = lock(&self.shared);
        match s.backing.sync_data() {
            Ok(()) => {
                if let Some(log) = s.unsynced.as_mut() {
                    log.clear();
                }
                s.syncs += 1;
                reply.ok()
            }
            Err(e) => reply.error(e.raw_os_error().unwrap_or(libc::EIO)),
        }
    }

    fn readdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, offset: i64, mut reply: ReplyDirectory) {
        if ino != ROOT {
            return reply.error(libc::ENOTDIR);
        }
        let views = lock(&self.shared).modes.len() as u64;
        let mut entries = vec![(ROOT, FileType::Directory, ".".to_string()), (ROOT, FileType::Directory, "..".to_string())];
        entries.extend((0..views).map(|v| (v + 2, FileType::RegularFile, format!("h{v}.disk"))));
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(ino, (i + 1) as i64, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// Why the FUSE view could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum FuseDiskError {
    #[error("cannot open the backing heartbeat disk {path}")]
    Backing { path: String, source: std::io::Error },
    #[error("cannot mount the FUSE view at {path} (is /dev/fuse there and fusermount3 installed?)")]
    Mount { path: String, source: std::io::Error },
}

/// A mounted view; unmounted when dropped (parked requests fail first, so nothing stays stuck).
pub struct FuseDisk {
    shared: Arc<Mutex<Shared>>,
    mountpoint: PathBuf,
    stop: Arc<AtomicBool>,
    session: Option<fuser::BackgroundSession>,
}

impl FuseDisk {
    /// Mounts `views` files `h0.disk`… at `mountpoint`, all backed by `backing`.
    pub fn mount(backing: &Path, mountpoint: &Path, views: usize) -> Result<FuseDisk, FuseDiskError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(backing)
            .map_err(|source| FuseDiskError::Backing { path: backing.display().to_string(), source })?;
        let size = file.metadata().map_err(|source| FuseDiskError::Backing { path: backing.display().to_string(), source })?.len();
        let shared = Arc::new(Mutex::new(Shared {
            backing: file,
            written: 0,
            modes: vec![ViewMode::Normal; views],
            parked: (0..views).map(|_| VecDeque::new()).collect(),
            unsynced: None,
            syncs: 0,
        }));
        let fs = ViewFs { shared: Arc::clone(&shared), size };
        let options = [fuser::MountOption::FSName("tandem-hbdisk".into()), fuser::MountOption::DefaultPermissions];
        let session =
            fuser::spawn_mount2(fs, mountpoint, &options).map_err(|source| FuseDiskError::Mount { path: mountpoint.display().to_string(), source })?;
        let stop = Arc::new(AtomicBool::new(false));
        // Completes parked requests of views that have recovered (slow ones one at a time).
        let (s, st) = (Arc::clone(&shared), Arc::clone(&stop));
        std::thread::spawn(move || {
            let mut slow_served = std::time::Instant::now();
            while !st.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(10));
                let mut g = lock(&s);
                let g = &mut *g;
                let slow_turn = slow_served.elapsed() >= SLOW_WRITE_EVERY;
                let mut ready: Vec<Parked> = Vec::new();
                for (m, p) in g.modes.iter().zip(g.parked.iter_mut()) {
                    match m {
                        ViewMode::Hang => {}
                        ViewMode::SlowWrites if slow_turn => ready.extend(p.pop_front()),
                        ViewMode::SlowWrites => {}
                        ViewMode::Normal | ViewMode::Fail => ready.extend(std::mem::take(p)),
                    }
                }
                if slow_turn {
                    slow_served = std::time::Instant::now();
                }
                for r in ready {
                    serve(g, r);
                }
            }
        });
        Ok(FuseDisk { shared, mountpoint: mountpoint.to_path_buf(), stop, session: Some(session) })
    }

    /// The path host `view` uses.
    #[must_use]
    pub fn path(&self, view: usize) -> PathBuf {
        self.mountpoint.join(format!("h{view}.disk"))
    }

    pub fn set_mode(&self, view: usize, mode: ViewMode) {
        if let Some(m) = lock(&self.shared).modes.get_mut(view) {
            *m = mode;
        }
    }

    /// Bytes written through the views so far.
    #[must_use]
    pub fn written(&self) -> u64 {
        lock(&self.shared).written
    }

    /// Gives the storage a volatile write cache (or takes it away): from now on, writes not
    /// followed by an `fsync` are lost by [`FuseDisk::lose_power`].
    pub fn set_volatile_cache(&self, on: bool) {
        lock(&self.shared).unsynced = on.then(VecDeque::new);
    }

    /// The storage loses power: every write since the last `fsync` is undone (newest first),
    /// and from then on every view hangs (nothing answers). Returns how many writes were undone.
    pub fn lose_power(&self) -> std::io::Result<usize> {
        let mut s = lock(&self.shared);
        s.modes.iter_mut().for_each(|m| *m = ViewMode::Hang);
        let log = s.unsynced.as_mut().map(std::mem::take).unwrap_or_default();
        let lost = log.len();
        for (offset, old) in log.into_iter().rev() {
            s.backing.write_all_at(&old, offset)?;
        }
        Ok(lost)
    }

    /// Writes a volatile cache holds now (not yet followed by an `fsync`).
    #[must_use]
    pub fn unsynced(&self) -> usize {
        lock(&self.shared).unsynced.as_ref().map_or(0, VecDeque::len)
    }

    /// `fsync`s the views have served so far.
    #[must_use]
    pub fn syncs(&self) -> u64 {
        lock(&self.shared).syncs
    }

    /// Requests waiting on hung views right now.
    #[must_use]
    pub fn parked(&self) -> usize {
        lock(&self.shared).parked.iter().map(VecDeque::len).sum()
    }
}

impl Drop for FuseDisk {
    fn drop(&mut self) {
        {
            let mut g = lock(&self.shared);
            for m in &mut g.modes {
                *m = ViewMode::Fail;
            }
            let parked: Vec<Parked> = g.parked.iter_mut().flat_map(std::mem::take).collect();
            for r in parked {
                fail(r);
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        // Dropping the session unmounts.
        drop(self.session.take());
    }
}
