//! zdt's pure layer: decisions over values, with no kernel and no /proc. Which SO_REUSEPORT
//! group a listener is in, whether a new process's listeners can take over from the port's
//! current ones, which of the processes holding a listener is the one that serves it; one read
//! of a port ([`snapshot`]) and the plan each command takes from it ([`sets`]); what attach and
//! upgrade decide from the port's listeners alone ([`port`]); which map entries a switch writes
//! ([`buffers`]); the error kinds and exit codes ([`error`]). zdt-ctl reads the kernel and
//! passes values in. This crate builds without the BPF toolchain, so its unit tests and the
//! model test run with a plain `cargo test -p zdt-plan` on any machine with Rust, without root.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::SocketAddr,
};

pub mod buffers;
pub mod error;
#[cfg(test)]
mod model;
pub mod port;
pub mod sets;
pub mod snapshot;

/// The kind of reuseport group a TCP listener of a port is in. Kernel contract
/// (net/ipv4/inet_hashtables.c, inet_reuseport_add_sock): sockets share a group only with the
/// same family, address, port, bound device, IPV6_V6ONLY setting and owner uid. An IPv4 client
/// is given to an AF_INET listener before a dual-stack one (compute_score ranks AF_INET higher),
/// and a program or a migration can only choose inside one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum GroupKind {
    /// An AF_INET socket (`0.0.0.0:PORT`, or an IPv4 address).
    V4,
    /// An AF_INET6 socket with IPV6_V6ONLY=1, or bound to a specific IPv6 address: IPv6 only.
    V6Only,
    /// `[::]:PORT` with IPV6_V6ONLY=0 (the default of Go, Java, Node): one socket for both
    /// families.
    DualStack,
}

impl GroupKind {
    pub fn of(local: &SocketAddr, v6only: bool) -> Self {
        match local {
            SocketAddr::V4(_) => GroupKind::V4,
            SocketAddr::V6(a) if !v6only && a.ip().is_unspecified() => GroupKind::DualStack,
            SocketAddr::V6(_) => GroupKind::V6Only,
        }
    }
}

/// Whether a TCP listener bound to `local` (with IPV6_V6ONLY `v6only`) can take a connection
/// to `to`. Kernel contract (inet_lookup_listener, compute_score): a listener takes connections
/// to its port on its own address, or on any address of its family when bound to the wildcard;
/// a `[::]` socket without IPV6_V6ONLY takes IPv4 ones too. (A listener on the exact address is
/// preferred to a wildcard one, but which of them is there when a connection comes is not
/// known in advance: both count.)
pub fn serves(local: &SocketAddr, v6only: bool, to: &SocketAddr) -> bool {
    if local.port() != to.port() {
        return false;
    }
    match (local, to) {
        (SocketAddr::V4(l), SocketAddr::V4(t)) => l.ip() == t.ip() || l.ip().is_unspecified(),
        (SocketAddr::V6(l), SocketAddr::V6(t)) => l.ip() == t.ip() || l.ip().is_unspecified(),
        (SocketAddr::V6(l), SocketAddr::V4(t)) => {
            !v6only && (l.ip().is_unspecified() || l.ip().to_ipv4_mapped() == Some(*t.ip()))
        }
        (SocketAddr::V4(_), SocketAddr::V6(_)) => false,
    }
}

/// How a port's sockets are laid out (`exec --split/--dual-stack`, `hold`'s placeholders).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Layout {
    /// An IPv4 socket and an IPv6-only one (for `:PORT`).
    #[default]
    Split,
    /// One `[::]` socket with IPV6_V6ONLY=0 (IPv4 clients arrive as ::ffff:a.b.c.d).
    DualStack,
}

/// The kinds of group a set of listeners has sockets in, each once, in order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupSet(Vec<GroupKind>);

impl GroupSet {
    pub fn new(groups: impl IntoIterator<Item = GroupKind>) -> Self {
        let mut v: Vec<GroupKind> = groups.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        GroupSet(v)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn has_dual_stack(&self) -> bool {
        self.0.contains(&GroupKind::DualStack)
    }

    pub fn kinds(&self) -> &[GroupKind] {
        &self.0
    }
}

impl fmt::Display for GroupSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<&str> = self
            .0
            .iter()
            .map(|g| match g {
                GroupKind::V4 => "an IPv4 socket",
                GroupKind::V6Only => "an IPv6-only socket",
                GroupKind::DualStack => "one dual-stack socket (IPV6_V6ONLY=0)",
            })
            .collect();
        match parts.as_slice() {
            [] => f.write_str("no socket"),
            [one] => f.write_str(one),
            [init @ .., last] => write!(f, "{} and {last}", init.join(", ")),
        }
    }
}

