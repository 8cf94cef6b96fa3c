//! The disk witness's region of shared storage: a header, one claim block per host, then the
//! witness's consensus database (see `tandem_core::witness` for the protocol).
//!
//! The region is a file on the shared storage or a block device (configuration
//! `disk_witness`), created by the operator (`truncate -s 64M`, or a partition) and never by
//! the agent. Claim blocks are read and written with O_DIRECT and O_DSYNC, as the heartbeat
//! disk is, so every host reads what the others wrote, not its own cache. The database behind
//! them is opened only by the host that holds the witness ([`RegionBackend`]).

use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tandem_core::wire::ClusterKey;
use tandem_core::witness::{Claim, ClaimError, CLAIMS_OFFSET, CLAIM_SIZE, DATABASE_OFFSET};
use tandem_core::{HostId, MAX_HOSTS};
use thiserror::Error;

/// The smallest region: header, claims and 16 MiB of database.
pub const MIN_REGION_BYTES: u64 = DATABASE_OFFSET + (16 << 20);
/// How long one claim read or write may take before the round counts it as failed (the
/// witness loop is never blocked by a hung disk: the I/O runs on the blocking pool).
pub const CLAIM_IO_TIMEOUT: Duration = Duration::from_secs(2);
/// The database header: magic, then the database's length (u64, little-endian).
const REGION_MAGIC: &[u8; 8] = b"TNDWREG1";
/// O_DIRECT alignment.
const ALIGN: u64 = 4096;

/// Witness-region failures.
#[derive(Debug, Error)]
pub enum RegionError {
    #[error("cannot open the disk witness region {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the disk witness region {path} holds {bytes} bytes; it needs at least {MIN_REGION_BYTES}")]
    TooSmall { path: String, bytes: u64 },
    #[error("disk witness region I/O failed")]
    Io(#[from] std::io::Error),
    #[error("the disk witness region did not answer within {0:?}")]
    Timeout(Duration),
    #[error("claim block of host {host} refused")]
    Claim {
        host: u32,
        #[source]
        source: ClaimError,
    },
    #[error("the disk witness region is closed on this host (it fenced or let the witness go)")]
    Closed,
}

/// Raw access to the region. Writes are durable when they return.
pub trait WitnessRegion: Send + Sync + std::fmt::Debug + 'static {
    fn read_at(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()>;
    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()>;
    fn size(&self) -> u64;
}

/// A region in a file or block device, read and written through aligned spans with O_DIRECT
/// and O_DSYNC (O_DSYNC alone where the filesystem refuses O_DIRECT, as tmpfs does).
#[derive(Debug)]
pub struct FileWitnessRegion {
    file: std::fs::File,
    size: u64,
    /// Serializes the read-modify-write of partial blocks.
    rmw: Mutex<()>,
}

impl FileWitnessRegion {
    pub fn open(path: &Path) -> Result<FileWitnessRegion, RegionError> {
        let open_err = |source| RegionError::Open { path: path.display().to_string(), source };
        let direct = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_DIRECT | libc::O_DSYNC).open(path);
        let file = match direct {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_DSYNC).open(path).map_err(open_err)?
            }
            Err(e) => return Err(open_err(e)),
        };
        let size = region_size(&file).map_err(open_err)?;
        if size < MIN_REGION_BYTES {
            return Err(RegionError::TooSmall { path: path.display().to_string(), bytes: size });
        }
        Ok(FileWitnessRegion { file, size, rmw: Mutex::new(()) })
    }

    /// The aligned span covering `offset..offset+len`, read whole.
    fn read_span(&self, offset: u64, len: usize) -> std::io::Result<(u64, AlignedBuf)> {
        let start = offset / ALIGN * ALIGN;
        let end = (offset + len as u64).div_ceil(ALIGN) * ALIGN;
        let mut buf = AlignedBuf::new((end - start) as usize)?;
        self.file.read_exact_at(buf.as_mut(), start)?;
        Ok((start, buf))
    }
}

