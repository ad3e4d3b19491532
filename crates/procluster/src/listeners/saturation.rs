//! Which reuseport slots have a worker that stopped accepting, judged from
//! their queues alone (no IO here: the caller reads each queue's length,
//! with `TCP_INFO`, every [`QUEUE_POLL`]).
//!
//! A slot whose queue has connections waiting and has not shrunk for
//! [`STUCK_AFTER`] is *suspect*: the caller steers new connections around it.
//! Under load a busy worker's queue often fails to shrink between two looks
//! (connections arrive as fast as it takes them), so suspicion alone moves
//! nothing: with no new arrivals, a worker that accepts shrinks its queue at
//! the next look and the slot rejoins at once. A suspect queue that still
//! has not shrunk after [`CONFIRM_AFTER`] is *stuck*: its worker is busy with
//! long requests, or hung, and the caller moves what waits there where it
//! can. A stuck slot rejoins as [`Rejoin`] says: after [`STUCK_RETRY`] (if
//! its worker is still not accepting, it is found stuck again), or once its
//! worker has taken everything that waited there.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use procluster::listeners::saturation::{
//!     CONFIRM_AFTER, Change, QueueWatch, Rejoin, STUCK_AFTER,
//! };
//!
//! let mut watch = QueueWatch::new(Rejoin::WhenDrained);
//! let t0 = Instant::now();
//! // Three connections wait in slot 1 and nobody takes them.
//! assert_eq!(watch.observe(1, 3, t0, true), None);
//! let t1 = t0 + STUCK_AFTER;
//! assert_eq!(watch.observe(1, 3, t1, true), Some(Change::Avoid(1)));
//! assert!(watch.is_avoided(1) && !watch.is_stuck(1));
//! assert_eq!(watch.observe(1, 3, t1 + CONFIRM_AFTER, true), Some(Change::Stuck(1)));
//! assert!(watch.is_stuck(1));
//! // Its worker took them: it gets new connections again.
//! let t2 = t1 + 2 * CONFIRM_AFTER;
//! assert_eq!(watch.observe(1, 0, t2, true), Some(Change::Retry(1)));
//! assert!(!watch.is_avoided(1));
//! ```

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// How often a reuseport group's queues are looked at.
pub const QUEUE_POLL: Duration = Duration::from_millis(10);
/// A queue that has not shrunk for this long belongs to a worker that is
/// not accepting.
pub const STUCK_AFTER: Duration = Duration::from_millis(20);
/// A suspect slot (steered around, so nothing new arrives there) whose
/// queue has not shrunk for this long is stuck.
pub const CONFIRM_AFTER: Duration = Duration::from_millis(20);
/// A stuck slot gets another chance after this long.
pub const STUCK_RETRY: Duration = Duration::from_millis(100);

/// When a stuck slot gets new connections again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejoin {
    /// After [`STUCK_RETRY`], whatever its queue (the caller moves what
    /// waits there, so the queue says nothing).
    AfterRetry,
    /// Once its queue is empty: its worker took what waited there, so it
    /// accepts again (for callers that cannot move queued connections).
    WhenDrained,
}

/// What an observation changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change<S> {
    /// The slot's queue stopped shrinking: steer new connections around it
    /// while the next looks tell whether its worker still accepts.
    Avoid(S),
    /// The slot's worker stopped accepting: steer around it and move what
    /// waits there where possible.
    Stuck(S),
    /// The slot gets new connections again.
    Retry(S),
}

/// The queues of one reuseport group's slots, as last seen.
#[derive(Debug, Clone)]
pub struct QueueWatch<S> {
    /// Non-empty queues: their length and since when it has not shrunk.
    backlogs: BTreeMap<S, (u32, Instant)>,
    /// Suspect slots: their queue's length and since when.
    suspects: BTreeMap<S, (u32, Instant)>,
    /// Stuck slots, since when.
    stuck: BTreeMap<S, Instant>,
    rejoin: Rejoin,
}

impl<S: Ord + Copy> QueueWatch<S> {
    /// Nothing seen yet; stuck slots rejoin as `rejoin` says.
    pub fn new(rejoin: Rejoin) -> Self {
        Self {
            backlogs: BTreeMap::new(),
            suspects: BTreeMap::new(),
            stuck: BTreeMap::new(),
            rejoin,
        }
    }

    /// `slot`'s queue holds `waiting` connections at `now`. A slot is only
    /// found stuck when `others_accepting` (another slot has a worker that
    /// could take its connections).
    pub fn observe(
        &mut self,
        slot: S,
        waiting: u32,
        now: Instant,
        others_accepting: bool,
    ) -> Option<Change<S>> {
        if let Some(since) = self.stuck.get(&slot) {
            let rejoins = match self.rejoin {
                Rejoin::AfterRetry => now.saturating_duration_since(*since) >= STUCK_RETRY,
                Rejoin::WhenDrained => waiting == 0,
            };
            if !rejoins {
                return None;
            }
            self.forget(slot);
            return Some(Change::Retry(slot));
        }
        if let Some((len, since)) = self.suspects.get_mut(&slot) {
            if waiting < *len {
                // Its worker took some: it accepts.
                self.forget(slot);
                return Some(Change::Retry(slot));
            }
            *len = waiting;
            if now.saturating_duration_since(*since) < CONFIRM_AFTER {
                return None;
            }
            self.suspects.remove(&slot);
            self.stuck.insert(slot, now);
            return Some(Change::Stuck(slot));
        }
        if waiting == 0 {
            self.backlogs.remove(&slot);
            return None;
        }
        let (len, since) = self.backlogs.entry(slot).or_insert((waiting, now));
        if waiting < *len {
            *len = waiting;
            *since = now;
            return None;
        }
        *len = waiting;
        if now.saturating_duration_since(*since) < STUCK_AFTER || !others_accepting {
            return None;
        }
        self.backlogs.remove(&slot);
        self.suspects.insert(slot, (waiting, now));
        Some(Change::Avoid(slot))
    }

