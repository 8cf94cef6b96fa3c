//! Tandem's decisions, free of I/O.
//!
//! Nothing in this crate touches a socket, a file, a clock or a random source: time arrives as
//! [`Millis`] values, messages and disk slots arrive as decoded values, and every answer is a
//! plain value the caller acts on. The agent runtime and the deterministic simulator drive the
//! same code.

pub mod convergence;
pub mod coordinate;
pub mod diskformat;
pub mod election;
pub mod evacuation;
pub mod hostset;
pub mod limits;
pub mod liveness;
pub mod logformat;
pub mod membership;
pub mod mirroring;
pub mod parking;
pub mod partition;
pub mod placement;
pub mod rebalance;
pub mod reconcile;
pub mod recovery;
pub mod spec;
pub mod state;
pub mod time;
pub mod timing;
pub mod wire;
pub mod witness;

pub use hostset::{HostId, HostSet, MAX_HOSTS};
pub use time::Millis;

/// The crate's layers, lowest first: a module may use the modules of its own and lower layers,
/// never a higher one (outside its tests). The cycles state ↔ placement ↔ recovery were broken
/// this way; this test keeps them broken.
#[cfg(test)]
mod layering {
    /// (module, its non-test source, modules it must not use).
    const RULES: &[(&str, &str, &[&str])] = &[
        ("spec", include_str!("spec.rs"), &["placement", "state", "recovery", "coordinate", "reconcile", "membership"]),
        ("placement", include_str!("placement.rs"), &["state", "recovery", "coordinate", "reconcile", "membership"]),
        ("state", include_str!("state.rs"), &["recovery", "coordinate", "reconcile", "membership"]),
        ("state/admission", include_str!("state/admission.rs"), &["recovery", "coordinate", "reconcile", "membership"]),
        ("state/apply", include_str!("state/apply.rs"), &["recovery", "coordinate", "reconcile", "membership"]),
        ("state/lifecycle", include_str!("state/lifecycle.rs"), &["recovery", "coordinate", "reconcile", "membership"]),
        ("state/command", include_str!("state/command.rs"), &["recovery", "coordinate", "reconcile", "membership"]),
        ("state/failure", include_str!("state/failure.rs"), &["recovery", "coordinate", "reconcile", "membership"]),
        ("state/sites", include_str!("state/sites.rs"), &["recovery", "coordinate", "reconcile", "membership"]),
        ("recovery", include_str!("recovery.rs"), &["coordinate", "reconcile", "membership"]),
    ];

    #[test]
    fn lower_layers_never_use_higher_ones() {
        for (module, source, forbidden) in RULES {
            let code = source.split("#[cfg(test)]").next().unwrap_or_default();
            for higher in *forbidden {
                let needle = format!("crate::{higher}");
                assert!(!code.contains(&needle), "{module} uses {needle}: a lower layer must not depend on a higher one");
            }
        }
    }
}
