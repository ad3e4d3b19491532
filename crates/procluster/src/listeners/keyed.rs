//! The primary's side of sticky sessions: reading each connection's key by
//! peeking at what the client sent (nothing is consumed), and the slots a
//! listener's keys are hashed over, with the connections waiting for a
//! slot's next worker.
//!
//! A connection whose key is not there yet waits on the event loop
//! (edge-triggered: it is looked at again only when more bytes arrive) for
//! at most the key timeout; each look peeks from the first byte into a
//! buffer shared by the thread, so a waiting connection holds no buffer.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::Semaphore;

use super::distributor::Distributor;
use crate::WorkerId;
use crate::sticky::head::{self, Found};
use crate::sticky::rendezvous;
use crate::sticky::table::{Route, SlotTable};
use crate::sticky::{SlotId, StickyKey, StickyOptions, slot_of_token};

/// A connection's routing key: the hash of its key, and the slot its value
/// names if it is a sticky token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct RoutingKey {
    pub(crate) hash: u32,
    pub(crate) token: Option<SlotId>,
}

/// What a look at a connection found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Peeked {
    /// Its key.
    Key(RoutingKey),
    /// It has no key: route it by its address.
    Fallback,
    /// Not yet: look again when more bytes arrive.
    More,
}

/// The routing key of the client's address: of its prefix for an address
/// key, of the whole address for the fallback of other keys.
pub(crate) fn address_key(key: &StickyKey, peer: Option<SocketAddr>) -> RoutingKey {
    let (v4, v6) = match key {
        StickyKey::Address {
            v4_prefix,
            v6_prefix,
        } => (*v4_prefix, *v6_prefix),
        _ => (32, 128),
    };
    RoutingKey {
        hash: peer.map_or(0, |peer| rendezvous::address_key(peer.ip(), v4, v6)),
        token: None,
    }
}

