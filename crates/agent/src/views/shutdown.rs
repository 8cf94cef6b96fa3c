//! `POST /v1/hosts/{name}/shutdown`: a planned stop of the agent that answers, under a policy.

use crate::agent::ShutdownPolicy;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The policy of the stop (`kill`, `migrate`, `shutdown`, `freeze`); absent: the host's
/// configured `[shutdown] policy`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ShutdownRequest {
    #[serde(default)]
    pub policy: Option<ShutdownPolicy>,
}

/// The stop has begun; the agent exits once it is done.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
pub struct ShutdownAsked {
    pub host: String,
    pub policy: ShutdownPolicy,
}