/// A file's or block device's size.
fn region_size(file: &std::fs::File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    let end = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(end)
}

impl WitnessRegion for FileWitnessRegion {
    fn read_at(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        check_bounds(offset, out.len(), self.size)?;
        let (start, buf) = self.read_span(offset, out.len())?;
        let at = (offset - start) as usize;
        out.copy_from_slice(&buf.as_ref()[at..at + out.len()]);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        check_bounds(offset, data.len(), self.size)?;
        let _one = self.rmw.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (start, mut buf) = self.read_span(offset, data.len())?;
        let at = (offset - start) as usize;
        buf.as_mut()[at..at + data.len()].copy_from_slice(data);
        self.file.write_all_at(buf.as_ref(), start)
    }

    fn size(&self) -> u64 {
        self.size
    }
}

fn check_bounds(offset: u64, len: usize, size: u64) -> std::io::Result<()> {
    if offset.checked_add(len as u64).is_none_or(|end| end > size) {
        return Err(std::io::Error::other(format!("{len} bytes at {offset} lie beyond the region's {size} bytes")));
    }
    Ok(())
}

/// A zeroed buffer aligned for O_DIRECT.
struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    layout: std::alloc::Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> std::io::Result<AlignedBuf> {
        let layout = std::alloc::Layout::from_size_align(len.max(1), ALIGN as usize).map_err(std::io::Error::other)?;
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw).ok_or_else(|| std::io::Error::other("out of memory"))?;
        Ok(AlignedBuf { ptr, layout })
    }

    fn as_ref(&self) -> &[u8] {
        // SAFETY: `ptr` holds `layout.size()` initialized bytes, owned by this buffer.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// Reads every host's claim block (one read of the claims area). Blocks never written are left
/// out; a block that fails its checks is an error naming its host (a forged or foreign claim
/// must not be taken for "nobody claims").
pub fn read_claims(region: &dyn WitnessRegion, key: &ClusterKey) -> Result<Vec<Claim>, RegionError> {
    let mut area = vec![0u8; MAX_HOSTS * CLAIM_SIZE];
    region.read_at(CLAIMS_OFFSET, &mut area)?;
    let mut claims = Vec::new();
    for (i, block) in area.chunks_exact(CLAIM_SIZE).enumerate() {
        let host = HostId(i as u32);
        if let Some(c) = Claim::decode(block, host, key).map_err(|source| RegionError::Claim { host: host.0, source })? {
            claims.push(c);
        }
    }
    Ok(claims)
}

/// Writes this host's claim block.
pub fn write_claim(region: &dyn WitnessRegion, key: &ClusterKey, claim: &Claim) -> Result<(), RegionError> {
    region.write_at(CLAIMS_OFFSET + u64::from(claim.host.0) * CLAIM_SIZE as u64, &claim.encode(key))?;
    Ok(())
}

/// Whether this host may write the witness's database at this instant: it holds its liveness
/// lease (checked afresh at every write, as a VM start is, so a host that resumes from a pause
/// longer than its lease writes nothing before its liveness loop notices).
pub type LeaseCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// What [`RegionBackend`] knows of the database: the length redb set, and the bytes written or
/// read (at least that long; a write past the length extends them, as it extends the region).
#[derive(Default)]
struct DatabaseImage {
    len: u64,
    bytes: Vec<u8>,
}

/// The span of each read that loads the database's image at open.
const IMAGE_READ_SPAN: usize = 1 << 20;

/// The witness's database as redb storage, in the region after the claims: its length is kept
/// in the region's header. Once `closed` is set (this host fenced, or let the witness go), or
/// while `lease` says no, every read and write is refused, so a node still shutting down, or resumed
/// after a pause, cannot touch the database once another host may have opened it.
pub struct RegionBackend {
    region: Arc<dyn WitnessRegion>,
    /// The database's bytes as this node last read or wrote them (its length is the
    /// database's). Read whole at open (in spans of `IMAGE_READ_SPAN`) and kept up to date by
    /// every write that landed, so redb's many small reads cost no I/O: over a network witness
    /// each would be a round trip.
    /// Sound because this node is the database's only writer while it may touch it at all (the
    /// claims and the lease check), and a node whose write failed is closed, never used again.
    image: Mutex<DatabaseImage>,
    closed: Arc<AtomicBool>,
    lease: LeaseCheck,
}

impl std::fmt::Debug for RegionBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RegionBackend({:?}, closed: {})", self.region, self.closed.load(Ordering::SeqCst))
    }
}

