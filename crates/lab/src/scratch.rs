//! A test's scratch directory: made fresh, removed however the test ends (a failed assertion
//! unwinds through its drop).

use std::path::{Path, PathBuf};

/// A directory under the system's temporary directory, named after its owner and this process.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// `$TMPDIR/{name}-{pid}`, emptied, with the `subdirs` in it.
    pub fn new(name: &str, subdirs: &[&str]) -> std::io::Result<ScratchDir> {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        for s in subdirs {
            std::fs::create_dir_all(dir.join(s))?;
        }
        Ok(ScratchDir(dir))
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
