//! The pool over Redis, for primaries on several hosts sharing one pool.
//!
//! The pool's queue is the stream `<prefix>:pool:<name>`, read by the
//! consumer group `primaries` in which every primary is a consumer. A
//! submission is an entry (`XADD`, through a script that first checks the
//! queue's bound: the stream's length less the group's pending entries); a
//! primary reads entries (`XREADGROUP`) only as its workers have room, and
//! runs each on them as a task of its own pool, with the same retries,
//! timeouts and attempts as a pool on the channel. It acks late: one script
//! appends the result to the submitter's result stream
//! (`<prefix>:pool:<name>:results:<submitter>`), acks the entry and deletes
//! it, once the task is finished, and only while the entry is still this
//! primary's. A primary renews its entries' idle time (`XCLAIM ... JUSTID`)
//! four times per [`PoolConfig::reclaim_after`]; another primary takes over
//! the entries of one that stopped doing so (`XAUTOCLAIM`), up to
//! [`PoolConfig::max_reclaims`] times per task. Entries a primary read but
//! cannot run (none of its workers takes tasks any more) go back to the
//! stream as new entries that keep their failed attempts.
//!
//! A submitter reads its result stream from its beginning, so a result
//! appended before it listens is not lost, and delivers each task's outcome
//! once (a second result for a task, from a run that was taken over, finds
//! nobody waiting and is dropped). Cancelling removes an entry nobody read
//! yet and tells the primaries (`PUBLISH` on `<prefix>:pool:<name>:cancel`)
//! so the one running it fires its handler's cancellation token.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::Value;
use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use super::dispatch::{Core, Submitting, Upstream};
use super::error::{Attempt, PoolError};
use super::payload::{Payload, PayloadWriter};
use super::sink::{Outcome, Sink};
use super::stats::{Latency, PoolStats};
use crate::Format;
use crate::redis_link::{connection_config, random_id};
use crate::sync::lock;

/// The consumer group of the primaries.
const GROUP: &str = "primaries";

/// How long a submitter's result stream lives after its last result.
const RESULTS_TTL: Duration = Duration::from_secs(3600);

/// How long a reader blocks on an empty stream before it looks around.
const BLOCK: Duration = Duration::from_millis(100);

/// How often the queue's length is read for the counters.
const COUNT_EVERY: Duration = Duration::from_millis(50);

