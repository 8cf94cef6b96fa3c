//! The two-site lab of the site tests: two sites, one host each, in network namespaces, each
//! site's storage a directory of its own (site a's optionally a FUSE view that can be made to
//! fail), a third vote (a disk witness, or a network witness in a third place), an optional
//! inter-site delay, and the disk-backed test guest `db` whose disk is mirrored between the
//! sites, running at site a with both copies current.

use crate::bench::migration::test_guest;
use crate::bench::twohosts::{network_witness_options, two_host_options};
use crate::delayrelay::DelayRelay;
use crate::demo::{http_get, wait};
use crate::diskguest::{highest_record, SeqWatch};
use crate::fusedisk::FuseDisk;
use crate::lab::Lab;
use crate::netlab::{can_use_namespaces, NetLab, VM_BRIDGE};
use crate::scratch::ScratchDir;
use anyhow::{anyhow, Result};
use serde_json::json;
use std::time::Duration;
use tandem_agent::views::{ForceRequest, LocalView, VmView};
use tandem_core::mirroring::LinkState;
use tandem_core::state::{DiskSpec, NetworkSpec, Protection, ServiceProbe};

/// The size of the guest's mirrored disk.
pub const DISK_BYTES: u64 = 64 << 20;

/// Runs `scenario` with the sites' storage in a scratch directory, where namespaces can be made
/// and the test guest is present.
pub fn with_sites(name: &str, scenario: impl FnOnce(&std::path::Path, &std::path::Path) -> Result<()>) -> Result<()> {
    if !can_use_namespaces() {
        return Ok(());
    }
    let Some(guest) = test_guest() else { return Ok(()) };
    let storage = ScratchDir::new(name, &["site-a", "site-b"])?;
    scenario(storage.path(), &guest)
}

/// How a test's two-site lab is made.
pub struct SiteLabSpec {
    /// The namespaces' prefix, and the loopback net (unique per test).
    pub prefix: &'static str,
    pub loopback_net: u8,
    pub witness: WitnessAt,
    /// Site a's copy a FUSE view that the test can make fail.
    pub fuse_a: bool,
    /// The one-way inter-site delay of the mirrors' traffic (the lab's delay relay in the third
    /// place, each host's copy server advertised there).
    pub delay: Option<Duration>,
    /// The agents on `[tls]` (a test CA naming both hosts' addresses): the copies cross over TLS.
    pub tls: bool,
    /// More of the hosts' `[mirror]` table.
    pub mirror_extra: &'static str,
    /// The hosts' `[migration]` table.
    pub migration_extra: &'static str,
}

impl SiteLabSpec {
    #[must_use]
    pub fn new(prefix: &'static str, loopback_net: u8, witness: WitnessAt) -> SiteLabSpec {
        SiteLabSpec { prefix, loopback_net, witness, fuse_a: false, delay: None, tls: false, mirror_extra: "", migration_extra: "" }
    }
}

/// The first port of the delay relays in the third place (one per host).
const DELAY_PORT: u16 = 10_950;

/// The two-site lab with the guest running at site a, its mirror into b's copy in sync.
pub struct SiteLab {
    pub lab: Lab,
    pub net: NetLab,
    /// The inter-site delay relays and the runtime that carries them (dropped after the lab).
    pub _delay: Option<(tokio::runtime::Runtime, Vec<DelayRelay>)>,
    pub seq: SeqWatch,
    pub image_a: std::path::PathBuf,
    /// Site a's storage, when it is a FUSE view that can be made to fail (dropped last: after
    /// the agents and their QEMU).
    pub fuse_a: Option<FuseDisk>,
}

/// The VM `db` as `c` sees it, once committed state counts exactly `want` current.
pub fn copies_are(c: &tandem::client::Client, want: &[&str]) -> Option<VmView> {
    let vm: VmView = c.get_as("/v1/vms/db").ok()?;
    (vm.copies == want).then_some(vm)
}

/// The third vote, and which host holds it when the lab starts (the holder keeps it while it
/// lives).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum WitnessAt {
    /// A disk witness beside the heartbeat disk, held by whichever host claims it first.
    First,
    /// A disk witness held by site b's host: started alone until it holds the witness.
    SiteB,
    /// A network witness (`tandem witness`) in a third place — the lab's control namespace,
    /// which both sites reach — and no shared storage at all.
    ThirdPlace,
}

