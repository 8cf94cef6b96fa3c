//! A one-line progress bar on standard error, for long commands run by a person: drawn only
//! when standard error is a terminal, so logs and pipes stay clean.

use std::io::Write;
use std::time::Instant;

/// Progress through `total` steps.
pub struct Progress {
    total: u64,
    label: &'static str,
    started: Instant,
    tty: bool,
}

const WIDTH: u64 = 30;

impl Progress {
    #[must_use]
    pub fn new(total: u64, label: &'static str) -> Progress {
        // SAFETY: isatty(2) only inspects the descriptor.
        let tty = unsafe { libc::isatty(libc::STDERR_FILENO) } == 1;
        Progress { total, label, started: Instant::now(), tty }
    }

    /// Shows `done` of `total`, with a short note (e.g. violations so far).
    pub fn set(&self, done: u64, note: &str) {
        if !self.tty || self.total == 0 {
            return;
        }
        let filled = (done.min(self.total) * WIDTH / self.total) as usize;
        let elapsed = self.started.elapsed().as_secs_f64();
        let eta = if done > 0 { elapsed / done as f64 * (self.total - done.min(self.total)) as f64 } else { 0.0 };
        let bar = format!("{}{}", "#".repeat(filled), ".".repeat(WIDTH as usize - filled));
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r[{bar}] {done}/{} {} {note} ({elapsed:.0} s, about {eta:.0} s left)\x1b[K", self.total, self.label);
        let _ = err.flush();
    }

    /// Clears the line.
    pub fn finish(&self) {
        if self.tty {
            clear_line();
        }
    }
}

/// Clears a progress line before other output is printed, when standard error is a terminal.
pub fn clear_line() {
    // SAFETY: isatty(2) only inspects the descriptor.
    if unsafe { libc::isatty(libc::STDERR_FILENO) } == 1 {
        let _ = write!(std::io::stderr().lock(), "\r\x1b[K");
    }
}
