//! Bounded delivery from the primary to many subscribers: the bus's
//! subscriptions and the store's watches.
//!
//! Each subscriber has an [`Outlet`] in the primary: a queue bounded in
//! messages and bytes, with a policy for when it is full ([`Overflow`]), and
//! credit: the subscriber's side accepts at most [`WINDOW`] messages it has
//! not read, and gives credit back as its application reads them. So a
//! subscriber that never reads holds at most its queue in the primary and
//! its window in its own process, and pushing to it never waits: a
//! publisher is never held up by a slow subscriber, and other subscribers
//! never notice it.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use crate::ChannelError;
use crate::Error;
use crate::primary::{ServiceContext, WorkerHandle};
use crate::protocol::Format;
use crate::sync::lock;

/// Messages a subscriber's side holds unread before the primary waits for
/// credit; credit goes back in halves of it.
pub(crate) const WINDOW: u32 = 1024;

/// What happens when a subscriber's queue in the primary is full (it reads
/// more slowly than messages arrive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Overflow {
    /// Drop the oldest queued message to make room, and count it: the
    /// subscriber sees the newest messages, with a gap it can measure
    /// (`dropped()` on the subscription). The default.
    #[default]
    DropOldest,
    /// End the subscription: its stream ends after the messages already
    /// delivered, and reports that it overflowed. For subscribers that must
    /// see every message or none (they resubscribe and resynchronise).
    Disconnect,
}

/// How much a subscriber's queue in the primary may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Messages queued at most (default 8192).
    pub capacity: u32,
    /// Bytes queued at most (default 16 MiB).
    pub max_bytes: u64,
    /// The policy when either limit is reached.
    pub overflow: Overflow,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            capacity: 8192,
            max_bytes: 16 * 1024 * 1024,
            overflow: Overflow::DropOldest,
        }
    }
}

impl Limits {
    /// The same limits with a capacity of `messages`.
    pub fn capacity(mut self, messages: u32) -> Self {
        self.capacity = messages.max(1);
        self
    }

    /// The same limits with a byte limit of `bytes`.
    pub fn max_bytes(mut self, bytes: u64) -> Self {
        self.max_bytes = bytes.max(1);
        self
    }

    /// The same limits with `overflow` as the policy.
    pub fn overflow(mut self, overflow: Overflow) -> Self {
        self.overflow = overflow;
        self
    }

    /// The limits a worker asked for, within what the primary allows.
    pub(crate) fn clamped(self, most: Limits) -> Self {
        Self {
            capacity: self.capacity.clamp(1, most.capacity),
            max_bytes: self.max_bytes.clamp(1, most.max_bytes),
            overflow: self.overflow,
        }
    }
}

/// Where an outlet's messages go.
pub(crate) enum Sink {
    /// A worker's side of a service, over its channel.
    Worker {
        context: ServiceContext,
        worker: WorkerHandle,
    },
    /// A reader in this process.
    Local(mpsc::UnboundedSender<Bytes>),
}

/// One subscriber's bounded queue in the primary.
pub(crate) struct Outlet {
    state: Mutex<State>,
    sink: Sink,
    limits: Limits,
    /// Sent to a worker when its subscription ends by overflow.
    closed_frame: Bytes,
}

struct State {
    queue: VecDeque<Bytes>,
    bytes: usize,
    /// Messages the sink may still take before it gives credit back.
    credit: u32,
    dropped: u64,
    closed: bool,
    /// A task is sending queued messages to a worker whose channel was full;
    /// nothing else sends meanwhile, so order is kept.
    pumping: bool,
}

/// What happened to a pushed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Queued or sent.
    Accepted,
    /// The subscription is closed (now, by overflow, or before).
    Closed,
}

