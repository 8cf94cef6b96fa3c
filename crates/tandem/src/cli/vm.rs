//! `tandem vm ...`: specs from flags or files, and the VM commands.

use super::args::{CreateArgs, VmOp};
use super::output::{kv, print_table, show, text, usage, Output};
use anyhow::{anyhow, Context, Result};
use tandem::client::{Client, ClientError};
use tandem_agent::views::{Cleared, Created, Deleted, EmptyRequest, ForceRequest, Starting, Stopping, UpdateVmRequest, Updated, VmView};
use tandem_core::state::{DriverSpec, NetworkSpec, Protection, ServiceProbe, VmSpec};

pub fn spec_from(args: &CreateArgs) -> Result<VmSpec> {
    if let Some(path) = &args.spec {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let is_toml = path.extension().is_some_and(|e| e == "toml");
        let spec: VmSpec = if is_toml {
            toml_spec(&text).with_context(|| format!("parsing {}", path.display()))?
        } else {
            serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
        };
        return Ok(spec);
    }
    let name = args.name.clone().ok_or_else(|| anyhow!("a VM name or --spec FILE is required"))?;
    let protection: Protection = args.protection.parse().map_err(|e: String| anyhow!(e))?;
    let driver = if args.command.is_empty() {
        DriverSpec::Qemu {
            kernel: args.kernel.clone(),
            initrd: args.initrd.clone(),
            cmdline: args.cmdline.clone(),
            extra_args: vec![],
            guest_agent: args.guest_agent,
        }
    } else {
        DriverSpec::Process { command: args.command.clone() }
    };
    let network = match (&args.bridge, &args.mac) {
        (Some(bridge), Some(mac)) => Some(NetworkSpec::Bridge { bridge: bridge.clone(), mac: mac.clone(), address: args.address.clone() }),
        _ => (!args.hostfwd.is_empty()).then(|| NetworkSpec::User { hostfwd: args.hostfwd.clone() }),
    };
    let shared = args.disk.iter().map(|p| tandem_core::state::DiskSpec { path: p.clone(), format: None, readonly: false, local: false, mirror: false });
    let local = args.local_disk.iter().map(|p| tandem_core::state::DiskSpec { path: p.clone(), format: None, readonly: false, local: true, mirror: false });
    let mirrored =
        args.mirrored_disk.iter().map(|p| tandem_core::state::DiskSpec { path: p.clone(), format: None, readonly: false, local: false, mirror: true });
    let disks = shared.chain(local).chain(mirrored).collect();
    let probe = args.probe.as_deref().map(|p| probe_from(p, args.probe_expect.clone())).transpose()?;
    Ok(VmSpec {
        name,
        vcpus: args.vcpus,
        memory_mib: args.memory_mib,
        disks,
        network,
        protection,
        priority: args.priority,
        restart_group: args.group,
        driver,
        probe,
        postcopy: serde_json::from_value(serde_json::Value::String(args.postcopy.clone())).context("--postcopy")?,
    })
}

/// `tcp:ADDR:PORT` or `http://ADDR:PORT/PATH` as a probe (the agent checks the values).
fn probe_from(text: &str, expect: Option<String>) -> Result<ServiceProbe> {
    if let Some(address) = text.strip_prefix("tcp:") {
        if expect.is_some() {
            return Err(anyhow!("--probe-expect needs an http:// probe"));
        }
        return Ok(ServiceProbe::Tcp { address: address.to_string() });
    }
    let rest = text.strip_prefix("http://").ok_or_else(|| anyhow!("--probe '{text}' must start with tcp: or http://"))?;
    let (address, path) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
    Ok(ServiceProbe::Http { address: address.to_string(), path: path.to_string(), expect })
}

pub fn toml_spec(text: &str) -> Result<VmSpec> {
    // TOML → JSON value → spec, so both formats share one schema.
    let v: toml_value::Value = toml_value::parse(text)?;
    Ok(serde_json::from_value(v)?)
}

/// The agent crate already parses TOML; reuse it through serde_json's Value.
mod toml_value {
    pub type Value = serde_json::Value;
    pub fn parse(text: &str) -> anyhow::Result<Value> {
        Ok(tandem_agent::config::toml_to_json(text)?)
    }
}