/// Whether listeners laid out as `new` can take the port's connections over from listeners
/// laid out as `current` without a loss; `Some(why)` if not.
///
/// Split layouts (IPv4 and/or IPv6-only sockets) hand over to split layouts group by group, as
/// they always have. Once either side has a dual-stack socket, the two must have the same
/// groups: a dual-stack socket is in a group of its own, beside an IPv4 group that wins every
/// IPv4 client, so connections would stay on (or go to) the side that is being replaced, and
/// its queue, when it closes, could not move to the other group.
pub fn layout_conflict(current: &GroupSet, new: &GroupSet) -> Option<String> {
    if current.is_empty() || new.is_empty() || current == new {
        return None;
    }
    if !current.has_dual_stack() && !new.has_dual_stack() {
        return None;
    }
    Some(format!(
        "the port's sockets are {current}, the new ones {new}: the kernel keeps a dual-stack \
         socket in a SO_REUSEPORT group of its own (and gives IPv4 clients to an IPv4 socket \
         first), and neither zdt's program nor the kernel's migration can move a connection \
         from one group to another"
    ))
}

/// Whether listeners bound to the devices `new` ((address, interface index), 0 for none) can
/// take the port over from sockets bound to `current`; `Some(why)` if not. Kernel contract
/// (sock_reuseport.c, reuseport_match; inet_lookup_listener's compute_score): sockets bound to
/// different devices are in different SO_REUSEPORT groups, and a listener bound to the device a
/// connection comes in on wins over an unbound one. A device-bound candidate beside unbound
/// members would take that device's connections while it warms up, outside the program's
/// reach, and the members' queues could never migrate to it. `name` gives an interface's name.
pub fn device_conflict(
    current: &BTreeSet<u32>,
    new: &[(SocketAddr, u32)],
    name: impl Fn(u32) -> String,
) -> Option<String> {
    let devices: BTreeSet<u32> = new.iter().map(|n| n.1).collect();
    if current.is_empty() || new.is_empty() || devices == *current {
        return None;
    }
    let on = |d: u32| {
        if d == 0 {
            "no device".to_string()
        } else {
            format!("device {}", name(d))
        }
    };
    let (addr, dev) = new
        .iter()
        .find(|n| !current.contains(&n.1))
        .or(new.first())
        .copied()?;
    let now: Vec<String> = current.iter().map(|&d| on(d)).collect();
    Some(format!(
        "its socket on {addr} is bound to {} (SO_BINDTODEVICE, `ip vrf exec`), the port's \
         sockets to {}: the kernel keeps sockets bound to different devices in different \
         SO_REUSEPORT groups and gives a device's connections to the one bound to it, so zdt \
         could neither keep connections from it while it warms up nor move a queue to it. Bind \
         the new version as the old one is bound",
        on(dev),
        now.join(", ")
    ))
}

/// Whose listeners zdt manages on a port: the owner uid of its members (`members`, the uids zdt
/// recorded; the kernel lets only one owner's sockets share a group), else the one owner of the
/// listeners found (`found`). `Err(uids)` when the listeners have several owners and no member
/// says which is the app's; `Ok(None)` when there is no listener. The other owners' listeners
/// are foreign: in groups of their own, never adopted, steered or signalled by zdt.
pub fn owner(members: &[u32], found: &[u32]) -> Result<Option<u32>, Vec<u32>> {
    if let Some(&uid) = members.first() {
        return Ok(Some(uid));
    }
    let uids: BTreeSet<u32> = found.iter().copied().collect();
    match uids.len() {
        0 => Ok(None),
        1 => Ok(uids.first().copied()),
        _ => Err(uids.into_iter().collect()),
    }
}

/// What zdt knows of a process that may hold a listener.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcInfo {
    pub ppid: i32,
    /// The executable (/proc/PID/exe), if readable.
    pub exe: Option<String>,
    /// The process runs a program it exec'd itself (PF_FORKNOEXEC clear): not a fork of its
    /// parent that kept the parent's program (as nginx's or gunicorn's workers are).
    pub execed: bool,
    /// Its environment has LISTEN_FDS: sockets were handed to it the systemd way.
    pub listen_fds: bool,
    /// A zdt-ctl process (hold, metrics, exec before it execs).
    pub zdt: bool,
}