/// After a Redis error, a loop waits this long before it tries again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How many tasks waiting in the stream (its length less the entries read
/// and not acked); creates the group when it is missing.
const WAITING: &str = r"
local function waiting(stream, group)
  local ok, pending = pcall(redis.call, 'XPENDING', stream, group)
  if not ok then
    redis.call('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
    return redis.call('XLEN', stream)
  end
  local n = redis.call('XLEN', stream) - pending[1]
  if n < 0 then n = 0 end
  return n
end
";

/// KEYS: the stream. ARGV: the group, the bound, the entry's fields.
const SUBMIT: &str = r"
local n = waiting(KEYS[1], ARGV[1])
if n >= tonumber(ARGV[2]) then return {0, n} end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
return {1, id, n + 1}
";

/// KEYS: the stream. ARGV: the group.
const BACKLOG: &str = r"
return waiting(KEYS[1], ARGV[1])
";

/// Whether entry ARGV[3] is pending for consumer ARGV[2] of group ARGV[1].
const OWNED: &str = r"
local function owned(stream, group, consumer, id)
  local p = redis.call('XPENDING', stream, group, id, id, 1)
  return #p > 0 and p[1][2] == consumer
end
";

/// KEYS: the stream, the result stream. ARGV: group, consumer, entry, task
/// number, outcome, result, the result stream's life in ms.
const COMPLETE: &str = r"
if not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
redis.call('XADD', KEYS[2], '*', 'i', ARGV[4], 'o', ARGV[5], 'p', ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
";

/// Acks and deletes an entry of this consumer, first adding it again with
/// the fields that follow, if any. KEYS: the stream. ARGV: group, consumer,
/// entry, fields...
const RELEASE: &str = r"
if not owned(KEYS[1], ARGV[1], ARGV[2], ARGV[3]) then return 0 end
if #ARGV > 3 then redis.call('XADD', KEYS[1], '*', unpack(ARGV, 4)) end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
";

/// Removes an entry nobody read yet, and tells the primaries. KEYS: the
/// stream. ARGV: group, entry, the cancel channel, the message.
const CANCEL: &str = r"
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 then redis.call('XDEL', KEYS[1], ARGV[2]) end
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
";

/// Resets the idle time of this consumer's entries; returns those that are
/// not its own any more. KEYS: the stream. ARGV: group, consumer, entries...
const RENEW: &str = r"
local lost = {}
for i = 3, #ARGV do
  if owned(KEYS[1], ARGV[1], ARGV[2], ARGV[i]) then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
  else
    lost[#lost + 1] = ARGV[i]
  end
end
return lost
";

/// Takes over entries idle for long, with how often each was delivered.
/// KEYS: the stream. ARGV: group, consumer, min idle ms, cursor, count.
const RECLAIM: &str = r"
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5])
local out = {r[1]}
for _, e in ipairs(r[2]) do
  if e and e[2] then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], e[1], e[1], 1)
    local n = 1
    if #p > 0 then n = p[1][4] end
    out[#out + 1] = {e[1], e[2], n}
  end
end
return out
";

struct Scripts {
    submit: redis::Script,
    backlog: redis::Script,
    complete: redis::Script,
    release: redis::Script,
    cancel: redis::Script,
    renew: redis::Script,
    reclaim: redis::Script,
}

impl Scripts {
    fn new() -> Self {
        let with = |head: &str, body: &str| redis::Script::new(&format!("{head}{body}"));
        Self {
            submit: with(WAITING, SUBMIT),
            backlog: with(WAITING, BACKLOG),
            complete: with(OWNED, COMPLETE),
            release: with(OWNED, RELEASE),
            cancel: redis::Script::new(CANCEL),
            renew: with(OWNED, RENEW),
            reclaim: redis::Script::new(RECLAIM),
        }
    }
}

fn backend(error: redis::RedisError) -> PoolError {
    PoolError::Backend(error.to_string())
}

/// The Redis names of one pool.
struct Keys {
    stream: String,
    cancel: String,
    prefix: String,
}

impl Keys {
    fn results(&self, submitter: u64) -> String {
        format!("{}:results:{submitter}", self.prefix)
    }
}

/// One task in the stream, as read.
struct Entry {
    id: String,
    task: Bytes,
    submitter: u64,
    number: u64,
    format: Option<Format>,
    attempts: Vec<Attempt>,
    reclaims: u32,
}

impl Entry {
    fn parse(id: String, fields: &HashMap<String, Value>) -> Option<Self> {
        let bytes = |name: &str| {
            fields
                .get(name)
                .and_then(|v| redis::from_redis_value_ref::<Vec<u8>>(v).ok())
        };
        let number = |name: &str| {
            bytes(name)
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|t| t.parse::<u64>().ok())
        };
        Some(Self {
            task: Bytes::from(bytes("t")?),
            submitter: number("r")?,
            number: number("i")?,
            format: bytes("f")
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|t| t.parse().ok()),
            attempts: bytes("a")
                .and_then(|b| postcard::from_bytes(&b).ok())
                .unwrap_or_default(),
            reclaims: number("c").map_or(0, |n| u32::try_from(n).unwrap_or(u32::MAX)),
            id,
        })
    }
}

