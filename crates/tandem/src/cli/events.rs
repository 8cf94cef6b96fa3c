//! `tandem events`: the HA timeline of one agent or of the whole cluster, once or followed.

use super::args::EventsArgs;
use super::output::{clock_time, Output};
use tandem::client::{Client, ClientError};
use tandem_agent::views::{Event, HostView};

/// Runs `tandem events`.
pub fn run(c: &Client, out: Output, args: &EventsArgs) -> Result<(), ClientError> {
    let EventsArgs { after, vm, host, kind, follow, cluster } = args;
    let mut filter = String::new();
    for (k, v) in [("vm", vm), ("host", host), ("kind", kind)] {
        if let Some(v) = v {
            filter.push_str(&format!("&{k}={v}"));
        }
    }
    // One (agent, last seq seen) per timeline read.
    let mut sources: Vec<(Client, u64)> = if *cluster {
        c.get_as::<Vec<HostView>>("/v1/hosts")?
            .into_iter()
            .map(|h| (Client { addr: h.api_addr, timeout: std::time::Duration::from_secs(5), ..c.clone() }, *after))
            .collect()
    } else {
        vec![(c.clone(), *after)]
    };
    loop {
        let mut list = Vec::new();
        for (src, after) in &mut sources {
            match src.get_as::<Vec<Event>>(&format!("/v1/events?after={after}{filter}")) {
                Ok(got) => {
                    *after = got.iter().map(|e| e.seq).max().unwrap_or(*after);
                    list.extend(got);
                }
                Err(e) if *cluster => eprintln!("tandem: events of {} not read: {e}", src.addr),
                Err(e) => return Err(e),
            }
        }
        list.sort_by_key(|e| (e.at_ms, e.seq));
        match out {
            // One JSON object per line when following, so it can be piped.
            Output::Json if *follow => list.iter().for_each(|e| println!("{}", serde_json::to_string(e).unwrap_or_default())),
            Output::Json => println!("{}", serde_json::to_string_pretty(&list).unwrap_or_default()),
            Output::Table => {
                for e in &list {
                    println!("{:>6} {} {:<10} {:<22} {}", e.seq, clock_time(e.at_ms), e.host, e.kind, e.detail);
                }
            }
        }
        if !*follow {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}
