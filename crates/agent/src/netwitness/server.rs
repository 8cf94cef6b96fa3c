//! `tandem witness --config FILE`: serves each configured cluster's heartbeat area and witness
//! region, kept in files under its data directory and written durably (O_DSYNC) before a write
//! is answered.

use super::{MAX_CLUSTERS, MAX_CONNECTIONS, MAX_IO, PREFIX, REGION_BYTES};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tandem_core::diskformat::{area_image, slot_offset, DISK_SIZE};
use tandem_core::wire::SLOT_SIZE;
use tandem_core::HostId;
use thiserror::Error;

/// The witness's configuration file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessConfig {
    /// Where agents reach it (HTTPS when `tls` is set).
    pub listen: SocketAddr,
    /// Where each cluster's areas are kept (`DATA_DIR/CLUSTER/`).
    pub data_dir: PathBuf,
    #[serde(default)]
    pub tls: Option<WitnessTls>,
    /// The clusters served, each with its name and the file holding its secret (the same file
    /// as its agents').
    pub cluster: Vec<ClusterEntry>,
}

/// The witness's certificate chain (it must name the listen address's IP or DNS name, and
/// chain to the CA the agents trust) and key.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WitnessTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterEntry {
    pub name: String,
    pub secret_file: PathBuf,
}

#[derive(Debug, Error)]
pub enum WitnessServerError {
    #[error("cannot read witness configuration {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("witness configuration {path} is not valid")]
    Parse {
        path: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("the witness serves 1 to {MAX_CLUSTERS} clusters, each named once with letters, digits, '-' or '_' (got {0})")]
    Clusters(String),
    #[error("cluster {cluster}: its secret")]
    Secret {
        cluster: String,
        #[source]
        source: Box<crate::config::ConfigError>,
    },
    #[error("cluster {cluster}: its area {path}")]
    Area {
        cluster: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cluster {cluster}: the heartbeat area {path} belongs to another cluster or is damaged")]
    ForeignArea {
        cluster: String,
        path: String,
        #[source]
        source: Box<crate::disk::DiskError>,
    },
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("witness TLS")]
    Tls(#[from] crate::tls::TlsError),
}

impl WitnessConfig {
    pub fn load(path: &Path) -> Result<WitnessConfig, WitnessServerError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| WitnessServerError::Read { path: origin.clone(), source })?;
        let cfg: WitnessConfig = toml::from_str(&text).map_err(|source| WitnessServerError::Parse { path: origin, source })?;
        let names: std::collections::HashSet<&str> = cfg.cluster.iter().map(|c| c.name.as_str()).collect();
        let well_named = cfg.cluster.iter().all(|c| tandem_core::spec::valid_name(&c.name));
        if cfg.cluster.is_empty() || cfg.cluster.len() > MAX_CLUSTERS || names.len() != cfg.cluster.len() || !well_named {
            return Err(WitnessServerError::Clusters(cfg.cluster.iter().map(|c| c.name.as_str()).collect::<Vec<_>>().join(", ")));
        }
        Ok(cfg)
    }
}

/// One cluster's areas and the token its agents present.
struct ClusterAreas {
    token: String,
    heartbeat: std::fs::File,
    region: std::fs::File,
}

type Clusters = Arc<HashMap<String, Arc<ClusterAreas>>>;

fn open_durable(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_DSYNC).open(path)
}

/// Opens (creating on first use) one cluster's areas: the heartbeat area formatted for the
/// cluster's key, the region sized [`REGION_BYTES`].
fn open_cluster(data_dir: &Path, entry: &ClusterEntry) -> Result<ClusterAreas, WitnessServerError> {
    let cluster = entry.name.clone();
    let key = crate::config::load_key(&entry.secret_file).map_err(|e| WitnessServerError::Secret { cluster: cluster.clone(), source: Box::new(e) })?;
    let dir = data_dir.join(&entry.name);
    let area_err = |path: &Path| {
        let (cluster, path) = (cluster.clone(), path.display().to_string());
        move |source| WitnessServerError::Area { cluster, path, source }
    };
    std::fs::create_dir_all(&dir).map_err(area_err(&dir))?;
    let hb = dir.join("heartbeat.area");
    match crate::disk::format(&hb, &key, false) {
        Ok(()) | Err(crate::disk::DiskError::AlreadyFormatted { .. }) => {}
        Err(e) => return Err(WitnessServerError::ForeignArea { cluster, path: hb.display().to_string(), source: Box::new(e) }),
    }
    let rg = dir.join("witness.region");
    let region = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&rg).map_err(area_err(&rg))?;
    if region.metadata().map_err(area_err(&rg))?.len() < REGION_BYTES {
        region.set_len(REGION_BYTES).map_err(area_err(&rg))?;
    }
    region.sync_all().map_err(area_err(&rg))?;
    Ok(ClusterAreas { token: key.peer_token(), heartbeat: open_durable(&hb).map_err(area_err(&hb))?, region: open_durable(&rg).map_err(area_err(&rg))? })
}

