//! Network namespaces for fault tests: one namespace per host, a "switch" namespace holding a
//! bridge that links them, and a control namespace from which a test talks to the agents. Every
//! address comes from 198.18.0.0/24 (the benchmarking range) and exists only inside the
//! namespaces made here; nothing is routed anywhere else. Dropping a `NetLab` deletes every
//! namespace it made, which also removes their interfaces and firewall rules.
//!
//! With [`NetLab::add_vm_network`] every host also gets the bridge its VMs join
//! ([`VM_BRIDGE`]), linked to the switch by a port of its own: a guest's tap on any host is on
//! one segment with every other host's guests and with the control namespace, so a VM answers on
//! its own address wherever it runs (the guests take addresses from [`NetLab::vm_ip`]).

use anyhow::{bail, Context, Result};
use std::process::Command;

/// The bridge on every host that bridged VMs join (`[qemu] bridges = ["vmbr0"]`).
pub const VM_BRIDGE: &str = "vmbr0";

/// The namespaces of one test.
pub struct NetLab {
    prefix: String,
    hosts: usize,
    created: Vec<String>,
    vm_network: bool,
}

/// Runs `ip`/`nft` and fails with its stderr when it fails.
fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

impl NetLab {
    /// Builds `hosts` host namespaces on one bridge, plus a control namespace. `prefix` keeps
    /// concurrent labs apart; it must be short (interface names are at most 15 bytes).
    pub fn create(prefix: &str, hosts: usize) -> Result<NetLab> {
        let mut lab = NetLab { prefix: prefix.to_string(), hosts, created: Vec::new(), vm_network: false };
        let sw = lab.switch();
        lab.add_ns(&sw)?;
        run("ip", &["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        run("ip", &["-n", &sw, "link", "set", "br0", "up"])?;
        let mut ends: Vec<(String, String)> = (0..hosts).map(|i| (lab.host_ns(i), lab.host_ip(i))).collect();
        ends.push((lab.control_ns(), lab.control_ip()));
        for (i, (ns, ip)) in ends.iter().enumerate() {
            lab.add_ns(ns)?;
            let port = lab.port(i);
            run("ip", &["-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", ns])?;
            run("ip", &["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            run("ip", &["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
            run("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
        }
        Ok(lab)
    }

    /// Gives every host the bridge its VMs join, with an uplink to the switch (port `v{i}`):
    /// host `i`'s VM traffic leaves by its own port, so cutting the host cuts its guests too.
    pub fn add_vm_network(&mut self) -> Result<()> {
        let sw = self.switch();
        for i in 0..self.hosts {
            let ns = self.host_ns(i);
            let port = self.vm_port(i);
            run("ip", &["-n", &ns, "link", "add", VM_BRIDGE, "type", "bridge"])?;
            run("ip", &["-n", &sw, "link", "add", &port, "type", "veth", "peer", "name", "vmup", "netns", &ns])?;
            run("ip", &["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            run("ip", &["-n", &ns, "link", "set", "vmup", "master", VM_BRIDGE, "up"])?;
            run("ip", &["-n", &ns, "link", "set", VM_BRIDGE, "up"])?;
        }
        self.vm_network = true;
        Ok(())
    }

    fn vm_port(&self, i: usize) -> String {
        format!("v{i}")
    }

    /// The address of the lab's `k`-th bridged VM (with its prefix length, as a spec wants it).
    #[must_use]
    pub fn vm_ip(k: usize) -> String {
        format!("198.18.0.{}/24", 100 + k)
    }

    fn add_ns(&mut self, ns: &str) -> Result<()> {
        // A namespace left over by a killed earlier run of the same test would make `add` fail.
        let _ = run("ip", &["netns", "del", ns]);
        run("ip", &["netns", "add", ns])?;
        self.created.push(ns.to_string());
        Ok(())
    }

    fn switch(&self) -> String {
        format!("{}-sw", self.prefix)
    }

    fn port(&self, i: usize) -> String {
        format!("p{i}")
    }

    /// The namespace of host `i`.
    #[must_use]
    pub fn host_ns(&self, i: usize) -> String {
        format!("{}-h{i}", self.prefix)
    }

    /// The address of host `i`.
    #[must_use]
    pub fn host_ip(&self, i: usize) -> String {
        format!("198.18.0.{}", 10 + i)
    }

    #[must_use]
    pub fn control_ns(&self) -> String {
        format!("{}-ctl", self.prefix)
    }

    #[must_use]
    pub fn control_ip(&self) -> String {
        "198.18.0.2".to_string()
    }

    /// (namespace, address) per host, as `LabOptions::netns` wants them.
    #[must_use]
    pub fn lab_hosts(&self) -> Vec<(String, String)> {
        (0..self.hosts).map(|i| (self.host_ns(i), self.host_ip(i))).collect()
    }

    /// Moves the calling thread into the control namespace, so that the sockets it opens from
    /// now on (API clients) reach the agents. Only this thread moves; the process stays put.
    pub fn enter_control(&self) -> Result<()> {
        let path = format!("/run/netns/{}", self.control_ns());
        let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
        // SAFETY: setns(2) on a namespace file we opened; it changes only this thread.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        if rc != 0 {
            bail!("setns {path}: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Cuts host `i` off the network: its switch port goes down, so it neither sends to nor hears
    /// from anyone (its shared disk stays reachable).
    /// With a VM network, its guests' uplink goes down too (one host, one cable).
    pub fn cut(&self, i: usize) -> Result<()> {
        self.set_ports(i, "down")
    }

    /// Reconnects host `i`.
    pub fn heal(&self, i: usize) -> Result<()> {
        self.set_ports(i, "up")
    }

    fn set_ports(&self, i: usize, state: &str) -> Result<()> {
        run("ip", &["-n", &self.switch(), "link", "set", &self.port(i), state])?;
        if self.vm_network {
            run("ip", &["-n", &self.switch(), "link", "set", &self.vm_port(i), state])?;
        }
        Ok(())
    }

    /// Drops each UDP packet arriving at host `i` on `port` with probability 1/`one_in`, at random.
    pub fn lose_udp(&self, i: usize, port: u16, one_in: u32) -> Result<()> {
        let ns = self.host_ns(i);
        run("ip", &["netns", "exec", &ns, "nft", "add", "table", "inet", "tandemloss"])?;
        run("ip", &["netns", "exec", &ns, "nft", "add", "chain", "inet", "tandemloss", "input", "{ type filter hook input priority 0 ; policy accept ; }"])?;
        let rule = format!("udp dport {port} numgen random mod {one_in} == 0 counter drop");
        let mut args = vec!["netns", "exec", &ns, "nft", "add", "rule", "inet", "tandemloss", "input"];
        args.extend(rule.split(' '));
        run("ip", &args)
    }

    /// Stops random loss on host `i`.
    pub fn stop_losing(&self, i: usize) -> Result<()> {
        run("ip", &["netns", "exec", &self.host_ns(i), "nft", "delete", "table", "inet", "tandemloss"])
    }

    fn cut_table(&self, i: usize, chains: &[(&str, &str)]) -> Result<()> {
        let ns = self.host_ns(i);
        let _ = run("ip", &["netns", "exec", &ns, "nft", "delete", "table", "inet", "tandemcut"]);
        run("ip", &["netns", "exec", &ns, "nft", "add", "table", "inet", "tandemcut"])?;
        for (hook, rule) in chains {
            let spec = format!("{{ type filter hook {hook} priority 0 ; policy accept ; }}");
            run("ip", &["netns", "exec", &ns, "nft", "add", "chain", "inet", "tandemcut", hook, &spec])?;
            let mut args = vec!["netns", "exec", &ns, "nft", "add", "rule", "inet", "tandemcut", hook];
            args.extend(rule.split(' '));
            run("ip", &args)?;
        }
        Ok(())
    }

    /// One-way partition: nothing host `i` sends leaves it, but it still hears everyone.
    pub fn block_outbound(&self, i: usize) -> Result<()> {
        self.cut_table(i, &[("output", "oifname eth0 drop")])
    }

    /// Pairwise partition: hosts `i` and `j` no longer reach each other; both still reach the rest.
    pub fn block_pair(&self, i: usize, j: usize) -> Result<()> {
        self.block_hosts(i, &[j])
    }

    /// Host `i` no longer reaches the hosts `others`, nor they it; it still reaches the rest (a
    /// cut between two sites is this on each host of one of them).
    pub fn block_hosts(&self, i: usize, others: &[usize]) -> Result<()> {
        let ips: Vec<String> = others.iter().map(|j| self.host_ip(*j)).collect();
        let set = format!("{{ {} }}", ips.join(", "));
        self.cut_table(i, &[("output", &format!("ip daddr {set} drop")), ("input", &format!("ip saddr {set} drop"))])
    }

    /// Nothing host `i` sends reaches the hosts `others`; it still hears them, and reaches the
    /// rest (a link between two sites broken one way is this on each host of one of them).
    pub fn block_outbound_to(&self, i: usize, others: &[usize]) -> Result<()> {
        let ips: Vec<String> = others.iter().map(|j| self.host_ip(*j)).collect();
        self.cut_table(i, &[("output", &format!("ip daddr {{ {} }} drop", ips.join(", ")))])
    }

    /// Host `i`'s UDP datagrams to `port` (its heartbeats) leave it no more; everything else
    /// does (a heal that reaches the heartbeat path last).
    pub fn block_udp_out(&self, i: usize, port: u16) -> Result<()> {
        self.cut_table(i, &[("output", &format!("udp dport {port} drop"))])
    }

    /// Removes the rules of `block_outbound` / `block_pair` / `block_udp_out` on host `i`.
    pub fn unblock(&self, i: usize) -> Result<()> {
        run("ip", &["netns", "exec", &self.host_ns(i), "nft", "delete", "table", "inet", "tandemcut"])
    }

    /// How many packets the loss rule of host `i` dropped.
    pub fn lost_udp(&self, i: usize) -> Result<u64> {
        let ns = self.host_ns(i);
        let out = Command::new("ip").args(["netns", "exec", &ns, "nft", "list", "table", "inet", "tandemloss"]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let packets =
            text.split_whitespace().skip_while(|w| *w != "packets").nth(1).and_then(|n| n.parse().ok()).with_context(|| format!("no counter in: {text}"))?;
        Ok(packets)
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for ns in self.created.iter().rev() {
            let _ = run("ip", &["netns", "del", ns]);
        }
    }
}

/// Whether namespace tests can run here (they need root). Under CI they must: a CI run that
/// silently skipped them would pass without testing partitions.
pub fn can_use_namespaces() -> bool {
    // SAFETY: geteuid(2) has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        assert!(std::env::var("CI").is_err(), "CI must run the namespace tests as root");
        eprintln!("skipping: network namespaces need root");
    }
    root
}
