//! A VM's service probe: how the host that starts a VM tells that its service answers. A VM
//! running is not a service back — a guest boots, a database replays its journal — and an
//! operator reading a failover wants the moment users were served again. The probe only
//! observes (it records when the service first answered after a start); it decides nothing.

use super::SpecError;
use serde::{Deserialize, Serialize};

/// The longest HTTP path or expected text a probe may name.
pub const MAX_PROBE_TEXT: usize = 256;

/// What counts as "the service answers".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum ServiceProbe {
    /// A TCP connection to `address` is accepted.
    Tcp {
        /// `IPV4:PORT`, or `{host_ip}:PORT` for the address of the host that runs the VM (a
        /// port forwarded by QEMU user networking, a process VM listening on its host).
        address: String,
    },
    /// An HTTP/1.0 `GET path` to `address` answers with a 2xx status (and a body holding
    /// `expect`, when given).
    Http {
        address: String,
        #[serde(default = "root_path")]
        path: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expect: Option<String>,
    },
}

fn root_path() -> String {
    "/".to_string()
}

fn bad(field: &'static str, value: &str, why: &'static str) -> SpecError {
    SpecError::BadValue { field, value: value.chars().take(200).collect(), why }
}

impl ServiceProbe {
    /// The address to probe from the host whose API address is `host_ip`.
    #[must_use]
    pub fn address_on(&self, host_ip: &str) -> String {
        let (ServiceProbe::Tcp { address } | ServiceProbe::Http { address, .. }) = self;
        address.replace("{host_ip}", host_ip)
    }

    /// Checks the probe before its spec is proposed: a probe reaches only a literal IPv4
    /// address or the running host's, and its request line cannot carry anything but a path.
    pub fn validate(&self) -> Result<(), SpecError> {
        let (ServiceProbe::Tcp { address } | ServiceProbe::Http { address, .. }) = self;
        let why = "must be IPV4:PORT or {host_ip}:PORT (port 1-65535)";
        let (ip, port) = address.rsplit_once(':').ok_or_else(|| bad("probe address", address, why))?;
        let ip_ok = ip == "{host_ip}" || ip.parse::<std::net::Ipv4Addr>().is_ok();
        let port_ok = port.chars().all(|c| c.is_ascii_digit()) && port.parse::<u16>().is_ok_and(|p| p > 0);
        if !ip_ok || !port_ok {
            return Err(bad("probe address", address, why));
        }
        if let ServiceProbe::Http { path, expect, .. } = self {
            if !path.starts_with('/') || path.len() > MAX_PROBE_TEXT || !path.chars().all(|c| c.is_ascii_graphic()) {
                return Err(bad("probe path", path, "must start with '/' and be at most 256 printable characters without spaces"));
            }
            if let Some(e) = expect.as_deref().filter(|e| e.is_empty() || e.len() > MAX_PROBE_TEXT || e.chars().any(char::is_control)) {
                return Err(bad("probe expect", e, "must be 1-256 printable characters"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(address: &str, path: &str, expect: Option<&str>) -> ServiceProbe {
        ServiceProbe::Http { address: address.into(), path: path.into(), expect: expect.map(Into::into) }
    }

    #[test]
    fn probes_reach_only_an_address_and_a_path() {
        assert!(ServiceProbe::Tcp { address: "{host_ip}:8080".into() }.validate().is_ok());
        assert!(http("198.18.0.7:80", "/health", Some("booted")).validate().is_ok());
        for address in ["{host_ip}", "host:80", "{host_ip}:0", "{host_ip}:65536", "1.2.3.4:+80", "[::1]:80", "{other}:80"] {
            assert!(ServiceProbe::Tcp { address: address.into() }.validate().is_err(), "{address}");
        }
        for path in ["health", "/a b", "/a\r\nHost: x", &format!("/{}", "a".repeat(MAX_PROBE_TEXT))] {
            assert!(http("{host_ip}:80", path, None).validate().is_err(), "{path:?}");
        }
        assert!(http("{host_ip}:80", "/", Some("")).validate().is_err());
        assert!(http("{host_ip}:80", "/", Some("a\nb")).validate().is_err());
        assert_eq!(ServiceProbe::Tcp { address: "{host_ip}:8080".into() }.address_on("198.18.0.2"), "198.18.0.2:8080");
    }

    #[test]
    fn an_http_probe_without_a_path_asks_for_the_root() {
        let p: ServiceProbe = serde_json::from_str(r#"{"kind":"http","address":"{host_ip}:80"}"#).expect("parses");
        assert_eq!(p, http("{host_ip}:80", "/", None));
    }
}