impl RegionBackend {
    /// Reads the database length from the region's header (0 for a region never used).
    pub fn open(region: Arc<dyn WitnessRegion>, closed: Arc<AtomicBool>, lease: LeaseCheck) -> Result<RegionBackend, RegionError> {
        let mut header = [0u8; 16];
        region.read_at(0, &mut header)?;
        let len = if &header[..8] == REGION_MAGIC { u64::from_le_bytes(header[8..16].try_into().unwrap_or_default()) } else { 0 };
        if DATABASE_OFFSET + len > region.size() {
            return Err(RegionError::Io(std::io::Error::other(format!("the region's header gives a database of {len} bytes, more than the region holds"))));
        }
        let mut bytes = vec![0u8; len as usize];
        for (i, chunk) in bytes.chunks_mut(IMAGE_READ_SPAN).enumerate() {
            region.read_at(DATABASE_OFFSET + (i * IMAGE_READ_SPAN) as u64, chunk)?;
        }
        Ok(RegionBackend { region, image: Mutex::new(DatabaseImage { len, bytes }), closed, lease })
    }

    fn image(&self) -> std::sync::MutexGuard<'_, DatabaseImage> {
        self.image.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Refuses the call once the node is closed, and closes it for good the first time the
    /// lease says no: a database that missed a write (a commit cut in half) must not be used
    /// again by this instance — the simulator found redb reading its own half-written pages
    /// after a brief lapse — so the loop closes the node and a new claim round opens it afresh.
    fn refuse_if_closed(&self) -> std::io::Result<()> {
        if !self.closed.load(Ordering::SeqCst) && !(self.lease)() {
            self.closed.store(true, Ordering::SeqCst);
        }
        if self.closed.load(Ordering::SeqCst) {
            return Err(std::io::Error::other(RegionError::Closed.to_string()));
        }
        Ok(())
    }
}