/// A process table: pid -> what zdt knows of it.
pub type Procs = BTreeMap<i32, ProcInfo>;

/// Why a process that holds a listener is not the process that serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotServing {
    /// pid 1: systemd holds the sockets of socket-activated services.
    Init,
    /// zdt-ctl itself (the placeholder of `zdt-ctl hold`, say).
    Zdt,
    /// It handed the socket to a program it started (`child`), and kept a copy: a supervisor.
    Supervisor { child: i32 },
}

/// Whether `pid` descends from `ancestor` (at most 64 generations: the table is a snapshot, and
/// a pid reused while it was read must not make a loop).
pub fn descends(pid: i32, ancestor: i32, procs: &Procs) -> bool {
    let mut p = pid;
    for _ in 0..64 {
        match procs.get(&p) {
            Some(info) if info.ppid == ancestor => return true,
            Some(info) if info.ppid > 0 && info.ppid != p => p = info.ppid,
            _ => return false,
        }
    }
    false
}

/// Why `pid`, one of the processes in `holders` that hold the same listener, does not serve
/// it; None if it may. A holder is a supervisor when a descendant of it that also holds the
/// socket runs a program of its own: it exec'd, and either its executable differs or it was
/// handed sockets the systemd way (LISTEN_FDS). Workers forked by a master (nginx, gunicorn)
/// run their master's program without exec, so their master stays the serving process.
pub fn not_serving(pid: i32, holders: &[i32], procs: &Procs) -> Option<NotServing> {
    if pid == 1 {
        return Some(NotServing::Init);
    }
    let me = procs.get(&pid);
    if me.is_some_and(|p| p.zdt) {
        return Some(NotServing::Zdt);
    }
    holders
        .iter()
        .copied()
        .filter(|&h| h != pid && descends(h, pid, procs))
        .find(|h| {
            procs.get(h).is_some_and(|c| {
                c.execed && (c.listen_fds || c.exe != me.and_then(|m| m.exe.clone()))
            })
        })
        .map(|child| NotServing::Supervisor { child })
}

/// The member to record for a listener held by `holders`: among the processes that serve it,
/// the topmost (a master before the workers it forked), the lowest pid if several are.
/// None if no holder serves it (only systemd or zdt-ctl hold it).
pub fn member(holders: &[i32], procs: &Procs) -> Option<i32> {
    let serving: Vec<i32> = holders
        .iter()
        .copied()
        .filter(|&h| not_serving(h, holders, procs).is_none())
        .collect();
    serving
        .iter()
        .copied()
        .filter(|&h| !serving.iter().any(|&o| o != h && descends(h, o, procs)))
        .min()
        // Only in a snapshot with a cycle is no serving holder topmost.
        .or_else(|| serving.iter().copied().min())
}

