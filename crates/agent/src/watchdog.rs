//! The hardware watchdog: a device that resets the host unless it is fed.
//!
//! Fencing without fencing hardware rests on it: a host whose agent hangs is reset before any
//! peer may restart its VMs. So the timeout the kernel actually applied is read back (a driver
//! may round it up, or ignore the request) and refused when it exceeds the validated bound, and
//! a regular file, which resets nothing, stands in for a device only when the configuration
//! says it is a test.

use std::io::Write;
use std::path::Path;
use thiserror::Error;

/// Why the watchdog cannot be used.
#[derive(Debug, Error)]
pub enum WatchdogError {
    #[error("cannot open watchdog {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set the timeout of watchdog {path}")]
    SetTimeout {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("watchdog {path} applied a {applied_s} s timeout (asked for {asked_s} s); more than {max_s} s resets the host after peers may restart its VMs")]
    TimeoutTooLong { path: String, asked_s: u64, applied_s: u64, max_s: u64 },
    #[error("{path} is not a watchdog device (a regular file resets nothing; it is accepted only with watchdog.test_file = true)")]
    NotADevice { path: String },
}

/// An open, armed watchdog.
pub struct HardwareWatchdog {
    file: std::fs::File,
    /// The timeout the device applied (the asked one for a test file).
    pub applied_s: u64,
}

// _IOWR('W', 6, int) and _IOR('W', 7, int).
const WDIOC_SETTIMEOUT: libc::c_ulong = 0xC004_5706;
const WDIOC_GETTIMEOUT: libc::c_ulong = 0x8004_5707;

fn ioctl_int(f: &std::fs::File, request: libc::c_ulong, value: &mut libc::c_int) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    // SAFETY: both requests read and/or write one int through a valid pointer on an open fd.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), request as _, value as *mut libc::c_int) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

impl HardwareWatchdog {
    /// Opens and arms `path` with `timeout_s`, and checks what the device applied against
    /// `max_s`. A regular file is refused unless `test_file`.
    pub fn open(path: &Path, timeout_s: u64, max_s: u64, test_file: bool) -> Result<HardwareWatchdog, WatchdogError> {
        use std::os::unix::fs::FileTypeExt;
        let name = path.display().to_string();
        let file = std::fs::OpenOptions::new().write(true).open(path).map_err(|source| WatchdogError::Open { path: name.clone(), source })?;
        let is_device = file.metadata().map_err(|source| WatchdogError::Open { path: name.clone(), source })?.file_type().is_char_device();
        if !is_device {
            return if test_file { Ok(HardwareWatchdog { file, applied_s: timeout_s }) } else { Err(WatchdogError::NotADevice { path: name }) };
        }
        let set = |source| WatchdogError::SetTimeout { path: name.clone(), source };
        let mut secs = libc::c_int::try_from(timeout_s).unwrap_or(libc::c_int::MAX);
        ioctl_int(&file, WDIOC_SETTIMEOUT, &mut secs).map_err(set)?;
        let mut applied: libc::c_int = 0;
        ioctl_int(&file, WDIOC_GETTIMEOUT, &mut applied).map_err(set)?;
        let applied_s = u64::try_from(applied).unwrap_or(u64::MAX);
        if applied_s == 0 || applied_s > max_s {
            let mut w = HardwareWatchdog { file, applied_s };
            // Disarm before refusing: the agent will not feed it.
            w.disarm();
            return Err(WatchdogError::TimeoutTooLong { path: name, asked_s: timeout_s, applied_s, max_s });
        }
        Ok(HardwareWatchdog { file, applied_s })
    }

    /// Feeds the watchdog.
    pub fn feed(&mut self) {
        let _ = self.file.write_all(b"\0");
    }

    /// The "magic close": a deliberate stop does not reset the host.
    pub fn disarm(&mut self) {
        let _ = self.file.write_all(b"V");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_regular_file_is_a_watchdog_only_in_test_mode() {
        let path = std::env::temp_dir().join(format!("tandem-wd-{}", std::process::id()));
        std::fs::write(&path, b"").expect("file");
        let e = HardwareWatchdog::open(&path, 2, 3, false).err().expect("refused");
        assert!(e.to_string().contains("test_file"), "{e}");
        let mut w = HardwareWatchdog::open(&path, 2, 3, true).expect("test mode");
        w.feed();
        w.disarm();
        assert_eq!(std::fs::read(&path).expect("read"), b"\0V");
        assert!(matches!(HardwareWatchdog::open(Path::new("/nonexistent/wd"), 2, 3, false), Err(WatchdogError::Open { .. })));
        let _ = std::fs::remove_file(&path);
    }

    /// /dev/null is a character device but no watchdog: setting the timeout fails, and says so.
    #[test]
    fn a_device_that_is_no_watchdog_is_refused() {
        let e = HardwareWatchdog::open(Path::new("/dev/null"), 2, 3, false).err().expect("refused");
        assert!(matches!(e, WatchdogError::SetTimeout { .. }), "{e}");
    }
}
