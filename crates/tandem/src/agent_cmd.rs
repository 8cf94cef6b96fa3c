//! `tandem agent`, `tandem witness` and `tandem disk format`: the agent's and the witness's process entries, its start-up line, and
//! how it stops (SIGTERM gives the VMs up first; open requests get a bounded drain).

use anyhow::Result;
use std::sync::Arc;
use std::time::Duration;
use tandem_agent::agent::Agent;
use tandem_agent::config::AgentConfig;

/// Formats the configured heartbeat disk; returns its path.
pub fn format_disk(config: &std::path::Path, force: bool) -> Result<String> {
    let cfg = AgentConfig::load(config)?;
    let Some(disk) = &cfg.heartbeat_disk else {
        anyhow::bail!("{} sets no heartbeat_disk: its heartbeat area is kept (and formatted) by its witness", config.display());
    };
    tandem_agent::disk::format(disk, &cfg.key()?, force)?;
    Ok(disk.display().to_string())
}

/// Runs the network witness until SIGTERM or Ctrl-C.
pub fn run_witness(config: &std::path::Path) -> Result<()> {
    let cfg = tandem_agent::netwitness::server::WitnessConfig::load(config)?;
    if cfg.tls.is_none() && !cfg.listen.ip().is_loopback() {
        tracing::warn!("the witness serves {} without TLS: the clusters' tokens cross the network in clear text; configure [tls]", cfg.listen);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                Some(()) = async { match term.as_mut() { Some(t) => t.recv().await, None => std::future::pending().await } } => {}
            }
        };
        tandem_agent::netwitness::server::serve(cfg, shutdown).await?;
        Ok::<(), anyhow::Error>(())
    })
}

/// How long open API requests may run on after a stop.
const HTTP_DRAIN: Duration = Duration::from_secs(5);

/// Runs the agent until it is stopped.
pub fn run_agent(config: &std::path::Path) -> Result<()> {
    let cfg = AgentConfig::load(config)?;
    let t = &cfg.timings;
    tracing::info!(
        "tandem agent {} starting: host {} (id {}), api {} ({}), heartbeats {}, driver {:?}, heartbeat disk {}, \
         heartbeat every {} ms, peer timeout {} ms, self-fence {} ms, fence wait {} ms, watchdog {}, data {}",
        env!("CARGO_PKG_VERSION"),
        cfg.name,
        cfg.host_id,
        cfg.api_addr,
        if cfg.tls.is_some() { "TLS" } else { "plain HTTP" },
        cfg.heartbeat_addr,
        cfg.driver,
        match (&cfg.heartbeat_disk, &cfg.witness) {
            (Some(d), _) => d.display().to_string(),
            (None, Some(w)) => format!("at {w}"),
            (None, None) => "none".into(),
        },
        t.heartbeat_interval_ms,
        t.peer_timeout_ms,
        t.self_fence_ms,
        t.fence_wait_ms(),
        if cfg.watchdog.enabled { format!("{} ({} s)", cfg.watchdog.device.display(), cfg.watchdog.timeout_s) } else { "off".into() },
        cfg.data_dir.display()
    );
    if cfg.tls.is_none() && !cfg.api_addr.ip().is_loopback() {
        tracing::warn!(
            "the API serves {} without TLS: bearer tokens, the cluster token included, cross the network in clear text; configure [tls]",
            cfg.api_addr
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let agent = Agent::open(cfg).await?;
        agent.spawn_loops()?;
        let a = Arc::clone(&agent);
        let stopped = Arc::new(tokio::sync::Notify::new());
        let done = Arc::clone(&stopped);
        let shutdown = async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            let stopped_itself = async {
                // The agent stops on its own when consensus stops on this host (its VMs are
                // already killed then: a second to notice costs nothing, a faster poll wakes
                // an idle agent for nothing).
                while !a.is_stopping() {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => a.stop_gracefully().await,
                Some(()) = async { match term.as_mut() { Some(t) => t.recv().await, None => std::future::pending().await } } => a.stop_gracefully().await,
                policy = a.stop_requested() => a.stop_with(Some(policy)).await,
                () = stopped_itself => {}
            }
            done.notify_one();
        };
        // Open requests get a bounded time to finish once the VMs are down and the loops stopped.
        let drained = async {
            stopped.notified().await;
            tokio::time::sleep(HTTP_DRAIN).await;
            tracing::warn!("open API requests did not finish within {HTTP_DRAIN:?} of the stop; exiting");
        };
        tokio::select! {
            r = tandem_agent::api::serve(Arc::clone(&agent), shutdown) => r?,
            () = drained => {}
        }
        if let Some(why) = agent.consensus.fatal() {
            anyhow::bail!("consensus stopped on this host: {why}");
        }
        Ok::<(), anyhow::Error>(())
    })
}
