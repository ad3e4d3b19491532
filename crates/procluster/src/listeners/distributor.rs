//! Which worker gets each connection the primary accepted: the round-robin
//! policy, and the draining of a reuseport slot that has no worker.
//!
//! Pure bookkeeping, no IO: the caller accepts connections, offers them, and
//! passes a `send` function to [`Distributor::dispatch`]. The distributor
//! keeps each connection until the worker that got it acknowledges taking
//! it, so a worker that refuses it or dies first costs nothing: the
//! connection goes to another worker. A connection can also be pinned to
//! one worker (sticky sessions): it waits for that worker's credit, and if
//! the worker goes, it comes back to the caller instead of going to another.

use std::collections::{HashMap, VecDeque};

use crate::WorkerId;

/// How workers are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// A worker takes a connection only while its application waits in
    /// `accept()` (it grants credit); round-robin among those that do.
    Credit,
    /// Round-robin among all workers, no credit needed (draining).
    Push,
}

/// In push mode, connections one worker may hold unacknowledged: a worker
/// that stopped reading its channel cannot collect connections (and the
/// primary's descriptors) without bound.
const PUSH_WINDOW: usize = 64;

/// Most connections handed to one worker in one message (one descriptor
/// each). A worker's credit rarely allows more; fewer descriptors per
/// message also leave a worker near its descriptor limit more room.
pub(crate) const MAX_BATCH: usize = 16;

/// How many connections fit in one message under a frame limit of
/// `max_frame` bytes (an entry takes at most 32 bytes encoded: a sequence
/// number and an IPv6 address with its port; the rest of the message 16).
pub(crate) fn batch_for_frame_limit(max_frame: usize) -> usize {
    (max_frame.saturating_sub(16) / 32).clamp(1, MAX_BATCH)
}

#[derive(Debug)]
struct Target {
    worker: WorkerId,
    credit: usize,
    /// Connections handed to it and not yet acknowledged.
    unacked: usize,
}

/// Connections waiting for a worker, and connections handed out but not yet
/// acknowledged.
#[derive(Debug)]
pub(crate) struct Distributor<C> {
    mode: Mode,
    targets: Vec<Target>,
    cursor: usize,
    queue: VecDeque<C>,
    /// Connections that only their worker may take.
    pinned: HashMap<WorkerId, VecDeque<C>>,
    /// Pinned connections whose worker went away, for the caller.
    orphans: Vec<C>,
    /// Handed out: to whom, the connection, whether it was pinned.
    in_flight: HashMap<u64, (WorkerId, C, bool)>,
    next_seq: u64,
    max_batch: usize,
}

impl<C> Distributor<C> {
    pub(crate) fn new(mode: Mode) -> Self {
        Self {
            mode,
            targets: Vec::new(),
            cursor: 0,
            queue: VecDeque::new(),
            pinned: HashMap::new(),
            orphans: Vec::new(),
            in_flight: HashMap::new(),
            next_seq: 1,
            max_batch: MAX_BATCH,
        }
    }

    /// At most `n` connections per message (at least one).
    pub(crate) fn with_max_batch(mut self, n: usize) -> Self {
        self.max_batch = n.clamp(1, MAX_BATCH);
        self
    }

    /// Connections accepted but not handed to any worker yet.
    pub(crate) fn queued(&self) -> usize {
        self.queue.len() + self.pinned.values().map(VecDeque::len).sum::<usize>()
    }

