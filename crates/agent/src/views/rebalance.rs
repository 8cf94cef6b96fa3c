//! `GET /v1/rebalance`: the live migrations that would remove violations of placement rules and
//! even out memory use (`tandem_core::rebalance`), for the CLI to show and carry out.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One proposed live migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RebalanceMoveView {
    pub vm: String,
    pub from: String,
    pub to: String,
    /// The rule the VM breaks where it is; `None`: it moves to even out memory use.
    pub rule: Option<String>,
}

/// A rule violation the plan cannot remove, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct UnfixableView {
    pub rule: String,
    pub vm: String,
    pub why: String,
}

/// The plan: its moves in the order they should be made, what it cannot fix, and the spread of
/// memory use (percentage points between the most and the least used host in normal mode)
/// before and after it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RebalanceView {
    pub moves: Vec<RebalanceMoveView>,
    pub unfixable: Vec<UnfixableView>,
    pub spread_before_pct: u64,
    pub spread_after_pct: u64,
}
