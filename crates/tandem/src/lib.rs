//! The `tandem` binary's library half: the agent command and the API client used by the CLI
//! (and by the laboratory, `tandem-lab`, which drives this binary from outside).
//!
//! Architecture invariant: the operator's binary links the product only — core, drivers, agent —
//! never the simulator, the FUSE layer or tokio's test utilities (`tandem-lab` holds those).

pub mod agent_cmd;
pub mod client;
