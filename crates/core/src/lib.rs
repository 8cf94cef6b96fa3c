//! Tandem's decisions, free of I/O.
//!
//! Nothing in this crate touches a socket, a file, a clock or a random source: time arrives as
//! [`Millis`] values, messages and disk slots arrive as decoded values, and every answer is a
//! plain value the caller acts on. The agent runtime and the deterministic simulator drive the
//! same code.

pub mod coordinate;
pub mod diskformat;
pub mod hostset;
pub mod limits;
pub mod liveness;
pub mod logformat;
pub mod membership;
pub mod partition;
pub mod placement;
pub mod reconcile;
pub mod recovery;
pub mod state;
pub mod time;
pub mod timing;
pub mod wire;

pub use hostset::{HostId, HostSet, MAX_HOSTS};
pub use time::Millis;
