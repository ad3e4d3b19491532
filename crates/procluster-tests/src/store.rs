//! The test worker's `store` mode: it opens the cluster's store and does
//! what the primary's [`StoreCommand`]s ask, reporting with
//! [`StoreReply`]s.

use std::sync::Arc;
use std::time::Duration;

use procluster::store::{ChangeKind, Store};
use procluster::worker::Worker;
use serde::{Deserialize, Serialize};

/// What the test primary asks of a worker in `store` mode.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum StoreCommand {
    /// Increment `key` by 1, `times` times, with up to `in_flight`
    /// increments outstanding at once; report `Incremented`.
    Incr {
        key: String,
        times: u64,
        in_flight: usize,
    },
    /// Increment `key` by 1 `times` times with compare-and-swap loops;
    /// report `Swapped` with the number of failed swaps.
    CasIncr { key: String, times: u64 },
    /// Set `key` to `value`, with a time to live in ms; report `Done`.
    Set {
        key: String,
        value: i64,
        ttl_ms: Option<u64>,
    },
    /// Report `Value` with the value of `key`.
    Get { key: String },
    /// Report `Value` with what `get_or_insert(key, value)` returned.
    GetOrInsert { key: String, value: i64 },
    /// Watch keys under `prefix`; report `Watching`, then `Changes` once
    /// `expect` changes arrived.
    Watch { prefix: String, expect: usize },
}

/// What a worker in `store` mode reports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum StoreReply {
    Incremented(u64),
    Swapped {
        failed: u64,
    },
    Done(Result<(), String>),
    Value(Result<Option<i64>, String>),
    Watching,
    Changes(Vec<Seen>),
    /// Still at it (every 2000 operations), so that a test's deadline
    /// measures progress, not the whole run.
    Progress(u64),
}

/// One change as a watch saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    pub key: String,
    pub kind: String,
    pub value: Option<i64>,
    pub revision: u64,
}

impl Seen {
    /// Sums up a change.
    pub fn of(change: &procluster::store::Change) -> Self {
        Self {
            key: change.key().to_string(),
            kind: match change.kind() {
                ChangeKind::Set => "set",
                ChangeKind::Deleted => "deleted",
                ChangeKind::Expired => "expired",
                _ => "other",
            }
            .to_string(),
            value: change.value::<i64>().ok().flatten(),
            revision: change.revision(),
        }
    }
}

/// The worker's side: one task per command.
pub async fn worker_main(worker: Worker) {
    let store = Store::open(&worker).await.expect("open the store");
    let shutdown = worker.shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            message = worker.recv() => {
                let Some(message) = message else { break };
                let command: StoreCommand = message.decode().expect("a store command");
                tokio::spawn(run(worker.clone(), store.clone(), command));
            }
        }
    }
}

async fn run(worker: Worker, store: Store, command: StoreCommand) {
    let reply = match command {
        StoreCommand::Incr {
            key,
            times,
            in_flight,
        } => {
            let slots = Arc::new(tokio::sync::Semaphore::new(in_flight.max(1)));
            let mut tasks = tokio::task::JoinSet::new();
            for done in 0..times {
                if done > 0 && done % 2000 == 0 {
                    worker
                        .send(&StoreReply::Progress(done))
                        .await
                        .expect("report");
                }
                let slot = slots.clone().acquire_owned().await.expect("semaphore");
                let (store, key) = (store.clone(), key.clone());
                tasks.spawn(async move {
                    store.incr(&key, 1).await.expect("incr");
                    drop(slot);
                });
            }
            while tasks.join_next().await.is_some() {}
            StoreReply::Incremented(times)
        }
        StoreCommand::CasIncr { key, times } => {
            let mut failed = 0;
            for done in 0..times {
                if done > 0 && done % 200 == 0 {
                    worker
                        .send(&StoreReply::Progress(done))
                        .await
                        .expect("report");
                }
                loop {
                    let current: Option<i64> = store.get(&key).await.expect("get");
                    let next = current.unwrap_or(0) + 1;
                    if store
                        .compare_and_swap(&key, current.as_ref(), Some(&next))
                        .await
                        .expect("cas")
                    {
                        break;
                    }
                    failed += 1;
                }
            }
            StoreReply::Swapped { failed }
        }
        StoreCommand::Set { key, value, ttl_ms } => StoreReply::Done(
            store
                .set_with(&key, &value, ttl_ms.map(Duration::from_millis))
                .await
                .map_err(|e| e.to_string()),
        ),
        StoreCommand::Get { key } => {
            StoreReply::Value(store.get(&key).await.map_err(|e| e.to_string()))
        }
        StoreCommand::GetOrInsert { key, value } => StoreReply::Value(
            store
                .get_or_insert(&key, &value)
                .await
                .map(Some)
                .map_err(|e| e.to_string()),
        ),
        StoreCommand::Watch { prefix, expect } => {
            let mut watch = store.watch_prefix(&prefix).await.expect("watch");
            worker.send(&StoreReply::Watching).await.expect("report");
            let mut seen = Vec::new();
            while seen.len() < expect {
                let Some(change) = watch.next().await else {
                    break;
                };
                seen.push(Seen::of(&change));
            }
            StoreReply::Changes(seen)
        }
    };
    worker.send(&reply).await.expect("report");
}
