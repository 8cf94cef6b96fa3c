//! Tandem's laboratory, apart from the product: local and namespace clusters of real agents
//! (`lab`, `netlab`), the disk-backed bridged guest and its watchers (`diskguest`), the FUSE heartbeat disk that injects storage faults (`fusedisk`), the demo,
//! the real fault suite (`chaos`), the simulator's front end (`sim`) and the benchmarks.
//!
//! Architecture invariant: nothing here is linked into the `tandem` binary that operators
//! install. The lab drives that binary as a separate process (`lab::tandem_binary`), through
//! its API and its configuration only.

pub mod bench;
pub mod chaos;
pub mod delayrelay;
pub mod demo;
pub mod diskguest;
pub mod fusedisk;
pub mod lab;
pub mod netlab;
pub mod progress;
pub mod qemuproc;
pub mod scratch;
pub mod sim;
pub mod sitelab;
pub mod testca;
