//! The store's state, without IO: keys, values, expiry and limits. Every
//! operation is applied here, one at a time, under the primary's lock, and
//! returns its outcome and the change it made (for watchers).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::StoreConfig;
use super::wire::{ChangeKind, Failure, Op, Outcome};
use crate::protocol::Format;

/// One key's value.
#[derive(Debug, Clone)]
struct Entry {
    value: Bytes,
    expires: Option<Instant>,
}

/// A change made by an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Change {
    pub(crate) key: String,
    pub(crate) kind: ChangeKind,
    pub(crate) value: Option<Bytes>,
    /// The store's revision after the change: one more per change.
    pub(crate) revision: u64,
}

pub(crate) struct Core {
    /// Whether changes are recorded (someone watches).
    recording: bool,
    entries: HashMap<String, Entry>,
    /// Keys with a deadline, in deadline order.
    deadlines: BTreeSet<(Instant, String)>,
    /// Bytes of keys and values held.
    bytes: usize,
    revision: u64,
    format: Format,
    config: StoreConfig,
}

/// Bytes a key and its value count for.
fn weight(key: &str, value: &[u8]) -> usize {
    key.len() + value.len()
}

impl Core {
    pub(crate) fn new(config: StoreConfig) -> Self {
        Self {
            recording: true,
            entries: HashMap::new(),
            deadlines: BTreeSet::new(),
            bytes: 0,
            revision: 0,
            format: Format::default(),
            config,
        }
    }

    /// Whether changes are recorded for watches; with none, they need not
    /// be (the revision counts on).
    pub(crate) fn set_recording(&mut self, on: bool) {
        self.recording = on;
    }

    pub(crate) fn set_format(&mut self, format: Format) {
        self.format = format;
    }

