//! What `attach` and `upgrade` decide from one read of a port's listeners, the read they make
//! before (attach: without) the port's maps: whose listeners zdt manages, what it warns about,
//! what it refuses, and which processes an attach makes the active set.
use crate::{error::bad_input, owner, sets::Process, snapshot::Listen};

/// A listener on the port, as one read (sock_diag, then one scan of /proc) saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OnPort {
    pub listen: Listen,
    /// Whether the port's spec names it. Kernel contract: a listener bound to a specific
    /// address wins its address's connections over a wildcard one and is in a group of its
    /// own, so the spec `:80` does not name `127.0.0.1:80`, nor the other way round.
    pub named: bool,
    /// The pid to name it by in a message: its member's, else its first holder's.
    pub pid: Option<i32>,
}

impl OnPort {
    fn describe(&self) -> String {
        match self.pid {
            Some(p) => format!("{} (pid {p})", self.listen.local),
            None => self.listen.local.to_string(),
        }
    }

    fn describe_foreign(&self) -> String {
        let (local, uid) = (self.listen.local, self.listen.uid);
        match self.pid {
            Some(p) => format!("{local} (pid {p}, uid {uid})"),
            None => format!("{local} (uid {uid})"),
        }
    }
}

/// The spec's listeners split by owner ([`owner`]): the app's user's, which zdt manages, and
/// the others', in groups of their own, which it leaves alone.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owned {
    /// None when no listener and no member says (then every listener is the app's).
    pub owner: Option<u32>,
    pub mine: Vec<OnPort>,
    pub foreign: Vec<OnPort>,
}

impl Owned {
    /// Splits the listeners `seen` that the spec names by `owner` (None: all are the app's).
    pub fn split(seen: &[OnPort], owner: Option<u32>) -> Owned {
        let (mine, foreign) = (seen.iter())
            .filter(|o| o.named)
            .partition(|o| owner.is_none_or(|u| o.listen.uid == u));
        Owned {
            owner,
            mine,
            foreign,
        }
    }

    /// The warning for the other users' listeners, None when there are none.
    pub fn warning(&self) -> Option<String> {
        let owner = self.owner.filter(|_| !self.foreign.is_empty())?;
        let foreign: Vec<String> = self.foreign.iter().map(OnPort::describe_foreign).collect();
        Some(format!(
            "{} listen(s) on the port as another user than the app's (uid {owner}): the kernel \
             keeps them in groups of their own, which zdt leaves alone (never adopted, steered \
             or stopped); connections the kernel gives them are not zdt's",
            foreign.join(", ")
        ))
    }
}

/// The owner uids of the listeners the spec names that a process holds (one that no process
/// holds any more is closing: it says nothing of whose the port is).
fn held_uids(seen: &[OnPort]) -> Vec<u32> {
    (seen.iter().filter(|o| o.named && o.pid.is_some()))
        .map(|o| o.listen.uid)
        .collect()
}

/// `upgrade`: the listeners the program is attached through, and the warning for the others.
/// Listeners of several users with no member to say which is the app's: all are attached
/// through (the program only steers inside each group, to slots of the group's own sockets).
pub fn upgrade(seen: &[OnPort], members: &[u32]) -> Owned {
    let uids = held_uids(seen);
    Owned::split(seen, owner(members, &uids).ok().flatten())
}

/// What `attach` does, decided before anything is created.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attach {
    /// The app's listeners, whose groups the program is attached to, and the others'.
    pub owned: Owned,
    /// The processes that serve the app's listeners, each with the cookies of its listeners,
    /// in the order first seen: they become the active set if the port has none. Listeners no
    /// process serves (systemd's before the service started, a placeholder) are not members.
    pub adopt: Vec<(Process, Vec<u64>)>,
    pub warnings: Vec<String>,
}

