//! The CLI's parts: its arguments, its output, the one-request commands, and the commands that
//! need more than a request.

pub mod args;
pub mod coldmove;
pub mod commands;
pub mod events;
pub mod maintenance;
pub mod migrate;
pub mod mirrors;
pub mod output;
pub mod rebalance;
pub mod shutdown;
pub mod vm;