/// The hosts that took the disk witness, in order.
pub fn witness_holders(lab: &Lab) -> Vec<String> {
    lab.events().into_iter().filter(|e| e.kind.to_string() == "witness-held").filter_map(|e| e.subject).collect()
}

/// With `fuse_a`, site a's copy is a FUSE view of a file beside (`site-a/db.raw` a link to it),
/// so that the test can make site a's storage fail under the guest.
pub fn start_site_lab(storage: &std::path::Path, guest: &std::path::Path, spec: &SiteLabSpec) -> Result<SiteLab> {
    let SiteLabSpec { prefix, loopback_net, witness, .. } = *spec;
    let image_a = storage.join("site-a/db.raw");
    let fuse_a = if spec.fuse_a {
        let backing = storage.join("site-a-storage.raw");
        std::fs::File::create(&backing)?.set_len(DISK_BYTES)?;
        let mount = storage.join("site-a-fuse");
        std::fs::create_dir_all(&mount)?;
        let fuse = FuseDisk::mount(&backing, &mount, 1)?;
        std::os::unix::fs::symlink(fuse.path(0), &image_a)?;
        Some(fuse)
    } else {
        std::fs::File::create(&image_a)?.set_len(DISK_BYTES)?;
        None
    };
    let image_b = storage.join("site-b/db.raw");
    let mut net = NetLab::create(&format!("{prefix}{}", std::process::id() % 10_000), 2)?;
    net.add_vm_network()?;
    net.enter_control()?;
    let mut opts = if witness == WitnessAt::ThirdPlace {
        network_witness_options(loopback_net, Some(net.lab_hosts()), &format!("{}:7463", net.control_ip()))
    } else {
        two_host_options(loopback_net, Some(net.lab_hosts()))
    };
    opts.driver = "qemu".into();
    opts.capacity = (4, 2048);
    opts.sites = vec!["a".into(), "b".into()];
    opts.extra_config = format!(
        "[qemu]\naccel = \"tcg\"\nmachine = \"microvm\"\nstop_timeout_s = 5\nbridges = [\"{VM_BRIDGE}\"]\nsite_disk_dir = \"{}/site-{{site}}\"\n[mirror]\nstall_ms = 1000\n{}",
        storage.display(),
        spec.mirror_extra
    );
    // The inter-site delay: each host's copy server reached through a delay relay in the third
    // place (the control namespace, where this test runs).
    let delay = match spec.delay {
        Some(d) => {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
            let mut relays = Vec::new();
            for i in 0..2 {
                let listen = format!("{}:{}", net.control_ip(), DELAY_PORT + i as u16);
                relays.push(rt.block_on(DelayRelay::start(&listen, &format!("{}:10930", net.host_ip(i)), d))?);
            }
            opts.extra_config.push_str(&format!("advertise = \"{}:1095{{index}}\"\n", net.control_ip()));
            Some((rt, relays))
        }
        None => None,
    };
    // After `[mirror]` (the delay's `advertise` goes there).
    if spec.tls {
        let ca = storage.join("ca");
        crate::testca::make_ca(&ca, "tandem site test CA", &[net.host_ip(0), net.host_ip(1)])?;
        opts.extra_config.push_str(&crate::testca::tls_table(&ca));
        opts.ca = Some(ca.join("ca.pem"));
    }
    if !spec.migration_extra.is_empty() {
        opts.extra_config.push_str(&format!("[migration]\n{}", spec.migration_extra));
    }
    let mut lab = Lab::new(opts, &crate::lab::tandem_binary()?)?;
    if witness == WitnessAt::ThirdPlace {
        lab.start_witness()?;
    }
    if witness == WitnessAt::SiteB {
        lab.start(1)?;
        wait("site b's host to hold the witness", Duration::from_secs(60), || (witness_holders(&lab) == ["h1"]).then_some(()))?;
        lab.start(0)?;
    } else {
        lab.start_all()?;
    }
    lab.form_cluster()?;
    let c = lab.client(0);
    // The third vote in place before anything is lost.
    wait("the witness to vote", Duration::from_secs(60), || {
        let st: tandem_agent::views::StatusView = c.get_as("/v1/status").ok()?;
        st.consensus.voters.contains(&tandem_core::witness::WITNESS_NODE).then_some(())
    })?;
    // The guest starts at site a: site b's host in maintenance meanwhile.
    c.post("/v1/hosts/h1/mode", &json!({ "mode": "maintenance" })).map_err(|e| anyhow!("{e}"))?;
    let ip = NetLab::vm_ip(0);
    let bare = ip.split('/').next().unwrap_or_default().to_string();
    let mut spec = crate::demo::demo_vm(0, "qemu", guest);
    spec.name = "db".into();
    spec.memory_mib = 128;
    spec.protection = Protection::Protect;
    spec.disks = vec![DiskSpec { path: "db.raw".into(), format: Some("raw".into()), readonly: false, local: false, mirror: true }];
    spec.network = Some(NetworkSpec::Bridge { bridge: VM_BRIDGE.into(), mac: "52:54:00:18:00:68".into(), address: Some(ip) });
    spec.probe = Some(ServiceProbe::Http { address: format!("{bare}:80"), path: "/seq".into(), expect: None });
    c.send("POST", "/v1/vms", &spec).map_err(|e| anyhow!("create: {e}"))?;
    c.send("POST", "/v1/vms/db/start", &ForceRequest::default()).map_err(|e| anyhow!("start: {e}"))?;
    let addr = format!("{bare}:80");
    wait("the guest's writer to answer", Duration::from_secs(120), || http_get(&addr, "/seq", Duration::from_millis(400)))?;
    c.post("/v1/hosts/h1/mode", &json!({ "mode": "normal" })).map_err(|e| anyhow!("{e}"))?;
    let seq = SeqWatch::start(&addr);
    // The mirror into site b's copy catches up, and committed state counts both copies.
    wait("both copies current", Duration::from_secs(120), || copies_are(&c, &["a", "b"]))?;
    let local: LocalView = c.get_as("/v1/local").map_err(|e| anyhow!("{e}"))?;
    assert!(local.mirrors.iter().any(|m| m.vm == "db" && m.site == "b" && m.state == LinkState::InSync), "{:?}", local.mirrors);
    if let Some((_, relays)) = &delay {
        // The mirror reaches site b's copy through the delay, at the address h1 advertised.
        assert!(relays[1].relayed() > 0, "the mirror into site b's copy did not go through the inter-site delay");
    }
    // The operator's view: `tandem vm mirrors`.
    let mut cli = std::process::Command::new(crate::lab::tandem_binary()?);
    cli.args(["--api", &lab.hosts[1].api, "--token", &lab.token()]);
    if let Some(ca) = &lab.opts.ca {
        cli.arg("--ca").arg(ca);
    }
    let out = cli.args(["vm", "mirrors", "db"]).output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("current copies: a, b") && text.contains("site b (served by h1): in sync"), "{text}");
    let metrics = c.get("/metrics").map_err(|e| anyhow!("{e}"))?.as_str().unwrap_or_default().to_string();
    assert!(metrics.contains("tandem_mirror_state{vm=\"db\",disk=\"0\",site=\"b\",state=\"in-sync\"} 1"), "{metrics}");
    for _ in 0..5 {
        let acknowledged = seq.highest();
        let there = highest_record(&image_b)?.unwrap_or(0);
        assert!(there >= acknowledged, "site b's copy holds {there}, the guest acknowledged {acknowledged}");
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(SiteLab { lab, net, _delay: delay, seq, image_a, fuse_a })
}

/// The guest's write sequence, judged: nothing it acknowledged lost or gone back, and `boots`
/// boots of its writer.
pub fn judge_sequence(seq: SeqWatch, boots: usize) {
    let verdict = crate::diskguest::judge(&seq.finish());
    eprintln!("{verdict:?}");
    assert!(verdict.lost.is_empty() && verdict.regressions == 0, "{verdict:?}");
    assert_eq!(verdict.boots, boots, "{verdict:?}");
}
