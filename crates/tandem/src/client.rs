//! A blocking client for the agent API, for the CLI and test harnesses.

use anyhow::{anyhow, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::time::Duration;
use tandem_agent::httpc;

/// What went wrong talking to an agent, with the exit code scripts can rely on.
#[derive(Debug)]
pub enum ClientError {
    /// The agent answered with an error (4xx): exit code 1.
    Refused { status: u16, message: String },
    /// The agent could not be reached or has no quorum (5xx): exit code 3.
    Unavailable(String),
    /// The command line itself is wrong (checked before any request): exit code 2.
    Usage(String),
    /// The agent answered something this client cannot read as the API's type (another
    /// version?): exit code 3.
    Protocol(String),
}

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Refused { status, message } => write!(f, "refused ({status}): {message}"),
            ClientError::Unavailable(m) => write!(f, "unavailable: {m}"),
            ClientError::Usage(m) => write!(f, "{m}"),
            ClientError::Protocol(m) => write!(f, "unexpected answer: {m}"),
        }
    }
}

impl std::error::Error for ClientError {}

impl ClientError {
    /// The process exit code for this error.
    #[must_use]
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Refused { .. } => 1,
            ClientError::Unavailable(_) | ClientError::Protocol(_) => 3,
            ClientError::Usage(_) => 2,
        }
    }
}

/// Talks to one agent.
#[derive(Clone, Debug)]
pub struct Client {
    pub addr: String,
    pub timeout: Duration,
    /// Sent as `Authorization: Bearer …`.
    pub token: Option<String>,
    /// Talk TLS, verifying the agent against this CA.
    pub tls: Option<tandem_agent::tls::ClientTls>,
}

impl Client {
    #[must_use]
    pub fn new(addr: &str) -> Client {
        Client { addr: addr.to_string(), timeout: Duration::from_secs(30), token: None, tls: None }
    }

    #[must_use]
    pub fn with_token(mut self, token: Option<String>) -> Client {
        self.token = token;
        self
    }

    #[must_use]
    pub fn with_tls(mut self, tls: Option<tandem_agent::tls::ClientTls>) -> Client {
        self.tls = tls;
        self
    }

    /// Sends a request and returns the JSON answer.
    pub fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| ClientError::Unavailable(e.to_string()))?;
        let body = body.map(|b| b.to_string().into_bytes());
        let resp = rt
            .block_on(httpc::request(self.tls.as_ref(), method, &self.addr, path, self.token.as_deref(), body, self.timeout))
            .map_err(|e| ClientError::Unavailable(format!("{:#}", anyhow::Error::new(e))))?;
        let v: Value = serde_json::from_slice(&resp.body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&resp.body).into_owned()));
        if resp.status >= 500 {
            return Err(ClientError::Unavailable(error_text(&v)));
        }
        if resp.status >= 400 {
            return Err(ClientError::Refused { status: resp.status, message: error_text(&v) });
        }
        Ok(v)
    }

    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.call("GET", path, None)
    }

    /// GET, read as the API's type for that path (`tandem_agent::views`).
    pub fn get_as<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        decode(self.get(path)?)
    }

    /// Sends a typed request body (`tandem_agent::views`) and returns the answer's JSON.
    pub fn send<B: Serialize>(&self, method: &str, path: &str, body: &B) -> Result<Value, ClientError> {
        let body = serde_json::to_value(body).map_err(|e| ClientError::Usage(format!("cannot encode the request: {e}")))?;
        self.call(method, path, Some(&body))
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.call("POST", path, Some(body))
    }

    /// Polls `f` every `every` until it returns `Some` or `timeout` passes.
    pub fn wait_for<T>(&self, timeout: Duration, every: Duration, mut f: impl FnMut(&Client) -> Option<T>) -> Result<T> {
        let end = std::time::Instant::now() + timeout;
        loop {
            if let Some(t) = f(self) {
                return Ok(t);
            }
            if std::time::Instant::now() > end {
                return Err(anyhow!("timed out after {timeout:?} waiting on {}", self.addr));
            }
            std::thread::sleep(every);
        }
    }

    /// Fetches a list endpoint as the API's type for its items.
    pub fn list_as<T: DeserializeOwned>(&self, path: &str) -> Result<Vec<T>> {
        self.get_as(path).map_err(|e| anyhow!("{e}")).with_context(|| format!("GET {path}"))
    }

    /// Fetches a JSON list endpoint.
    pub fn list(&self, path: &str) -> Result<Vec<Value>> {
        let v = self.get(path).map_err(|e| anyhow!("{e}")).with_context(|| format!("GET {path}"))?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }
}

/// Reads an answer as the API's type `T`.
pub fn decode<T: DeserializeOwned>(v: Value) -> Result<T, ClientError> {
    serde_json::from_value(v).map_err(|e| ClientError::Protocol(format!("{e} (is the agent another version?)")))
}

fn error_text(v: &Value) -> String {
    v.get("error").and_then(Value::as_str).map_or_else(|| v.to_string(), str::to_string)
}
