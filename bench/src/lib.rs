//! The benchmarks that `cargo xtask bench` runs (zdt-bench) and their short versions, which
//! `cargo xtask test` holds (tests/bench.rs): each measures zdt beside a control in the same run
//! and renders its figures (markdown, SVG) for the README and docs/BENCHMARK.md.
pub mod cold;
pub mod cost;
pub mod handover;
pub mod scale;