/// Work for the writer, in order.
enum Op {
    Complete {
        entry: String,
        results: String,
        number: u64,
        outcome: Vec<u8>,
        result: Bytes,
    },
    /// Ack and delete, adding these fields again as a new entry if any.
    Release {
        entry: String,
        fields: Vec<(&'static str, Bytes)>,
    },
    Cancel {
        entry: String,
        number: u64,
    },
}

/// A submission of this process waiting for its result.
struct Waiter {
    sink: Sink,
    entry: Option<String>,
    submitted: Instant,
}

/// A task this primary read and holds until its outcome is in Redis.
struct Held {
    entry: String,
    submitter: u64,
    number: u64,
    format: Format,
    task: Bytes,
    reclaims: u32,
    /// Its id in the pool here.
    local: Option<u64>,
}

#[derive(Default)]
struct State {
    waiting: HashMap<u64, Waiter>,
    held: HashMap<u64, Held>,
    /// Held tasks by submitter and number, for cancellations.
    by_task: HashMap<(u64, u64), u64>,
    submitted: u64,
    cancelled: u64,
    refused_full: u64,
    reclaimed: u64,
    given_back: u64,
    latency: Latency,
    /// Tasks waiting in the stream, as last read.
    backlog: usize,
}

/// A pool's side in Redis: the upstream of its [`Core`].
pub(super) struct RedisPool {
    core: Weak<Core>,
    keys: Keys,
    consumer: String,
    submitter: u64,
    queue_bound: usize,
    reclaim_after: Duration,
    max_reclaims: u32,
    memfd_threshold: Option<usize>,
    connection: MultiplexedConnection,
    scripts: Arc<Scripts>,
    state: Mutex<State>,
    ops: mpsc::UnboundedSender<Op>,
    /// Told when results arrive here (room may have been made).
    room: Notify,
    next: AtomicU64,
    /// Dropped with the pool: ends its readers.
    alive: watch::Sender<()>,
}

impl RedisPool {
    /// Connects the pool `core` to the Redis server at `url` and starts its
    /// readers.
    pub(super) async fn connect(
        core: &Arc<Core>,
        url: &str,
        prefix: &str,
    ) -> Result<Arc<Self>, PoolError> {
        let client = redis::Client::open(url).map_err(backend)?;
        let config = connection_config();
        let connection = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(backend)?;
        let reader = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(backend)?;
        let results = client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(backend)?;
        let base = format!("{prefix}:pool:{}", core.name);
        let keys = Keys {
            stream: base.clone(),
            cancel: format!("{base}:cancel"),
            prefix: base,
        };
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&keys.stream)
            .arg(GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut connection.clone())
            .await;
        if let Err(error) = created {
            if error.code() != Some("BUSYGROUP") {
                return Err(backend(error));
            }
        }
        let mut pubsub = client.get_async_pubsub().await.map_err(backend)?;
        pubsub.subscribe(&keys.cancel).await.map_err(backend)?;
        let config = core.config();
        let submitter = random_id();
        let (ops, queued) = mpsc::unbounded_channel();
        let (alive, _) = watch::channel(());
        let scripts = Arc::new(Scripts::new());
        let pool = Arc::new(Self {
            core: Arc::downgrade(core),
            consumer: format!("{}-{submitter:016x}", std::process::id()),
            submitter,
            queue_bound: config.queue,
            reclaim_after: config.reclaim_after,
            max_reclaims: config.max_reclaims,
            memfd_threshold: config.memfd_threshold,
            connection: connection.clone(),
            scripts: scripts.clone(),
            state: Mutex::default(),
            ops,
            room: Notify::new(),
            next: AtomicU64::new(1),
            keys,
            alive,
        });
        tokio::spawn(write_loop(
            connection,
            scripts,
            pool.keys.stream.clone(),
            pool.keys.cancel.clone(),
            pool.consumer.clone(),
            queued,
        ));
        tokio::spawn(read_results(
            Arc::downgrade(&pool),
            results,
            pool.keys.results(submitter),
            pool.alive.subscribe(),
        ));
        tokio::spawn(read_cancels(
            Arc::downgrade(&pool),
            pubsub,
            pool.alive.subscribe(),
        ));
        tokio::spawn(read_tasks(Arc::downgrade(&pool), reader));
        Ok(pool)
    }

    async fn add(
        &self,
        task: &[u8],
        format: Format,
        number: u64,
    ) -> Result<Result<String, usize>, PoolError> {
        let reply: Value = self
            .scripts
            .submit
            .key(&self.keys.stream)
            .arg(GROUP)
            .arg(self.queue_bound)
            .arg("t")
            .arg(task)
            .arg("r")
            .arg(self.submitter)
            .arg("i")
            .arg(number)
            .arg("f")
            .arg(format.to_string())
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(backend)?;
        let parts = array(&reply);
        let added = parts.first().and_then(int) == Some(1);
        if added {
            let id = parts.get(1).and_then(text);
            let waiting = parts.get(2).and_then(int).unwrap_or(0);
            lock(&self.state).backlog = usize::try_from(waiting).unwrap_or(0);
            id.map(Ok).ok_or_else(|| {
                PoolError::Backend("Redis answered a submission without an entry id".into())
            })
        } else {
            let waiting = parts.get(1).and_then(int).unwrap_or(0);
            let waiting = usize::try_from(waiting).unwrap_or(0);
            lock(&self.state).backlog = waiting;
            Ok(Err(waiting))
        }
    }

