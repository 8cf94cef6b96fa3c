//! The rules for spec values that become QEMU or process arguments: nothing a spec says may add
//! an option of its own. Checked by the API before a spec is proposed and by the drivers before a
//! start — not in `apply`, so a stricter rule never makes hosts disagree about the log.

use super::{DriverSpec, NetworkSpec, SpecError, VmSpec};

/// Disk image formats a spec may name (QEMU's `format=`; anything else could name a driver with
/// its own options).
pub const DISK_FORMATS: [&str; 2] = ["raw", "qcow2"];

fn bad(field: &'static str, value: &str, why: &'static str) -> SpecError {
    SpecError::BadValue { field, value: value.chars().take(200).collect(), why }
}

/// A path that goes into a QEMU or process argument: absolute, printable, no `..`.
fn check_path(field: &'static str, p: &str) -> Result<(), SpecError> {
    if !p.starts_with('/') {
        return Err(bad(field, p, "must be an absolute path"));
    }
    if p.len() > 4096 || p.chars().any(char::is_control) {
        return Err(bad(field, p, "must be at most 4096 printable characters"));
    }
    if p.split('/').any(|c| c == "..") {
        return Err(bad(field, p, "must not contain '..'"));
    }
    Ok(())
}

/// `tcp:ADDR:PORT-ADDR:PORT` (or udp), ADDR empty, an IPv4 address or `{host_ip}`: nothing that
/// could add a `guestfwd=...-cmd:` or any other option to the netdev.
fn check_hostfwd(f: &str) -> Result<(), SpecError> {
    let why = "must look like tcp:{host_ip}:8080-:80 (tcp or udp, IPv4 addresses, ports 1-65535)";
    let rest = f.strip_prefix("tcp:").or_else(|| f.strip_prefix("udp:")).ok_or_else(|| bad("hostfwd", f, why))?;
    let (host, guest) = rest.split_once('-').ok_or_else(|| bad("hostfwd", f, why))?;
    for side in [host, guest] {
        let (addr, port) = side.rsplit_once(':').ok_or_else(|| bad("hostfwd", f, why))?;
        let addr_ok = addr.is_empty() || addr == "{host_ip}" || addr.parse::<std::net::Ipv4Addr>().is_ok();
        let port_ok = port.parse::<u16>().is_ok_and(|p| p > 0) && port.chars().all(|c| c.is_ascii_digit());
        if !addr_ok || !port_ok {
            return Err(bad("hostfwd", f, why));
        }
    }
    Ok(())
}

fn check_network(n: &NetworkSpec) -> Result<(), SpecError> {
    match n {
        NetworkSpec::User { hostfwd } => hostfwd.iter().try_for_each(|f| check_hostfwd(f)),
        NetworkSpec::Tap { ifname, mac } => {
            check_ifname("ifname", ifname)?;
            mac.as_deref().map_or(Ok(()), check_mac)
        }
        NetworkSpec::Bridge { bridge, mac, address } => {
            check_ifname("bridge", bridge)?;
            check_mac(mac)?;
            address.as_deref().map_or(Ok(()), check_address)
        }
    }
}

/// An interface name as Linux takes it, and nothing an option could hide in.
fn check_ifname(field: &'static str, name: &str) -> Result<(), SpecError> {
    if name.is_empty() || name.len() > 15 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.') {
        return Err(bad(field, name, "must be 1-15 characters of letters, digits, '-', '_' and '.'"));
    }
    Ok(())
}

fn check_mac(m: &str) -> Result<(), SpecError> {
    let parts: Vec<&str> = m.split(':').collect();
    if parts.len() != 6 || !parts.iter().all(|p| p.len() == 2 && p.chars().all(|c| c.is_ascii_hexdigit())) {
        return Err(bad("mac", m, "must be six hex pairs separated by ':'"));
    }
    // The low bit of the first octet marks a group address, which no NIC may have.
    if u8::from_str_radix(parts[0], 16).is_ok_and(|b| b & 1 == 1) {
        return Err(bad("mac", m, "is a multicast address (the first octet must be even)"));
    }
    Ok(())
}

/// `IP/PREFIX`: the guest's address on its bridge (it reaches the guest's kernel command line).
fn check_address(a: &str) -> Result<(), SpecError> {
    let why = "must be an address with its prefix length, like 198.18.0.100/24";
    let (ip, prefix) = a.split_once('/').ok_or_else(|| bad("address", a, why))?;
    let max = match ip.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(_)) => 32,
        Ok(std::net::IpAddr::V6(_)) => 128,
        Err(_) => return Err(bad("address", a, why)),
    };
    if !prefix.chars().all(|c| c.is_ascii_digit()) || !prefix.parse::<u8>().is_ok_and(|p| p <= max) {
        return Err(bad("address", a, why));
    }
    Ok(())
}

impl VmSpec {
    /// Checks every value that becomes part of a QEMU or process argument, so that no spec
    /// field can add options of its own (a `guestfwd=...-cmd:` in a port forward, a `helper=`
    /// in a tap name, a driver in a disk format). The API runs it before a spec is proposed
    /// and the drivers again before a start; it is not part of `apply`, so a stricter rule in a
    /// newer release never makes hosts disagree about an entry already in the log.
    pub fn check_arguments(&self) -> Result<(), SpecError> {
        for d in &self.disks {
            if d.local || d.mirror {
                // Relative to the host's local_disk_dir or site_disk_dir (`validate` keeps it inside).
                check_path("local or mirrored disk path", &format!("/{}", d.path))?;
            } else {
                check_path("disk path", &d.path)?;
            }
            if let Some(f) = d.format.as_deref().filter(|f| !DISK_FORMATS.contains(f)) {
                return Err(bad("disk format", f, "must be raw or qcow2"));
            }
        }
        if let Some(n) = &self.network {
            check_network(n)?;
        }
        if let Some(p) = &self.probe {
            p.validate()?;
        }
        if let DriverSpec::Qemu { kernel, initrd, cmdline, extra_args, .. } = &self.driver {
            for (field, p) in [("kernel", kernel), ("initrd", initrd)] {
                if let Some(p) = p {
                    check_path(field, p)?;
                }
            }
            if let Some(c) = cmdline.as_deref().filter(|c| c.len() > 4096 || c.chars().any(char::is_control)) {
                return Err(bad("cmdline", c, "must be at most 4096 printable characters"));
            }
            if let Some(a) = extra_args.iter().find(|a| a.chars().any(char::is_control)) {
                return Err(bad("extra_args", a, "must be printable"));
            }
        }
        Ok(())
    }
}
