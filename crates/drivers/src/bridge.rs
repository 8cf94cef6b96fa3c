//! Bridged networking for QEMU guests: a VM whose spec says `network.mode = "bridge"` gets a tap
//! device on a bridge of the host, with its own MAC, so its address follows it from host to host.
//!
//! QEMU creates the tap itself (`-netdev tap,ifname=…,script=no`): a tap it creates lives exactly
//! as long as that QEMU process, so a VM that stops, crashes, moves away or is killed by a fence
//! leaves nothing behind. The driver then puts it on the bridge and up. QEMU creates its netdevs
//! before its main loop answers on QMP, so once a start has reached QMP the tap exists; a guest
//! that booted a few milliseconds before its link came up retries as any NIC does, and a paused
//! migration destination sends nothing until it is resumed.
//!
//! Trust: a spec names a bridge, the host decides which ones VMs may join (`[qemu] bridges`); a
//! VM can never be put on a host's management or storage bridge by an API caller.

use crate::DriverError;
use std::time::Duration;

/// How long one `ip link` call may take.
pub const TAP_SETUP_TIMEOUT: Duration = Duration::from_secs(5);

/// The tap device of VM `vm` on this host: `tn` and 13 hex digits of a hash of its name (Linux
/// interface names have at most 15 bytes; VM names up to 63). One name per VM, so at most one
/// QEMU of a VM can hold it on a host.
#[must_use]
pub fn tap_name(vm: &str) -> String {
    // FNV-1a, 64 bits: stable across releases and platforms (std's hasher is neither).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in vm.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("tn{:013x}", h >> 12)
}

/// Whether this host lets VMs join `bridge`.
pub fn check_allowed(vm: &str, bridge: &str, allowed: &[String]) -> Result<(), DriverError> {
    if allowed.iter().any(|b| b == bridge) {
        return Ok(());
    }
    let allowed = if allowed.is_empty() { "none".to_string() } else { allowed.join(", ") };
    Err(DriverError::Refused { vm: vm.to_string(), reason: format!("bridge '{bridge}' is not one this host lets VMs join ([qemu] bridges: {allowed})") })
}

/// Puts the tap of `vm` (created by its QEMU) on `bridge` and brings it up.
pub async fn attach(vm: &str, bridge: &str) -> Result<(), DriverError> {
    let tap = tap_name(vm);
    let run = tokio::process::Command::new("ip").args(["link", "set", "dev", &tap, "master", bridge, "up"]).kill_on_drop(true).output();
    let failed = |reason: String| DriverError::Refused { vm: vm.to_string(), reason };
    match tokio::time::timeout(TAP_SETUP_TIMEOUT, run).await {
        Err(_) => Err(failed(format!("putting tap {tap} on bridge {bridge} took more than {TAP_SETUP_TIMEOUT:?}"))),
        Ok(Err(e)) => Err(failed(format!("cannot run ip to put tap {tap} on bridge {bridge}: {e}"))),
        Ok(Ok(out)) if !out.status.success() => {
            Err(failed(format!("cannot put tap {tap} on bridge {bridge}: {}", String::from_utf8_lossy(&out.stderr).trim())))
        }
        Ok(Ok(_)) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_fit_linux_and_differ_per_vm() {
        let names: std::collections::BTreeSet<String> = (0..1000).map(|i| tap_name(&format!("vm-{i}"))).collect();
        assert_eq!(names.len(), 1000);
        assert!(names.iter().all(|n| n.len() == 15 && n.starts_with("tn") && n[2..].chars().all(|c| c.is_ascii_hexdigit())));
        assert_eq!(tap_name("web0"), tap_name("web0"), "stable");
        assert_eq!(tap_name(&"x".repeat(63)).len(), 15);
    }

    #[test]
    fn only_the_hosts_bridges_may_be_joined() {
        assert!(check_allowed("a", "vmbr0", &["vmbr0".into()]).is_ok());
        let e = check_allowed("a", "mgmt0", &["vmbr0".into()]).expect_err("refused");
        assert!(e.to_string().contains("'a'") && format!("{e:?}").contains("mgmt0") && format!("{e:?}").contains("vmbr0"), "{e:?}");
        assert!(format!("{:?}", check_allowed("a", "vmbr0", &[]).expect_err("none allowed")).contains("none"));
    }
}
