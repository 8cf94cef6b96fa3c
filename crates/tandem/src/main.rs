//! `tandem`: the agent and the CLI in one binary (the laboratory is `tandem-lab`).

mod cli;

use cli::args::*;
use cli::output::usage;
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
        Cmd::Agent { .. } | Cmd::Witness { .. } | Cmd::Disk { .. } => Ok(()),
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
        other => cli::commands::run(&c, out, other),
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
    let agent = matches!(cli.command, Cmd::Agent { .. } | Cmd::Witness { .. });
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
        Cmd::Witness { config } => match tandem::agent_cmd::run_witness(config) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("tandem witness: {e:#}");
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
