'use strict';
// Node `cluster` IPC benchmark: the reference figures procluster is compared
// against. Usage:
//
//   node bench/node/ipc.js [--messages N] [--pingpongs N] [--forks N]
//                          [--serialization json|advanced]
//
// The primary forks workers of this same script; cluster.isPrimary picks the
// role and the BENCH_ROLE environment variable (set per fork) picks what the
// worker does. Three measurements run one after another:
//   a. one-way throughput worker -> primary (backpressure respected),
//   b. ping-pong round-trip latency primary -> worker -> primary,
//   c. fork -> 'online' latency.
// Exactly one JSON object is printed on stdout, as the last line; every
// diagnostic goes to stderr so stdout stays machine-readable.

const cluster = require('node:cluster');

// Whole-run bound. Unref'd so that it never keeps a finished process alive;
// both roles install it so neither side can hang forever.
const WATCHDOG_MS = 60_000;

// Untimed round trips before the timed ping-pong, so that JIT warm-up and
// lazy allocation in both processes do not land in the percentiles.
const PINGPONG_WARMUP = 1000;

function fail(message) {
  process.stderr.write(`ipc.js (${cluster.isPrimary ? 'primary' : 'worker'}): ${message}\n`);
  if (cluster.isPrimary) {
    // Workers would otherwise linger until they notice the channel closed.
    for (const worker of Object.values(cluster.workers)) worker.process.kill('SIGKILL');
  }
  process.exit(1);
}

function startWatchdog() {
  setTimeout(() => fail(`watchdog: not finished after ${WATCHDOG_MS / 1000} s`), WATCHDOG_MS).unref();
}

// ---------------------------------------------------------------- primary --

function parseArgs(argv) {
  const opts = { messages: 200_000, pingpongs: 20_000, forks: 20, serialization: 'json' };
  const counts = { '--messages': 'messages', '--pingpongs': 'pingpongs', '--forks': 'forks' };
  for (let i = 0; i < argv.length; i++) {
    // Accept both `--flag value` and `--flag=value`.
    let [flag, value] = argv[i].split(/=(.*)/s, 2);
    if (value === undefined) value = argv[++i];
    if (value === undefined) fail(`missing value for ${flag}`);
    if (flag in counts) {
      if (!/^[1-9][0-9]*$/.test(value)) fail(`${flag} expects a positive integer, got '${value}'`);
      opts[counts[flag]] = Number(value);
    } else if (flag === '--serialization') {
      if (value !== 'json' && value !== 'advanced') fail(`--serialization expects json|advanced, got '${value}'`);
      opts.serialization = value;
    } else {
      fail(`unknown argument '${flag}'`);
    }
  }
  return opts;
}

function forkWorker(role) {
  const worker = cluster.fork({ BENCH_ROLE: role });
  // An early worker death would otherwise leave the primary waiting for
  // messages that never come, until the watchdog fires.
  const onExit = (code, signal) => fail(`${role} worker exited unexpectedly (code ${code}, signal ${signal})`);
  worker.on('exit', onExit);
  const online = new Promise((resolve) => worker.once('online', resolve));
  return { worker, online, onExit };
}

// Disconnect (the graceful cluster path) and wait for the process to be gone,
// so that the next measurement does not share the CPUs with a dying worker.
function stopWorker({ worker, onExit }) {
  worker.off('exit', onExit);
  return new Promise((resolve) => {
    worker.once('exit', resolve);
    worker.disconnect();
  });
}

async function measureThroughput(total) {
  const handle = forkWorker('throughput');
  await handle.online;
  let expected = 0;
  let start;
  const seconds = await new Promise((resolve) => {
    handle.worker.on('message', (msg) => {
      if (msg === null || typeof msg !== 'object' || msg.n !== expected) {
        fail(`throughput: expected {n: ${expected}}, got ${JSON.stringify(msg)}`);
      }
      expected++;
      if (expected === total) resolve(Number(process.hrtime.bigint() - start) / 1e9);
    });
    start = process.hrtime.bigint();
    handle.worker.send({ go: total });
  });
  await stopWorker(handle);
  return { messages: total, seconds: round(seconds, 6), msgs_per_sec: round(total / seconds, 1) };
}