/// The descendant of `pid` to name when `pid` was seen not to listen on a spec while a process
/// of its tree does (a start script that forked the server instead of exec'ing it): the lowest
/// such pid among `holders` (the holders of every listener the spec names), or None when `pid`
/// itself holds one of them now. A process that binds late and then forks workers sharing the
/// sockets (nginx's master) was seen without listeners before it bound; by the time its tree is
/// looked at it holds them itself, and it is the member, not the workers.
pub fn listening_child(pid: i32, holders: &[i32], procs: &Procs) -> Option<i32> {
    if holders.contains(&pid) {
        return None;
    }
    holders
        .iter()
        .copied()
        .filter(|&h| descends(h, pid, procs))
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn groups_follow_family_address_and_v6only() {
        assert_eq!(GroupKind::of(&sa("0.0.0.0:80"), false), GroupKind::V4);
        assert_eq!(GroupKind::of(&sa("127.0.0.1:80"), false), GroupKind::V4);
        assert_eq!(GroupKind::of(&sa("[::]:80"), true), GroupKind::V6Only);
        assert_eq!(GroupKind::of(&sa("[::]:80"), false), GroupKind::DualStack);
        // A specific IPv6 address takes no IPv4 client whatever IPV6_V6ONLY says.
        assert_eq!(GroupKind::of(&sa("[::1]:80"), false), GroupKind::V6Only);
    }

    #[test]
    fn a_listener_serves_its_address_or_its_family_from_the_wildcard() {
        let to4 = sa("127.0.0.1:9100");
        let to6 = sa("[::1]:9100");
        for (local, v6only, four, six) in [
            ("127.0.0.1:9100", false, true, false),
            ("0.0.0.0:9100", false, true, false),
            ("127.0.0.2:9100", false, false, false),
            ("0.0.0.0:9101", false, false, false),
            ("[::1]:9100", true, false, true),
            ("[::]:9100", true, false, true),
            // Dual-stack: IPv4 clients too.
            ("[::]:9100", false, true, true),
            ("[::ffff:127.0.0.1]:9100", false, true, false),
            ("[::2]:9100", false, false, false),
        ] {
            assert_eq!(serves(&sa(local), v6only, &to4), four, "{local} {v6only}");
            assert_eq!(serves(&sa(local), v6only, &to6), six, "{local} {v6only}");
        }
    }

    fn l(groups: &[GroupKind]) -> GroupSet {
        GroupSet::new(groups.iter().copied())
    }

    #[test]
    fn split_layouts_hand_over_to_split_layouts() {
        use GroupKind::*;
        let split = l(&[V4, V6Only]);
        assert_eq!(layout_conflict(&split, &split), None);
        // Adding or dropping a family is what it was before zdt: no group changes kind.
        assert_eq!(layout_conflict(&l(&[V4]), &split), None);
        assert_eq!(layout_conflict(&split, &l(&[V4])), None);
        assert_eq!(layout_conflict(&l(&[V6Only]), &l(&[V4])), None);
    }

    #[test]
    fn dual_stack_hands_over_to_dual_stack_only() {
        use GroupKind::*;
        let dual = l(&[DualStack]);
        assert_eq!(layout_conflict(&dual, &dual), None);
        for (current, new) in [
            (l(&[V4, V6Only]), dual.clone()),
            (dual.clone(), l(&[V4, V6Only])),
            (l(&[V4]), dual.clone()),
            (dual.clone(), l(&[V6Only])),
            // An IPv4 socket beside a dual-stack one takes every IPv4 client from it.
            (dual.clone(), l(&[DualStack, V4])),
            (l(&[DualStack, V4]), dual.clone()),
        ] {
            let why = layout_conflict(&current, &new).expect("a conflict");
            assert!(why.contains("dual-stack"), "{why}");
        }
    }

    #[test]
    fn nothing_to_compare_is_no_conflict() {
        let dual = l(&[GroupKind::DualStack]);
        assert_eq!(layout_conflict(&GroupSet::default(), &dual), None);
        assert_eq!(layout_conflict(&dual, &GroupSet::default()), None);
    }

    #[test]
    fn a_device_bound_candidate_beside_unbound_members_conflicts() {
        let a: SocketAddr = "0.0.0.0:80".parse().unwrap();
        let name = |d: u32| format!("if{d}");
        let unbound = BTreeSet::from([0]);
        assert_eq!(device_conflict(&unbound, &[(a, 0)], name), None);
        let why = device_conflict(&unbound, &[(a, 0), (a, 1)], name).expect("a conflict");
        assert!(why.contains("device if1"), "{why}");
        assert!(why.contains("no device"), "{why}");
        // Members bound to a device hand over to sockets bound to the same one.
        let bound = BTreeSet::from([1]);
        assert_eq!(device_conflict(&bound, &[(a, 1)], name), None);
        assert!(device_conflict(&bound, &[(a, 0)], name).is_some());
        // Nothing serves yet: nothing to conflict with.
        assert_eq!(device_conflict(&BTreeSet::new(), &[(a, 1)], name), None);
    }

    #[test]
    fn the_owner_is_the_members_then_the_only_one() {
        assert_eq!(owner(&[33], &[33, 65534]), Ok(Some(33)));
        assert_eq!(owner(&[], &[33, 33]), Ok(Some(33)));
        assert_eq!(owner(&[], &[]), Ok(None));
        assert_eq!(owner(&[], &[65534, 0, 0]), Err(vec![0, 65534]));
    }

    #[test]
    fn layouts_read_as_words() {
        use GroupKind::*;
        assert_eq!(
            l(&[V6Only, V4]).to_string(),
            "an IPv4 socket and an IPv6-only socket"
        );
        assert_eq!(
            l(&[DualStack]).to_string(),
            "one dual-stack socket (IPV6_V6ONLY=0)"
        );
        assert_eq!(GroupSet::default().to_string(), "no socket");
    }

    fn proc(ppid: i32, exe: &str, execed: bool) -> ProcInfo {
        ProcInfo {
            ppid,
            exe: Some(exe.into()),
            execed,
            ..ProcInfo::default()
        }
    }

    #[test]
    fn a_master_is_the_member_not_its_workers() {
        // nginx: the master forks its workers, which keep its program (no exec).
        let procs = Procs::from([
            (100, proc(1, "/usr/sbin/nginx", true)),
            (101, proc(100, "/usr/sbin/nginx", false)),
            (102, proc(100, "/usr/sbin/nginx", false)),
        ]);
        assert_eq!(not_serving(100, &[100, 101, 102], &procs), None);
        assert_eq!(member(&[101, 102, 100], &procs), Some(100));
        // Workers alone (the master closed its copy): the lowest of them.
        assert_eq!(member(&[102, 101], &procs), Some(101));
    }

    #[test]
    fn a_supervisor_that_keeps_the_socket_is_not_the_member() {
        // A supervisor (pid 50) made the socket and started the app with it (exec, another
        // program); both hold it.
        let procs = Procs::from([
            (50, proc(1, "/usr/bin/supervisor", true)),
            (60, proc(50, "/usr/bin/myapp", true)),
            (61, proc(60, "/usr/bin/myapp", false)),
        ]);
        assert_eq!(
            not_serving(50, &[50, 60, 61], &procs),
            Some(NotServing::Supervisor { child: 60 })
        );
        assert_eq!(member(&[50, 60, 61], &procs), Some(60));
        // The same program re-exec'd with sockets handed the systemd way is a supervisor too.
        let mut same = procs.clone();
        same.insert(
            60,
            ProcInfo {
                exe: Some("/usr/bin/supervisor".into()),
                listen_fds: true,
                ..proc(50, "", true)
            },
        );
        assert_eq!(member(&[50, 60], &same), Some(60));
        // Without LISTEN_FDS and with the same program, it is a master and its worker.
        same.get_mut(&60).unwrap().listen_fds = false;
        assert_eq!(member(&[50, 60], &same), Some(50));
    }

    #[test]
    fn init_and_zdt_never_are_members() {
        let procs = Procs::from([
            (1, proc(0, "/lib/systemd/systemd", true)),
            (70, proc(1, "/usr/bin/myapp", true)),
            (
                80,
                ProcInfo {
                    zdt: true,
                    ..proc(1, "/usr/sbin/zdt-ctl", true)
                },
            ),
        ]);
        assert_eq!(not_serving(1, &[1, 70], &procs), Some(NotServing::Init));
        assert_eq!(not_serving(80, &[80], &procs), Some(NotServing::Zdt));
        // Socket activation: systemd and the service hold the socket; the service is the member.
        assert_eq!(member(&[1, 70], &procs), Some(70));
        // Only systemd (the service has not started) or only the placeholder: no member.
        assert_eq!(member(&[1], &procs), None);
        assert_eq!(member(&[80], &procs), None);
    }

    #[test]
    fn an_unknown_or_looping_ancestry_ends() {
        // A snapshot taken while pids were reused can hold a cycle.
        let procs = Procs::from([(10, proc(11, "/a", false)), (11, proc(10, "/a", false))]);
        assert!(!descends(10, 12, &procs));
        assert!(!descends(99, 1, &procs));
        assert_eq!(member(&[11, 10], &procs), Some(10));
    }

    #[test]
    fn a_child_is_named_only_while_its_parent_holds_nothing() {
        // A shell (100) that forked the server (101) instead of exec'ing it: name the child.
        let procs: Procs = [
            (100, proc(1, "/bin/sh", true)),
            (101, proc(100, "/usr/sbin/nginx", true)),
            (102, proc(101, "/usr/sbin/nginx", false)),
        ]
        .into_iter()
        .collect();
        assert_eq!(listening_child(100, &[101, 102], &procs), Some(101));
        // nginx's master (101) seen before it bound, its tree looked at after it bound and
        // forked its workers: it holds the sockets itself, so no child is named.
        assert_eq!(listening_child(101, &[101, 102], &procs), None);
        // Holders outside the tree are no one's child.
        assert_eq!(listening_child(102, &[101], &procs), None);
        assert_eq!(listening_child(100, &[], &procs), None);
    }
}