    pub(crate) fn format(&self) -> Format {
        self.format
    }

    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// The earliest deadline of a key.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.first().map(|(at, _)| *at)
    }

    /// Applies one operation at `now`; `changes` receives what it changed
    /// (expiries it found on the way included).
    pub(crate) fn apply(
        &mut self,
        op: Op,
        now: Instant,
        changes: &mut Vec<Change>,
    ) -> Result<Outcome, Failure> {
        let key = op.key().to_string();
        self.check_key(&key)?;
        self.expire_key(&key, now, changes);
        match op {
            Op::Get { .. } => Ok(Outcome::Value(self.value(&key))),
            Op::Set { value, ttl_ms, .. } => {
                let expires = ttl_ms.map(|ms| now + Duration::from_millis(ms));
                self.put(key, value.into(), expires, changes)?;
                Ok(Outcome::Done)
            }
            Op::Delete { .. } => Ok(Outcome::Deleted(self.remove(
                &key,
                ChangeKind::Deleted,
                changes,
            ))),
            Op::Incr { by, .. } => {
                let current = match self.entries.get(&key) {
                    None => 0,
                    Some(entry) => crate::message::decode::<i64>(self.format, &entry.value)
                        .map_err(|_| Failure::NotANumber { key: key.clone() })?,
                };
                let next = current
                    .checked_add(by)
                    .ok_or_else(|| Failure::Overflow { key: key.clone() })?;
                let mut value = Vec::new();
                crate::message::encode_into(self.format, &next, &mut value)
                    .map_err(|e| Failure::Invalid(e.to_string()))?;
                let expires = self.entries.get(&key).and_then(|e| e.expires);
                self.put(key, Bytes::from(value), expires, changes)?;
                Ok(Outcome::Number(next))
            }
            Op::Cas { expected, new, .. } => {
                let current = self.entries.get(&key).map(|e| &e.value[..]);
                if current != expected.as_ref().map(|b| &b.0[..]) {
                    return Ok(Outcome::Swapped(false));
                }
                match new {
                    Some(value) => self.put(key, value.into(), None, changes)?,
                    None => {
                        self.remove(&key, ChangeKind::Deleted, changes);
                    }
                }
                Ok(Outcome::Swapped(true))
            }
            Op::GetOrInsert { value, .. } => {
                if let Some(current) = self.value(&key) {
                    return Ok(Outcome::Value(Some(current)));
                }
                let value: Bytes = value.into();
                self.put(key, value.clone(), None, changes)?;
                Ok(Outcome::Value(Some(value.into())))
            }
        }
    }

    fn value(&self, key: &str) -> Option<super::wire::Blob> {
        self.entries.get(key).map(|e| e.value.clone().into())
    }

    fn check_key(&self, key: &str) -> Result<(), Failure> {
        if key.is_empty() || key.len() > self.config.max_key {
            return Err(Failure::Invalid(format!(
                "a key must have 1 to {} bytes, not {}",
                self.config.max_key,
                key.len()
            )));
        }
        Ok(())
    }

    /// Sets a key, within the limits.
    fn put(
        &mut self,
        key: String,
        value: Bytes,
        expires: Option<Instant>,
        changes: &mut Vec<Change>,
    ) -> Result<(), Failure> {
        if value.len() > self.config.max_value {
            return Err(Failure::Full(format!(
                "a value of {} bytes is over the store's limit of {} bytes per value",
                value.len(),
                self.config.max_value
            )));
        }
        let old = self.entries.get(&key);
        let old_weight = old.map_or(0, |e| weight(&key, &e.value));
        if old.is_none() && self.entries.len() >= self.config.max_keys {
            return Err(Failure::Full(format!(
                "the store holds {} keys, its limit (StoreConfig::max_keys)",
                self.entries.len()
            )));
        }
        let bytes = self.bytes - old_weight + weight(&key, &value);
        if bytes > self.config.max_bytes {
            return Err(Failure::Full(format!(
                "the store would hold {bytes} bytes, over its limit of {} (StoreConfig::max_bytes)",
                self.config.max_bytes
            )));
        }
        if let Some(at) = old.and_then(|e| e.expires) {
            self.deadlines.remove(&(at, key.clone()));
        }
        if let Some(at) = expires {
            self.deadlines.insert((at, key.clone()));
        }
        self.bytes = bytes;
        self.revision += 1;
        if self.recording {
            changes.push(Change {
                key: key.clone(),
                kind: ChangeKind::Set,
                value: Some(value.clone()),
                revision: self.revision,
            });
        }
        self.entries.insert(key, Entry { value, expires });
        Ok(())
    }

    fn remove(&mut self, key: &str, kind: ChangeKind, changes: &mut Vec<Change>) -> bool {
        let Some(entry) = self.entries.remove(key) else {
            return false;
        };
        if let Some(at) = entry.expires {
            self.deadlines.remove(&(at, key.to_string()));
        }
        self.bytes -= weight(key, &entry.value);
        self.revision += 1;
        if !self.recording {
            return true;
        }
        changes.push(Change {
            key: key.to_string(),
            kind,
            value: None,
            revision: self.revision,
        });
        true
    }

    fn expire_key(&mut self, key: &str, now: Instant, changes: &mut Vec<Change>) {
        if self
            .entries
            .get(key)
            .and_then(|e| e.expires)
            .is_some_and(|at| at <= now)
        {
            self.remove(key, ChangeKind::Expired, changes);
        }
    }

    /// Removes every key whose deadline has passed.
    pub(crate) fn expire_due(&mut self, now: Instant, changes: &mut Vec<Change>) {
        while let Some((at, key)) = self.deadlines.first().cloned() {
            if at > now {
                break;
            }
            self.remove(&key, ChangeKind::Expired, changes);
        }
    }

    /// Every key, its value and the time it has left, for a snapshot.
    pub(crate) fn dump(&self, now: Instant) -> Vec<(String, Bytes, Option<Duration>)> {
        self.entries
            .iter()
            .filter(|(_, e)| e.expires.is_none_or(|at| at > now))
            .map(|(k, e)| {
                (
                    k.clone(),
                    e.value.clone(),
                    e.expires.map(|at| at.saturating_duration_since(now)),
                )
            })
            .collect()
    }

    /// Loads a snapshot's entries.
    pub(crate) fn load(
        &mut self,
        entries: Vec<(String, Bytes, Option<Duration>)>,
        now: Instant,
    ) -> Result<(), Failure> {
        let mut changes = Vec::new();
        for (key, value, left) in entries {
            self.check_key(&key)?;
            self.put(key, value, left.map(|d| now + d), &mut changes)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::wire::Blob;
    use super::*;

    fn core() -> Core {
        Core::new(StoreConfig::default())
    }

    fn json(value: &impl serde::Serialize) -> Blob {
        Blob(serde_json::to_vec(value).unwrap())
    }

    fn run(core: &mut Core, op: Op) -> Result<Outcome, Failure> {
        core.apply(op, Instant::now(), &mut Vec::new())
    }

    fn set(key: &str, value: Blob, ttl_ms: Option<u64>) -> Op {
        Op::Set {
            key: key.into(),
            value,
            ttl_ms,
        }
    }

    #[test]
    fn set_get_delete() {
        let mut core = core();
        assert_eq!(
            run(&mut core, Op::Get { key: "a".into() }),
            Ok(Outcome::Value(None))
        );
        run(&mut core, set("a", json(&1), None)).unwrap();
        assert_eq!(
            run(&mut core, Op::Get { key: "a".into() }),
            Ok(Outcome::Value(Some(json(&1))))
        );
        assert_eq!(
            run(&mut core, Op::Delete { key: "a".into() }),
            Ok(Outcome::Deleted(true))
        );
        assert_eq!(
            run(&mut core, Op::Delete { key: "a".into() }),
            Ok(Outcome::Deleted(false))
        );
        assert_eq!((core.len(), core.bytes()), (0, 0));
    }

    #[test]
    fn increments_start_at_zero_and_refuse_what_is_not_a_number() {
        let mut core = core();
        let incr = |by| Op::Incr {
            key: "n".into(),
            by,
        };
        assert_eq!(run(&mut core, incr(5)), Ok(Outcome::Number(5)));
        assert_eq!(run(&mut core, incr(-2)), Ok(Outcome::Number(3)));
        run(&mut core, set("n", json(&"text"), None)).unwrap();
        assert!(matches!(
            run(&mut core, incr(1)),
            Err(Failure::NotANumber { .. })
        ));
        run(&mut core, set("n", json(&i64::MAX), None)).unwrap();
        assert!(matches!(
            run(&mut core, incr(1)),
            Err(Failure::Overflow { .. })
        ));
    }

    #[test]
    fn compare_and_swap_swaps_only_on_a_match() {
        let mut core = core();
        let cas = |expected: Option<Blob>, new: Option<Blob>| Op::Cas {
            key: "k".into(),
            expected,
            new,
        };
        assert_eq!(
            run(&mut core, cas(None, Some(json(&1)))),
            Ok(Outcome::Swapped(true))
        );
        assert_eq!(
            run(&mut core, cas(None, Some(json(&2)))),
            Ok(Outcome::Swapped(false))
        );
        assert_eq!(
            run(&mut core, cas(Some(json(&1)), Some(json(&2)))),
            Ok(Outcome::Swapped(true))
        );
        assert_eq!(
            run(&mut core, cas(Some(json(&2)), None)),
            Ok(Outcome::Swapped(true))
        );
        assert_eq!(core.len(), 0);
    }

    #[test]
    fn get_or_insert_keeps_the_first_value() {
        let mut core = core();
        let goi = |v| Op::GetOrInsert {
            key: "k".into(),
            value: json(&v),
        };
        assert_eq!(run(&mut core, goi(1)), Ok(Outcome::Value(Some(json(&1)))));
        assert_eq!(run(&mut core, goi(2)), Ok(Outcome::Value(Some(json(&1)))));
    }

    #[test]
    fn keys_expire_at_their_deadline_and_say_so() {
        let mut core = core();
        let start = Instant::now();
        let mut changes = Vec::new();
        core.apply(set("t", json(&1), Some(100)), start, &mut changes)
            .unwrap();
        assert_eq!(
            core.next_deadline(),
            Some(start + Duration::from_millis(100))
        );
        core.expire_due(start + Duration::from_millis(99), &mut changes);
        assert_eq!(core.len(), 1);
        core.expire_due(start + Duration::from_millis(100), &mut changes);
        assert_eq!(core.len(), 0);
        let kinds: Vec<_> = changes.iter().map(|c| (c.kind, c.revision)).collect();
        assert_eq!(kinds, [(ChangeKind::Set, 1), (ChangeKind::Expired, 2)]);
        assert_eq!(core.next_deadline(), None);
        // Found expired by a read before the timer came.
        core.apply(set("t", json(&1), Some(10)), start, &mut changes)
            .unwrap();
        let late = start + Duration::from_millis(11);
        assert_eq!(
            core.apply(Op::Get { key: "t".into() }, late, &mut changes),
            Ok(Outcome::Value(None))
        );
    }

    #[test]
    fn limits_are_clear_errors_and_change_nothing() {
        let mut core = Core::new(StoreConfig {
            max_keys: 2,
            max_bytes: 20,
            ..StoreConfig::default()
        });
        run(&mut core, set("a", json(&1), None)).unwrap();
        run(&mut core, set("b", json(&2), None)).unwrap();
        let Err(Failure::Full(why)) = run(&mut core, set("c", json(&3), None)) else {
            panic!()
        };
        assert!(why.contains("max_keys"), "{why}");
        let Err(Failure::Full(why)) = run(&mut core, set("a", json(&"x".repeat(30)), None)) else {
            panic!()
        };
        assert!(why.contains("max_bytes"), "{why}");
        assert_eq!(
            run(&mut core, Op::Get { key: "a".into() }),
            Ok(Outcome::Value(Some(json(&1))))
        );
        assert!(run(&mut core, Op::Get { key: String::new() }).is_err());
    }
}