    /// Connections handed out and not yet acknowledged.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    pub(crate) fn has_targets(&self) -> bool {
        !self.targets.is_empty()
    }

    pub(crate) fn add_target(&mut self, worker: WorkerId) {
        if !self.targets.iter().any(|t| t.worker == worker) {
            self.targets.push(Target {
                worker,
                credit: 0,
                unacked: 0,
            });
        }
    }

    /// Forgets a worker; what it held unacknowledged goes back to the front
    /// of the queue, in order, except connections pinned to it, which wait
    /// for [`take_orphans`](Self::take_orphans) with those still queued for it.
    pub(crate) fn remove_target(&mut self, worker: WorkerId) {
        self.targets.retain(|t| t.worker != worker);
        let mut returned: Vec<(u64, C, bool)> = Vec::new();
        let seqs: Vec<u64> = self
            .in_flight
            .iter()
            .filter(|(_, (w, _, _))| *w == worker)
            .map(|(s, _)| *s)
            .collect();
        for seq in seqs {
            if let Some((_, conn, pinned)) = self.in_flight.remove(&seq) {
                returned.push((seq, conn, pinned));
            }
        }
        returned.sort_by_key(|(seq, _, _)| *seq);
        let mut orphans = Vec::new();
        for (_, conn, pinned) in returned.into_iter().rev() {
            if pinned {
                orphans.push(conn);
            } else {
                self.queue.push_front(conn);
            }
        }
        orphans.reverse();
        self.orphans.extend(orphans);
        if let Some(queued) = self.pinned.remove(&worker) {
            self.orphans.extend(queued);
        }
    }

    /// A connection only `worker` may take; it waits for that worker's
    /// credit.
    pub(crate) fn offer_to(&mut self, worker: WorkerId, conn: C) {
        self.pinned.entry(worker).or_default().push_back(conn);
    }

    /// Pinned connections whose worker went away (see
    /// [`remove_target`](Self::remove_target)), oldest first.
    pub(crate) fn take_orphans(&mut self) -> Vec<C> {
        std::mem::take(&mut self.orphans)
    }

    /// The worker's application waits for `n` more connections.
    pub(crate) fn credit(&mut self, worker: WorkerId, n: usize) {
        if let Some(target) = self.targets.iter_mut().find(|t| t.worker == worker) {
            target.credit = target.credit.saturating_add(n);
        }
    }

    /// A newly accepted connection.
    pub(crate) fn offer(&mut self, conn: C) {
        self.queue.push_back(conn);
    }

    /// The worker's answer for connection `seq`. Returns the connection when
    /// it was taken, so the caller can close its own copy.
    pub(crate) fn ack(&mut self, worker: WorkerId, seq: u64, accepted: bool) -> Option<C> {
        match self.in_flight.get(&seq) {
            Some((holder, _, _)) if *holder == worker => {}
            _ => return None,
        }
        let (_, conn, pinned) = self.in_flight.remove(&seq)?;
        if let Some(target) = self.targets.iter_mut().find(|t| t.worker == worker) {
            target.unacked = target.unacked.saturating_sub(1);
        }
        if accepted {
            Some(conn)
        } else {
            // Refused (its listener closed): next worker, and no credit for
            // this one until it asks again.
            if let Some(target) = self.targets.iter_mut().find(|t| t.worker == worker) {
                target.credit = 0;
            }
            if pinned {
                self.pinned.entry(worker).or_default().push_front(conn);
            } else {
                self.queue.push_front(conn);
            }
            None
        }
    }

    /// Hands queued connections to workers that can take them, in
    /// round-robin order, calling `send(worker, batch)` once per worker with
    /// every connection it got this time (at most `max_batch` per call),
    /// each with its sequence number. A `false` from `send` means that
    /// worker's channel is gone: it is removed and its connections go
    /// elsewhere.
    pub(crate) fn dispatch(&mut self, mut send: impl FnMut(WorkerId, &[(u64, &C)]) -> bool) {
        loop {
            let mut batches: Vec<(WorkerId, Vec<u64>)> = Vec::new();
            self.assign_pinned(&mut batches);
            while !self.queue.is_empty() {
                let Some(index) = self.next_target() else {
                    break;
                };
                let conn = self.queue.pop_front().expect("queue checked non-empty");
                let seq = self.next_seq;
                self.next_seq += 1;
                let target = &mut self.targets[index];
                if self.mode == Mode::Credit {
                    target.credit -= 1;
                }
                target.unacked += 1;
                let worker = target.worker;
                self.in_flight.insert(seq, (worker, conn, false));
                add_to_batches(&mut batches, worker, seq, self.max_batch);
            }
            let mut failed: Vec<WorkerId> = Vec::new();
            for (worker, seqs) in &batches {
                if failed.contains(worker) {
                    continue;
                }
                let batch: Vec<(u64, &C)> = seqs
                    .iter()
                    .filter_map(|seq| self.in_flight.get(seq).map(|(_, conn, _)| (*seq, conn)))
                    .collect();
                if !send(*worker, &batch) {
                    failed.push(*worker);
                }
            }
            if failed.is_empty() {
                return;
            }
            // Their connections return to the queue, in order, for the others.
            for worker in failed {
                self.remove_target(worker);
            }
        }
    }

    /// Hands each target the connections pinned to it, as far as it can
    /// take them.
    fn assign_pinned(&mut self, batches: &mut Vec<(WorkerId, Vec<u64>)>) {
        if self.pinned.is_empty() {
            return;
        }
        for target in &mut self.targets {
            let Some(queue) = self.pinned.get_mut(&target.worker) else {
                continue;
            };
            while !queue.is_empty() {
                let can_take = match self.mode {
                    Mode::Push => target.unacked < PUSH_WINDOW,
                    Mode::Credit => target.credit > 0,
                };
                if !can_take {
                    break;
                }
                let Some(conn) = queue.pop_front() else {
                    break;
                };
                let seq = self.next_seq;
                self.next_seq += 1;
                if self.mode == Mode::Credit {
                    target.credit -= 1;
                }
                target.unacked += 1;
                self.in_flight.insert(seq, (target.worker, conn, true));
                add_to_batches(batches, target.worker, seq, self.max_batch);
            }
        }
        self.pinned.retain(|_, queue| !queue.is_empty());
    }

    /// The next worker in round-robin order that can take a connection.
    fn next_target(&mut self) -> Option<usize> {
        let n = self.targets.len();
        for step in 0..n {
            let index = (self.cursor + step) % n;
            let target = &self.targets[index];
            let can_take = match self.mode {
                Mode::Push => target.unacked < PUSH_WINDOW,
                Mode::Credit => target.credit > 0,
            };
            if can_take {
                self.cursor = (index + 1) % n;
                return Some(index);
            }
        }
        None
    }

    /// Everything still held: queued and in flight (to close it).
    pub(crate) fn drain_all(&mut self) -> Vec<C> {
        let mut all: Vec<C> = self.queue.drain(..).collect();
        all.extend(self.pinned.drain().flat_map(|(_, queue)| queue));
        all.append(&mut self.orphans);
        all.extend(self.in_flight.drain().map(|(_, (_, c, _))| c));
        all
    }
}

