'use strict';
// The articles' task broker, written as they show it: the primary keeps an
// array of idle workers and a queue, sends `{type: 'TASK'}` with
// worker.send(), and each worker answers `{type: 'TASK_RESULT'}` with
// process.send(). Only the measuring around it is ours. Usage:
//
//   node bench/node/pool-broker.js [--tasks N] [--rounds N] [--cpu-tasks N]
//        [--cpu-rounds N] [--workers N] [--payload-mib N]
//
// Prints one JSON object last: tiny_per_sec, p50_us, p99_us, cpu_per_sec,
// large_ms.

const cluster = require('node:cluster');
const crypto = require('node:crypto');

function parseArgs(argv) {
  const opts = { tasks: 200000, rounds: 20000, 'cpu-tasks': 2000, 'cpu-rounds': 3000, workers: 2, 'payload-mib': 16 };
  for (let i = 0; i < argv.length; i += 2) {
    const key = argv[i].replace(/^--/, '');
    if (!(key in opts)) throw new Error(`unknown argument ${argv[i]}`);
    opts[key] = Number(argv[i + 1]);
  }
  return opts;
}

// The work of a CPU task: SHA-256 of the seed's 8 little-endian bytes, then
// of each digest, `rounds` times in all (the same as procluster's bench).
function hashRounds(seed, rounds) {
  const first = Buffer.alloc(8);
  first.writeBigUInt64LE(BigInt(seed));
  let digest = crypto.createHash('sha256').update(first).digest();
  for (let i = 1; i < rounds; i++) digest = crypto.createHash('sha256').update(digest).digest();
  return digest.toString('hex');
}

if (cluster.isPrimary) {
  const opts = parseArgs(process.argv.slice(2));

  // --- the articles' broker -------------------------------------------------
  const idleWorkers = [];
  const taskQueue = [];
  const pending = new Map();
  let nextTaskId = 0;

  function dispatch() {
    while (idleWorkers.length > 0 && taskQueue.length > 0) {
      const worker = idleWorkers.shift();
      const task = taskQueue.shift();
      worker.send({ type: 'TASK', task });
    }
  }

  function submitTask(payload) {
    return new Promise((resolve) => {
      const id = nextTaskId++;
      pending.set(id, resolve);
      taskQueue.push({ id, payload });
      dispatch();
    });
  }

  for (let i = 0; i < opts.workers; i++) {
    const worker = cluster.fork();
    worker.on('message', (message) => {
      if (message.type === 'READY') {
        idleWorkers.push(worker);
        dispatch();
      } else if (message.type === 'TASK_RESULT') {
        const resolve = pending.get(message.id);
        pending.delete(message.id);
        idleWorkers.push(worker);
        dispatch();
        resolve(message.result);
      }
    });
  }
  // ---------------------------------------------------------------------------

  const quantile = (sorted, q) => sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(sorted.length * q) - 1))];

  async function main() {
    // Warm-up: every worker has answered.
    await Promise.all(Array.from({ length: 1000 }, (_, n) => submitTask({ kind: 'echo', n })));

    let start = process.hrtime.bigint();
    await Promise.all(Array.from({ length: opts.tasks }, (_, n) => submitTask({ kind: 'echo', n })));
    const tinySeconds = Number(process.hrtime.bigint() - start) / 1e9;

    const samples = [];
    for (let n = 0; n < opts.rounds; n++) {
      const t0 = process.hrtime.bigint();
      await submitTask({ kind: 'echo', n });
      samples.push(Number(process.hrtime.bigint() - t0) / 1000);
    }
    samples.sort((a, b) => a - b);

    start = process.hrtime.bigint();
    await Promise.all(Array.from({ length: opts['cpu-tasks'] }, (_, seed) =>
      submitTask({ kind: 'hash', seed, rounds: opts['cpu-rounds'] })));
    const cpuSeconds = Number(process.hrtime.bigint() - start) / 1e9;

    const large = 'x'.repeat(opts['payload-mib'] * 1024 * 1024);
    const trips = [];
    for (let i = 0; i < 5; i++) {
      const t0 = process.hrtime.bigint();
      const back = await submitTask({ kind: 'echo', n: large });
      if (back.length !== large.length) throw new Error('the large payload came back changed');
      trips.push(Number(process.hrtime.bigint() - t0) / 1e6);
    }
    trips.sort((a, b) => a - b);

    for (const worker of Object.values(cluster.workers)) worker.kill();
    console.log(JSON.stringify({
      bench: 'pool-broker',
      tiny_per_sec: opts.tasks / tinySeconds,
      p50_us: quantile(samples, 0.5),
      p99_us: quantile(samples, 0.99),
      cpu_per_sec: opts['cpu-tasks'] / cpuSeconds,
      large_ms: quantile(trips, 0.5),
    }));
  }
  main().catch((error) => { console.error(error); process.exit(1); });
} else {
  process.on('message', (message) => {
    if (message.type === 'TASK') {
      const { id, payload } = message.task;
      const result = payload.kind === 'hash' ? hashRounds(payload.seed, payload.rounds) : payload.n;
      process.send({ type: 'TASK_RESULT', id, result });
    }
  });
  process.send({ type: 'READY' });
}
