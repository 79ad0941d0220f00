//! zdt-ctl: zero-downtime handover of a SO_REUSEPORT port between processes, steered by a BPF
//! `sk_reuseport` program. The `zdt-ctl` binary is a thin shell over this library; the tests and
//! the benchmark call the same functions.
pub mod addr;
pub mod cmd;
pub mod error;
pub mod readiness;
pub mod sockets;
pub mod state;

/// Test hook: when `ZDT_FAILPOINT` names this point, stop here (until killed). The fault tests
/// SIGKILL zdt-ctl at every step of a command this way and check that the next command finds a
/// consistent state. Without the variable this is one environment lookup.
pub fn failpoint(name: &str) {
    if std::env::var_os("ZDT_FAILPOINT").is_some_and(|v| v == name) {
        eprintln!("zdt-ctl: failpoint {name} reached");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
