//! `tandem events`: the HA timeline of one agent or of the whole cluster, once or followed.

use super::args::EventsArgs;
use super::output::{clock_time, s, Output};
use tandem::client::{Client, ClientError};

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
        c.get("/v1/hosts")?
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h["api_addr"].as_str())
            .map(|a| (Client { addr: a.to_string(), timeout: std::time::Duration::from_secs(5), ..c.clone() }, *after))
            .collect()
    } else {
        vec![(c.clone(), *after)]
    };
    loop {
        let mut list = Vec::new();
        for (src, after) in &mut sources {
            match src.get(&format!("/v1/events?after={after}{filter}")) {
                Ok(v) => {
                    let got = v.as_array().cloned().unwrap_or_default();
                    *after = got.iter().filter_map(|e| e["seq"].as_u64()).max().unwrap_or(*after);
                    list.extend(got);
                }
                Err(e) if *cluster => eprintln!("tandem: events of {} not read: {e}", src.addr),
                Err(e) => return Err(e),
            }
        }
        list.sort_by_key(|e| (e["at_ms"].as_u64().unwrap_or(0), e["seq"].as_u64().unwrap_or(0)));
        match out {
            // One JSON object per line when following, so it can be piped.
            Output::Json if *follow => list.iter().for_each(|e| println!("{e}")),
            Output::Json => println!("{}", serde_json::to_string_pretty(&list).unwrap_or_default()),
            Output::Table => {
                for e in &list {
                    let at = e["at_ms"].as_u64().map_or_else(String::new, clock_time);
                    println!("{:>6} {at} {:<10} {:<22} {}", s(&e["seq"]), s(&e["host"]), s(&e["kind"]), s(&e["detail"]));
                }
            }
        }
        if !*follow {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}