async function measurePingPong(roundTrips) {
  const handle = forkWorker('echo');
  await handle.online;
  const total = PINGPONG_WARMUP + roundTrips;
  const samplesNs = new Float64Array(roundTrips);
  await new Promise((resolve) => {
    let i = 0;
    let sentAt = 0n;
    const sendNext = () => {
      sentAt = process.hrtime.bigint();
      handle.worker.send({ n: i });
    };
    handle.worker.on('message', (msg) => {
      // Read the clock before any checking so the sample is as tight as it
      // can be from the JS side.
      const now = process.hrtime.bigint();
      if (msg === null || typeof msg !== 'object' || msg.n !== i) {
        fail(`pingpong: expected echo {n: ${i}}, got ${JSON.stringify(msg)}`);
      }
      if (i >= PINGPONG_WARMUP) samplesNs[i - PINGPONG_WARMUP] = Number(now - sentAt);
      i++;
      if (i === total) resolve();
      else sendNext();
    });
    sendNext();
  });
  await stopWorker(handle);
  samplesNs.sort();
  return {
    round_trips: roundTrips,
    p50_us: round(percentile(samplesNs, 0.5) / 1e3, 1),
    p99_us: round(percentile(samplesNs, 0.99) / 1e3, 1),
  };
}

async function measureForkOnline(forks) {
  const samples = [];
  for (let i = 0; i < forks; i++) {
    const t0 = process.hrtime.bigint();
    const handle = forkWorker('idle');
    await handle.online;
    const t1 = process.hrtime.bigint();
    samples.push(Number(t1 - t0) / 1e6);
    await stopWorker(handle);
  }
  const sorted = Float64Array.from(samples).sort();
  // The median of an even count is the mean of the two middle samples.
  const mid = sorted.length >> 1;
  const median = sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
  return { samples_ms: samples.map((s) => round(s, 3)), median_ms: round(median, 3) };
}

// Nearest-rank percentile on an ascending array.
function percentile(sorted, p) {
  const rank = Math.ceil(p * sorted.length);
  return sorted[Math.min(sorted.length, Math.max(1, rank)) - 1];
}

function round(x, digits) {
  return Number(x.toFixed(digits));
}

async function primaryMain() {
  const opts = parseArgs(process.argv.slice(2));
  // Workers get their orders over IPC, so they must not re-parse our argv.
  cluster.setupPrimary({ serialization: opts.serialization, args: [] });

  process.stderr.write(`ipc.js: throughput, ${opts.messages} messages\n`);
  const throughput = await measureThroughput(opts.messages);
  process.stderr.write(`ipc.js: ping-pong, ${PINGPONG_WARMUP} warm-up + ${opts.pingpongs} timed\n`);
  const pingpong = await measurePingPong(opts.pingpongs);
  process.stderr.write(`ipc.js: fork->online, ${opts.forks} forks\n`);
  const forkOnline = await measureForkOnline(opts.forks);

  const result = {
    runtime: 'node',
    node_version: process.version,
    serialization: opts.serialization,
    throughput,
    pingpong,
    fork_online: forkOnline,
  };
  // Exit only once the line is handed to the OS, so it cannot be lost.
  process.stdout.write(`${JSON.stringify(result)}\n`, () => process.exit(0));
}

// ----------------------------------------------------------------- worker --

// Sends {n: 0} .. {n: total-1} as fast as the channel takes them. process.send
// returns false once Node's write queue for the channel passes its high-water
// mark; from then on we stop producing until that very message has been
// written out (its callback fires), so at most one queue's worth of messages
// is ever buffered in this process.
function sendAll(total) {
  let next = 0; // index of the next message to produce
  let written = 0; // messages whose send callback has fired
  let resumeAt = -1; // when paused: resume once `written` reaches this

  // Write callbacks fire in send order, so counting them tells us how much of
  // the queue has drained; one shared function avoids a closure per message.
  const onWritten = (err) => {
    if (err) fail(`throughput: send failed: ${err.message}`);
    written++;
    if (resumeAt !== -1 && written >= resumeAt) {
      resumeAt = -1;
      pump();
    }
  };

  const pump = () => {
    while (next < total) {
      const ok = process.send({ n: next }, undefined, undefined, onWritten);
      next++;
      if (!ok) {
        resumeAt = next;
        return;
      }
    }
  };

  pump();
}

function workerMain() {
  startWatchdog();
  const role = process.env.BENCH_ROLE;
  if (role === 'throughput') {
    process.once('message', (msg) => {
      if (!msg || !Number.isSafeInteger(msg.go) || msg.go < 1) fail(`throughput: bad go message ${JSON.stringify(msg)}`);
      sendAll(msg.go);
    });
  } else if (role === 'echo') {
    process.on('message', (msg) => process.send(msg));
  } else if (role !== 'idle') {
    // 'idle' workers only exist to be timed to 'online'; the cluster IPC
    // channel keeps them alive until the primary disconnects them.
    fail(`unknown BENCH_ROLE '${role}'`);
  }
}

if (cluster.isPrimary) {
  startWatchdog();
  primaryMain().catch((err) => fail(err && err.stack ? err.stack : String(err)));
} else {
  workerMain();
}
