//! `tandem vm ...`: specs from flags or files, and the VM commands.

use super::args::{CreateArgs, VmOp};
use super::output::{kv, print_table, s, show, usage, Output};
use anyhow::{anyhow, Context, Result};
use serde_json::json;
use tandem::client::{Client, ClientError};
use tandem_core::state::{DriverSpec, NetworkSpec, Protection, VmSpec};

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
        DriverSpec::Qemu { kernel: args.kernel.clone(), initrd: args.initrd.clone(), cmdline: args.cmdline.clone(), extra_args: vec![] }
    } else {
        DriverSpec::Process { command: args.command.clone() }
    };
    let network = (!args.hostfwd.is_empty()).then(|| NetworkSpec::User { hostfwd: args.hostfwd.clone() });
    let disks = args.disk.iter().map(|p| tandem_core::state::DiskSpec { path: p.clone(), format: None, readonly: false }).collect();
    Ok(VmSpec { name, vcpus: args.vcpus, memory_mib: args.memory_mib, disks, network, protection, priority: args.priority, restart_group: args.group, driver })
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
            let v = c.post("/v1/vms", &serde_json::to_value(&spec).map_err(|e| ClientError::Refused { status: 400, message: e.to_string() })?)?;
            show(out, &v, kv);
            Ok(())
        }
        VmOp::Start { name, force } => {
            let v = c.post(&format!("/v1/vms/{name}/start"), &json!({ "force": force }))?;
            show(out, &v, kv);
            Ok(())
        }
        VmOp::Update { name, vcpus, memory_mib, protection, priority, group, force } => {
            let current = c.get(&format!("/v1/vms/{name}"))?;
            let mut spec = current["spec"].clone();
            if let Some(x) = vcpus {
                spec["vcpus"] = json!(x);
            }
            if let Some(x) = memory_mib {
                spec["memory_mib"] = json!(x);
            }
            if let Some(x) = protection {
                let p: Protection = x.parse().map_err(usage)?;
                spec["protection"] = json!(p);
            }
            if let Some(x) = priority {
                spec["priority"] = json!(x);
            }
            if let Some(x) = group {
                spec["restart_group"] = json!(x);
            }
            let v = c.call("PUT", &format!("/v1/vms/{name}"), Some(&json!({ "spec": spec, "force": force })))?;
            show(out, &v, kv);
            Ok(())
        }
        VmOp::Stop { name } => {
            let v = c.post(&format!("/v1/vms/{name}/stop"), &json!({}))?;
            show(out, &v, kv);
            Ok(())
        }
        VmOp::Clear { name } => {
            let v = c.post(&format!("/v1/vms/{name}/clear"), &json!({}))?;
            show(out, &v, kv);
            Ok(())
        }
        VmOp::Delete { name } => {
            let v = c.call("DELETE", &format!("/v1/vms/{name}"), None)?;
            show(out, &v, kv);
            Ok(())
        }
        VmOp::Show { name } => {
            let v = c.get(&format!("/v1/vms/{name}"))?;
            show(out, &v, |v| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()));
            Ok(())
        }
        VmOp::List => {
            let v = c.get("/v1/vms")?;
            show(out, &v, |v| {
                let mut rows = vec![["NAME", "PROTECTION", "PRIORITY", "VCPU", "MEMORY MiB", "DESIRED", "HOST", "GENERATION", "ERROR / WAITING"]
                    .map(String::from)
                    .to_vec()];
                for x in v.as_array().into_iter().flatten() {
                    rows.push(vec![
                        s(&x["name"]),
                        s(&x["protection"]),
                        s(&x["priority"]),
                        s(&x["vcpus"]),
                        s(&x["memory_mib"]),
                        s(&x["desired"]),
                        s(&x["host"]),
                        s(&x["generation"]),
                        if x["error"].is_null() { s(&x["waiting"]) } else { s(&x["error"]) },
                    ]);
                }
                print_table(&rows);
            });
            Ok(())
        }
    }
}
