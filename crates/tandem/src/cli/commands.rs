//! The one-request commands: cluster, hosts, FTT and plans, rules, tokens. Requests are built
//! from, and answers read as, the API's types (`tandem_agent::views`).

use super::args::*;
use super::output::{kv, print_plans, print_table, show, text, usage, Output};
use std::collections::BTreeMap;
use tandem::client::{Client, ClientError};
use tandem_agent::views::*;

/// Runs one of the commands this module owns.
pub fn run(c: &Client, out: Output, cmd: &Cmd) -> Result<(), ClientError> {
    match cmd {
        Cmd::Cluster { op } => cluster(c, out, op),
        Cmd::Host { op } => host(c, out, op),
        Cmd::Ftt => show(out, &c.get("/v1/ftt")?, print_ftt),
        Cmd::Plan => show(out, &c.get("/v1/plan")?, print_plans),
        Cmd::Failovers { limit, vms } => show(out, &c.get(&format!("/v1/failovers?limit={limit}"))?, |f: &Vec<FailoverView>| print_failovers(f, *vms)),
        Cmd::Migrations => show(out, &c.get("/v1/migrations")?, super::migrate::print_migrations),
        Cmd::Rebalance(args) => super::rebalance::run(c, out, args),
        Cmd::Whatif { fail, fail_site } => {
            let query = match fail_site {
                Some(site) => format!("fail_site={site}"),
                None => format!("fail={}", fail.join(",")),
            };
            show(out, &c.get(&format!("/v1/plan?{query}"))?, print_plans)
        }
        Cmd::Rule { op } => rule(c, out, op),
        Cmd::Token { op } => token(c, out, op),
        _ => Err(usage("this command is not a client command")),
    }
}

fn cluster(c: &Client, out: Output, op: &ClusterOp) -> Result<(), ClientError> {
    match op {
        ClusterOp::Init => show(out, &c.send("POST", "/v1/cluster/init", &EmptyRequest {})?, kv::<Initialized>),
        ClusterOp::Status => show(out, &c.get("/v1/status")?, |s: &StatusView| println!("{}", serde_json::to_string_pretty(s).unwrap_or_default())),
        ClusterOp::Settings => show(out, &c.get("/v1/settings")?, kv::<Settings>),
        ClusterOp::Set { ftt_target, vcpu_overcommit_pct, group_delay, shutdown_policy, survive_site_loss, preferred_site, force } => {
            let mut req = SettingsRequest {
                vcpu_overcommit_pct: *vcpu_overcommit_pct,
                survive_site_loss: *survive_site_loss,
                force: *force,
                ..SettingsRequest::default()
            };
            if let Some(t) = ftt_target {
                req.ftt_target =
                    Some(if t == "none" { None } else { Some(t.parse::<u32>().map_err(|_| usage(format!("--ftt-target '{t}' is not a number or 'none'")))?) });
            }
            req.group_delays_ms = group_delays(group_delay)?;
            req.preferred_site = preferred_site.as_deref().map(|s| (s != "none").then(|| s.to_string()));
            req.shutdown_policy = match shutdown_policy.as_deref() {
                None => None,
                Some("host") => Some(None),
                Some(p) => Some(Some(serde_json::from_value(serde_json::json!(p)).map_err(|e| usage(format!("--shutdown-policy: {e}")))?)),
            };
            show(out, &c.send("POST", "/v1/settings", &req)?, kv::<SettingsSet>)
        }
    }
}

/// `--group-delay GROUP=SECONDS|default`, as the request's per-group milliseconds.
fn group_delays(args: &[String]) -> Result<BTreeMap<u8, Option<u64>>, ClientError> {
    let mut delays = BTreeMap::new();
    for g in args {
        let bad = || usage(format!("--group-delay '{g}' is not GROUP=SECONDS or GROUP=default"));
        let (group, secs) = g.split_once('=').ok_or_else(bad)?;
        let group: u8 = group.parse().map_err(|_| bad())?;
        let ms = if secs == "default" {
            None
        } else {
            let secs: f64 = secs.parse().ok().filter(|s: &f64| s.is_finite() && *s >= 0.0).ok_or_else(bad)?;
            Some((secs * 1000.0).round() as u64)
        };
        delays.insert(group, ms);
    }
    Ok(delays)
}