    async fn submit_task(
        &self,
        payload: Payload,
        wait: bool,
        sink: Sink,
    ) -> Result<u64, (PoolError, Sink)> {
        let format = match self.core.upgrade().map(|core| core.format()) {
            Some(Ok(format)) => format,
            Some(Err(error)) => return Err((error, sink)),
            None => return Err((PoolError::Closed("the pool is gone".into()), sink)),
        };
        let task = match payload.bytes() {
            Ok(bytes) => bytes,
            Err(error) => {
                let error =
                    PoolError::Codec(format!("cannot read the task's memory file: {error}"));
                return Err((error, sink));
            }
        };
        let number = self.next.fetch_add(1, Ordering::Relaxed);
        // Waiting before the entry exists: its result may come before the
        // script's answer.
        lock(&self.state).waiting.insert(
            number,
            Waiter {
                sink,
                entry: None,
                submitted: Instant::now(),
            },
        );
        let mut registered = Registered {
            pool: self,
            number,
            armed: true,
        };
        loop {
            let room = self.room.notified();
            match self.add(&task, format, number).await {
                Ok(Ok(entry)) => {
                    registered.armed = false;
                    let mut state = lock(&self.state);
                    state.submitted += 1;
                    if let Some(waiter) = state.waiting.get_mut(&number) {
                        waiter.entry = Some(entry);
                    }
                    return Ok(number);
                }
                Ok(Err(waiting)) if !wait => {
                    registered.armed = false;
                    let mut state = lock(&self.state);
                    state.refused_full += 1;
                    let sink = state.waiting.remove(&number).map(|w| w.sink);
                    return Err((PoolError::Full(waiting), sink.unwrap_or_else(dropped_sink)));
                }
                Ok(Err(_)) => {
                    // Room comes as tasks finish, here or on another host.
                    let _ = tokio::time::timeout(COUNT_EVERY, room).await;
                }
                Err(error) => {
                    registered.armed = false;
                    let sink = lock(&self.state).waiting.remove(&number).map(|w| w.sink);
                    return Err((error, sink.unwrap_or_else(dropped_sink)));
                }
            }
        }
    }

    /// A result from this process's result stream.
    fn deliver(&self, number: u64, outcome: Result<(), PoolError>, result: Bytes) {
        let waiter = {
            let mut state = lock(&self.state);
            let Some(waiter) = state.waiting.remove(&number) else {
                // A duplicate, or nobody waits any more.
                return;
            };
            if outcome.is_ok() {
                state.latency.record(waiter.submitted.elapsed());
            }
            waiter
        };
        let outcome: Outcome = outcome.map(|()| Payload::inline(result));
        match waiter.sink {
            Sink::Worker { worker, submission } => {
                if let Some(core) = self.core.upgrade() {
                    core.upstream_answered(worker, submission, outcome);
                }
            }
            sink => {
                sink.deliver(outcome);
            }
        }
    }

    /// Takes a task read from the stream into the pool here.
    fn take(&self, core: &Core, entry: Entry, deliveries: u32) {
        let reclaims = entry.reclaims.saturating_add(deliveries.saturating_sub(1));
        let results = self.keys.results(entry.submitter);
        let refuse = |error: PoolError| Op::Complete {
            entry: entry.id.clone(),
            results: results.clone(),
            number: entry.number,
            outcome: encode_outcome(&Err(error)),
            result: Bytes::new(),
        };
        if reclaims > self.max_reclaims {
            tracing::warn!(pool = %core.name, entry = %entry.id, reclaims, "a task was taken over too often; it fails");
            let _ = self.ops.send(refuse(PoolError::TooManyReclaims(reclaims)));
            return;
        }
        let format = match (entry.format, core.format()) {
            (Some(theirs), Ok(ours)) if theirs == ours => ours,
            (theirs, Ok(ours)) => {
                let theirs = theirs.map_or("an unknown format".into(), |f| f.to_string());
                let error = PoolError::Codec(format!(
                    "the task is in {theirs}, but this primary's cluster speaks {ours}"
                ));
                let _ = self.ops.send(refuse(error));
                return;
            }
            // Not in a running cluster: leave it to the reclaim.
            (_, Err(_)) => return,
        };
        let payload = self.payload_for_workers(&entry.task);
        let handle = self.next.fetch_add(1, Ordering::Relaxed);
        {
            let mut state = lock(&self.state);
            state
                .by_task
                .insert((entry.submitter, entry.number), handle);
            state.held.insert(
                handle,
                Held {
                    entry: entry.id,
                    submitter: entry.submitter,
                    number: entry.number,
                    format,
                    task: entry.task,
                    reclaims,
                    local: None,
                },
            );
        }
        let local = core.insert_upstream(payload, handle, entry.attempts);
        if let Some(held) = lock(&self.state).held.get_mut(&handle) {
            held.local = Some(local);
        }
    }

