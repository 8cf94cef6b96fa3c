//! `tandem vm mirrors NAME`: a VM's disks mirrored between sites — which sites' copies committed
//! state counts current, and each mirror's state at the host running the VM (resyncing with the
//! bytes copied, in sync, holding its writes, degraded), read from that host's `/v1/local`.

use super::output::{show, usage, Output};
use tandem::client::{Client, ClientError};
use tandem_agent::views::{LocalView, MirrorsView, VmView};
use tandem_core::mirroring::LinkState;

pub fn run(c: &Client, out: Output, name: &str) -> Result<(), ClientError> {
    let vm: VmView = c.get_as(&format!("/v1/vms/{name}"))?;
    if !vm.spec.site_mirrored() {
        return Err(usage(format!("VM '{name}' has no disk mirrored between sites")));
    }
    // The host running it knows its mirrors; a host that does not answer shows none.
    let links = match &vm.host_api {
        Some(api) => Client { addr: api.clone(), ..c.clone() }
            .get_as::<LocalView>("/v1/local")
            .map(|l| l.mirrors.into_iter().filter(|m| m.vm == name).collect())
            .unwrap_or_default(),
        None => Vec::new(),
    };
    let view = MirrorsView { vm: name.to_string(), host: vm.host.clone(), copies: vm.copies.clone(), links };
    let value = serde_json::to_value(&view).map_err(|e| usage(format!("encoding the answer: {e}")))?;
    show(out, &value, print)
}

fn print(v: &MirrorsView) {
    let copies = if v.copies.is_empty() { "every site's (it has not run yet)".to_string() } else { v.copies.join(", ") };
    println!("{}: runs on {}; current copies: {copies}", v.vm, v.host.as_deref().unwrap_or("no host"));
    if v.links.is_empty() {
        println!("  no mirror at its host (not running, its host not answering, or no other site's host serving a copy)");
    }
    for l in &v.links {
        let state = match &l.state {
            LinkState::Detached => "detached".to_string(),
            LinkState::Resyncing { copied, total } => match l.compared {
                Some(d) => format!(
                    "resyncing: {} of {} MiB compared with the copy's chunk sums; {} KiB of writes crossed the link, {} MiB matched",
                    copied >> 20,
                    total >> 20,
                    d.sent >> 10,
                    d.matched >> 20
                ),
                None => format!("resyncing: {} of {} MiB", copied >> 20, total >> 20),
            },
            LinkState::InSync => "in sync: every write goes to both copies".to_string(),
            LinkState::Holding => "HOLDING: the copy is lost; writes wait until it is committed stale".to_string(),
            LinkState::Degraded => "DEGRADED: running on this site's copy alone".to_string(),
            LinkState::OnOtherCopy => "ON THE OTHER COPY: this site's storage failed; the disk runs on this copy alone".to_string(),
            LinkState::Returning { copied, total } => {
                format!("ON THE OTHER COPY, returning: {} of {} MiB copied back into this site's copy", copied >> 20, total >> 20)
            }
            LinkState::PathLost => "PATH LOST: this site's storage failed and this copy is not in sync; the guest is paused".to_string(),
        };
        let capped = match (&l.state, l.resync_cap_mib_s) {
            (LinkState::Resyncing { .. }, Some(cap)) => format!(" (copying at most {cap} MiB/s)"),
            _ => String::new(),
        };
        let pace = l.pace.map(|p| format!("; at {:.1} MiB/s, about {} s left", p.kib_s as f64 / 1024.0, p.left_s)).unwrap_or_default();
        println!("  disk {} -> site {} (served by {}): {state}{capped}{pace}", l.disk, l.site, l.server);
    }
}
