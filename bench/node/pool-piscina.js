'use strict';
// Piscina (worker threads) on the same tasks as bench/node/pool-broker.js.
// The procluster bench installs piscina from npm into target/bench-npm and
// runs this with NODE_PATH pointing there. Prints one JSON object last:
// tiny_per_sec, p50_us, p99_us, cpu_per_sec, large_ms.

const crypto = require('node:crypto');

function hashRounds(seed, rounds) {
  const first = Buffer.alloc(8);
  first.writeBigUInt64LE(BigInt(seed));
  let digest = crypto.createHash('sha256').update(first).digest();
  for (let i = 1; i < rounds; i++) digest = crypto.createHash('sha256').update(digest).digest();
  return digest.toString('hex');
}

// What each worker thread runs.
module.exports = (payload) => (payload.kind === 'hash' ? hashRounds(payload.seed, payload.rounds) : payload.n);

if (require.main === module) {
  const Piscina = require('piscina');
  const opts = { tasks: 200000, rounds: 20000, 'cpu-tasks': 2000, 'cpu-rounds': 3000, workers: 2, 'payload-mib': 16 };
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i += 2) opts[argv[i].replace(/^--/, '')] = Number(argv[i + 1]);
  const pool = new Piscina({ filename: __filename, minThreads: opts.workers, maxThreads: opts.workers });
  const quantile = (sorted, q) => sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(sorted.length * q) - 1))];

  (async () => {
    await Promise.all(Array.from({ length: 1000 }, (_, n) => pool.run({ kind: 'echo', n })));
    let start = process.hrtime.bigint();
    await Promise.all(Array.from({ length: opts.tasks }, (_, n) => pool.run({ kind: 'echo', n })));
    const tinySeconds = Number(process.hrtime.bigint() - start) / 1e9;
    const samples = [];
    for (let n = 0; n < opts.rounds; n++) {
      const t0 = process.hrtime.bigint();
      await pool.run({ kind: 'echo', n });
      samples.push(Number(process.hrtime.bigint() - t0) / 1000);
    }
    samples.sort((a, b) => a - b);
    start = process.hrtime.bigint();
    await Promise.all(Array.from({ length: opts['cpu-tasks'] }, (_, seed) =>
      pool.run({ kind: 'hash', seed, rounds: opts['cpu-rounds'] })));
    const cpuSeconds = Number(process.hrtime.bigint() - start) / 1e9;
    const large = 'x'.repeat(opts['payload-mib'] * 1024 * 1024);
    const trips = [];
    for (let i = 0; i < 5; i++) {
      const t0 = process.hrtime.bigint();
      const back = await pool.run({ kind: 'echo', n: large });
      if (back.length !== large.length) throw new Error('the large payload came back changed');
      trips.push(Number(process.hrtime.bigint() - t0) / 1e6);
    }
    trips.sort((a, b) => a - b);
    await pool.destroy();
    console.log(JSON.stringify({
      bench: 'piscina',
      tiny_per_sec: opts.tasks / tinySeconds,
      p50_us: quantile(samples, 0.5),
      p99_us: quantile(samples, 0.99),
      cpu_per_sec: opts['cpu-tasks'] / cpuSeconds,
      large_ms: quantile(trips, 0.5),
    }));
  })().catch((error) => { console.error(error); process.exit(1); });
}