    /// A task's bytes as the workers get them: in a memory file from the
    /// pool's threshold up.
    fn payload_for_workers(&self, task: &Bytes) -> Payload {
        if self.memfd_threshold.is_some_and(|t| task.len() >= t) {
            let mut writer = PayloadWriter::new(self.memfd_threshold);
            let written =
                std::io::Write::write_all(&mut writer, task).and_then(|()| writer.finish());
            if let Ok(payload) = written {
                return payload;
            }
        }
        Payload::inline(task.clone())
    }

    fn forget_held(state: &mut State, handle: u64) -> Option<Held> {
        let held = state.held.remove(&handle)?;
        state.by_task.remove(&(held.submitter, held.number));
        Some(held)
    }

    /// Gives back the tasks read here that no worker here can take.
    fn give_back(&self, core: &Core) {
        let stranded = core.take_stranded();
        if stranded.is_empty() {
            return;
        }
        let mut state = lock(&self.state);
        for (handle, attempts) in stranded {
            let Some(held) = Self::forget_held(&mut state, handle) else {
                continue;
            };
            state.given_back += 1;
            let attempts = postcard::to_allocvec(&attempts).unwrap_or_default();
            let fields = vec![
                ("t", held.task),
                ("r", Bytes::from(held.submitter.to_string())),
                ("i", Bytes::from(held.number.to_string())),
                ("f", Bytes::from(held.format.to_string())),
                ("a", Bytes::from(attempts)),
                ("c", Bytes::from(held.reclaims.to_string())),
            ];
            let _ = self.ops.send(Op::Release {
                entry: held.entry,
                fields,
            });
        }
    }

    /// The submitter of task `number` stopped waiting for it.
    fn on_cancel(&self, submitter: u64, number: u64) {
        let held = {
            let mut state = lock(&self.state);
            let Some(handle) = state.by_task.get(&(submitter, number)).copied() else {
                return;
            };
            Self::forget_held(&mut state, handle)
        };
        let Some(held) = held else { return };
        if let (Some(local), Some(core)) = (held.local, self.core.upgrade()) {
            core.cancel(local);
        }
        let _ = self.ops.send(Op::Release {
            entry: held.entry,
            fields: Vec::new(),
        });
    }

    /// Renews the idle time of the entries held here; drops those another
    /// primary took over meanwhile (this one stalled).
    async fn renew(&self, core: &Core) {
        let entries: HashMap<String, u64> = lock(&self.state)
            .held
            .iter()
            .map(|(handle, held)| (held.entry.clone(), *handle))
            .collect();
        let ids: Vec<&String> = entries.keys().collect();
        for chunk in ids.chunks(512) {
            let mut invocation = self.scripts.renew.prepare_invoke();
            invocation
                .key(&self.keys.stream)
                .arg(GROUP)
                .arg(&self.consumer);
            for id in chunk {
                invocation.arg(id.as_str());
            }
            let lost: Vec<String> = match invocation
                .invoke_async(&mut self.connection.clone())
                .await
            {
                Ok(lost) => lost,
                Err(error) => {
                    tracing::warn!(pool = %core.name, %error, "cannot renew the pool's tasks in Redis");
                    return;
                }
            };
            for entry in lost {
                let Some(handle) = entries.get(&entry) else {
                    continue;
                };
                let held = Self::forget_held(&mut lock(&self.state), *handle);
                if let Some(local) = held.and_then(|h| h.local) {
                    tracing::warn!(pool = %core.name, %entry, "another primary took over a task running here");
                    core.cancel(local);
                }
            }
        }
    }

