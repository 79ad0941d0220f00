//! zdt-ctl: zero-downtime handover of a SO_REUSEPORT port between processes, steered by a BPF
//! `sk_reuseport` program. The `zdt-ctl` binary is a thin shell over this library; the tests and
//! the benchmark call the same functions.
pub mod addr;
pub mod cmd;
pub mod error;
pub mod readiness;
pub mod sockets;
pub mod state;