fn host(c: &Client, out: Output, op: &HostOp) -> Result<(), ClientError> {
    match op {
        HostOp::Join { api_addr } => show(out, &c.send("POST", "/v1/hosts/join", &JoinRequest { api_addr: api_addr.clone() })?, kv::<Joined>),
        HostOp::Mode { name, mode, force } => {
            let req = HostModeRequest { mode: mode.parse().map_err(usage)?, force: *force };
            show(out, &c.send("POST", &format!("/v1/hosts/{name}/mode"), &req)?, kv::<HostModeSet>)
        }
        HostOp::List => show(out, &c.get("/v1/hosts")?, print_hosts),
        HostOp::Shutdown { name, policy, no_wait } => super::shutdown::run(c, out, name, policy.as_deref(), *no_wait),
        HostOp::Maintenance { action, name, force, shutdown_unmovable, no_wait } => {
            let how = super::maintenance::Follow { force: *force, shutdown_unmovable: *shutdown_unmovable, no_wait: *no_wait };
            super::maintenance::run(c, out, action == "enter", name, how)
        }
    }
}

fn print_hosts(hosts: &Vec<HostView>) {
    let mut rows =
        vec![["ID", "NAME", "SITE", "STATUS", "MODE", "EPOCH", "LIVENESS", "NET AGE", "DISK AGE", "VCPU", "MEMORY MiB", "LEADER"].map(String::from).to_vec()];
    let age = |x: Option<u64>| x.map_or("-".into(), |ms| format!("{:.1}s", ms as f64 / 1000.0));
    for h in hosts {
        rows.push(vec![
            h.id.to_string(),
            h.name.clone(),
            h.site.clone().unwrap_or_else(|| "-".into()),
            text(&h.status),
            text(&h.mode),
            h.epoch.to_string(),
            h.liveness.as_str().to_string(),
            age(h.net_age_ms),
            age(h.disk_age_ms),
            format!("{}/{}", h.used.vcpus, h.capacity.vcpus),
            format!("{}/{}", h.used.memory_mib, h.capacity.memory_mib),
            if h.leader { "*".into() } else { String::new() },
        ]);
    }
    print_table(&rows);
}

fn print_ftt(v: &FttView) {
    let r = &v.report;
    let exact = if r.exact { "exact" } else { "lower bound" };
    println!("failures to tolerate: {} ({exact}; limited by {})", r.ftt, r.limited_by);
    println!("target: {}", v.target.map_or("-".into(), |t| t.to_string()));
    println!("failure sets checked: {} (every set up to {} host(s))", r.sets_checked, r.checked_up_to);
    if let Some((hosts, vms)) = &r.counterexample {
        let hosts: Vec<String> = hosts.iter().map(|h| h.0.to_string()).collect();
        println!("breaks when hosts [{}] fail: [{}] could not restart", hosts.join(", "), vms.join(", "));
    }
    if !v.sites.is_empty() || v.survive_site_loss {
        println!("target \"survive the loss of one site\": {}", if v.survive_site_loss { "on" } else { "off" });
    }
    for l in &v.sites {
        let down: Vec<&str> = l.protected_down.iter().map(|d| d.vm.as_str()).collect();
        let verdict = match (l.survived, l.quorum) {
            (true, _) => "survived: every protected VM restarts elsewhere".to_string(),
            (false, false) => format!("not survived: no majority left, [{}] stay down", down.join(", ")),
            (false, true) => format!("not survived: [{}] could not restart", down.join(", ")),
        };
        println!("loss of site {} ({}): {verdict}", l.site, l.hosts.join(", "));
    }
}

fn rule(c: &Client, out: Output, op: &RuleOp) -> Result<(), ClientError> {
    match op {
        RuleOp::Add { name, kind, site, hard, vms, force, enforce } => {
            let kind: RuleKind = match kind.as_deref() {
                None => RuleKind::Site,
                Some(k) => serde_json::from_value(serde_json::json!(k)).map_err(|_| usage(format!("--kind '{k}' is not affinity, anti-affinity or site")))?,
            };
            if (kind == RuleKind::Site) != site.is_some() {
                return Err(usage("--site goes with a site rule (--kind site), and a site rule needs --site"));
            }
            let req = RuleRequest { name: name.clone(), kind, hard: *hard, vms: vms.clone(), site: site.clone(), force: *force };
            show(out, &c.send("POST", "/v1/rules", &req)?, kv::<RuleAdded>)?;
            if !*enforce {
                return Ok(());
            }
            let args = super::args::RebalanceArgs { dry_run: false, yes: true, rule: Some(name.clone()), no_balance: true, parallel: 2 };
            super::rebalance::run(c, out, &args)
        }
        RuleOp::List => show(out, &c.get("/v1/rules")?, |rules: &Vec<Rule>| {
            let mut rows = vec![["NAME", "KIND", "SITE", "HARD", "VMS"].map(String::from).to_vec()];
            for r in rules {
                rows.push(vec![r.name.clone(), text(&r.kind), r.site.clone().unwrap_or_else(|| "-".into()), r.hard.to_string(), r.vms.join(",")]);
            }
            print_table(&rows);
        }),
        RuleOp::Delete { name } => show(out, &c.call("DELETE", &format!("/v1/rules/{name}"), None)?, kv::<Deleted>),
    }
}