    /// Takes over up to `room` entries whose primary stopped renewing them;
    /// returns how many.
    async fn reclaim(&self, core: &Core, room: usize, cursor: &mut String) -> usize {
        let reply: Value = match self
            .scripts
            .reclaim
            .key(&self.keys.stream)
            .arg(GROUP)
            .arg(&self.consumer)
            .arg(u64::try_from(self.reclaim_after.as_millis()).unwrap_or(u64::MAX))
            .arg(cursor.as_str())
            .arg(room)
            .invoke_async(&mut self.connection.clone())
            .await
        {
            Ok(reply) => reply,
            Err(error) => {
                tracing::warn!(pool = %core.name, %error, "cannot reclaim the pool's stalled tasks in Redis");
                return 0;
            }
        };
        let parts = array(&reply);
        if let Some(next) = parts.first().and_then(text) {
            *cursor = next;
        }
        let mut taken = 0;
        for claimed in parts.iter().skip(1) {
            let claimed = array(claimed);
            let (Some(id), Some(fields)) = (claimed.first().and_then(text), claimed.get(1)) else {
                continue;
            };
            let deliveries = claimed.get(2).and_then(int).unwrap_or(1);
            let deliveries = u32::try_from(deliveries).unwrap_or(u32::MAX);
            let fields = pairs(fields);
            taken += 1;
            lock(&self.state).reclaimed += 1;
            match Entry::parse(id.clone(), &fields) {
                Some(entry) => {
                    tracing::info!(pool = %core.name, entry = %id, "took over a task from a primary that stopped answering");
                    self.take(core, entry, deliveries);
                }
                None => self.drop_malformed(core, id),
            }
        }
        taken
    }

    fn drop_malformed(&self, core: &Core, entry: String) {
        tracing::warn!(pool = %core.name, %entry, "dropped a stream entry that is not a task of the pool");
        let _ = self.ops.send(Op::Release {
            entry,
            fields: Vec::new(),
        });
    }

    /// Reads how many tasks wait in the stream, for the counters.
    async fn count_backlog(&self) {
        let waiting: redis::RedisResult<i64> = self
            .scripts
            .backlog
            .key(&self.keys.stream)
            .arg(GROUP)
            .invoke_async(&mut self.connection.clone())
            .await;
        if let Ok(waiting) = waiting {
            lock(&self.state).backlog = usize::try_from(waiting).unwrap_or(0);
        }
    }
}

/// Takes the waiter out again unless the submission went through: the
/// submitter stopped waiting (its future was dropped). If the entry was
/// added meanwhile, its task still runs and its result is dropped.
struct Registered<'a> {
    pool: &'a RedisPool,
    number: u64,
    armed: bool,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        if self.armed {
            let mut state = lock(&self.pool.state);
            if state.waiting.remove(&self.number).is_some() {
                state.cancelled += 1;
            }
        }
    }
}

/// A sink for an error whose own sink is gone (cannot happen, but the
/// signature wants one).
fn dropped_sink() -> Sink {
    Sink::One(oneshot::channel().0)
}

fn encode_outcome(outcome: &Result<(), PoolError>) -> Vec<u8> {
    postcard::to_allocvec(outcome).unwrap_or_default()
}

fn array(value: &Value) -> &[Value] {
    match value {
        Value::Array(items) | Value::Set(items) => items,
        _ => &[],
    }
}

fn text(value: &Value) -> Option<String> {
    redis::from_redis_value_ref::<String>(value).ok()
}

fn int(value: &Value) -> Option<i64> {
    redis::from_redis_value_ref::<i64>(value).ok()
}

/// A flat array of field names and values as a map.
fn pairs(value: &Value) -> HashMap<String, Value> {
    let items = array(value);
    items
        .chunks(2)
        .filter_map(|pair| match pair {
            [name, value] => Some((text(name)?, value.clone())),
            _ => None,
        })
        .collect()
}

impl Upstream for RedisPool {
    fn submit(&self, payload: Payload, wait: bool, sink: Sink) -> Submitting<'_> {
        Box::pin(self.submit_task(payload, wait, sink))
    }

    fn cancel(&self, number: u64) {
        let mut state = lock(&self.state);
        let Some(waiter) = state.waiting.remove(&number) else {
            return;
        };
        state.cancelled += 1;
        if let Some(entry) = waiter.entry {
            let _ = self.ops.send(Op::Cancel { entry, number });
        }
    }

    fn finished(&self, handle: u64, outcome: Outcome) {
        let Some(held) = Self::forget_held(&mut lock(&self.state), handle) else {
            // Cancelled, or taken over by another primary.
            return;
        };
        let (outcome, result) = match outcome {
            Ok(payload) => match payload.bytes() {
                Ok(bytes) => (Ok(()), bytes),
                Err(error) => (
                    Err(PoolError::Codec(format!(
                        "cannot read the result's memory file: {error}"
                    ))),
                    Bytes::new(),
                ),
            },
            Err(error) => (Err(error), Bytes::new()),
        };
        let _ = self.ops.send(Op::Complete {
            entry: held.entry,
            results: self.keys.results(held.submitter),
            number: held.number,
            outcome: encode_outcome(&outcome),
            result,
        });
    }

    fn add_stats(&self, stats: &mut PoolStats) {
        let state = lock(&self.state);
        stats.queued += state.backlog;
        stats.submitted = state.submitted;
        stats.cancelled = state.cancelled;
        stats.refused_full = state.refused_full;
        stats.reclaimed = state.reclaimed;
        stats.given_back = state.given_back;
        stats.latency = state.latency.clone();
    }
}