/// Serves until `shutdown` resolves.
pub async fn serve(cfg: WitnessConfig, shutdown: impl std::future::Future<Output = ()> + Send + 'static) -> Result<(), WitnessServerError> {
    let mut clusters = HashMap::new();
    for entry in &cfg.cluster {
        clusters.insert(entry.name.clone(), Arc::new(open_cluster(&cfg.data_dir, entry)?));
    }
    let router = router(Arc::new(clusters));
    let addr = cfg.listen;
    let bind = |source| WitnessServerError::Bind { addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(bind)?;
    tracing::info!("tandem witness serving {} cluster(s) on {addr} ({})", cfg.cluster.len(), if cfg.tls.is_some() { "TLS" } else { "plain HTTP" });
    match &cfg.tls {
        Some(t) => {
            let tls = crate::tls::ServerTls::load(&t.cert, &t.key)?;
            let listener = crate::tls::TlsListener::spawn(listener, tls).map_err(bind)?;
            let listener = crate::api_limits::CappedListener::new(listener, MAX_CONNECTIONS);
            axum::serve(listener, router).with_graceful_shutdown(shutdown).await.map_err(bind)
        }
        None => {
            let listener = crate::api_limits::CappedListener::new(listener, MAX_CONNECTIONS);
            axum::serve(listener, router).with_graceful_shutdown(shutdown).await.map_err(bind)
        }
    }
}

fn router(clusters: Clusters) -> axum::Router {
    axum::Router::new()
        .route(&format!("{PREFIX}/health"), get(|| async { "tandem witness\n" }))
        .route(&format!("{PREFIX}/{{cluster}}/heartbeat"), get(read_heartbeat))
        .route(&format!("{PREFIX}/{{cluster}}/heartbeat/{{slot}}"), axum::routing::post(heartbeat_round))
        .route(&format!("{PREFIX}/{{cluster}}/region"), get(read_region).post(write_region))
        .layer(DefaultBodyLimit::max(MAX_IO + 4096))
        .layer(axum::middleware::from_fn(crate::api_limits::deadline))
        .with_state(clusters)
}

/// The cluster named in the path, if the request carries its token (an unknown cluster and a
/// wrong token get the same answer: nothing about which clusters are served leaks).
fn authorized(clusters: &Clusters, name: &str, headers: &HeaderMap) -> Option<Arc<ClusterAreas>> {
    let presented = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "))?;
    clusters.get(name).filter(|c| constant_time_eq(c.token.as_bytes(), presented.as_bytes())).cloned()
}

fn unauthorized() -> Response {
    (StatusCode::UNAUTHORIZED, "unknown cluster or wrong token\n").into_response()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn io_failed(e: &std::io::Error) -> Response {
    tracing::warn!("witness area I/O failed: {e}");
    (StatusCode::INTERNAL_SERVER_ERROR, format!("witness storage failed: {e}\n")).into_response()
}

/// File I/O off the async threads (a slow disk holds a blocking thread, not the server).
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
}

fn read_image(c: &ClusterAreas) -> std::io::Result<Vec<u8>> {
    let mut area = vec![0u8; DISK_SIZE];
    c.heartbeat.read_exact_at(&mut area, 0)?;
    Ok(area_image(&area))
}

async fn read_heartbeat(State(clusters): State<Clusters>, UrlPath(name): UrlPath<String>, headers: HeaderMap) -> Response {
    let Some(c) = authorized(&clusters, &name, &headers) else { return unauthorized() };
    match blocking(move || read_image(&c)).await {
        Ok(image) => image.into_response(),
        Err(e) => io_failed(&e),
    }
}

/// Writes one slot, then answers the whole area's image: a liveness round in one request.
async fn heartbeat_round(State(clusters): State<Clusters>, UrlPath((name, slot)): UrlPath<(String, u32)>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(c) = authorized(&clusters, &name, &headers) else { return unauthorized() };
    if !HostId(slot).is_valid() || body.len() != SLOT_SIZE {
        return (StatusCode::BAD_REQUEST, format!("a slot write is one slot ({SLOT_SIZE} bytes) of a valid host id\n")).into_response();
    }
    match blocking(move || c.heartbeat.write_all_at(&body, slot_offset(HostId(slot))).and_then(|()| read_image(&c))).await {
        Ok(image) => image.into_response(),
        Err(e) => io_failed(&e),
    }
}

#[derive(Deserialize)]
struct Span {
    offset: u64,
    #[serde(default)]
    len: u64,
}

fn span_ok(offset: u64, len: u64) -> bool {
    len <= MAX_IO as u64 && offset.checked_add(len).is_some_and(|end| end <= REGION_BYTES)
}

async fn read_region(State(clusters): State<Clusters>, UrlPath(name): UrlPath<String>, Query(span): Query<Span>, headers: HeaderMap) -> Response {
    let Some(c) = authorized(&clusters, &name, &headers) else { return unauthorized() };
    if !span_ok(span.offset, span.len) {
        return (StatusCode::BAD_REQUEST, format!("a region read is at most {MAX_IO} bytes within {REGION_BYTES}\n")).into_response();
    }
    let len = span.len as usize;
    match blocking(move || {
        let mut out = vec![0u8; len];
        c.region.read_exact_at(&mut out, span.offset).map(|()| out)
    })
    .await
    {
        Ok(bytes) => bytes.into_response(),
        Err(e) => io_failed(&e),
    }
}

async fn write_region(State(clusters): State<Clusters>, UrlPath(name): UrlPath<String>, Query(span): Query<Span>, headers: HeaderMap, body: Bytes) -> Response {
    let Some(c) = authorized(&clusters, &name, &headers) else { return unauthorized() };
    if !span_ok(span.offset, body.len() as u64) {
        return (StatusCode::BAD_REQUEST, format!("a region write is at most {MAX_IO} bytes within {REGION_BYTES}\n")).into_response();
    }
    match blocking(move || c.region.write_all_at(&body, span.offset)).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => io_failed(&e),
    }
}