/// `attach SPEC` (`spec` as the user wrote it, for messages) over the listeners `seen` on its
/// port, with the uids of the port's members (`members`, empty when it has none) and the app's
/// user if `--user` named one. Refused (bad input, nothing changed): `--user` naming another
/// uid than the members'; listeners of several users and nothing to say which is the app's; no
/// listener of the app on the spec while the port has others, which the spec does not name (it
/// would steer nothing at all).
pub fn attach(
    spec: &str,
    seen: &[OnPort],
    members: &[u32],
    user: Option<u32>,
) -> anyhow::Result<Attach> {
    let uids = held_uids(seen);
    let owner = match (user, members.first()) {
        // The members say whose the port is: the kernel groups only one owner's sockets.
        (Some(u), Some(&m)) if u != m => {
            return Err(bad_input(format!(
                "--user names uid {u}, but the members of {spec} run as uid {m}: zdt hands over \
                 only between processes of the app's user (the kernel keeps sockets of \
                 different uids in separate groups); pass --user {m} or leave it out; nothing \
                 was changed"
            )))
        }
        (Some(u), _) => Some(u),
        (None, _) => owner(members, &uids).map_err(|many| {
            bad_input(format!(
                "{spec} has listeners of several users (uids {many:?}) and no member yet says \
                 which is the app's: pass --user with the app's user; nothing was changed"
            ))
        })?,
    };
    let owned = Owned::split(seen, owner);
    let others: Vec<&OnPort> = seen.iter().filter(|o| !o.named).collect();
    let port = seen.first().map_or(0, |o| o.listen.local.port());
    let described = || {
        let d: Vec<String> = others.iter().map(|o| o.describe()).collect();
        d.join(", ")
    };
    if owned.mine.is_empty() && !others.is_empty() {
        let first = others[0].listen.local;
        return Err(bad_input(format!(
            "no listener on {spec}: port {port} is served by {} only, which {spec} does not \
             name. Attach what the service listens on: `zdt-ctl attach {first}` (or make the \
             service listen on {spec}); nothing was changed",
            described(),
        )));
    }
    let mut warnings: Vec<String> = owned.warning().into_iter().collect();
    if !others.is_empty() {
        warnings.push(format!(
            "{} also listen(s) on port {port}, outside {spec}: connections to that address go \
             there without zdt's steering",
            described()
        ));
    }
    let mut adopt: Vec<(Process, Vec<u64>)> = Vec::new();
    for o in &owned.mine {
        let Some(p) = o.listen.member else { continue };
        match adopt.iter_mut().find(|(q, _)| *q == p) {
            Some((_, cookies)) => cookies.push(o.listen.cookie),
            None => adopt.push((p, vec![o.listen.cookie])),
        }
    }
    Ok(Attach {
        owned,
        adopt,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{kind_of, Kind};

    fn on(local: &str, uid: u32, member: Option<i32>, named: bool) -> OnPort {
        let cookie = 1000 + member.unwrap_or(0) as u64 * 10 + uid as u64 + u64::from(named);
        OnPort {
            listen: Listen {
                cookie,
                local: local.parse().unwrap(),
                v6only: local.starts_with('['),
                uid,
                device: 0,
                member: member.map(|pid| Process { pid, start: 7 }),
            },
            named,
            pid: member,
        }
    }

    #[test]
    fn an_app_already_serving_is_adopted_per_process() {
        let seen = [
            on("0.0.0.0:80", 0, Some(10), true),
            on("[::]:80", 0, Some(10), true),
            on("0.0.0.0:80", 0, Some(11), true),
            on("0.0.0.0:80", 0, None, true),
        ];
        let a = attach(":80", &seen, &[], None).unwrap();
        assert_eq!(
            a.owned.mine.len(),
            4,
            "every listener's group gets the program"
        );
        let adopted: Vec<(i32, usize)> = a.adopt.iter().map(|(p, c)| (p.pid, c.len())).collect();
        assert_eq!(adopted, vec![(10, 2), (11, 1)]);
        assert!(a.warnings.is_empty(), "{:?}", a.warnings);
    }

    #[test]
    fn several_users_and_no_member_is_refused_unless_user_says() {
        let seen = [
            on("0.0.0.0:80", 0, Some(10), true),
            on("[::]:80", 65534, Some(20), true),
        ];
        let e = attach(":80", &seen, &[], None).unwrap_err();
        assert_eq!(kind_of(&e), Kind::BadInput);
        assert!(e.to_string().contains("--user"), "{e}");
        for (members, user) in [(vec![0], None), (vec![], Some(0))] {
            let a = attach(":80", &seen, &members, user).unwrap();
            assert_eq!(a.adopt.len(), 1);
            assert_eq!(a.adopt[0].0.pid, 10, "never another user's process");
            assert_eq!(a.owned.foreign.len(), 1);
            assert!(
                a.warnings[0].contains("[::]:80 (pid 20, uid 65534)"),
                "{:?}",
                a.warnings
            );
        }
    }

    #[test]
    fn a_listener_no_process_holds_says_nothing_of_the_owner() {
        let mut closing = on("[::]:80", 65534, None, true);
        closing.pid = None;
        let seen = [on("0.0.0.0:80", 0, Some(10), true), closing];
        let a = attach(":80", &seen, &[], None).unwrap();
        assert_eq!(a.owned.owner, Some(0));
        assert_eq!(a.adopt.len(), 1);
    }

    #[test]
    fn user_cannot_name_another_user_than_the_members() {
        let seen = [
            on("0.0.0.0:80", 0, Some(10), true),
            on("[::]:80", 65534, Some(20), true),
        ];
        let e = attach(":80", &seen, &[0], Some(65534)).unwrap_err();
        assert_eq!(kind_of(&e), Kind::BadInput);
        assert!(e.to_string().contains("uid 0"), "{e}");
        assert!(attach(":80", &seen, &[0], Some(0)).is_ok());
    }

    #[test]
    fn a_spec_that_names_none_of_the_ports_listeners_is_refused() {
        let seen = [on("127.0.0.1:80", 0, Some(10), false)];
        let e = attach(":80", &seen, &[], None).unwrap_err();
        assert_eq!(kind_of(&e), Kind::BadInput);
        let e = e.to_string();
        assert!(e.contains("127.0.0.1:80 (pid 10)"), "{e}");
        assert!(e.contains("zdt-ctl attach 127.0.0.1:80"), "{e}");
        // No listener at all: an attach before the app starts (late binding) is fine.
        let a = attach(":80", &[], &[], None).unwrap();
        assert!(a.adopt.is_empty() && a.warnings.is_empty());
    }

    #[test]
    fn listeners_outside_the_spec_are_warned_about_and_left_alone() {
        let seen = [
            on("0.0.0.0:80", 0, Some(10), true),
            on("127.0.0.1:80", 0, Some(30), false),
        ];
        let a = attach(":80", &seen, &[], None).unwrap();
        assert_eq!(a.adopt.len(), 1);
        assert_eq!(a.owned.mine.len(), 1);
        assert!(
            a.warnings[0].contains("127.0.0.1:80 (pid 30) also listen(s) on port 80"),
            "{:?}",
            a.warnings
        );
    }

    #[test]
    fn upgrade_never_refuses_and_leaves_other_users_out_once_a_member_says() {
        let seen = [
            on("0.0.0.0:80", 0, Some(10), true),
            on("[::]:80", 65534, Some(20), true),
            on("127.0.0.1:80", 0, Some(30), false),
        ];
        let none = upgrade(&seen, &[]);
        assert_eq!((none.owner, none.mine.len()), (None, 2), "{none:?}");
        assert_eq!(none.warning(), None);
        let known = upgrade(&seen, &[0]);
        assert_eq!((known.mine.len(), known.foreign.len()), (1, 1));
        assert!(known.warning().is_some_and(|w| w.contains("uid 65534")));
    }
}