/// Sends the pool's completions, give-backs and cancellations to Redis in
/// order, as many per round trip as are queued.
async fn write_loop(
    mut connection: MultiplexedConnection,
    scripts: Arc<Scripts>,
    stream: String,
    cancel: String,
    consumer: String,
    mut ops: mpsc::UnboundedReceiver<Op>,
) {
    let ttl = u64::try_from(RESULTS_TTL.as_millis()).unwrap_or(u64::MAX);
    let mut batch = Vec::with_capacity(256);
    while ops.recv_many(&mut batch, 256).await > 0 {
        let mut pipe = redis::pipe();
        pipe.load_script(&scripts.complete).ignore();
        pipe.load_script(&scripts.release).ignore();
        pipe.load_script(&scripts.cancel).ignore();
        for op in batch.drain(..) {
            match op {
                Op::Complete {
                    entry,
                    results,
                    number,
                    outcome,
                    result,
                } => {
                    let mut invocation = scripts.complete.prepare_invoke();
                    invocation
                        .key(&stream)
                        .key(results)
                        .arg(GROUP)
                        .arg(&consumer)
                        .arg(entry)
                        .arg(number)
                        .arg(outcome)
                        .arg(&result[..])
                        .arg(ttl);
                    pipe.invoke_script(&invocation).ignore();
                }
                Op::Release { entry, fields } => {
                    let mut invocation = scripts.release.prepare_invoke();
                    invocation.key(&stream).arg(GROUP).arg(&consumer).arg(entry);
                    for (name, value) in fields {
                        invocation.arg(name).arg(&value[..]);
                    }
                    pipe.invoke_script(&invocation).ignore();
                }
                Op::Cancel { entry, number } => {
                    let mut invocation = scripts.cancel.prepare_invoke();
                    invocation
                        .key(&stream)
                        .arg(GROUP)
                        .arg(entry)
                        .arg(&cancel)
                        .arg(format!("{consumer}:{number}"));
                    pipe.invoke_script(&invocation).ignore();
                }
            }
        }
        if let Err(error) = pipe.query_async::<()>(&mut connection).await {
            // The tasks stay pending in Redis: another primary (or this
            // one) takes them over once they are idle long enough.
            tracing::error!(%error, "cannot write the pool's outcomes to Redis");
        }
    }
}

/// Reads this process's result stream from its beginning, delivering each
/// result once and deleting what it read.
async fn read_results(
    pool: Weak<RedisPool>,
    mut connection: MultiplexedConnection,
    key: String,
    mut alive: watch::Receiver<()>,
) {
    let mut last = "0-0".to_string();
    loop {
        let mut command = redis::cmd("XREAD");
        command
            .arg("COUNT")
            .arg(1024)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(&key)
            .arg(&last);
        let read = command.query_async::<Option<StreamReadReply>>(&mut connection);
        let reply = tokio::select! {
            reply = read => reply,
            _ = alive.changed() => return,
        };
        let Some(pool) = pool.upgrade() else { return };
        let reply = match reply {
            Ok(reply) => reply,
            Err(error) => {
                tracing::error!(%error, "cannot read the pool's results from Redis");
                drop(pool);
                tokio::time::sleep(RETRY_AFTER).await;
                continue;
            }
        };
        let mut read = Vec::new();
        for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            last.clone_from(&entry.id);
            read.push(entry.id.clone());
            let field = |name: &str| {
                entry
                    .map
                    .get(name)
                    .and_then(|v| redis::from_redis_value_ref::<Vec<u8>>(v).ok())
            };
            let number = field("i")
                .and_then(|b| String::from_utf8(b).ok())
                .and_then(|t| t.parse::<u64>().ok());
            let Some(number) = number else { continue };
            let outcome = field("o")
                .and_then(|b| postcard::from_bytes::<Result<(), PoolError>>(&b).ok())
                .unwrap_or_else(|| {
                    Err(PoolError::Codec(
                        "the result's outcome does not decode".into(),
                    ))
                });
            let result = field("p").map(Bytes::from).unwrap_or_default();
            pool.deliver(number, outcome, result);
        }
        if !read.is_empty() {
            pool.room.notify_waiters();
            let deleted: redis::RedisResult<()> = redis::cmd("XDEL")
                .arg(&key)
                .arg(&read)
                .query_async(&mut connection)
                .await;
            if let Err(error) = deleted {
                tracing::warn!(%error, "cannot delete the pool's read results in Redis");
            }
        }
    }
}

