//! What this host lets a VM spec do to it, whatever the API caller's role.
//!
//! A VM spec comes from whoever holds an admin token; the host runs it as root. The policy in the
//! agent's own configuration (which no API call can change) bounds what such a spec can reach:
//! raw QEMU arguments, files outside the allowed prefixes, block devices not listed. The driver
//! kind (`driver = "qemu"` refuses process VMs, which run any command) is part of the same
//! boundary. A refusal names the rule.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use tandem_core::state::{DriverSpec, VmSpec};
use thiserror::Error;

/// The `[policy]` table of the agent configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostPolicy {
    /// Raw QEMU arguments from the spec (`extra_args`) are passed on only when this is true.
    #[serde(default)]
    pub allow_extra_args: bool,
    /// Kernels, initrds and disk images must lie under one of these directories (after
    /// symlinks are resolved). Empty: any absolute path of a regular file.
    #[serde(default)]
    pub path_prefixes: Vec<PathBuf>,
    /// Block devices a disk may name; any other block or character device is refused.
    #[serde(default)]
    pub block_devices: Vec<PathBuf>,
}

/// Why this host refuses to run a spec.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum PolicyRefusal {
    #[error("extra_args are not allowed on this host (policy.allow_extra_args = false)")]
    ExtraArgs,
    #[error("{what} {path} is outside the allowed prefixes {allowed:?} (policy.path_prefixes)")]
    OutsidePrefixes { what: &'static str, path: String, allowed: Vec<PathBuf> },
    #[error("{what} {path} is a device not listed in policy.block_devices")]
    DeviceNotListed { what: &'static str, path: String },
}

impl HostPolicy {
    /// Checks `spec` against this host's policy. Reads file metadata (is it a device? where
    /// does the symlink lead?), so it runs on the host, right before a start.
    pub fn admits(&self, spec: &VmSpec) -> Result<(), PolicyRefusal> {
        // A local disk is confined to the host's own `[qemu] local_disk_dir` (its relative path
        // has no `..`: checked with the spec), which the host's operator chose.
        let mut files: Vec<(&'static str, &str)> = spec.disks.iter().filter(|d| !d.local).map(|d| ("disk", d.path.as_str())).collect();
        if let DriverSpec::Qemu { kernel, initrd, extra_args, .. } = &spec.driver {
            if !extra_args.is_empty() && !self.allow_extra_args {
                return Err(PolicyRefusal::ExtraArgs);
            }
            files.extend(kernel.as_deref().map(|k| ("kernel", k)));
            files.extend(initrd.as_deref().map(|i| ("initrd", i)));
        }
        files.into_iter().try_for_each(|(what, path)| self.admits_file(what, Path::new(path)))
    }

    fn admits_file(&self, what: &'static str, path: &Path) -> Result<(), PolicyRefusal> {
        let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let is_device = std::fs::metadata(&real).is_ok_and(|m| {
            use std::os::unix::fs::FileTypeExt;
            m.file_type().is_block_device() || m.file_type().is_char_device()
        });
        if is_device {
            let listed = self.block_devices.iter().any(|d| std::fs::canonicalize(d).unwrap_or_else(|_| d.clone()) == real);
            return if listed { Ok(()) } else { Err(PolicyRefusal::DeviceNotListed { what, path: path.display().to_string() }) };
        }
        if self.path_prefixes.is_empty() || self.path_prefixes.iter().any(|p| real.starts_with(p)) {
            return Ok(());
        }
        Err(PolicyRefusal::OutsidePrefixes { what, path: path.display().to_string(), allowed: self.path_prefixes.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_core::state::{DiskSpec, Protection};

    fn spec(disk: &str, extra: &[&str]) -> VmSpec {
        VmSpec {
            name: "v".into(),
            vcpus: 1,
            memory_mib: 64,
            disks: vec![DiskSpec { path: disk.into(), format: None, readonly: false, local: false, mirror: false }],
            network: None,
            protection: Protection::Protect,
            priority: 0,
            restart_group: 0,
            driver: DriverSpec::Qemu {
                kernel: None,
                initrd: None,
                cmdline: None,
                extra_args: extra.iter().map(|s| s.to_string()).collect(),
                guest_agent: false,
            },
            probe: None,
            postcopy: tandem_core::spec::Postcopy::Off,
        }
    }

    #[test]
    fn refusals_name_the_rule() {
        let dir = std::env::temp_dir().join(format!("tandem-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let inside = dir.join("ok.raw");
        std::fs::write(&inside, b"").expect("image");
        let link = dir.join("escape.raw");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink("/etc/passwd", &link).expect("symlink");
        let p = HostPolicy { path_prefixes: vec![std::fs::canonicalize(&dir).expect("canon")], ..HostPolicy::default() };

        assert_eq!(p.admits(&spec(&inside.display().to_string(), &[])), Ok(()));
        let e = p.admits(&spec(&inside.display().to_string(), &["-device", "x"])).expect_err("extra args");
        assert!(e.to_string().contains("policy.allow_extra_args"), "{e}");
        let e = p.admits(&spec("/etc/shadow", &[])).expect_err("outside");
        assert!(e.to_string().contains("policy.path_prefixes"), "{e}");
        // A symlink inside the prefix that leads out of it is judged by where it leads.
        assert!(matches!(p.admits(&spec(&link.display().to_string(), &[])), Err(PolicyRefusal::OutsidePrefixes { .. })));
        // Devices only when listed, prefixes or not.
        let e = HostPolicy::default().admits(&spec("/dev/null", &[])).expect_err("device");
        assert!(e.to_string().contains("policy.block_devices"), "{e}");
        let listed = HostPolicy { block_devices: vec!["/dev/null".into()], ..HostPolicy::default() };
        assert_eq!(listed.admits(&spec("/dev/null", &[])), Ok(()));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
