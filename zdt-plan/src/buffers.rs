//! Where a command writes the live set and the rollback target, so that one write commits both.
//!
//! `ZDT_ACTIVE` has three entries; the control word names the live one (`active_buf`, which the
//! program reads) and the one that holds the rollback target (`rollback_buf`, which only
//! zdt-ctl reads). A command writes its new set, and a new target when it needs one, only into
//! entries the control word does not name, then names them in one write of the control word.
//! Killed before that write, it changed nothing anyone reads; after it, everything. So a
//! promote or a rollback killed halfway never loses the rollback target (with the target saved
//! in its own write first, a rollback killed between the two writes lost the version it was
//! going back to).
//!
//! The one exception is a plan that needs a new set and a target held by no entry while both
//! named entries are in use (a failed promote putting the set before it back, after something
//! else switched meanwhile): then the set goes into the target's entry before the control
//! write. What a kill there leaves as the target is that set, the version the plan restores.
use zdt_common::{ActiveSet, SlotList};

/// The three entries and what the control word names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffers {
    pub entries: [ActiveSet; 3],
    /// The live entry; None before the first switch (the program passes through).
    pub live: Option<usize>,
    /// The entry of the rollback target (empty lists: none).
    pub target: usize,
}

/// What to write: each entry in `writes`, in order, then the control word naming `live` and
/// `target` (when either changed).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Commit {
    pub writes: Vec<(usize, ActiveSet)>,
    pub live: Option<usize>,
    pub target: usize,
}

impl Commit {
    /// Whether the control word changes.
    pub fn switches(&self, now: &Buffers) -> bool {
        (self.live, self.target) != (now.live, now.target)
    }
}

impl Buffers {
    /// The live set (None before the first switch).
    pub fn live_set(&self) -> Option<ActiveSet> {
        self.live.map(|i| self.entries[i])
    }

    /// The rollback target, without probe lists (a target that was a live set keeps them in its
    /// entry; they mean nothing once it is not live), None when it names no one.
    pub fn target_set(&self) -> Option<ActiveSet> {
        let set = without_probe(&self.entries[self.target]);
        (!set.is_empty()).then_some(set)
    }

    /// The writes that make `set` live (None: the live set stays) and `target` the rollback
    /// target (None: it stays). A target equal to the live set is taken from the live entry
    /// when the set switches; a set equal to the live one is not written again.
    pub fn commit(&self, set: Option<ActiveSet>, target: Option<ActiveSet>) -> Commit {
        let set = set.filter(|s| self.live_set() != Some(*s));
        let mut writes = Vec::new();
        let named = |i: usize| Some(i) == self.live || i == self.target;
        let holds = |i: usize, t: &ActiveSet| without_probe(&self.entries[i]) == *t;
        let target_entry = match target.map(|t| without_probe(&t)) {
            None => self.target,
            Some(t) if holds(self.target, &t) => self.target,
            // The live set as the target: only when it stops being live (a target that is the
            // live set restores nothing).
            Some(t) if set.is_some() && self.live.is_some_and(|l| holds(l, &t)) => {
                self.live.unwrap_or(self.target)
            }
            Some(t) => match (0..3).find(|&i| !named(i) && holds(i, &t)) {
                Some(i) => i,
                None => {
                    let i = (0..3).find(|&i| !named(i)).unwrap_or(self.target);
                    writes.push((i, t));
                    i
                }
            },
        };
        let live = match set {
            None => self.live,
            Some(s) => {
                // Never the live entry (the program reads it) nor the target's; an entry no one
                // names if one is left, else the old target's (the exception above).
                let free = |i: &usize| Some(*i) != self.live && *i != target_entry;
                let i = (0..3)
                    .filter(free)
                    .find(|&i| !named(i))
                    .or_else(|| (0..3).find(free))
                    .unwrap_or(self.target);
                if self.entries[i] != s {
                    writes.push((i, s));
                }
                Some(i)
            }
        };
        Commit {
            writes,
            live,
            target: target_entry,
        }
    }

    /// `self` after `commit`, written up to its `writes`' `upto`th write (all of them and the
    /// control word when `upto` is None): what a command killed there leaves.
    pub fn after(&self, commit: &Commit, upto: Option<usize>) -> Buffers {
        let mut b = *self;
        for &(i, s) in commit.writes.iter().take(upto.unwrap_or(usize::MAX)) {
            b.entries[i] = s;
        }
        if upto.is_none() {
            (b.live, b.target) = (commit.live, commit.target);
        }
        b
    }
}