    /// Whether `slot` is stuck: its worker was found not accepting.
    pub fn is_stuck(&self, slot: S) -> bool {
        self.stuck.contains_key(&slot)
    }

    /// Whether new connections should go around `slot`: it is suspect or
    /// stuck.
    pub fn is_avoided(&self, slot: S) -> bool {
        self.stuck.contains_key(&slot) || self.suspects.contains_key(&slot)
    }

    /// The stuck slots.
    pub fn stuck(&self) -> impl Iterator<Item = S> + '_ {
        self.stuck.keys().copied()
    }

    /// Forgets what was seen of `slot` (its worker changed, or it closed).
    pub fn forget(&mut self, slot: S) {
        self.stuck.remove(&slot);
        self.suspects.remove(&slot);
        self.backlogs.remove(&slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_queue_that_shrinks_is_never_avoided() {
        let mut watch = QueueWatch::new(Rejoin::AfterRetry);
        let t0 = Instant::now();
        for (i, len) in [9, 8, 8, 7, 5, 5, 2, 0, 4].into_iter().enumerate() {
            assert_eq!(watch.observe(0, len, t0 + ms(10 * i as u64), true), None);
        }
    }

    #[test]
    fn a_busy_queue_that_shrinks_once_avoided_rejoins_at_once() {
        let mut watch = QueueWatch::new(Rejoin::AfterRetry);
        let t0 = Instant::now();
        watch.observe(0, 5, t0, true);
        watch.observe(0, 6, t0 + ms(10), true);
        assert_eq!(
            watch.observe(0, 7, t0 + ms(20), true),
            Some(Change::Avoid(0))
        );
        assert!(watch.is_avoided(0));
        assert!(!watch.is_stuck(0), "nothing is moved on suspicion alone");
        assert_eq!(
            watch.observe(0, 4, t0 + ms(30), true),
            Some(Change::Retry(0))
        );
        assert!(!watch.is_avoided(0));
        assert_eq!(watch.stuck().count(), 0);
    }

    #[test]
    fn a_queue_that_stays_is_stuck_then_retried_then_stuck_again() {
        let mut watch = QueueWatch::new(Rejoin::AfterRetry);
        let t0 = Instant::now();
        assert_eq!(watch.observe(2, 1, t0, true), None);
        assert_eq!(watch.observe(2, 4, t0 + ms(10), true), None);
        assert_eq!(
            watch.observe(2, 4, t0 + ms(20), true),
            Some(Change::Avoid(2))
        );
        assert_eq!(watch.observe(2, 4, t0 + ms(30), true), None);
        assert_eq!(
            watch.observe(2, 4, t0 + ms(40), true),
            Some(Change::Stuck(2))
        );
        assert_eq!(watch.stuck().collect::<Vec<_>>(), [2]);
        assert_eq!(watch.observe(2, 4, t0 + ms(80), true), None);
        assert_eq!(
            watch.observe(2, 4, t0 + ms(140), true),
            Some(Change::Retry(2))
        );
        assert!(!watch.is_avoided(2));
        assert_eq!(watch.observe(2, 4, t0 + ms(150), true), None);
        assert_eq!(
            watch.observe(2, 5, t0 + ms(170), true),
            Some(Change::Avoid(2))
        );
        assert_eq!(
            watch.observe(2, 5, t0 + ms(190), true),
            Some(Change::Stuck(2))
        );
    }

    #[test]
    fn without_another_accepting_slot_nothing_is_avoided() {
        let mut watch = QueueWatch::new(Rejoin::AfterRetry);
        let t0 = Instant::now();
        watch.observe(0, 3, t0, false);
        assert_eq!(watch.observe(0, 3, t0 + ms(500), false), None);
        assert_eq!(
            watch.observe(0, 3, t0 + ms(510), true),
            Some(Change::Avoid(0))
        );
    }

    #[test]
    fn a_slot_that_cannot_be_emptied_by_others_rejoins_once_drained() {
        let mut watch = QueueWatch::new(Rejoin::WhenDrained);
        let t0 = Instant::now();
        watch.observe(0, 2, t0, true);
        assert_eq!(
            watch.observe(0, 2, t0 + ms(20), true),
            Some(Change::Avoid(0))
        );
        assert_eq!(
            watch.observe(0, 2, t0 + ms(40), true),
            Some(Change::Stuck(0))
        );
        assert_eq!(
            watch.observe(0, 2, t0 + ms(500), true),
            None,
            "still waiting"
        );
        assert_eq!(watch.observe(0, 1, t0 + ms(510), true), None);
        assert_eq!(
            watch.observe(0, 0, t0 + ms(520), true),
            Some(Change::Retry(0))
        );
    }

    #[test]
    fn forgetting_a_slot_starts_it_afresh() {
        let mut watch = QueueWatch::new(Rejoin::AfterRetry);
        let t0 = Instant::now();
        watch.observe(1, 3, t0, true);
        watch.observe(1, 3, t0 + ms(30), true);
        watch.observe(1, 3, t0 + ms(60), true);
        assert!(watch.is_stuck(1));
        watch.forget(1);
        assert!(!watch.is_avoided(1));
        assert_eq!(watch.observe(1, 3, t0 + ms(70), true), None);
    }
}