impl redb::StorageBackend for RegionBackend {
    fn len(&self) -> Result<u64, std::io::Error> {
        Ok(self.image().len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
        // Reads too: once another host may hold the witness, this node's image is not that
        // host's database (redb panicked on such a page in the simulator).
        self.refuse_if_closed()?;
        let image = self.image();
        let at = usize::try_from(offset).map_err(std::io::Error::other)?;
        match image.bytes.get(at..at + out.len()) {
            Some(src) => out.copy_from_slice(src),
            // Past what this node has seen: the region's own bytes (never written by it).
            None => self.region.read_at(DATABASE_OFFSET + offset, out)?,
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
        self.refuse_if_closed()?;
        if DATABASE_OFFSET + len > self.region.size() {
            return Err(std::io::Error::other(format!("the disk witness region is full: a database of {len} bytes does not fit")));
        }
        let mut image = self.image();
        // New positions read as zeros: a region used before may hold an older database there.
        let zeros = vec![0u8; 1 << 20];
        let mut at = image.len;
        while at < len {
            let n = (len - at).min(zeros.len() as u64) as usize;
            self.region.write_at(DATABASE_OFFSET + at, &zeros[..n])?;
            at += n as u64;
        }
        let mut header = [0u8; 16];
        header[..8].copy_from_slice(REGION_MAGIC);
        header[8..].copy_from_slice(&len.to_le_bytes());
        self.region.write_at(0, &header)?;
        let (old_len, new_len) = (usize::try_from(image.len).map_err(std::io::Error::other)?, usize::try_from(len).map_err(std::io::Error::other)?);
        if new_len < old_len {
            image.bytes.truncate(new_len);
        } else {
            // As the region now reads: zeros from the old length on.
            let size = image.bytes.len().max(new_len);
            image.bytes.resize(size, 0);
            image.bytes[old_len..new_len].fill(0);
        }
        image.len = len;
        Ok(())
    }

    fn sync_data(&self) -> Result<(), std::io::Error> {
        // Every write is synchronous (O_DSYNC) already.
        self.refuse_if_closed()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        self.refuse_if_closed()?;
        let mut image = self.image();
        let at = usize::try_from(offset).map_err(std::io::Error::other)?;
        self.region.write_at(DATABASE_OFFSET + offset, data)?;
        // Only a write that landed: one that failed leaves this node to be closed.
        if image.bytes.len() < at + data.len() {
            image.bytes.resize(at + data.len(), 0);
        }
        image.bytes[at..at + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// Opens the configured region, or says why not.
pub fn open_region(path: &Path) -> Result<Arc<dyn WitnessRegion>, RegionError> {
    Ok(Arc::new(FileWitnessRegion::open(path)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(dir: &Path) -> Arc<dyn WitnessRegion> {
        let path = dir.join("witness");
        std::fs::File::create(&path).and_then(|f| f.set_len(MIN_REGION_BYTES)).expect("create");
        open_region(&path).expect("open")
    }

    fn scratch(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("tandem-witness-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("dir");
        d
    }

    /// Claims written by two hosts are read back by either; a forged block is refused by name.
    #[test]
    fn claims_round_trip_through_the_region_and_a_forged_one_is_refused() {
        let d = scratch("claims");
        let r = region(&d);
        let key = ClusterKey::new(b"witness-test-secret-0123").expect("key");
        assert_eq!(read_claims(r.as_ref(), &key).expect("read"), vec![]);
        let a = Claim { host: HostId(0), claiming: true, incarnation: 1, counter: 1 };
        let b = Claim { host: HostId(1), claiming: false, incarnation: 4, counter: 9 };
        write_claim(r.as_ref(), &key, &a).expect("write");
        write_claim(r.as_ref(), &key, &b).expect("write");
        assert_eq!(read_claims(r.as_ref(), &key).expect("read"), vec![a, b]);
        let other = ClusterKey::new(b"some-other-cluster-secret").expect("key");
        write_claim(r.as_ref(), &other, &Claim { host: HostId(2), claiming: true, incarnation: 1, counter: 1 }).expect("write");
        assert!(matches!(read_claims(r.as_ref(), &key), Err(RegionError::Claim { host: 2, source: ClaimError::BadMac })));
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A database in the region survives closing and reopening (as when another host takes
    /// the witness over), and a closed backend refuses to write.
    #[test]
    fn a_database_in_the_region_persists_and_a_closed_one_refuses_writes() {
        let d = scratch("db");
        let r = region(&d);
        let table: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("t");
        {
            let closed = Arc::new(AtomicBool::new(false));
            let db = redb::Database::builder()
                .create_with_backend(RegionBackend::open(Arc::clone(&r), Arc::clone(&closed), Arc::new(|| true)).expect("backend"))
                .expect("db");
            let tx = db.begin_write().expect("tx");
            tx.open_table(table).expect("table").insert("term", 7).expect("insert");
            tx.commit().expect("commit");
            closed.store(true, Ordering::SeqCst);
            let write = || -> Result<(), Box<dyn std::error::Error>> {
                let tx = db.begin_write()?;
                tx.open_table(table)?.insert("term", 8)?;
                tx.commit()?;
                Ok(())
            };
            assert!(write().is_err(), "a closed region takes no commit");
        }
        let db = redb::Database::builder().create_with_backend(RegionBackend::open(r, Arc::default(), Arc::new(|| true)).expect("backend")).expect("reopen");
        use redb::ReadableDatabase;
        let tx = db.begin_read().expect("tx");
        assert_eq!(tx.open_table(table).expect("table").get("term").expect("get").map(|v| v.value()), Some(7));
        let _ = std::fs::remove_dir_all(&d);
    }
}
