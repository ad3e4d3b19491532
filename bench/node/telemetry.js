'use strict';
// prom-client's AggregatorRegistry on Node's cluster module: the reference
// for procluster's scrape of a whole cluster. Usage:
//
//   node bench/node/telemetry.js [--workers N] [--series N] [--scrapes N]
//
// Every worker registers SERIES counters in prom-client's default registry;
// the primary times `AggregatorRegistry.clusterMetrics()`, which asks every
// worker over IPC and sums their metrics, as procluster's scrape does.
// Exactly one JSON object is printed on stdout; diagnostics go to stderr.
// prom-client is found through NODE_PATH (the bench installs it).

const cluster = require('node:cluster');
const client = require('prom-client');

const WATCHDOG_MS = 300_000;

function option(name, fallback) {
  const at = process.argv.indexOf(name);
  if (at < 0) return fallback;
  const value = Number(process.argv[at + 1]);
  if (!Number.isInteger(value) || value < 1) {
    process.stderr.write(`telemetry.js: ${name} expects a positive integer\n`);
    process.exit(2);
  }
  return value;
}

const WORKERS = option('--workers', 64);
const SERIES = option('--series', 100);
const SCRAPES = option('--scrapes', 50);

function percentile(sorted, q) {
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(sorted.length * q) - 1))];
}

if (cluster.isPrimary) {
  setTimeout(() => {
    process.stderr.write('telemetry.js: watchdog expired\n');
    for (const w of Object.values(cluster.workers)) w.process.kill('SIGKILL');
    process.exit(1);
  }, WATCHDOG_MS).unref();
  const aggregator = new client.AggregatorRegistry();
  let ready = 0;
  cluster.on('message', (_worker, message) => {
    if (message === 'ready' && ++ready === WORKERS) run();
  });
  for (let i = 0; i < WORKERS; i++) cluster.fork();

  async function run() {
    for (let i = 0; i < 5; i++) await aggregator.clusterMetrics();
    const samples = [];
    let text = '';
    for (let i = 0; i < SCRAPES; i++) {
      const start = process.hrtime.bigint();
      text = await aggregator.clusterMetrics();
      samples.push(Number(process.hrtime.bigint() - start) / 1e6);
    }
    samples.sort((a, b) => a - b);
    const expected = `app_series_0 ${WORKERS}`;
    if (!text.includes(expected)) {
      process.stderr.write(`telemetry.js: the sum is wrong (wanted "${expected}")\n`);
      process.exit(1);
    }
    console.log(JSON.stringify({
      node_version: process.version,
      prom_client: require('prom-client/package.json').version,
      workers: WORKERS,
      series: SERIES,
      scrapes: SCRAPES,
      bytes: text.length,
      p50_ms: percentile(samples, 0.5),
      p99_ms: percentile(samples, 0.99),
    }));
    for (const w of Object.values(cluster.workers)) w.process.kill('SIGKILL');
    process.exit(0);
  }
} else {
  // Its constructor makes the worker answer the primary's requests.
  new client.AggregatorRegistry();
  for (let s = 0; s < SERIES; s++) {
    new client.Counter({ name: `app_series_${s}`, help: `Series ${s} of the bench` }).inc(1);
  }
  process.send('ready');
}
