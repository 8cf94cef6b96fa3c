//! A small QMP client: newline-delimited JSON over a UNIX socket, with a timeout on every call.
//!
//! One task owns the socket; calls are sent to it over a bounded channel and answered by id, and
//! asynchronous events are handed to a callback. A stopped QEMU accepts the connection but never
//! greets, so even the handshake has a deadline.

use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

/// The longest QMP line accepted.
pub const MAX_LINE: u64 = 1 << 20;
/// Calls waiting for the socket task at once.
pub const MAX_IN_FLIGHT: usize = 16;

/// QMP failures.
#[derive(Debug, Error)]
pub enum QmpError {
    #[error("could not connect to QMP socket {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP did not answer within {0:?}")]
    Timeout(Duration),
    #[error("QMP connection closed")]
    Closed,
    #[error("QMP I/O failed")]
    Io(#[from] std::io::Error),
    #[error("QMP sent something that is not JSON")]
    BadJson(#[from] serde_json::Error),
    #[error("QMP line longer than {MAX_LINE} bytes")]
    LineTooLong,
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command { command: String, class: String, desc: String },
    #[error("QMP greeting missing or malformed")]
    BadGreeting,
}

/// An asynchronous QMP event.
#[derive(Clone, Debug)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
}

type Reply = Result<Value, QmpError>;

/// A connected QMP session.
pub struct Qmp {
    tx: mpsc::Sender<(String, Value, oneshot::Sender<Reply>)>,
}

/// The socket's reading side, line by line. Cancel-safe: the session task reads inside a
/// `select!` that a call of its own can win, so the bytes of a line read so far stay in `line`
/// for the next read (a buffer local to the read would lose them, and the rest of the line would
/// then fail to parse and end the session — seen as a guest that ignored its power button).
struct LineReader {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    line: Vec<u8>,
}

impl LineReader {
    async fn next(&mut self) -> Result<Option<Value>, QmpError> {
        let room = MAX_LINE.saturating_sub(self.line.len() as u64);
        (&mut self.reader).take(room).read_until(b'\n', &mut self.line).await?;
        if !self.line.ends_with(b"\n") {
            // Either the line reached the bound or the socket ended (mid-line or between lines).
            return if self.line.len() as u64 >= MAX_LINE { Err(QmpError::LineTooLong) } else { Ok(None) };
        }
        let parsed = serde_json::from_slice(&self.line);
        self.line.clear();
        Ok(Some(parsed?))
    }
}

impl Qmp {
    /// Connects, checks the greeting and negotiates capabilities, all within `timeout`.
    pub async fn connect(path: &Path, timeout: Duration, on_event: impl Fn(QmpEvent) + Send + 'static) -> Result<Qmp, QmpError> {
        let handshake = async {
            let stream = UnixStream::connect(path).await.map_err(|source| QmpError::Connect { path: path.display().to_string(), source })?;
            let (r, mut w) = stream.into_split();
            let mut reader = LineReader { reader: BufReader::new(r), line: Vec::new() };
            let greeting = reader.next().await?.ok_or(QmpError::Closed)?;
            if greeting.get("QMP").is_none() {
                return Err(QmpError::BadGreeting);
            }
            w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n").await?;
            loop {
                let v = reader.next().await?.ok_or(QmpError::Closed)?;
                if v.get("return").is_some() {
                    break;
                }
                if let Some(e) = v.get("error") {
                    return Err(command_error("qmp_capabilities", e));
                }
            }
            Ok::<_, QmpError>((reader, w))
        };
        let (mut reader, mut w) = tokio::time::timeout(timeout, handshake).await.map_err(|_| QmpError::Timeout(timeout))??;
        let (tx, mut rx) = mpsc::channel::<(String, Value, oneshot::Sender<Reply>)>(MAX_IN_FLIGHT);
        tokio::spawn(async move {
            let mut pending: HashMap<u64, (String, oneshot::Sender<Reply>)> = HashMap::new();
            let mut next_id: u64 = 0;
            loop {
                tokio::select! {
                    req = rx.recv() => {
                        let Some((command, args, reply)) = req else { break };
                        next_id += 1;
                        let mut msg = json!({"execute": command, "id": next_id});
                        if !args.is_null() {
                            msg["arguments"] = args;
                        }
                        let mut line = msg.to_string();
                        line.push('\n');
                        if let Err(e) = w.write_all(line.as_bytes()).await {
                            let _ = reply.send(Err(QmpError::Io(e)));
                            break;
                        }
                        pending.insert(next_id, (command, reply));
                    }
                    line = reader.next() => {
                        match line {
                            Ok(Some(v)) => {
                                if let Some(name) = v.get("event").and_then(Value::as_str) {
                                    on_event(QmpEvent { name: name.to_string(), data: v.get("data").cloned().unwrap_or(Value::Null) });
                                } else if let Some(id) = v.get("id").and_then(Value::as_u64) {
                                    if let Some((command, reply)) = pending.remove(&id) {
                                        let r = match (v.get("return"), v.get("error")) {
                                            (Some(ret), _) => Ok(ret.clone()),
                                            (None, Some(e)) => Err(command_error(&command, e)),
                                            (None, None) => Err(QmpError::BadGreeting),
                                        };
                                        let _ = reply.send(r);
                                    }
                                }
                            }
                            Ok(None) | Err(_) => break,
                        }
                    }
                }
            }
            for (_, (_, reply)) in pending.drain() {
                let _ = reply.send(Err(QmpError::Closed));
            }
        });
        Ok(Qmp { tx })
    }

