//! `tandem`: the agent, the CLI and the demo in one binary.

mod cli;

use cli::args::*;
use cli::output::{kv, print_plans, print_table, s, show, usage};
use serde_json::{json, Value};
use tandem::client::{Client, ClientError};

fn cli_token(cli: &Cli) -> Result<Option<String>, ClientError> {
    if let Some(t) = &cli.token {
        return Ok(Some(t.clone()));
    }
    let Some(path) = &cli.secret_file else { return Ok(None) };
    let bytes = std::fs::read(path).map_err(|e| usage(format!("cannot read secret file {}: {e}", path.display())))?;
    let key = tandem_core::wire::ClusterKey::new(&bytes).map_err(|e| usage(format!("secret file {}: {e}", path.display())))?;
    Ok(Some(key.peer_token()))
}

fn run_client(cli: &Cli) -> Result<(), ClientError> {
    let tls = match &cli.ca {
        Some(ca) => Some(tandem_agent::tls::ClientTls::load(ca).map_err(|e| usage(format!("{:#}", anyhow::Error::new(e))))?),
        None => None,
    };
    let c = Client::new(&cli.api).with_token(cli_token(cli)?).with_tls(tls);
    let out = cli.output;
    match &cli.command {
        Cmd::Agent { .. } | Cmd::Disk { .. } => Ok(()),
        Cmd::Cluster { op: ClusterOp::Settings } => {
            let v = c.get("/v1/settings")?;
            show(out, &v, kv);
            Ok(())
        }
        Cmd::Cluster { op: ClusterOp::Set { ftt_target, vcpu_overcommit_pct, group_delay, force } } => {
            let mut body = json!({ "force": force });
            if let Some(t) = ftt_target {
                body["ftt_target"] = if t == "none" {
                    Value::Null
                } else {
                    json!(t.parse::<u32>().map_err(|_| usage(format!("--ftt-target '{t}' is not a number or 'none'")))?)
                };
            }
            if let Some(p) = vcpu_overcommit_pct {
                body["vcpu_overcommit_pct"] = json!(p);
            }
            let mut delays = serde_json::Map::new();
            for g in group_delay {
                let bad = || usage(format!("--group-delay '{g}' is not GROUP=SECONDS or GROUP=default"));
                let (group, secs) = g.split_once('=').ok_or_else(bad)?;
                let group: u8 = group.parse().map_err(|_| bad())?;
                let ms = if secs == "default" {
                    Value::Null
                } else {
                    let secs: f64 = secs.parse().ok().filter(|s: &f64| s.is_finite() && *s >= 0.0).ok_or_else(bad)?;
                    json!((secs * 1000.0).round() as u64)
                };
                delays.insert(group.to_string(), ms);
            }
            if !delays.is_empty() {
                body["group_delays_ms"] = Value::Object(delays);
            }
            let v = c.post("/v1/settings", &body)?;
            show(out, &v, kv);
            Ok(())
        }
        Cmd::Host { op: HostOp::Mode { name, mode, force } } => {
            let v = c.post(&format!("/v1/hosts/{name}/mode"), &json!({ "mode": mode, "force": force }))?;
            show(out, &v, kv);
            Ok(())
        }
        Cmd::Ftt => {
            let v = c.get("/v1/ftt")?;
            show(out, &v, |v| {
                let r = &v["report"];
                let exact = if r["exact"] == true { "exact" } else { "lower bound" };
                println!("failures to tolerate: {} ({exact}; limited by {})", s(&r["ftt"]), s(&r["limited_by"]));
                println!("target: {}", s(&v["target"]));
                println!("failure sets checked: {} (every set up to {} host(s))", s(&r["sets_checked"]), s(&r["checked_up_to"]));
                if let Some(c) = r["counterexample"].as_array() {
                    println!("breaks when hosts {} fail: {} could not restart", s(&c[0]), s(&c[1]));
                }
            });
            Ok(())
        }
        Cmd::Plan => {
            let v = c.get("/v1/plan")?;
            show(out, &v, print_plans);
            Ok(())
        }
        Cmd::Whatif { fail } => {
            let v = c.get(&format!("/v1/plan?fail={}", fail.join(",")))?;
            show(out, &v, print_plans);
            Ok(())
        }
        Cmd::Rule { op: RuleOp::Add { name, kind, hard, vms, force } } => {
            let v = c.post("/v1/rules", &json!({ "name": name, "kind": kind, "hard": hard, "vms": vms, "force": force }))?;
            show(out, &v, kv);
            Ok(())
        }
        Cmd::Rule { op: RuleOp::List } => {
            let v = c.get("/v1/rules")?;
            show(out, &v, |v| {
                let mut rows = vec![["NAME", "KIND", "HARD", "VMS"].map(String::from).to_vec()];
                for r in v.as_array().into_iter().flatten() {
                    let vms: Vec<String> = r["vms"].as_array().into_iter().flatten().map(s).collect();
                    rows.push(vec![s(&r["name"]), s(&r["kind"]), s(&r["hard"]), vms.join(",")]);
                }
                print_table(&rows);
            });
            Ok(())
        }
        Cmd::Rule { op: RuleOp::Delete { name } } => {
            let v = c.call("DELETE", &format!("/v1/rules/{name}"), None)?;
            show(out, &v, kv);
            Ok(())
        }
        Cmd::Cluster { op: ClusterOp::Init } => {
            let v = c.post("/v1/cluster/init", &json!({}))?;
            show(out, &v, kv);
            Ok(())
        }
        Cmd::Cluster { op: ClusterOp::Status } => {
            let v = c.get("/v1/status")?;
            show(out, &v, |v| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()));
            Ok(())
        }
        Cmd::Host { op: HostOp::Join { api_addr } } => {
            let v = c.post("/v1/hosts/join", &json!({ "api_addr": api_addr }))?;
            show(out, &v, kv);
            Ok(())
        }
        Cmd::Host { op: HostOp::List } => {
            let v = c.get("/v1/hosts")?;
            show(out, &v, |v| {
                let mut rows =
                    vec![["ID", "NAME", "STATUS", "EPOCH", "LIVENESS", "NET AGE", "DISK AGE", "VCPU", "MEMORY MiB", "LEADER"].map(String::from).to_vec()];
                for h in v.as_array().into_iter().flatten() {
                    let age = |x: &Value| x.as_u64().map_or("-".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
                    rows.push(vec![
                        s(&h["id"]),
                        s(&h["name"]),
                        s(&h["status"]),
                        s(&h["epoch"]),
                        s(&h["liveness"]),
                        age(&h["net_age_ms"]),
                        age(&h["disk_age_ms"]),
                        format!("{}/{}", s(&h["used"]["vcpus"]), s(&h["capacity"]["vcpus"])),
                        format!("{}/{}", s(&h["used"]["memory_mib"]), s(&h["capacity"]["memory_mib"])),
                        if h["leader"] == true { "*".into() } else { String::new() },
                    ]);
                }
                print_table(&rows);
            });
            Ok(())
        }
        Cmd::Vm { op } => cli::vm::run(&c, out, op),
        Cmd::Events(args) => cli::events::run(&c, out, args),
        Cmd::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut cmd, "tandem", &mut script);
            // A closed pipe (`| head`) is not an error worth a panic.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
            Ok(())
        }
        Cmd::Openapi => {
            println!("{}", serde_json::to_string_pretty(&tandem_agent::endpoints::openapi()).unwrap_or_default());
            Ok(())
        }
        Cmd::Token { op: TokenOp::Create { name, role } } => {
            let role: tandem_core::state::Role = role.parse().map_err(usage)?;
            let v = c.post("/v1/tokens", &json!({ "name": name, "role": role }))?;
            show(out, &v, |v| {
                println!("token {} ({}) created; it is shown only now:", s(&v["name"]), s(&v["role"]));
                println!("{}", s(&v["token"]));
            });
            Ok(())
        }
        Cmd::Token { op: TokenOp::List } => {
            let v = c.get("/v1/tokens")?;
            show(out, &v, |v| {
                let mut rows = vec![vec!["NAME".to_string(), "ROLE".to_string()]];
                rows.extend(v.as_array().into_iter().flatten().map(|t| vec![s(&t["name"]), s(&t["role"])]));
                print_table(&rows);
            });
            Ok(())
        }
        Cmd::Token { op: TokenOp::Delete { name } } => {
            let v = c.call("DELETE", &format!("/v1/tokens/{name}"), None)?;
            show(out, &v, kv);
            Ok(())
        }
    }
}

/// Gives every subcommand's long help the manual's sections.
fn with_manual(cmd: clap::Command) -> clap::Command {
    cmd.after_long_help(MANUAL).mut_subcommands(with_manual)
}

fn main() {
    let matches = with_manual(<Cli as clap::CommandFactory>::command()).get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let agent = matches!(cli.command, Cmd::Agent { .. });
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| if agent { "warn,tandem=info,tandem_agent=info" } else { "warn" }.into());
    let logs = tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::new(filter)).with_writer(std::io::stderr);
    // A subscriber already set (none is, in this program) would keep logging: nothing to handle.
    let _ = logs.try_init();
    let code = match &cli.command {
        Cmd::Disk { op: DiskOp::Format { config, force } } => match tandem::agent_cmd::format_disk(config, *force) {
            Ok(path) => {
                println!("formatted {path} as this cluster's heartbeat disk");
                0
            }
            Err(e) => {
                eprintln!("tandem disk format: {e:#}");
                1
            }
        },
        Cmd::Agent { config } => match tandem::agent_cmd::run_agent(config) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("tandem agent: {e:#}");
                2
            }
        },
        _ => match run_client(&cli) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("tandem: {e}");
                e.exit_code()
            }
        },
    };
    std::process::exit(code);
}