/// Hands the primaries' cancellations to the tasks held here.
async fn read_cancels(
    pool: Weak<RedisPool>,
    pubsub: redis::aio::PubSub,
    mut alive: watch::Receiver<()>,
) {
    use futures_core::Stream;
    let mut messages = pubsub.into_on_message();
    loop {
        let next = std::future::poll_fn(|cx| Pin::new(&mut messages).poll_next(cx));
        let message = tokio::select! {
            message = next => message,
            _ = alive.changed() => return,
        };
        let Some(message) = message else { return };
        let Some(pool) = pool.upgrade() else { return };
        let text = String::from_utf8_lossy(message.get_payload_bytes());
        let Some((submitter, number)) = text.rsplit_once(':') else {
            continue;
        };
        let submitter = submitter
            .rsplit('-')
            .next()
            .and_then(|s| u64::from_str_radix(s, 16).ok());
        if let (Some(submitter), Ok(number)) = (submitter, number.parse()) {
            pool.on_cancel(submitter, number);
        }
    }
}

/// Reads tasks as the workers here have room, reclaims stalled ones,
/// renews those held here and gives back those no worker here can take.
async fn read_tasks(pool: Weak<RedisPool>, mut reader: MultiplexedConnection) {
    let long_ago = Instant::now().checked_sub(Duration::from_secs(3600));
    let mut renewed = Instant::now();
    let mut reclaimed = long_ago.unwrap_or_else(Instant::now);
    let mut counted = long_ago.unwrap_or_else(Instant::now);
    let mut cursor = "0-0".to_string();
    loop {
        let Some(pool) = pool.upgrade() else { return };
        let Some(core) = pool.core.upgrade() else {
            return;
        };
        pool.give_back(&core);
        let every = pool.reclaim_after / 4;
        if renewed.elapsed() >= every {
            renewed = Instant::now();
            pool.renew(&core).await;
        }
        if counted.elapsed() >= COUNT_EVERY {
            counted = Instant::now();
            pool.count_backlog().await;
        }
        let mut room = core.free_capacity();
        if room > 0 && reclaimed.elapsed() >= every {
            reclaimed = Instant::now();
            room = room.saturating_sub(pool.reclaim(&core, room, &mut cursor).await);
        }
        if room == 0 {
            let changed = core.changed.notified();
            let _ = tokio::time::timeout(BLOCK, changed).await;
            continue;
        }
        let read = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(GROUP)
            .arg(&pool.consumer)
            .arg("COUNT")
            .arg(room)
            .arg("BLOCK")
            .arg(u64::try_from(BLOCK.as_millis()).unwrap_or(100))
            .arg("STREAMS")
            .arg(&pool.keys.stream)
            .arg(">")
            .query_async::<Option<StreamReadReply>>(&mut reader)
            .await;
        match read {
            Ok(reply) => {
                let entries: Vec<_> = reply
                    .into_iter()
                    .flat_map(|r| r.keys)
                    .flat_map(|k| k.ids)
                    .collect();
                {
                    // Until the next count, the queue is shorter by these.
                    let mut state = lock(&pool.state);
                    state.backlog = state.backlog.saturating_sub(entries.len());
                }
                for entry in entries {
                    match Entry::parse(entry.id.clone(), &entry.map) {
                        Some(task) => pool.take(&core, task, 1),
                        None => pool.drop_malformed(&core, entry.id),
                    }
                }
            }
            Err(error) => {
                tracing::error!(pool = %core.name, %error, "cannot read the pool's tasks from Redis");
                drop((pool, core));
                tokio::time::sleep(RETRY_AFTER).await;
            }
        }
    }
}