impl Outlet {
    pub(crate) fn new(sink: Sink, limits: Limits, closed_frame: Bytes) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                bytes: 0,
                credit: WINDOW,
                dropped: 0,
                closed: false,
                pumping: false,
            }),
            sink,
            limits,
            closed_frame,
        })
    }

    /// The outlet's limits.
    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    /// Messages dropped so far by [`Overflow::DropOldest`].
    pub(crate) fn dropped(&self) -> u64 {
        lock(&self.state).dropped
    }

    /// Whether the outlet is closed (by overflow, or its subscriber left).
    pub(crate) fn is_closed(&self) -> bool {
        lock(&self.state).closed
    }

    /// Messages waiting in the queue.
    pub(crate) fn queued(&self) -> usize {
        lock(&self.state).queue.len()
    }

    /// Queues `item` (the whole frame body for the sink) and sends what
    /// credit allows. Never waits.
    pub(crate) fn push(self: &Arc<Self>, item: Bytes) -> Pushed {
        let mut state = lock(&self.state);
        if state.closed {
            return Pushed::Closed;
        }
        let len = item.len();
        let full = |s: &State| {
            s.queue.len() >= self.limits.capacity as usize
                || (s.bytes + len) as u64 > self.limits.max_bytes
        };
        if full(&state) {
            match self.limits.overflow {
                Overflow::DropOldest => {
                    while full(&state) {
                        let Some(oldest) = state.queue.pop_front() else {
                            break;
                        };
                        state.bytes -= oldest.len();
                        state.dropped += 1;
                    }
                    if len as u64 > self.limits.max_bytes {
                        // Larger than the whole queue may ever hold.
                        state.dropped += 1;
                        return Pushed::Accepted;
                    }
                }
                Overflow::Disconnect => {
                    drop(state);
                    self.close_overflowed();
                    return Pushed::Closed;
                }
            }
        }
        state.bytes += len;
        state.queue.push_back(item);
        self.send_ready(state);
        Pushed::Accepted
    }

    /// The subscriber read `n` more messages.
    pub(crate) fn add_credit(self: &Arc<Self>, n: u32) {
        let mut state = lock(&self.state);
        state.credit = state.credit.saturating_add(n).min(WINDOW);
        self.send_ready(state);
    }

    /// Ends the outlet without telling the subscriber (it asked, or left).
    pub(crate) fn close(&self) {
        let mut state = lock(&self.state);
        state.closed = true;
        state.queue.clear();
        state.bytes = 0;
    }

    fn close_overflowed(self: &Arc<Self>) {
        self.close();
        match &self.sink {
            Sink::Local(tx) => {
                let _ = tx.send(self.closed_frame.clone());
            }
            Sink::Worker { context, worker } => {
                let frame = self.closed_frame.clone();
                if let Err(Error::Channel(ChannelError::Full)) =
                    context.try_send(worker, Format::Binary, &frame, Vec::new())
                {
                    let (context, worker) = (context.clone(), worker.clone());
                    tokio::spawn(async move {
                        let _ = context
                            .send(&worker, Format::Binary, &frame, Vec::new())
                            .await;
                    });
                }
            }
        }
    }

    /// Sends queued messages while there is credit, in order; hands the rest
    /// to a task when the worker's channel is full.
    fn send_ready(self: &Arc<Self>, mut state: std::sync::MutexGuard<'_, State>) {
        if state.pumping {
            return;
        }
        while state.credit > 0 {
            let Some(item) = state.queue.pop_front() else {
                return;
            };
            match &self.sink {
                Sink::Local(tx) => {
                    if tx.send(item.clone()).is_err() {
                        state.closed = true;
                        state.queue.clear();
                        return;
                    }
                }
                Sink::Worker { context, worker } => {
                    match context.try_send(worker, Format::Binary, &item, Vec::new()) {
                        Ok(()) => {}
                        Err(Error::Channel(ChannelError::Full)) => {
                            state.queue.push_front(item);
                            state.pumping = true;
                            drop(state);
                            tokio::spawn(self.clone().pump());
                            return;
                        }
                        Err(_) => {
                            // The worker is gone; its service hears of it.
                            state.closed = true;
                            state.queue.clear();
                            state.bytes = 0;
                            return;
                        }
                    }
                }
            }
            state.bytes -= item.len();
            state.credit -= 1;
        }
    }

    /// Sends to a worker whose channel was full, waiting for room, until the
    /// queue or the credit runs out.
    async fn pump(self: Arc<Self>) {
        let Sink::Worker { context, worker } = &self.sink else {
            return;
        };
        loop {
            let item = {
                let mut state = lock(&self.state);
                match (state.credit > 0)
                    .then(|| state.queue.pop_front())
                    .flatten()
                {
                    Some(item) if !state.closed => {
                        state.bytes -= item.len();
                        state.credit -= 1;
                        item
                    }
                    _ => {
                        state.pumping = false;
                        return;
                    }
                }
            };
            if context
                .send(worker, Format::Binary, &item, Vec::new())
                .await
                .is_err()
            {
                self.close();
                lock(&self.state).pumping = false;
                return;
            }
        }
    }
}

