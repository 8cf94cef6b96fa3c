//! `GET /v1/rebalance`: the rebalancing plan on committed state. Carrying it out is a live
//! migration per move (`POST /v1/vms/{name}/migrate`), each judged again when asked for.

use super::{ApiError, ApiQuery, ApiResult};
use crate::agent::Agent;
use crate::views::{RebalanceMoveView, RebalanceView, UnfixableView};
use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;
use std::sync::Arc;
use tandem_core::hostset::HostId;
use tandem_core::rebalance::{rebalance_plan, MoveReason, RebalanceScope};

#[derive(Deserialize)]
pub(super) struct RebalanceQuery {
    /// Only this rule's violations.
    rule: Option<String>,
    /// Even out memory use too (default true).
    balance: Option<bool>,
}

pub(super) async fn rebalance(State(a): State<Arc<Agent>>, ApiQuery(q): ApiQuery<RebalanceQuery>) -> ApiResult<RebalanceView> {
    // Planned on a snapshot, off the runtime: each step plans on a copy of the state.
    let snap = a.consensus.snapshot();
    let view = a
        .heavy
        .run(move || {
            let s = &snap.state;
            if let Some(r) = q.rule.as_ref().filter(|r| !s.rules.contains_key(*r)) {
                // A bad query value (the path names no resource): 400, as the API documents.
                return Err(ApiError::new(StatusCode::BAD_REQUEST, format!("unknown rule '{r}'")));
            }
            let plan = rebalance_plan(s, &RebalanceScope { rule: q.rule.clone(), balance: q.balance.unwrap_or(true) });
            let name = |h: HostId| s.host_name(h);
            Ok(RebalanceView {
                moves: plan
                    .moves
                    .into_iter()
                    .map(|m| RebalanceMoveView {
                        from: name(m.from),
                        to: name(m.to),
                        rule: match m.reason {
                            MoveReason::Rule(r) => Some(r),
                            MoveReason::Balance => None,
                        },
                        vm: m.vm,
                    })
                    .collect(),
                unfixable: plan.unfixable.into_iter().map(|u| UnfixableView { rule: u.rule, vm: u.vm, why: u.why }).collect(),
                spread_before_pct: plan.spread_before_pct,
                spread_after_pct: plan.spread_after_pct,
            })
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e))??;
    Ok(Json(view))
}