thread_local! {
    static PEEK_BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Peeks at what `socket`'s client sent so far (up to `max_head` bytes) and
/// looks for `key` in it.
pub(crate) fn peek(socket: BorrowedFd<'_>, key: &StickyKey, max_head: usize) -> Peeked {
    use rustix::net::RecvFlags;
    PEEK_BUFFER.with_borrow_mut(|buffer| {
        let max_head = max_head.max(1);
        if buffer.len() < max_head {
            buffer.resize(max_head, 0);
        }
        let window = &mut buffer[..max_head];
        let received = loop {
            match rustix::net::recv(socket, &mut *window, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
                Err(rustix::io::Errno::INTR) => {}
                other => break other,
            }
        };
        match received {
            // The client closed without a word.
            Ok((0, _)) => Peeked::Fallback,
            Ok((n, _)) => {
                let full = n >= max_head;
                match head::find(&window[..n], key, full) {
                    Found::Key(value) => Peeked::Key(RoutingKey {
                        hash: rendezvous::text_key(value),
                        token: slot_of_token(value),
                    }),
                    Found::Never => Peeked::Fallback,
                    Found::Incomplete => Peeked::More,
                }
            }
            Err(rustix::io::Errno::AGAIN) => Peeked::More,
            // Reset: the worker will see it too.
            Err(_) => Peeked::Fallback,
        }
    })
}

/// Waits, on the event loop, for the key of a connection whose client has
/// not sent it yet, until `deadline`. Returns the connection and its key,
/// or `None` for the key when it should be routed by its address.
pub(crate) async fn read_key(
    socket: OwnedFd,
    key: StickyKey,
    max_head: usize,
    deadline: Instant,
) -> (Option<OwnedFd>, Option<RoutingKey>) {
    let watched = match crate::sys::async_fd(socket, tokio::io::Interest::READABLE) {
        Ok(watched) => watched,
        Err(error) => {
            tracing::warn!(%error, "cannot wait for a connection's sticky key; it is closed");
            return (None, None);
        }
    };
    let looked = tokio::time::timeout_at(deadline.into(), async {
        loop {
            let Ok(mut ready) = watched.readable().await else {
                return None;
            };
            match peek(watched.get_ref().as_fd(), &key, max_head) {
                Peeked::Key(found) => return Some(found),
                Peeked::Fallback => return None,
                Peeked::More => ready.clear_ready(),
            }
        }
    })
    .await;
    (Some(watched.into_inner()), looked.ok().flatten())
}

/// A connection that knows its routing key.
pub(crate) trait HasKey {
    fn routing_key(&self) -> RoutingKey;
}

/// A sticky listener's routing: its key, the slots it hashes over, and the
/// connections waiting for a slot's next worker.
pub(crate) struct Keyed<C> {
    pub(crate) key: StickyKey,
    pub(crate) options: StickyOptions,
    table: SlotTable<WorkerId>,
    /// The slot of each worker holding the listener.
    slots: BTreeMap<WorkerId, SlotId>,
    /// Connections waiting for a slot's next worker.
    parked: BTreeMap<SlotId, Vec<C>>,
    parked_count: usize,
    /// Connections that arrived while the listener had no slot at all.
    homeless: Vec<C>,
    /// Connections whose key is being read.
    pub(crate) pending: Arc<Semaphore>,
}

impl<C: HasKey> Keyed<C> {
    pub(crate) fn new(key: StickyKey, options: StickyOptions) -> Self {
        Self {
            key,
            options,
            table: SlotTable::default(),
            slots: BTreeMap::new(),
            parked: BTreeMap::new(),
            parked_count: 0,
            homeless: Vec::new(),
            pending: Arc::new(Semaphore::new(
                options.max_pending.clamp(1, Semaphore::MAX_PERMITS),
            )),
        }
    }

    /// The slot `worker` holds.
    pub(crate) fn slot_of(&self, worker: WorkerId) -> Option<SlotId> {
        self.slots.get(&worker).copied()
    }

    /// Whether keys are hashed over `slot` (it has a worker or waits for
    /// one).
    pub(crate) fn has_slot(&self, slot: SlotId) -> bool {
        self.table.slots().any(|s| s == slot)
    }

    /// The slots keys are hashed over, ascending.
    pub(crate) fn slots(&self) -> impl Iterator<Item = SlotId> + '_ {
        self.table.slots()
    }

    /// Connections held here, not in the distributor.
    pub(crate) fn held(&self) -> usize {
        self.parked_count + self.homeless.len()
    }

    /// A worker is on its way to `slot`: its keys wait for it until
    /// `until`.
    pub(crate) fn expect(&mut self, slot: SlotId, until: Instant) {
        self.table.expect(slot, until);
    }

    /// Sends `conn` where its key goes: to its slot's worker (through the
    /// distributor, which keeps it for that worker only), or into the
    /// waiting room of its slot.
    pub(crate) fn place(&mut self, conn: C, distributor: &mut Distributor<C>) {
        let key = conn.routing_key();
        let room_full = self.parked_count >= self.options.max_pending;
        match self.table.route(key.hash, key.token, room_full) {
            Route::Worker(_, worker) => distributor.offer_to(worker, conn),
            Route::Wait(slot) => {
                self.parked.entry(slot).or_default().push(conn);
                self.parked_count += 1;
            }
            Route::Nowhere => self.homeless.push(conn),
        }
    }

    /// `worker` holds the listener for `slot`: the slot's waiting
    /// connections (and those that had nowhere to go) are its now.
    pub(crate) fn joined(
        &mut self,
        worker: WorkerId,
        slot: SlotId,
        distributor: &mut Distributor<C>,
    ) {
        self.slots.insert(worker, slot);
        self.table.held(slot, worker);
        distributor.add_target(worker);
        let waiting = self.parked.remove(&slot).unwrap_or_default();
        self.parked_count -= waiting.len();
        for conn in waiting {
            distributor.offer_to(worker, conn);
        }
        for conn in std::mem::take(&mut self.homeless) {
            self.place(conn, distributor);
        }
    }

    /// `worker` left the listener. Its slot's keys, and the connections it
    /// had not taken, wait for the slot's next worker until `until`; when
    /// the slot is `retired`, they go to the other slots at once.
    pub(crate) fn left(
        &mut self,
        worker: WorkerId,
        retired: bool,
        until: Instant,
        distributor: &mut Distributor<C>,
    ) {
        let Some(slot) = self.slots.remove(&worker) else {
            return;
        };
        distributor.remove_target(worker);
        if retired {
            self.table.remove(slot);
        } else {
            self.table.vacated(slot, worker, until);
        }
        for conn in distributor.take_orphans() {
            self.place(conn, distributor);
        }
        if retired {
            self.reroute(slot, distributor);
        }
    }

    /// Slot `slot` is gone for good: unless a worker holds it (then it
    /// goes when that worker leaves), its keys go elsewhere now.
    pub(crate) fn retire(&mut self, slot: SlotId, distributor: &mut Distributor<C>) {
        if self.table.worker(slot).is_none() {
            self.table.remove(slot);
            self.reroute(slot, distributor);
        }
    }

    /// Waiting slots whose time is up give their keys to the others.
    pub(crate) fn expire(&mut self, now: Instant, distributor: &mut Distributor<C>) {
        for slot in self.table.expire(now) {
            tracing::debug!(
                slot,
                "a sticky slot's worker did not come back in time; its keys go to the other slots"
            );
            self.reroute(slot, distributor);
        }
    }

    /// When the next waiting slot gives up.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.table.next_deadline()
    }

    fn reroute(&mut self, slot: SlotId, distributor: &mut Distributor<C>) {
        let waiting = self.parked.remove(&slot).unwrap_or_default();
        self.parked_count -= waiting.len();
        for conn in waiting {
            self.place(conn, distributor);
        }
    }

    /// Everything held here (the listener closes).
    pub(crate) fn drain(&mut self) -> Vec<C> {
        self.parked_count = 0;
        let mut all: Vec<C> = std::mem::take(&mut self.parked)
            .into_values()
            .flatten()
            .collect();
        all.append(&mut self.homeless);
        all
    }
}