fn token(c: &Client, out: Output, op: &TokenOp) -> Result<(), ClientError> {
    match op {
        TokenOp::Create { name, role } => {
            let req = TokenRequest { name: name.clone(), role: role.parse().map_err(usage)? };
            show(out, &c.send("POST", "/v1/tokens", &req)?, |t: &NewToken| {
                println!("token {} ({}) created; it is shown only now:", t.name, t.role);
                println!("{}", t.token);
            })
        }
        TokenOp::List => show(out, &c.get("/v1/tokens")?, |tokens: &Vec<TokenView>| {
            let mut rows = vec![vec!["NAME".to_string(), "ROLE".to_string()]];
            rows.extend(tokens.iter().map(|t| vec![t.name.clone(), t.role.to_string()]));
            print_table(&rows);
        }),
        TokenOp::Delete { name } => show(out, &c.call("DELETE", &format!("/v1/tokens/{name}"), None)?, kv::<Revoked>),
    }
}

/// Seconds from `origin` to `t`, signed, for a phase column.
fn after(origin: u64, t: u64) -> String {
    format!("{:+.2} s", (t as f64 - origin as f64) / 1000.0)
}

/// Each failover as its phases, in seconds after the last evidence of the failed host's life.
fn print_failovers(failovers: &Vec<FailoverView>, every_vm: bool) {
    if failovers.is_empty() {
        println!("no failover recorded");
        return;
    }
    for f in failovers {
        let r = &f.record;
        let origin = r.last_evidence_ms.or(r.declared_dead_ms).unwrap_or(r.decided_ms);
        println!("{} failed over ({}, epoch {}), committed by {}:", r.host, r.reason, r.epoch, f.recorded_by);
        let mut rows: Vec<Vec<String>> = vec![vec!["PHASE".into(), "AFTER LAST EVIDENCE".into()]];
        let mut phase = |name: &str, t: Option<u64>| rows.push(vec![name.to_string(), t.map_or_else(|| "-".into(), |t| after(origin, t))]);
        phase("last evidence of life", r.last_evidence_ms);
        phase("declared dead", r.declared_dead_ms);
        phase("fence deadline", r.fence_deadline_ms);
        phase("decided", Some(r.decided_ms));
        phase("committed", Some(r.committed_ms));
        let mut started: Vec<u64> = f.starts.iter().filter_map(|s| s.started_ms).collect();
        started.sort_unstable();
        if let (Some(first), Some(last)) = (started.first(), started.last()) {
            phase("first VM started", Some(*first));
            phase("half the VMs started", Some(started[started.len() / 2]));
            phase("last VM started", Some(*last));
        }
        let mut answering: Vec<u64> = f.starts.iter().filter_map(|s| s.answering_ms).collect();
        answering.sort_unstable();
        if let (Some(first), Some(last)) = (answering.first(), answering.last()) {
            phase("first service answering", Some(*first));
            phase("last service answering", Some(*last));
        }
        print_table(&rows);
        println!("{} of {} moved VM(s) started, {} answering their probe; {} left down", started.len(), f.starts.len(), answering.len(), r.left_down.len());
        if every_vm {
            let mut rows: Vec<Vec<String>> = vec![["VM", "TO", "GENERATION", "STARTED", "ANSWERING"].map(String::from).to_vec()];
            let at = |t: Option<u64>, none: &str| t.map_or_else(|| none.to_string(), |t| after(origin, t));
            rows.extend(
                f.starts.iter().map(|s| vec![s.vm.clone(), s.host.clone(), s.generation.to_string(), at(s.started_ms, "not yet"), at(s.answering_ms, "-")]),
            );
            print_table(&rows);
        }
        println!();
    }
}