pub fn without_probe(set: &ActiveSet) -> ActiveSet {
    let mut set = *set;
    set.probe = [SlotList::EMPTY; 2];
    set
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(slots: &[u32]) -> ActiveSet {
        let mut s = ActiveSet::EMPTY;
        s.lists[0].slots[..slots.len()].copy_from_slice(slots);
        s.lists[0].len = slots.len() as u32;
        s
    }

    fn bufs(entries: [&[u32]; 3], live: Option<usize>, target: usize) -> Buffers {
        Buffers {
            entries: entries.map(set),
            live,
            target,
        }
    }

    /// Every entry a commit writes before its control word is one nothing reads: neither the
    /// live entry nor the target's (except the documented case), so a kill there changes
    /// nothing.
    fn check_staged(b: &Buffers, c: &Commit) {
        for k in 0..c.writes.len() {
            let mid = b.after(c, Some(k + 1));
            assert_eq!(mid.live_set(), b.live_set(), "{b:?} {c:?}");
        }
    }

    #[test]
    fn a_promote_names_the_live_entry_as_the_target_and_writes_one_entry() {
        let b = bufs([&[1], &[2], &[]], Some(0), 1);
        let c = b.commit(Some(set(&[3])), Some(set(&[1])));
        assert_eq!(c.writes, [(2, set(&[3]))]);
        assert_eq!((c.live, c.target), (Some(2), 0));
        check_staged(&b, &c);
        let after = b.after(&c, None);
        assert_eq!(after.live_set(), Some(set(&[3])));
        assert_eq!(after.target_set(), Some(set(&[1])));
        // Killed before the control word: the target is still [2], the live set [1].
        let killed = b.after(&c, Some(1));
        assert_eq!(killed.target_set(), Some(set(&[2])));
    }

    #[test]
    fn a_rollback_swaps_live_and_target_in_one_write() {
        let b = bufs([&[1], &[2], &[]], Some(0), 1);
        // The target restored (as a new value) and the live set as the new target.
        let c = b.commit(Some(set(&[2])), Some(set(&[1])));
        let after = b.after(&c, None);
        assert_eq!(after.live_set(), Some(set(&[2])));
        assert_eq!(after.target_set(), Some(set(&[1])));
        assert_eq!(c.target, 0);
        check_staged(&b, &c);
    }

    #[test]
    fn a_set_already_live_makes_no_write_and_never_becomes_the_target() {
        let b = bufs([&[1], &[2], &[]], Some(0), 1);
        let c = b.commit(Some(set(&[1])), Some(set(&[1])));
        let after = b.after(&c, None);
        assert_eq!(after.live_set(), Some(set(&[1])));
        assert_eq!(after.entries[after.target], set(&[1]));
        assert_ne!(after.target, 0, "the target entry is the live one");
    }

    #[test]
    fn a_target_kept_in_a_free_entry_is_named_again_without_a_write() {
        // After a promote: 2 live, 0 the target (the set before), 1 the old target.
        let b = bufs([&[1], &[0], &[3]], Some(2), 0);
        let c = b.commit(Some(set(&[1])), Some(set(&[0])));
        assert_eq!((c.live, c.target), (Some(0), 1));
        assert!(c.writes.is_empty(), "{c:?}");
    }

    #[test]
    fn a_new_target_and_a_new_set_with_one_free_entry_overwrite_the_old_target_last() {
        let b = bufs([&[1], &[2], &[9]], Some(0), 1);
        let c = b.commit(Some(set(&[4])), Some(set(&[5])));
        assert_eq!(c.writes, [(2, set(&[5])), (1, set(&[4]))]);
        assert_eq!((c.live, c.target), (Some(1), 2));
        check_staged(&b, &c);
        // Killed after both writes: the target entry holds the set the plan restores.
        assert_eq!(b.after(&c, Some(2)).target_set(), Some(set(&[4])));
    }

    #[test]
    fn before_the_first_switch_the_target_and_set_take_free_entries() {
        let b = bufs([&[], &[], &[]], None, 2);
        let c = b.commit(Some(set(&[1])), Some(ActiveSet::EMPTY));
        let after = b.after(&c, None);
        assert_eq!(after.live_set(), Some(set(&[1])));
        assert_eq!(after.target_set(), None);
        assert_ne!(after.live, Some(after.target));
    }

    #[test]
    fn a_new_target_alone_goes_into_a_free_entry() {
        let b = bufs([&[1], &[2, 3], &[]], Some(0), 1);
        let c = b.commit(None, Some(set(&[2])));
        assert_eq!(c.writes, [(2, set(&[2]))]);
        assert_eq!((c.live, c.target), (Some(0), 2));
    }

    #[test]
    fn every_commit_keeps_the_live_entry_unwritten_and_the_target_apart() {
        let values: [&[u32]; 4] = [&[], &[1], &[2], &[3]];
        for live in [None, Some(0), Some(1), Some(2)] {
            for target in 0..3 {
                if live == Some(target) {
                    continue;
                }
                for e in 0..64 {
                    let entries = [e % 4, e / 4 % 4, e / 16 % 4].map(|i| values[i]);
                    let b = bufs(entries, live, target);
                    for s in [None, Some(1), Some(2), Some(3)] {
                        for t in [None, Some(0), Some(1), Some(2), Some(3)] {
                            let (s, t) = (s.map(|i| set(values[i])), t.map(|i| set(values[i])));
                            let c = b.commit(s, t);
                            check_staged(&b, &c);
                            let a = b.after(&c, None);
                            assert_eq!(a.live_set(), s.or(b.live_set()), "{b:?} {c:?}");
                            let want = t.map(|t| (!t.is_empty()).then_some(t));
                            assert_eq!(
                                a.target_set(),
                                want.unwrap_or(b.target_set()),
                                "{b:?} {c:?}"
                            );
                            assert_ne!(a.live, Some(a.target), "{b:?} {c:?}");
                        }
                    }
                }
            }
        }
    }
}
