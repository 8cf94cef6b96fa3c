//! TLS for what a live migration sends between hosts: the memory stream and the NBD copy of
//! local disks. Where the cluster's agents use TLS (`[tls]`), their QEMUs do too, with the same
//! certificates: each side loads them as a `tls-creds-x509` object just before it is needed (so
//! a renewed certificate is used from the next migration on) and verifies its peer — the
//! destination accepts only a source that presents a certificate of the cluster's CA, and the
//! source checks that the destination's certificate names the address it sends to. Without it,
//! anyone who reached the destination's listening port first could feed it a guest of their
//! own, and anyone on the path could read the guest's memory.

use crate::migration::qmp_failed;
use crate::qmp::Qmp;
use crate::DriverError;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// QEMU's credentials directory (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`,
/// `client-cert.pem`, `client-key.pem`), made of links to the agent's own TLS files.
#[derive(Debug)]
pub struct MigrationTls {
    dir: PathBuf,
    /// Makes every credentials object's id unique within a QEMU process: a source that
    /// migrates again after a failure loads them afresh beside the old ones.
    loads: AtomicU64,
}

/// Which side of a connection a QEMU is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsEndpoint {
    /// The destination: it listens and verifies the source's client certificate.
    Server,
    /// The source: it connects and verifies the destination's certificate and address.
    Client,
}

impl MigrationTls {
    /// Lays out `dir` as QEMU expects it, with links to the agent's `cert`, `key` and `ca`
    /// (one certificate serves both ends: it must allow TLS server and client use, or carry no
    /// extended key usage at all). Links, not copies: the key is not duplicated, and a renewed
    /// file is seen at the next load.
    pub fn prepare(dir: &Path, cert: &Path, key: &Path, ca: &Path) -> std::io::Result<MigrationTls> {
        std::fs::create_dir_all(dir)?;
        let absolute = |p: &Path| if p.is_absolute() { Ok(p.to_path_buf()) } else { std::env::current_dir().map(|d| d.join(p)) };
        let links = [("ca-cert.pem", ca), ("server-cert.pem", cert), ("server-key.pem", key), ("client-cert.pem", cert), ("client-key.pem", key)];
        for (name, target) in links {
            let link = dir.join(name);
            match std::fs::remove_file(&link) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            std::os::unix::fs::symlink(absolute(target)?, &link)?;
        }
        Ok(MigrationTls { dir: dir.to_path_buf(), loads: AtomicU64::new(0) })
    }

    /// Loads the credentials into VM `vm`'s QEMU for `endpoint`, verifying the peer, and
    /// returns the object's id (for `tls-creds`). QEMU reads and checks the files here: a
    /// missing or unusable certificate fails the migration before anything is sent.
    pub async fn load(&self, vm: &str, q: &Qmp, timeout: Duration, endpoint: TlsEndpoint) -> Result<String, DriverError> {
        let (side, name) = match endpoint {
            TlsEndpoint::Server => ("in", "server"),
            TlsEndpoint::Client => ("out", "client"),
        };
        let id = format!("tandem-tls-{side}-{}", self.loads.fetch_add(1, Ordering::Relaxed));
        let object = json!({"qom-type": "tls-creds-x509", "id": id, "dir": self.dir, "endpoint": name, "verify-peer": true});
        q.execute("object-add", object, timeout).await.map_err(qmp_failed(vm))?;
        Ok(id)
    }
}

/// The host part of a `tcp:HOST:PORT` migration URI (an IPv6 host in brackets loses them):
/// the name the destination's certificate must carry.
#[must_use]
pub fn uri_host(uri: &str) -> Option<&str> {
    let rest = uri.strip_prefix("tcp:")?;
    let (host, _port) = rest.rsplit_once(':')?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_certificate_must_name_the_host_the_source_sends_to() {
        assert_eq!(uri_host("tcp:127.84.0.11:40123"), Some("127.84.0.11"));
        assert_eq!(uri_host("tcp:[fd00::1]:40123"), Some("fd00::1"));
        assert_eq!(uri_host("unix:/x"), None);
        assert_eq!(uri_host("tcp::1"), None);
    }

    /// QEMU's layout, each name a link to the agent's own file; preparing again (a restart)
    /// replaces the links.
    #[test]
    fn the_credentials_directory_links_the_agents_files_in_qemus_layout() {
        let root = std::env::temp_dir().join(format!("tandem-migtls-{}", std::process::id()));
        std::fs::create_dir_all(&root).expect("dir");
        for f in ["agent.pem", "agent.key", "ca.pem"] {
            std::fs::write(root.join(f), f).expect("write");
        }
        let dir = root.join("qemu-tls");
        for _ in 0..2 {
            let tls = MigrationTls::prepare(&dir, &root.join("agent.pem"), &root.join("agent.key"), &root.join("ca.pem")).expect("prepare");
            assert_eq!(tls.dir, dir);
        }
        let read = |n: &str| std::fs::read_to_string(dir.join(n)).expect("read");
        assert_eq!(read("ca-cert.pem"), "ca.pem");
        assert_eq!(read("server-cert.pem"), "agent.pem");
        assert_eq!(read("client-cert.pem"), "agent.pem");
        assert_eq!(read("server-key.pem"), "agent.key");
        assert_eq!(read("client-key.pem"), "agent.key");
        assert!(std::fs::symlink_metadata(dir.join("server-key.pem")).expect("meta").file_type().is_symlink(), "the key is linked, not copied");
        let _ = std::fs::remove_dir_all(&root);
    }
}
