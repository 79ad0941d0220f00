//! The test harness, which the suites (tests/tests), the benchmarks (bench/) and the demo
//! (demo/) share: network namespaces, real processes (the demo service and zdt-ctl), a load
//! client that classifies every request, and the real servers, kernels and hosts the suites run.
pub mod debian;
pub mod h3;
pub mod harness;
pub mod kernel;
pub mod load;
pub mod netns;
pub mod nspawn;
pub mod podman;
pub mod programs;
pub mod servers;
pub mod udp;