    /// Whether the connection has ended (every call would fail with [`QmpError::Closed`]).
    #[must_use]
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Runs one command; `args` may be `Value::Null`.
    pub async fn execute(&self, command: &str, args: Value, timeout: Duration) -> Result<Value, QmpError> {
        let call = async {
            let (reply_tx, reply_rx) = oneshot::channel();
            self.tx.send((command.to_string(), args, reply_tx)).await.map_err(|_| QmpError::Closed)?;
            reply_rx.await.map_err(|_| QmpError::Closed)?
        };
        tokio::time::timeout(timeout, call).await.map_err(|_| QmpError::Timeout(timeout))?
    }
}

fn command_error(command: &str, e: &Value) -> QmpError {
    QmpError::Command {
        command: command.to_string(),
        class: e.get("class").and_then(Value::as_str).unwrap_or("?").to_string(),
        desc: e.get("desc").and_then(Value::as_str).unwrap_or("?").to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::UnixListener;

    /// An in-memory stand-in for QEMU's QMP server: greets, negotiates, answers `query-status`,
    /// emits an event before the reply, and fails unknown commands.
    async fn fake_qemu(listener: UnixListener, greet: bool) {
        let (s, _) = listener.accept().await.expect("accept");
        if !greet {
            // Like a SIGSTOPped qemu: connection accepted, nothing ever said.
            tokio::time::sleep(Duration::from_secs(30)).await;
            return;
        }
        let (r, mut w) = s.into_split();
        w.write_all(b"{\"QMP\":{\"version\":{},\"capabilities\":[]}}\n").await.expect("greet");
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            let v: Value = serde_json::from_str(&l).expect("json");
            let id = v.get("id").cloned().unwrap_or(Value::Null);
            let out = match v["execute"].as_str() {
                Some("qmp_capabilities") => json!({"return": {}}),
                Some("query-status") => {
                    w.write_all(b"{\"event\":\"STOP\",\"data\":{}}\n").await.expect("event");
                    json!({"return": {"status": "running", "running": true}, "id": id})
                }
                Some("slow-halves") => {
                    // A reply the socket delivers in two pieces, 300 ms apart (as a loaded
                    // QEMU, or a long line, can): the client reads the first half, then another
                    // call of its own interrupts the read.
                    let reply = format!("{}\n", json!({"return": {"halves": 2}, "id": id}));
                    let (a, b) = reply.split_at(reply.len() / 2);
                    w.write_all(a.as_bytes()).await.expect("first half");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    w.write_all(b.as_bytes()).await.expect("second half");
                    continue;
                }
                Some("garble") => {
                    w.write_all(b"{not json\n").await.expect("garbage");
                    continue;
                }
                _ => json!({"error": {"class": "CommandNotFound", "desc": "nope"}, "id": id}),
            };
            w.write_all(format!("{out}\n").as_bytes()).await.expect("reply");
        }
    }

    #[tokio::test]
    async fn calls_events_errors_and_timeouts() {
        let dir = std::env::temp_dir().join(format!("tandem-qmp-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("ok.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind");
        tokio::spawn(fake_qemu(listener, true));
        let events = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let ev = std::sync::Arc::clone(&events);
        let qmp = Qmp::connect(&path, Duration::from_secs(2), move |e| ev.lock().expect("lock").push(e.name)).await.expect("connect");
        let status = qmp.execute("query-status", Value::Null, Duration::from_secs(2)).await.expect("status");
        assert_eq!(status["status"], "running");
        assert_eq!(events.lock().expect("lock").as_slice(), ["STOP".to_string()]);
        let err = qmp.execute("bogus", Value::Null, Duration::from_secs(2)).await.expect_err("must fail");
        assert!(err.to_string().contains("CommandNotFound"), "{err}");

        // A call sent while a reply is half read: both are answered, the session stays whole.
        let qmp = std::sync::Arc::new(qmp);
        let q = std::sync::Arc::clone(&qmp);
        let slow = tokio::spawn(async move { q.execute("slow-halves", Value::Null, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let other = qmp.execute("query-status", Value::Null, Duration::from_secs(5)).await;
        let slow = slow.await.expect("join");
        assert_eq!(slow.expect("the half-read reply arrives whole")["halves"], 2);
        assert_eq!(other.expect("the interrupting call is answered")["status"], "running");
        let again = qmp.execute("query-status", Value::Null, Duration::from_secs(2)).await;
        assert!(again.is_ok(), "the session still answers: {again:?}");
        // A line that is not JSON ends the session, and the session says so (the driver then
        // connects again).
        assert!(!qmp.is_closed());
        let err = qmp.execute("garble", Value::Null, Duration::from_secs(2)).await.expect_err("ended");
        assert!(matches!(err, QmpError::Closed), "{err}");
        assert!(qmp.is_closed());

        let silent = dir.join("silent.sock");
        let _ = std::fs::remove_file(&silent);
        let listener = UnixListener::bind(&silent).expect("bind");
        tokio::spawn(fake_qemu(listener, false));
        let started = std::time::Instant::now();
        let err = Qmp::connect(&silent, Duration::from_millis(200), |_| {}).await.err().expect("must time out");
        assert!(matches!(err, QmpError::Timeout(_)), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