/// A subscriber's side of the credit: counts what its application reads and
/// says when to give credit back.
#[derive(Debug, Default)]
pub(crate) struct Credit {
    read: u32,
}

impl Credit {
    /// One more message read; `Some(n)` when `n` credits should go back.
    pub(crate) fn read_one(&mut self) -> Option<u32> {
        self.read += 1;
        (self.read >= WINDOW / 2).then(|| std::mem::take(&mut self.read))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local(limits: Limits) -> (Arc<Outlet>, mpsc::UnboundedReceiver<Bytes>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Outlet::new(Sink::Local(tx), limits, Bytes::from_static(b"closed")),
            rx,
        )
    }

    fn item(n: u32) -> Bytes {
        Bytes::from(n.to_le_bytes().to_vec())
    }

    fn drain(rx: &mut mpsc::UnboundedReceiver<Bytes>) -> Vec<Bytes> {
        let mut out = Vec::new();
        while let Ok(b) = rx.try_recv() {
            out.push(b);
        }
        out
    }

    #[test]
    fn messages_within_credit_go_straight_through_in_order() {
        let (outlet, mut rx) = local(Limits::default());
        for n in 0..10 {
            assert_eq!(outlet.push(item(n)), Pushed::Accepted);
        }
        assert_eq!(drain(&mut rx), (0..10).map(item).collect::<Vec<_>>());
        assert_eq!(outlet.queued(), 0);
    }

    #[test]
    fn past_the_window_messages_wait_for_credit() {
        let (outlet, mut rx) = local(Limits::default());
        for n in 0..WINDOW + 5 {
            outlet.push(item(n));
        }
        assert_eq!(drain(&mut rx).len(), WINDOW as usize);
        assert_eq!(outlet.queued(), 5);
        outlet.add_credit(3);
        assert_eq!(
            drain(&mut rx),
            (WINDOW..WINDOW + 3).map(item).collect::<Vec<_>>()
        );
        assert_eq!(outlet.queued(), 2);
    }

    #[test]
    fn a_full_queue_drops_its_oldest_and_counts_them() {
        let (outlet, mut rx) = local(Limits::default().capacity(4));
        for n in 0..WINDOW + 10 {
            outlet.push(item(n));
        }
        assert_eq!(outlet.queued(), 4);
        assert_eq!(outlet.dropped(), 6);
        drain(&mut rx);
        outlet.add_credit(WINDOW);
        let rest = drain(&mut rx);
        assert_eq!(
            rest,
            (WINDOW + 6..WINDOW + 10).map(item).collect::<Vec<_>>()
        );
    }

    #[test]
    fn the_byte_limit_counts_too() {
        let (outlet, _rx) = local(Limits::default().max_bytes(8));
        // Take all credit so everything queues.
        lock(&outlet.state).credit = 0;
        for n in 0..5 {
            outlet.push(item(n));
        }
        assert_eq!(outlet.queued(), 2, "two 4-byte items fit in 8 bytes");
        assert_eq!(outlet.dropped(), 3);
    }

    #[test]
    fn the_disconnect_policy_ends_the_subscription_and_says_so() {
        let (outlet, mut rx) = local(Limits::default().capacity(2).overflow(Overflow::Disconnect));
        lock(&outlet.state).credit = 0;
        assert_eq!(outlet.push(item(0)), Pushed::Accepted);
        assert_eq!(outlet.push(item(1)), Pushed::Accepted);
        assert_eq!(outlet.push(item(2)), Pushed::Closed);
        assert_eq!(drain(&mut rx), vec![Bytes::from_static(b"closed")]);
        assert_eq!(outlet.push(item(3)), Pushed::Closed);
        assert_eq!(outlet.queued(), 0);
    }

    #[test]
    fn credit_goes_back_in_halves_of_the_window() {
        let mut credit = Credit::default();
        let given: u32 = (0..WINDOW * 2).filter_map(|_| credit.read_one()).sum();
        assert_eq!(given, WINDOW * 2);
    }
}