/// Adds `seq` to `worker`'s batch, or starts another one when it is full.
fn add_to_batches(batches: &mut Vec<(WorkerId, Vec<u64>)>, worker: WorkerId, seq: u64, max: usize) {
    match batches
        .iter_mut()
        .find(|(w, seqs)| *w == worker && seqs.len() < max)
    {
        Some((_, seqs)) => seqs.push(seq),
        None => batches.push((worker, vec![seq])),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hand_out(d: &mut Distributor<u32>) -> Vec<(u32, u64, u32)> {
        let mut sent = Vec::new();
        d.dispatch(|w, batch| {
            sent.extend(batch.iter().map(|(seq, c)| (w.get(), *seq, **c)));
            true
        });
        // In the order they were assigned.
        sent.sort_by_key(|s| s.1);
        sent
    }

    #[test]
    fn credit_decides_who_gets_what() {
        let mut d = Distributor::new(Mode::Credit);
        d.add_target(WorkerId::new(1));
        d.add_target(WorkerId::new(2));
        d.credit(WorkerId::new(1), 1);
        d.credit(WorkerId::new(2), 9);
        for c in 0..10 {
            d.offer(c);
        }
        let sent = hand_out(&mut d);
        assert_eq!(sent.iter().filter(|s| s.0 == 1).count(), 1);
        assert_eq!(sent.iter().filter(|s| s.0 == 2).count(), 9);
        assert_eq!(d.queued(), 0);
    }

    #[test]
    fn without_credit_connections_wait_and_nothing_spins() {
        let mut d = Distributor::new(Mode::Credit);
        d.add_target(WorkerId::new(1));
        d.offer(7);
        assert!(hand_out(&mut d).is_empty());
        assert_eq!(d.queued(), 1);
        d.credit(WorkerId::new(1), 1);
        assert_eq!(hand_out(&mut d), vec![(1, 1, 7)]);
    }

    #[test]
    fn a_worker_that_dies_before_acknowledging_loses_nothing() {
        let mut d = Distributor::new(Mode::Push);
        d.add_target(WorkerId::new(1));
        d.add_target(WorkerId::new(2));
        for c in 0..4 {
            d.offer(c);
        }
        let sent = hand_out(&mut d);
        assert_eq!(sent.iter().map(|s| s.0).collect::<Vec<_>>(), [1, 2, 1, 2]);
        d.ack(WorkerId::new(2), 2, true);
        d.remove_target(WorkerId::new(1));
        let again = hand_out(&mut d);
        assert_eq!(
            again.iter().map(|s| (s.0, s.2)).collect::<Vec<_>>(),
            [(2, 0), (2, 2)]
        );
    }

    #[test]
    fn a_refused_connection_goes_to_another_worker() {
        let mut d = Distributor::new(Mode::Credit);
        d.add_target(WorkerId::new(1));
        d.add_target(WorkerId::new(2));
        d.credit(WorkerId::new(1), 1);
        d.offer(5);
        let sent = hand_out(&mut d);
        assert_eq!(sent[0].0, 1);
        assert!(d.ack(WorkerId::new(1), sent[0].1, false).is_none());
        d.credit(WorkerId::new(2), 1);
        assert_eq!(hand_out(&mut d)[0], (2, 2, 5));
        assert_eq!(d.ack(WorkerId::new(2), 2, true), Some(5));
        assert_eq!(d.in_flight(), 0);
    }

    #[test]
    fn a_failed_send_removes_the_worker_and_keeps_the_connection() {
        let mut d = Distributor::new(Mode::Push);
        d.add_target(WorkerId::new(1));
        d.add_target(WorkerId::new(2));
        d.offer(9);
        let mut sent = Vec::new();
        d.dispatch(|w, batch| {
            if w == 1 {
                return false;
            }
            sent.extend(batch.iter().map(|(_, c)| (w.get(), **c)));
            true
        });
        assert_eq!(sent, [(2, 9)]);
        assert!(d.targets.iter().all(|t| t.worker == 2));
    }

    #[test]
    fn a_worker_that_never_acknowledges_stops_getting_pushed_connections() {
        let mut d = Distributor::new(Mode::Push);
        d.add_target(WorkerId::new(1));
        d.add_target(WorkerId::new(2));
        for c in 0..(PUSH_WINDOW as u32 * 3) {
            d.offer(c);
        }
        let sent = hand_out(&mut d);
        let to_1 = sent.iter().filter(|s| s.0 == 1).count();
        assert_eq!(to_1, PUSH_WINDOW);
        assert_eq!(d.queued(), PUSH_WINDOW);
        // Worker 2 takes its share; the rest go to it, not to the deaf one.
        for (w, seq, _) in sent.iter().filter(|s| s.0 == 2) {
            d.ack(WorkerId::new(*w), *seq, true);
        }
        let more = hand_out(&mut d);
        assert!(more.iter().all(|s| s.0 == 2));
        assert_eq!(d.queued(), 0);
    }

    #[test]
    fn each_worker_gets_its_share_in_one_message_of_bounded_size() {
        let mut d = Distributor::new(Mode::Push);
        d.add_target(WorkerId::new(1));
        d.add_target(WorkerId::new(2));
        let total = MAX_BATCH + 10;
        for c in 0..total as u32 {
            d.offer(c);
        }
        let mut calls = Vec::new();
        d.dispatch(|w, batch| {
            calls.push((w.get(), batch.len()));
            true
        });
        // Round-robin: half each, and each half fits in one message.
        assert_eq!(calls, [(1, total / 2), (2, total / 2)]);
        let mut d = Distributor::new(Mode::Credit);
        d.add_target(WorkerId::new(1));
        d.credit(WorkerId::new(1), MAX_BATCH + 1);
        for c in 0..(MAX_BATCH + 1) as u32 {
            d.offer(c);
        }
        let mut sizes = Vec::new();
        d.dispatch(|_, batch| {
            sizes.push(batch.len());
            true
        });
        assert_eq!(sizes, [MAX_BATCH, 1]);
    }

    #[test]
    fn the_largest_connections_message_fits_the_size_bound() {
        use crate::protocol::{Control, HandedConnection};
        for n in [1, MAX_BATCH] {
            let control = Control::Connections {
                key: u32::MAX,
                handed: vec![
                    HandedConnection {
                        seq: u64::MAX,
                        peer: Some(
                            "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535"
                                .parse()
                                .unwrap()
                        ),
                    };
                    n
                ],
            };
            assert!(control.encode().len() <= 16 + 32 * n, "{n} entries");
        }
    }

    #[test]
    fn a_small_frame_limit_makes_smaller_messages() {
        assert_eq!(batch_for_frame_limit(1 << 20), MAX_BATCH);
        assert_eq!(batch_for_frame_limit(16 + 32 * 3), 3);
        assert_eq!(batch_for_frame_limit(0), 1);
        let mut d = Distributor::new(Mode::Push).with_max_batch(3);
        d.add_target(WorkerId::new(1));
        for c in 0..7 {
            d.offer(c);
        }
        let mut sizes = Vec::new();
        d.dispatch(|_, batch| {
            sizes.push(batch.len());
            true
        });
        assert_eq!(sizes, [3, 3, 1]);
    }

    #[test]
    fn acks_from_the_wrong_worker_are_ignored() {
        let mut d = Distributor::new(Mode::Push);
        d.add_target(WorkerId::new(1));
        d.offer(1);
        hand_out(&mut d);
        assert!(d.ack(WorkerId::new(2), 1, true).is_none());
        assert_eq!(d.in_flight(), 1);
    }

    #[test]
    fn a_pinned_connection_waits_for_its_worker_and_no_other() {
        let mut d = Distributor::new(Mode::Credit);
        d.add_target(WorkerId::new(1));
        d.add_target(WorkerId::new(2));
        d.credit(WorkerId::new(2), 5);
        d.offer_to(WorkerId::new(1), 10);
        d.offer_to(WorkerId::new(1), 11);
        assert!(hand_out(&mut d).is_empty(), "worker 1 has no credit");
        assert_eq!(d.queued(), 2);
        d.credit(WorkerId::new(1), 1);
        let sent = hand_out(&mut d);
        assert_eq!(sent, [(1, 1, 10)]);
        // Refused: back to the front of worker 1's line.
        d.ack(WorkerId::new(1), 1, false);
        d.credit(WorkerId::new(1), 1);
        assert_eq!(hand_out(&mut d), [(1, 2, 10)]);
        // Worker 1 goes: its connections come back to the caller.
        d.remove_target(WorkerId::new(1));
        assert_eq!(d.take_orphans(), [10, 11]);
        assert_eq!((d.queued(), d.in_flight()), (0, 0));
    }
}
