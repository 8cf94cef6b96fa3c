//! The Tandem agent runtime: configuration, consensus, heartbeats, fencing, VM reconciliation
//! and the HTTP API around the sans-I/O core.

pub mod agent;
pub mod api;
pub mod api_limits;
pub mod config;
pub mod consensus;
pub mod disk;
pub mod endpoints;
pub mod events;
pub mod heavy;
pub mod httpc;
pub mod io;
pub mod limits;
pub mod metrics;
pub mod multipath;
pub mod netwitness;
pub mod policy;
pub mod raft_runtime;
pub mod tls;
pub mod views;
pub mod watchdog;
pub mod witness;
