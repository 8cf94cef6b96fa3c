//! A cold move: a VM shut down cleanly (the driver asks its guest first and kills it only past
//! its stop timeout) and started again wherever placement puts it — while its host is in
//! maintenance, on any other. `host maintenance enter --shutdown-unmovable` uses it for the VMs
//! whose live migration kept failing. The start is forced: entering maintenance was already
//! judged by admission control, as the coordinator's own moves are.

use super::output::Output;
use std::time::{Duration, Instant};
use tandem::client::{Client, ClientError};
use tandem_agent::views::{EmptyRequest, ForceRequest, VmView};

/// How often the VM is read while it stops and starts.
const POLL: Duration = Duration::from_millis(250);
/// How long a clean shutdown may take to show (the driver's stop timeout is far shorter).
const STOP_WAIT: Duration = Duration::from_secs(600);
/// How long the VM may take to be placed and started again.
const START_WAIT: Duration = Duration::from_secs(300);

fn wait_for(c: &Client, vm: &str, what: &str, bound: Duration, done: impl Fn(&VmView) -> bool) -> Result<VmView, ClientError> {
    let t = Instant::now();
    loop {
        let vms: Vec<VmView> = c.get_as("/v1/vms")?;
        let v = vms.into_iter().find(|v| v.name == vm).ok_or_else(|| ClientError::Refused { status: 404, message: format!("{vm} vanished") })?;
        if done(&v) {
            return Ok(v);
        }
        if t.elapsed() > bound {
            return Err(ClientError::Unavailable(format!("{vm} did not {what} within {} s", bound.as_secs())));
        }
        std::thread::sleep(POLL);
    }
}

/// Moves `vm`, which runs on `from` and cannot move live (`why`), cold.
pub fn run(c: &Client, out: Output, vm: &str, from: &str, why: &str) -> Result<(), ClientError> {
    let table = out == Output::Table;
    if table {
        println!("  {vm:<20} cannot move live ({why}): shutting it down to start it elsewhere");
    }
    let t0 = Instant::now();
    c.send("POST", &format!("/v1/vms/{vm}/stop"), &EmptyRequest {})?;
    wait_for(c, vm, "shut down", STOP_WAIT, |v| v.host.is_none())?;
    c.send("POST", &format!("/v1/vms/{vm}/start"), &ForceRequest { force: true })?;
    let v = wait_for(c, vm, "start elsewhere", START_WAIT, |v| v.host.as_deref().is_some_and(|h| h != from))?;
    if table {
        println!("  {vm:<20} starts on {}, {:.1} s after its shutdown began", v.host.as_deref().unwrap_or("?"), t0.elapsed().as_secs_f64());
    }
    Ok(())
}
