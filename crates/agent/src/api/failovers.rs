//! The recent failovers across the cluster, with their measured phases: each committed
//! failover's record (from the timeline of the coordinator that committed it) joined with when
//! each moved VM started on its new host, and when its service answered there (from that host's
//! timeline).

use super::*;
use crate::events::FailoverRecord;

/// How much earlier than the decision, on the deciding host's clock, a start recorded by another
/// host may appear and still count. The hosts' wall clocks are not Tandem's to bound (its
/// decisions use each host's own monotonic clock); NTP keeps them far closer than this, and a
/// start on the new host a second before the failover was decided cannot be this failover's.
const START_SKEW_MS: u64 = 1000;

#[derive(Deserialize)]
pub(super) struct FailoverQuery {
    #[serde(default)]
    limit: Option<usize>,
}

/// The events of `kind` in one host's timeline: this agent's own, or a peer's over the API.
async fn timeline(a: &Agent, addr: Option<String>, kind: EventKind) -> Vec<Event> {
    let Some(addr) = addr else {
        return a.events.since(0, crate::events::EVENT_RING).into_iter().filter(|e| e.kind == kind).collect();
    };
    let path = format!("/v1/events?kind={kind}&limit={}", crate::events::EVENT_RING);
    match a.rpc().call(&addr, &path, Some(&a.token), None, crate::agent::LOCAL_QUERY_TIMEOUT).await {
        Ok(r) if r.status == 200 => serde_json::from_slice(&r.body).unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// Joins failover records with the starts of the VMs they moved: the earliest start of each VM on
/// its new host recorded from the decision on (less the allowed clock skew), and the first time
/// its service answered there from that start on (where its spec names a probe).
fn join(records: Vec<(String, FailoverRecord)>, starts: &[Event], answers: &[Event]) -> Vec<FailoverView> {
    // The earliest event of `vm` on `host` stamped `earliest` or later.
    let first = |events: &[Event], vm: &str, host: &str, earliest: u64| {
        events.iter().filter(|e| e.vm.as_deref() == Some(vm) && e.host == host && e.at_ms >= earliest).map(|e| e.at_ms).min()
    };
    records
        .into_iter()
        .map(|(recorded_by, record)| {
            let starts = record
                .moved
                .iter()
                .map(|m| {
                    // The decision is on the coordinator's clock, the start on the new host's.
                    let started_ms = first(starts, &m.vm, &m.to, record.decided_ms.saturating_sub(START_SKEW_MS));
                    // Both on the new host's clock.
                    let answering_ms = started_ms.and_then(|s| first(answers, &m.vm, &m.to, s));
                    VmStartView { vm: m.vm.clone(), host: m.to.clone(), generation: m.generation, started_ms, answering_ms }
                })
                .collect();
            FailoverView { recorded_by, record, starts }
        })
        .collect()
}

pub(super) async fn failovers(State(a): State<Arc<Agent>>, ApiQuery(q): ApiQuery<FailoverQuery>) -> Json<Vec<FailoverView>> {
    let limit = q.limit.unwrap_or(10).min(crate::events::EVENT_RING);
    let peers: Vec<Option<String>> = a.consensus.with_state(|s| s.hosts.values().map(|h| (h.id != a.me).then(|| h.api_addr.clone())).collect());
    // Every host at once: one that does not answer delays this by at most LOCAL_QUERY_TIMEOUT.
    let mut asks = tokio::task::JoinSet::new();
    for addr in peers {
        let a = Arc::clone(&a);
        asks.spawn(async move {
            let committed = timeline(&a, addr.clone(), EventKind::FailoverCommitted).await;
            let started = timeline(&a, addr.clone(), EventKind::VmStarted).await;
            let answering = timeline(&a, addr, EventKind::VmAnswering).await;
            (committed, started, answering)
        });
    }
    let mut records: Vec<(String, FailoverRecord)> = Vec::new();
    let (mut starts, mut answers): (Vec<Event>, Vec<Event>) = (Vec::new(), Vec::new());
    while let Some(answer) = asks.join_next().await {
        let Ok((committed, started, answering)) = answer else { continue };
        records.extend(committed.into_iter().filter_map(|e| Some((e.host, e.failover?))));
        starts.extend(started);
        answers.extend(answering);
    }
    // A failover is recorded once, by the coordinator that committed it.
    records.sort_by_key(|r| std::cmp::Reverse(r.1.committed_ms));
    records.truncate(limit);
    Json(join(records, &starts, &answers))
}
