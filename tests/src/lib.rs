//! The test and benchmark harness: network namespaces, real processes (the demo service and
//! zdt-ctl), and a load client that classifies every request.
pub mod bench;
pub mod cold;
pub mod cost;
pub mod debian;
pub mod harness;
pub mod kernel;
pub mod load;
pub mod netns;
pub mod nspawn;
pub mod podman;
pub mod programs;
pub mod scale;
pub mod servers;
