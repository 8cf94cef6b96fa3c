//! API tokens and their roles (only a token's SHA-256 is kept in committed state).

use super::*;
/// What an API token may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Reads and writes.
    Admin,
    /// Reads, and starts, stops and clears VMs; no specs, rules, settings, hosts or tokens.
    Operator,
    /// Reads only (GET).
    ReadOnly,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Admin => "admin",
            Role::Operator => "operator",
            Role::ReadOnly => "read-only",
        })
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "admin" => Ok(Role::Admin),
            "operator" => Ok(Role::Operator),
            "read-only" => Ok(Role::ReadOnly),
            other => Err(format!("unknown role '{other}': use admin, operator or read-only")),
        }
    }
}

/// A named API token. The token itself is shown once, when it is made; the cluster keeps its
/// SHA-256 only, so a copy of the state or the log gives nobody access.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    pub name: String,
    pub role: Role,
    /// Lower-case hex SHA-256 of the token.
    pub sha256: String,
}

/// The SHA-256 of a presented token, as stored in [`ApiToken::sha256`].
#[must_use]
pub fn token_sha256(token: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}
