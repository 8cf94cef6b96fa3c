//! The HA timeline recorded by this agent.

use super::*;

#[derive(Deserialize)]
pub(super) struct EventQuery {
    #[serde(default)]
    after: u64,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    vm: Option<String>,
    #[serde(default)]
    kind: Option<String>,
    #[serde(default)]
    host: Option<String>,
}

pub(super) async fn events(State(a): State<Arc<Agent>>, ApiQuery(q): ApiQuery<EventQuery>) -> Json<Vec<Event>> {
    let limit = q.limit.unwrap_or(1000).min(crate::events::EVENT_RING);
    let keep = |e: &crate::events::Event| {
        q.vm.as_ref().is_none_or(|v| e.vm.as_ref() == Some(v))
            && q.kind.as_ref().is_none_or(|k| e.kind.as_str() == k)
            && q.host.as_ref().is_none_or(|h| e.host == *h || e.subject.as_ref() == Some(h))
    };
    Json(a.events.since(q.after, crate::events::EVENT_RING).into_iter().filter(keep).take(limit).collect())
}
