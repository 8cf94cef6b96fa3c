//! The QEMU command line of a launch: machine, CPU and memory, the kernel and its arguments,
//! each disk (a mirrored one pauses the guest on a failed request instead of failing it), the
//! network, the guest agent's channel; QMP and the serial console on files in the run directory.

use super::{escape_option_value, QemuDriver};
use crate::{DriverError, VmLaunch};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use tandem_core::state::{DriverSpec, NetworkSpec};

impl QemuDriver {
    /// The QEMU command line for a launch; `local_servers`: the unix sockets of the local copy
    /// servers of its mirrored disks, by index (a mirrored disk without one opens its copy
    /// itself).
    pub fn command(&self, launch: &VmLaunch, local_servers: &BTreeMap<usize, PathBuf>) -> Result<Command, DriverError> {
        let spec = &launch.spec;
        let DriverSpec::Qemu { kernel, initrd, cmdline, extra_args, guest_agent } = &spec.driver else {
            return Err(DriverError::WrongDriver { vm: spec.name.clone(), needed: "process", have: "qemu" });
        };
        // Checked again here: the spec may have been committed by a release with looser rules.
        spec.check_arguments().map_err(|e| DriverError::Refused { vm: spec.name.clone(), reason: e.to_string() })?;
        let bus = if self.cfg.machine == "microvm" { "device" } else { "pci" };
        let qmp = self.run_dir.join(format!("{}.qmp", spec.name));
        let serial = self.run_dir.join(format!("{}.serial", spec.name));
        let _ = std::fs::remove_file(&qmp);
        let qga = crate::qga::socket_path(&self.run_dir, &spec.name);
        let _ = std::fs::remove_file(&qga);
        let mut c = Command::new(&self.cfg.binary);
        c.args(["-name", &format!("{},process=tandem-{}", spec.name, spec.name)])
            .args(["-accel", &self.cfg.accel, "-M", &self.cfg.machine])
            .args(["-nodefaults", "-no-user-config", "-cpu", &self.cfg.cpu_model(), "-display", "none"])
            .args(["-smp", &spec.vcpus.to_string(), "-m", &spec.memory_mib.to_string()])
            .args(["-qmp", &format!("unix:{},server=on,wait=off", qmp.display())])
            .args(["-serial", &format!("file:{}", serial.display())]);
        if let Some(k) = kernel {
            c.args(["-kernel", k]);
            if let Some(i) = initrd {
                c.args(["-initrd", i]);
            }
            let mut append = cmdline.clone().unwrap_or_default();
            append.push_str(&format!(" tandem.vm={}", spec.name));
            if let Some(NetworkSpec::Bridge { address: Some(a), .. }) = &spec.network {
                append.push_str(&format!(" tandem.ip={a}"));
            }
            c.args(["-append", append.trim()]);
        }
        for (i, d) in spec.disks.iter().enumerate() {
            let fmt = d.format.clone().unwrap_or_else(|| "raw".into());
            let ro = if d.readonly { ",readonly=on" } else { "" };
            let path = if d.local {
                self.local_disk(&d.path).display().to_string()
            } else if d.mirror {
                crate::diskcopy::local_path(Path::new(&self.cfg.site_disk_dir), &d.path).display().to_string()
            } else {
                d.path.clone()
            };
            // A mirrored disk pauses the guest when its site's storage fails a request (kept to
            // be retried) rather than failing it: the agent then switches the disk onto the
            // other site's copy (`pathswitch`) and the guest sees a pause, not an error.
            // (`auto-read-only=off`: the switch drops the failed copy's write permission, which
            // would otherwise reopen its file read-only — an open that fails on failed storage.)
            let on_error = if d.mirror { ",werror=stop,rerror=stop,auto-read-only=off" } else { "" };
            // Served by a local copy server (`localcopy`): an NBD client that can be cut from
            // storage that hangs.
            let file = match local_servers.get(&i).filter(|_| d.mirror) {
                Some(socket) => format!(
                    "file.driver=nbd,file.server.type=unix,file.server.path={},file.export={},file.node-name={}",
                    escape_option_value(&socket.display().to_string()),
                    crate::localcopy::LOCAL_EXPORT,
                    crate::localcopy::client_node(i)
                ),
                None => format!("file={}", escape_option_value(&path)),
            };
            c.args(["-drive", &format!("{file},if=none,id=disk{i},format={fmt},cache=none{ro}{on_error}")]);
            c.args(["-device", &format!("virtio-blk-{bus},drive=disk{i}")]);
        }
        match &spec.network {
            None => {}
            Some(NetworkSpec::User { hostfwd }) => {
                let mut nd = "user,id=net0".to_string();
                for f in hostfwd {
                    nd.push_str(&format!(",hostfwd={}", f.replace("{host_ip}", &self.host_ip)));
                }
                c.args(["-netdev", &nd, "-device", &format!("virtio-net-{bus},netdev=net0")]);
            }
            Some(NetworkSpec::Tap { ifname, mac }) => {
                c.args(["-netdev", &format!("tap,id=net0,ifname={ifname},script=no,downscript=no")]);
                let mac = mac.as_ref().map(|m| format!(",mac={m}")).unwrap_or_default();
                c.args(["-device", &format!("virtio-net-{bus},netdev=net0{mac}")]);
            }
            Some(NetworkSpec::Bridge { bridge, mac, .. }) => {
                crate::bridge::check_allowed(&spec.name, bridge, &self.cfg.bridges)?;
                let tap = crate::bridge::tap_name(&spec.name);
                c.args(["-netdev", &format!("tap,id=net0,ifname={tap},script=no,downscript=no")]);
                c.args(["-device", &format!("virtio-net-{bus},netdev=net0,mac={mac}")]);
            }
        }
        if *guest_agent {
            c.args(crate::qga::channel_args(&qga, bus));
        }
        c.args(extra_args)
            .env("TANDEM_VM", &spec.name)
            .env("TANDEM_HOST", &self.host_name)
            .env("TANDEM_GENERATION", launch.generation.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(self.run_dir.join(format!("{}.stderr", spec.name)))
                    .map_err(|source| DriverError::Spawn { vm: spec.name.clone(), source })?,
            ));
        Ok(c)
    }
}
