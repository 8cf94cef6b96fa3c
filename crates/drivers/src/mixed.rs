//! A host that runs both QEMU guests and plain process workloads: each VM goes to the driver its
//! spec names. The fault suite uses it to run a few real guests next to many cheap workloads.

use crate::process::ProcessDriver;
use crate::qemu::QemuDriver;
use crate::{BoxFuture, DriverError, VmDriver, VmLaunch, VmStatus};
use tandem_core::state::DriverSpec;

/// Dispatches by the VM's driver spec; operations on a running VM go to whichever driver has it.
pub struct MixedDriver {
    pub qemu: QemuDriver,
    pub process: ProcessDriver,
}

impl MixedDriver {
    fn owner(&self, name: &str) -> &dyn VmDriver {
        if self.qemu.list().iter().any(|v| v.name == name) {
            &self.qemu
        } else {
            &self.process
        }
    }
}

impl VmDriver for MixedDriver {
    fn kind(&self) -> &'static str {
        "mixed"
    }

    fn start<'a>(&'a self, launch: &'a VmLaunch) -> BoxFuture<'a, Result<(), DriverError>> {
        match launch.spec.driver {
            DriverSpec::Qemu { .. } => self.qemu.start(launch),
            DriverSpec::Process { .. } => self.process.start(launch),
        }
    }

    fn stop<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), DriverError>> {
        self.owner(name).stop(name)
    }

    fn kill(&self, name: &str) -> Result<(), DriverError> {
        self.owner(name).kill(name)
    }

    fn kill_all(&self) -> usize {
        self.qemu.kill_all() + self.process.kill_all()
    }

    fn list(&self) -> Vec<VmStatus> {
        let mut all = self.qemu.list();
        all.extend(self.process.list());
        all
    }

    fn forget(&self, name: &str) {
        self.qemu.forget(name);
        self.process.forget(name);
    }
}
