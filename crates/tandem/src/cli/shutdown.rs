//! `tandem host shutdown NAME [--policy P]`: asks the host's own agent for a planned stop, then
//! follows it from another host until committed state shows it gone (left with its VMs parked,
//! or failed over), and says where its VMs are.

use super::output::{kv, Output};
use std::time::{Duration, Instant};
use tandem::client::{decode, Client, ClientError};
use tandem_agent::views::{HostView, ShutdownAsked, ShutdownRequest, VmView};
use tandem_core::state::HostStatus;

/// How often the cluster is read while following.
const POLL: Duration = Duration::from_millis(500);
/// How long the CLI follows (a `migrate` stop may take its whole evacuation bound).
const FOLLOW_FOR: Duration = Duration::from_secs(900);

pub fn run(c: &Client, out: Output, name: &str, policy: Option<&str>, no_wait: bool) -> Result<(), ClientError> {
    let hosts: Vec<HostView> = decode(c.get("/v1/hosts")?)?;
    let target = hosts.iter().find(|h| h.name == name).ok_or_else(|| ClientError::Refused { status: 404, message: format!("unknown host '{name}'") })?;
    let policy = policy.map(|p| serde_json::from_value(serde_json::json!(p))).transpose().map_err(|e| ClientError::Usage(format!("--policy: {e}")))?;
    let vms: Vec<VmView> = decode(c.get("/v1/vms")?)?;
    let was_on: Vec<String> = vms.into_iter().filter(|v| v.host.as_deref() == Some(name)).map(|v| v.name).collect();
    let own = Client { addr: target.api_addr.clone(), ..c.clone() };
    let answer = own.send("POST", &format!("/v1/hosts/{name}/shutdown"), &ShutdownRequest { policy })?;
    let asked: ShutdownAsked = decode(answer.clone())?;
    if no_wait {
        return super::output::show(out, &answer, kv::<ShutdownAsked>);
    }
    if out == Output::Table {
        println!("{name} stops (policy {}): {} VM(s) there", serde_json::to_value(asked.policy).unwrap_or_default().as_str().unwrap_or("?"), was_on.len());
    }
    // Followed from another host: the stopping one goes away.
    let watcher = hosts.iter().find(|h| h.name != name).map_or_else(|| c.clone(), |h| Client { addr: h.api_addr.clone(), ..c.clone() });
    let started = Instant::now();
    let status = loop {
        if started.elapsed() > FOLLOW_FOR {
            return Err(ClientError::Unavailable(format!("stopped following after {} s; see tandem host list", FOLLOW_FOR.as_secs())));
        }
        let gone = watcher
            .get("/v1/hosts")
            .ok()
            .and_then(|v| decode::<Vec<HostView>>(v).ok())
            .and_then(|hs| hs.into_iter().find(|h| h.name == name))
            .map(|h| h.status)
            .filter(|s| *s != HostStatus::Active);
        if let Some(s) = gone {
            break s;
        }
        std::thread::sleep(POLL);
    };
    let vms: Vec<VmView> = decode(watcher.get("/v1/vms")?)?;
    match out {
        Output::Json => {
            println!("{}", serde_json::json!({"host": name, "status": status, "vms": vms.iter().filter(|v| was_on.contains(&v.name)).collect::<Vec<_>>()}))
        }
        Output::Table => {
            println!("{name} is {} after {:.1} s", serde_json::to_value(status).unwrap_or_default().as_str().unwrap_or("?"), started.elapsed().as_secs_f64());
            for v in vms.iter().filter(|v| was_on.contains(&v.name)) {
                let at = match (&v.host, &v.waiting) {
                    (Some(h), _) => format!("runs on {h}"),
                    (None, Some(why)) => why.clone(),
                    (None, None) => "stopped".to_string(),
                };
                println!("  {:<20} {at}", v.name);
            }
        }
    }
    Ok(())
}
