//! API tokens: list, create (shown once), revoke.

use super::*;

pub(super) async fn tokens(State(a): State<Arc<Agent>>) -> Json<Vec<TokenView>> {
    Json(a.consensus.with_state(|s| s.tokens.values().map(|t| TokenView { name: t.name.clone(), role: t.role }).collect()))
}

pub(super) async fn token_create(State(a): State<Arc<Agent>>, body: Bytes) -> ApiResult<NewToken> {
    let b: TokenRequest = parse(&body, "token request")?;
    // 32 random bytes from the kernel: the token is shown once and only its hash is replicated.
    let mut raw = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut raw))
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("reading /dev/urandom: {e}")))?;
    let token: String = std::iter::once("tdm_".to_string()).chain(raw.iter().map(|b| format!("{b:02x}"))).collect();
    let record = ApiToken { name: b.name.clone(), role: b.role, sha256: token_sha256(&token) };
    submit(&a, Command::SetToken { token: record }).await?;
    a.events.record(crate::events::EventKind::TokenCreated, None, None, format!("API token '{}' ({}) created", b.name, b.role));
    Ok(Json(NewToken { name: b.name, role: b.role, token }))
}

pub(super) async fn token_delete(State(a): State<Arc<Agent>>, ApiPath(name): ApiPath) -> ApiResult<Revoked> {
    submit(&a, Command::DeleteToken { name: name.clone() }).await?;
    a.events.record(crate::events::EventKind::TokenRevoked, None, None, format!("API token '{name}' revoked"));
    Ok(Json(Revoked { revoked: name }))
}
