//! The FUSE view of the heartbeat disk used by the fault suite: views share one backing file,
//! and one view can fail or hang while the others keep working. Needs /dev/fuse (root).

use std::os::unix::fs::FileExt;
use std::sync::mpsc;
use std::time::Duration;
use tandem_lab::fusedisk::{FuseDisk, ViewMode};

fn read_in_thread(path: std::path::PathBuf) -> mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = std::fs::File::open(&path).and_then(|f| {
            let mut b = vec![0u8; 512];
            f.read_exact_at(&mut b, 512).map(|()| b)
        });
        let _ = tx.send(r);
    });
    rx
}

#[test]
fn one_view_hangs_or_fails_while_the_others_work() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::temp_dir().join(format!("tandem-fusedisk-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("mnt"))?;
    let backing = dir.join("heartbeat.disk");
    std::fs::write(&backing, vec![0u8; 64 * 512])?;
    let disk = FuseDisk::mount(&backing, &dir.join("mnt"), 3)?;

    // Coherent: a write through view 0 is read through view 2 and lands in the backing file.
    let f0 = std::fs::OpenOptions::new().read(true).write(true).open(disk.path(0))?;
    f0.write_all_at(&[7u8; 512], 512)?;
    let seen = read_in_thread(disk.path(2)).recv_timeout(Duration::from_secs(5))??;
    assert_eq!(seen, vec![7u8; 512]);
    assert_eq!(&std::fs::read(&backing)?[512..1024], &[7u8; 512][..]);

    // View 1 hangs: its read does not come back, view 2 still answers.
    disk.set_mode(1, ViewMode::Hang);
    let hung = read_in_thread(disk.path(1));
    assert!(hung.recv_timeout(Duration::from_millis(500)).is_err(), "a hung view must not answer");
    assert!(disk.parked() >= 1);
    assert!(read_in_thread(disk.path(2)).recv_timeout(Duration::from_secs(5))?.is_ok());
    // Recovery completes the parked request, late, with the data.
    disk.set_mode(1, ViewMode::Normal);
    assert_eq!(hung.recv_timeout(Duration::from_secs(5))??, vec![7u8; 512]);

    // A failed view answers EIO at once.
    disk.set_mode(1, ViewMode::Fail);
    let err = read_in_thread(disk.path(1)).recv_timeout(Duration::from_secs(5))?.expect_err("EIO");
    assert_eq!(err.raw_os_error(), Some(libc::EIO));

    drop(f0);
    drop(disk);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
