//! The store over Redis, for clusters on several hosts.
//!
//! Key `k` is the Redis string `<prefix>:k:<k>`, its value the bytes of the
//! cluster's format. Every change goes through a Lua script, so each is
//! atomic, and while any process watches (the key `<prefix>:watching`
//! lives), the same script appends the change with a revision to the
//! stream `<prefix>:changes`: watchers read that stream, so they see every
//! change in the order Redis applied them, with its value. Differences from
//! the local store: Redis expires keys itself and watches are not told;
//! the store's limits are Redis's own (`maxmemory`); durability is Redis's
//! persistence settings.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::streams::StreamReadReply;
use tokio::sync::mpsc;

use super::wire::{Blob, ChangeKind, Down, Op, Outcome, Watched};
use super::{Backend, BoxFuture, Limits, StoreConfig, StoreError, StoreService};
use crate::fanout::{Outlet, Sink};
use crate::protocol::Format;
use crate::redis_link::connection_config;
use crate::sync::lock;

/// Entries the change stream keeps at least (Redis trims it near there).
const STREAM_LENGTH: u32 = 100_000;

/// How long the `watching` mark lives unless a watcher renews it.
const WATCHING_TTL: Duration = Duration::from_secs(30);

/// The note every change script ends with. KEYS: the data key, the
/// `watching` mark, the revision counter, the change stream. ARGV[1]: the
/// user's key.
const NOTE: &str = r"
local function note(kind, value)
  if redis.call('EXISTS', KEYS[2]) == 1 then
    local rev = redis.call('INCR', KEYS[3])
    if value then
      redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[#ARGV], '*', 'k', ARGV[1], 'o', kind, 'r', rev, 'v', value)
    else
      redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[#ARGV], '*', 'k', ARGV[1], 'o', kind, 'r', rev)
    end
  end
end
";

/// ARGV[2]: value, ARGV[3]: ttl in ms or empty.
const SET: &str = r"
if ARGV[3] ~= '' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
note('s', ARGV[2])
return 1
";

const DELETE: &str = r"
local n = redis.call('DEL', KEYS[1])
if n == 1 then note('d', false) end
return n
";

/// JSON integers are decimal text, as Redis counts. ARGV[2]: by.
const INCR_JSON: &str = r"
local n = redis.call('INCRBY', KEYS[1], ARGV[2])
note('s', redis.call('GET', KEYS[1]))
return n
";

/// The binary format's integers are zigzag varints (exact to 2^53 here).
const INCR_BINARY: &str = r"
local function dec(s)
  local n, mul = 0, 1
  for i = 1, #s do
    local b = string.byte(s, i)
    n = n + (b % 128) * mul
    mul = mul * 128
    if b < 128 then
      if i ~= #s then return nil end
      if n % 2 == 0 then return n / 2 else return -(n + 1) / 2 end
    end
  end
  return nil
end
local function enc(v)
  local z
  if v >= 0 then z = v * 2 else z = -v * 2 - 1 end
  local out = {}
  repeat
    local b = z % 128
    z = (z - b) / 128
    if z > 0 then b = b + 128 end
    out[#out + 1] = string.char(b)
  until z == 0
  return table.concat(out)
end
local n = 0
local cur = redis.call('GET', KEYS[1])
if cur then
  n = dec(cur)
  if n == nil then return redis.error_reply('ERR value is not an integer') end
end
n = n + tonumber(ARGV[2])
if n >= 2^53 or n <= -2^53 then return redis.error_reply('ERR increment would overflow') end
local v = enc(n)
redis.call('SET', KEYS[1], v, 'KEEPTTL')
note('s', v)
return n
";

/// ARGV[2]: '1' if a value is expected, ARGV[3]: it; ARGV[4]: '1' for a new
/// value, ARGV[5]: it.
const CAS: &str = r"
local cur = redis.call('GET', KEYS[1])
if ARGV[2] == '1' then
  if cur ~= ARGV[3] then return 0 end
elseif cur then
  return 0
end
if ARGV[4] == '1' then
  redis.call('SET', KEYS[1], ARGV[5])
  note('s', ARGV[5])
elseif cur then
  redis.call('DEL', KEYS[1])
  note('d', false)
end
return 1
";

/// ARGV[2]: the value to insert.
const GET_OR_INSERT: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur then return cur end
redis.call('SET', KEYS[1], ARGV[2])
note('s', ARGV[2])
return ARGV[2]
";

/// Marks the store watched and returns the stream's last id. KEYS: the
/// mark, the stream. ARGV[1]: the mark's life in seconds.
const START_WATCH: &str = r"
redis.call('SET', KEYS[1], '1', 'EX', ARGV[1])
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if #last == 0 then return '0-0' end
return last[1][1]
";

struct Scripts {
    set: redis::Script,
    delete: redis::Script,
    incr_json: redis::Script,
    incr_binary: redis::Script,
    cas: redis::Script,
    get_or_insert: redis::Script,
    start_watch: redis::Script,
}

impl Scripts {
    fn new() -> Self {
        let with_note = |body: &str| redis::Script::new(&format!("{NOTE}{body}"));
        Self {
            set: with_note(SET),
            delete: with_note(DELETE),
            incr_json: with_note(INCR_JSON),
            incr_binary: with_note(INCR_BINARY),
            cas: with_note(CAS),
            get_or_insert: with_note(GET_OR_INSERT),
            start_watch: redis::Script::new(START_WATCH),
        }
    }
}

fn backend_error(error: redis::RedisError) -> StoreError {
    StoreError::Backend(error.to_string())
}

/// A stream entry id, as numbers, to compare.
fn parse_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

enum FormatSource {
    Fixed(Format),
    Primary(StoreService),
}

pub(crate) struct RedisStore {
    format: FormatSource,
    prefix: String,
    client: redis::Client,
    connection: MultiplexedConnection,
    scripts: Arc<Scripts>,
    watches: Arc<Mutex<Watches>>,
    next_id: AtomicU64,
    most: Limits,
}

#[derive(Default)]
struct Watches {
    subs: HashMap<u64, Watching>,
    reader: bool,
}

struct Watching {
    watched: Watched,
    /// Changes up to this stream id happened before the watch.
    after: (u64, u64),
    outlet: Arc<Outlet>,
}

impl RedisStore {
    pub(crate) async fn connect(
        url: &str,
        prefix: String,
        format: Format,
    ) -> Result<Arc<Self>, StoreError> {
        Self::open(url, prefix, FormatSource::Fixed(format)).await
    }

    pub(crate) async fn connect_primary(
        url: &str,
        prefix: String,
        service: StoreService,
    ) -> Result<Arc<Self>, StoreError> {
        Self::open(url, prefix, FormatSource::Primary(service)).await
    }

    async fn open(
        url: &str,
        prefix: String,
        format: FormatSource,
    ) -> Result<Arc<Self>, StoreError> {
        let client = redis::Client::open(url).map_err(backend_error)?;
        let connection = client
            .get_multiplexed_async_connection_with_config(&connection_config())
            .await
            .map_err(backend_error)?;
        Ok(Arc::new(Self {
            format,
            prefix,
            client,
            connection,
            scripts: Arc::new(Scripts::new()),
            watches: Arc::default(),
            next_id: AtomicU64::new(1),
            most: StoreConfig::default().most,
        }))
    }

    fn value_format(&self) -> Format {
        match &self.format {
            FormatSource::Fixed(format) => *format,
            FormatSource::Primary(service) => service.format(),
        }
    }

    fn data_key(&self, key: &str) -> String {
        format!("{}:k:{key}", self.prefix)
    }

    fn mark(&self) -> String {
        format!("{}:watching", self.prefix)
    }

    fn stream(&self) -> String {
        format!("{}:changes", self.prefix)
    }

    /// Runs a change script with the keys every one takes.
    async fn change<T: redis::FromRedisValue>(
        &self,
        script: &redis::Script,
        key: &str,
        args: &[&[u8]],
    ) -> Result<T, StoreError> {
        let mut invocation = script.prepare_invoke();
        invocation
            .key(self.data_key(key))
            .key(self.mark())
            .key(format!("{}:rev", self.prefix))
            .key(self.stream())
            .arg(key);
        for arg in args {
            invocation.arg(*arg);
        }
        invocation.arg(STREAM_LENGTH);
        invocation
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(|e| {
                let text = e.to_string();
                if text.contains("overflow") {
                    StoreError::Overflow { key: key.into() }
                } else if text.contains("not an integer") {
                    StoreError::NotANumber { key: key.into() }
                } else {
                    backend_error(e)
                }
            })
    }

    async fn apply(&self, op: Op) -> Result<Outcome, StoreError> {
        let scripts = self.scripts.clone();
        match op {
            Op::Get { key } => {
                let value: Option<Vec<u8>> = redis::cmd("GET")
                    .arg(self.data_key(&key))
                    .query_async(&mut self.connection.clone())
                    .await
                    .map_err(backend_error)?;
                Ok(Outcome::Value(value.map(Blob)))
            }
            Op::Set { key, value, ttl_ms } => {
                let ttl = ttl_ms.map(|ms| ms.to_string()).unwrap_or_default();
                let _: i64 = self
                    .change(&scripts.set, &key, &[&value.0, ttl.as_bytes()])
                    .await?;
                Ok(Outcome::Done)
            }
            Op::Delete { key } => {
                let n: i64 = self.change(&scripts.delete, &key, &[]).await?;
                Ok(Outcome::Deleted(n == 1))
            }
            Op::Incr { key, by } => {
                let script = match self.value_format() {
                    Format::Json => &scripts.incr_json,
                    Format::Binary => &scripts.incr_binary,
                };
                let n: i64 = self
                    .change(script, &key, &[by.to_string().as_bytes()])
                    .await?;
                Ok(Outcome::Number(n))
            }
            Op::Cas { key, expected, new } => {
                let flag = |v: &Option<Blob>| if v.is_some() { b"1" } else { b"0" };
                let empty = Vec::new();
                let swapped: i64 = self
                    .change(
                        &scripts.cas,
                        &key,
                        &[
                            flag(&expected),
                            expected.as_ref().map_or(&empty, |b| &b.0),
                            flag(&new),
                            new.as_ref().map_or(&empty, |b| &b.0),
                        ],
                    )
                    .await?;
                Ok(Outcome::Swapped(swapped == 1))
            }
            Op::GetOrInsert { key, value } => {
                let current: Vec<u8> = self
                    .change(&scripts.get_or_insert, &key, &[&value.0])
                    .await?;
                Ok(Outcome::Value(Some(Blob(current))))
            }
        }
    }

    async fn start_watch(
        self: &Arc<Self>,
        watched: Watched,
        limits: Limits,
    ) -> Result<(u64, mpsc::UnboundedReceiver<Bytes>), StoreError> {
        let last: String = self
            .scripts
            .start_watch
            .key(self.mark())
            .key(self.stream())
            .arg(WATCHING_TTL.as_secs())
            .invoke_async(&mut self.connection.clone())
            .await
            .map_err(backend_error)?;
        let sub = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::unbounded_channel();
        let closed = super::wire::encode(&Down::Closed { sub });
        let outlet = Outlet::new(Sink::Local(tx), limits.clamped(self.most), closed);
        let start_reader = {
            let mut watches = lock(&self.watches);
            watches.subs.insert(
                sub,
                Watching {
                    watched,
                    after: parse_id(&last),
                    outlet,
                },
            );
            !std::mem::replace(&mut watches.reader, true)
        };
        if start_reader {
            let connection = self
                .client
                .get_multiplexed_async_connection_with_config(&connection_config())
                .await
                .map_err(backend_error)?;
            tokio::spawn(read_changes(Arc::downgrade(self), connection, last));
        }
        Ok((sub, rx))
    }
}

/// Reads the change stream for this process's watches, renewing the
/// `watching` mark, until no watch is left.
async fn read_changes(
    store: Weak<RedisStore>,
    mut connection: MultiplexedConnection,
    mut last: String,
) {
    let mut renewed = Instant::now();
    loop {
        let (stream, mark) = {
            let Some(store) = store.upgrade() else { return };
            let mut watches = lock(&store.watches);
            if watches.subs.is_empty() {
                watches.reader = false;
                return;
            }
            (store.stream(), store.mark())
        };
        if renewed.elapsed() >= WATCHING_TTL / 3 {
            renewed = Instant::now();
            let _: Result<(), _> = redis::cmd("SET")
                .arg(&mark)
                .arg("1")
                .arg("EX")
                .arg(WATCHING_TTL.as_secs())
                .query_async(&mut connection)
                .await;
        }
        let reply: Result<Option<StreamReadReply>, _> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(1024)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS")
            .arg(&stream)
            .arg(&last)
            .query_async(&mut connection)
            .await;
        let reply = match reply {
            Ok(reply) => reply,
            Err(error) => {
                tracing::error!(%error, "the store's change stream failed; watches end");
                if let Some(store) = store.upgrade() {
                    let mut watches = lock(&store.watches);
                    for (_, watching) in watches.subs.drain() {
                        watching.outlet.close();
                    }
                    watches.reader = false;
                }
                return;
            }
        };
        let Some(store) = store.upgrade() else { return };
        let watches = lock(&store.watches);
        for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            last = entry.id.clone();
            let id = parse_id(&entry.id);
            let text = |field: &str| -> Option<String> {
                entry
                    .map
                    .get(field)
                    .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
            };
            let (Some(key), Some(kind)) = (text("k"), text("o")) else {
                continue;
            };
            let kind = if kind == "d" {
                ChangeKind::Deleted
            } else {
                ChangeKind::Set
            };
            let revision = text("r").and_then(|r| r.parse().ok()).unwrap_or(0);
            let value = entry
                .map
                .get("v")
                .and_then(|v| redis::from_redis_value_ref::<Vec<u8>>(v).ok());
            for (sub, watching) in &watches.subs {
                if id > watching.after && watching.watched.matches(&key) {
                    let frame = super::wire::encode(&Down::Change {
                        sub: *sub,
                        key: key.clone(),
                        kind,
                        value: value.clone().map(Blob),
                        revision,
                        dropped: watching.outlet.dropped(),
                    });
                    watching.outlet.push(frame);
                }
            }
        }
    }
}

impl Backend for Arc<RedisStore> {
    fn format(&self) -> Format {
        self.value_format()
    }

    fn call(&self, op: Op) -> BoxFuture<'_, Result<Outcome, StoreError>> {
        Box::pin(self.apply(op))
    }

    fn watch(
        &self,
        watched: Watched,
        limits: Limits,
    ) -> BoxFuture<'_, Result<(u64, mpsc::UnboundedReceiver<Bytes>), StoreError>> {
        Box::pin(self.start_watch(watched, limits))
    }

    fn credit(&self, sub: u64, n: u32) {
        let outlet = lock(&self.watches).subs.get(&sub).map(|w| w.outlet.clone());
        if let Some(outlet) = outlet {
            outlet.add_credit(n);
        }
    }

    fn unwatch(&self, sub: u64) {
        if let Some(watching) = lock(&self.watches).subs.remove(&sub) {
            watching.outlet.close();
        }
    }
}
