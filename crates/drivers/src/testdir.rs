//! Tests' scratch directories: one per test name and process, made empty at the start and
//! removed however the test ends (a failing assertion included).

use std::path::{Path, PathBuf};

/// A scratch directory under the system's temporary directory.
pub struct TestDir(PathBuf);

impl TestDir {
    /// `<tmp>/<name>-<pid>`, empty.
    pub fn new(name: &str) -> TestDir {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a test's scratch directory");
        TestDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
