//! Which slots a listener's keys are hashed over, and who holds each: a
//! slot with a worker, or one waiting (for at most a bounded time) for its
//! next worker. No IO: the caller says what time it is.

use std::collections::BTreeMap;
use std::time::Instant;

use super::SlotId;
use super::rendezvous;

/// A slot's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place<W> {
    /// Its worker takes the slot's keys.
    Held(W),
    /// No worker now; its keys wait until then for the next one.
    Waiting(Instant),
}

/// Where a key goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route<W> {
    /// To this slot's worker.
    Worker(SlotId, W),
    /// This slot's keys wait for its next worker.
    Wait(SlotId),
    /// No slot at all.
    Nowhere,
}

/// The slots of one sticky listener.
#[derive(Debug, Clone)]
pub(crate) struct SlotTable<W> {
    slots: BTreeMap<SlotId, Place<W>>,
}

impl<W> Default for SlotTable<W> {
    fn default() -> Self {
        Self {
            slots: BTreeMap::new(),
        }
    }
}

impl<W: Copy + Eq> SlotTable<W> {
    /// `worker` holds `slot` now.
    pub(crate) fn held(&mut self, slot: SlotId, worker: W) {
        self.slots.insert(slot, Place::Held(worker));
    }

    /// `worker` left `slot`: its keys wait for the next worker until
    /// `until`. Nothing changes if another worker holds the slot.
    pub(crate) fn vacated(&mut self, slot: SlotId, worker: W, until: Instant) {
        if self.slots.get(&slot) == Some(&Place::Held(worker)) {
            self.slots.insert(slot, Place::Waiting(until));
        }
    }

    /// A worker is on its way to `slot`: until `until`, its keys wait for
    /// it (a slot already known is left as it is).
    pub(crate) fn expect(&mut self, slot: SlotId, until: Instant) {
        self.slots.entry(slot).or_insert(Place::Waiting(until));
    }

    /// `slot` is gone for good (the cluster scaled down), or its worker
    /// left it for good: its keys go to the other slots at once.
    pub(crate) fn remove(&mut self, slot: SlotId) {
        self.slots.remove(&slot);
    }

    /// Waiting slots whose time is up at `now` leave the table; returns
    /// them.
    pub(crate) fn expire(&mut self, now: Instant) -> Vec<SlotId> {
        let expired: Vec<SlotId> = self
            .slots
            .iter()
            .filter(|(_, place)| matches!(place, Place::Waiting(until) if *until <= now))
            .map(|(slot, _)| *slot)
            .collect();
        for slot in &expired {
            self.slots.remove(slot);
        }
        expired
    }

    /// The earliest time a waiting slot gives up.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.slots
            .values()
            .filter_map(|place| match place {
                Place::Waiting(until) => Some(*until),
                Place::Held(_) => None,
            })
            .min()
    }

    /// The worker holding `slot`.
    pub(crate) fn worker(&self, slot: SlotId) -> Option<W> {
        match self.slots.get(&slot)? {
            Place::Held(worker) => Some(*worker),
            Place::Waiting(_) => None,
        }
    }

    /// Every slot keys are hashed over (held or waiting), ascending.
    pub(crate) fn slots(&self) -> impl Iterator<Item = SlotId> + '_ {
        self.slots.keys().copied()
    }

    /// Where `key` goes: the slot a token names if the table has it,
    /// otherwise the slot that weighs most for the key. With `held_only`,
    /// waiting slots are passed over (their waiting room is full).
    pub(crate) fn route(&self, key: u32, token: Option<SlotId>, held_only: bool) -> Route<W> {
        let eligible =
            |slot: &SlotId| !held_only || matches!(self.slots.get(slot), Some(Place::Held(_)));
        let slot = token
            .filter(|slot| self.slots.contains_key(slot) && eligible(slot))
            .or_else(|| rendezvous::choose(key, self.slots.keys().copied().filter(eligible)));
        match slot {
            None => Route::Nowhere,
            Some(slot) => match self.slots[&slot] {
                Place::Held(worker) => Route::Worker(slot, worker),
                Place::Waiting(_) => Route::Wait(slot),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn key_of(table: &SlotTable<u32>, slot: SlotId) -> u32 {
        (0..)
            .find(|k| matches!(table.route(*k, None, false), Route::Worker(s, _) if s == slot))
            .unwrap()
    }

    #[test]
    fn a_vacated_slot_keeps_its_keys_until_its_wait_is_over() {
        let t0 = Instant::now();
        let mut table = SlotTable::default();
        for slot in 0..3 {
            table.held(slot, 10 + slot as u32);
        }
        let key = key_of(&table, 1);
        table.vacated(1, 11, t0 + Duration::from_secs(2));
        assert_eq!(table.route(key, None, false), Route::Wait(1));
        assert!(matches!(table.route(key, None, true), Route::Worker(s, _) if s != 1));
        assert!(table.expire(t0 + Duration::from_secs(1)).is_empty());
        // Its next worker: the keys are back.
        table.held(1, 21);
        assert_eq!(table.route(key, None, false), Route::Worker(1, 21));
        // A worker that left does not vacate its successor's slot.
        table.vacated(1, 11, t0);
        assert_eq!(table.worker(1), Some(21));
        table.vacated(1, 21, t0 + Duration::from_secs(2));
        assert_eq!(table.next_deadline(), Some(t0 + Duration::from_secs(2)));
        assert_eq!(table.expire(t0 + Duration::from_secs(2)), [1]);
        assert!(matches!(table.route(key, None, false), Route::Worker(s, _) if s != 1));
    }

    #[test]
    fn tokens_go_to_their_slot_while_it_exists() {
        let mut table = SlotTable::default();
        table.held(0, 1u32);
        table.held(1, 2u32);
        for key in 0..50 {
            assert_eq!(table.route(key, Some(1), false), Route::Worker(1, 2));
        }
        assert!(matches!(table.route(5, Some(7), false), Route::Worker(..)));
        table.expect(2, Instant::now());
        assert_eq!(table.route(0, Some(2), false), Route::Wait(2));
        assert_eq!(
            SlotTable::<u32>::default().route(1, None, false),
            Route::Nowhere
        );
    }
}