/// Runs one `tandem vm` command.
pub fn run(c: &Client, out: Output, op: &VmOp) -> Result<(), ClientError> {
    match op {
        VmOp::Create(args) => {
            let spec = spec_from(args).map_err(|e| ClientError::Refused { status: 400, message: format!("{e:#}") })?;
            show(out, &c.send("POST", "/v1/vms", &spec)?, kv::<Created>)
        }
        VmOp::Start { name, force } => show(out, &c.send("POST", &format!("/v1/vms/{name}/start"), &ForceRequest { force: *force })?, kv::<Starting>),
        VmOp::Update { name, vcpus, memory_mib, protection, priority, group, force } => {
            let mut spec = c.get_as::<VmView>(&format!("/v1/vms/{name}"))?.spec;
            spec.vcpus = vcpus.unwrap_or(spec.vcpus);
            spec.memory_mib = memory_mib.unwrap_or(spec.memory_mib);
            if let Some(x) = protection {
                spec.protection = x.parse().map_err(usage)?;
            }
            spec.priority = priority.unwrap_or(spec.priority);
            spec.restart_group = group.unwrap_or(spec.restart_group);
            show(out, &c.send("PUT", &format!("/v1/vms/{name}"), &UpdateVmRequest { spec, force: *force })?, kv::<Updated>)
        }
        VmOp::Migrate { name, to, force, cancel, no_wait } => super::migrate::run(c, out, name, to.clone(), *force, *cancel, *no_wait),
        VmOp::Stop { name } => show(out, &c.send("POST", &format!("/v1/vms/{name}/stop"), &EmptyRequest {})?, kv::<Stopping>),
        VmOp::Clear { name } => show(out, &c.send("POST", &format!("/v1/vms/{name}/clear"), &EmptyRequest {})?, kv::<Cleared>),
        VmOp::Delete { name } => show(out, &c.call("DELETE", &format!("/v1/vms/{name}"), None)?, kv::<Deleted>),
        VmOp::Show { name } => show(out, &c.get(&format!("/v1/vms/{name}"))?, |v: &VmView| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default())),
        VmOp::List => show(out, &c.get("/v1/vms")?, print_vms),
        VmOp::Mirrors { name } => super::mirrors::run(c, out, name),
    }
}

fn print_vms(vms: &Vec<VmView>) {
    let mut rows =
        vec![["NAME", "PROTECTION", "PRIORITY", "VCPU", "MEMORY MiB", "DESIRED", "HOST", "GENERATION", "ERROR / WAITING"].map(String::from).to_vec()];
    let or_dash = |x: Option<String>| x.unwrap_or_else(|| "-".into());
    for x in vms {
        rows.push(vec![
            x.name.clone(),
            text(&x.protection),
            x.priority.to_string(),
            x.vcpus.to_string(),
            x.memory_mib.to_string(),
            text(&x.desired),
            or_dash(x.host.clone()),
            or_dash(x.generation.map(|g| g.to_string())),
            or_dash(x.error.clone().or_else(|| x.waiting.clone())),
        ]);
    }
    print_table(&rows);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::args::{Cli, Cmd, VmOp};
    use clap::Parser;

    fn create(args: &[&str]) -> Result<VmSpec> {
        let cli = Cli::try_parse_from([&["tandem", "vm", "create"], args].concat()).map_err(|e| anyhow!("{e}"))?;
        match cli.command {
            Cmd::Vm { op: VmOp::Create(a) } => spec_from(&a),
            _ => Err(anyhow!("not a create")),
        }
    }

    /// `--bridge` and `--mac` (and `--address`) make a bridged spec; `--mac` alone, or a bridge
    /// beside port forwards, is a usage error.
    #[test]
    fn bridge_flags_make_a_bridged_spec() {
        let spec = create(&["db", "--kernel", "/k", "--bridge", "vmbr0", "--mac", "52:54:00:00:00:07", "--address", "198.18.0.107/24"]).expect("parses");
        assert_eq!(
            spec.network,
            Some(NetworkSpec::Bridge { bridge: "vmbr0".into(), mac: "52:54:00:00:00:07".into(), address: Some("198.18.0.107/24".into()) })
        );
        assert!(spec.check_arguments().is_ok());
        assert!(create(&["db", "--kernel", "/k", "--mac", "52:54:00:00:00:07"]).is_err());
        assert!(create(&["db", "--kernel", "/k", "--bridge", "vmbr0"]).is_err(), "a bridged VM needs its own MAC");
        assert!(create(&["db", "--kernel", "/k", "--bridge", "vmbr0", "--mac", "52:54:00:00:00:07", "--hostfwd", "tcp::1-:2"]).is_err());
    }

    /// The systemd unit in the repository runs a command line this CLI accepts.
    #[test]
    fn the_systemd_unit_runs_a_valid_agent_command() {
        let unit = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../contrib/tandem.service")).expect("the unit is in the repository");
        let exec = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart");
        let mut words: Vec<&str> = exec.split_whitespace().collect();
        assert!(words.first().is_some_and(|b| b.ends_with("/tandem")), "{exec}");
        words[0] = "tandem";
        let cli = Cli::try_parse_from(&words).expect("the unit's command line parses");
        assert!(matches!(cli.command, Cmd::Agent { .. }), "{exec}");
        assert!(unit.contains("KillSignal=SIGTERM") && unit.contains("KillMode=mixed"), "the agent alone gets SIGTERM and stops its VMs by policy");
    }
}
