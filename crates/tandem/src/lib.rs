//! The `tandem` binary's library half: the API client used by the CLI, the local-cluster lab
//! used by the demo and the integration tests, and the demo itself.

pub mod agent_cmd;
pub mod bench;
pub mod chaos;
pub mod client;
pub mod demo;
pub mod fusedisk;
pub mod lab;
pub mod netlab;
pub mod progress;
pub mod sim;
