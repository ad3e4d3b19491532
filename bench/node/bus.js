'use strict';
// Node `cluster` broadcast through the primary: the userland pattern that
// procluster's bus is compared against. Usage:
//
//   node bench/node/bus.js [--messages N] [--pings N]
//
// Two workers. A worker "publishes" by process.send() to the primary, which
// relays the message to every worker (itself included), as the articles on
// Node's cluster module show. Two measurements:
//   a. broadcast throughput: worker 1 publishes N small messages (at most
//      1000 unacknowledged sends in flight); the time until both workers
//      have received all N;
//   b. broadcast latency: worker 1 publishes one message at a time with a
//      timestamp and waits for its own copy before the next; worker 2
//      records how long each took to reach it (one way), p50 and p99.
// One JSON object is printed on stdout, as the last line.

const cluster = require('node:cluster');
const { performance } = require('node:perf_hooks');

const WATCHDOG_MS = 120_000;

function fail(message) {
  process.stderr.write(`bus.js: ${message}\n`);
  if (cluster.isPrimary) {
    for (const worker of Object.values(cluster.workers)) worker.process.kill('SIGKILL');
  }
  process.exit(1);
}

// Microseconds on a clock both processes share (wall clock, µs precision).
function nowUs() {
  return (performance.timeOrigin + performance.now()) * 1000;
}

function parseArgs(argv) {
  const opts = { messages: 200_000, pings: 10_000 };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = argv[++i];
    if (!/^[1-9][0-9]*$/.test(value || '')) fail(`${flag} expects a positive integer`);
    if (flag === '--messages') opts.messages = Number(value);
    else if (flag === '--pings') opts.pings = Number(value);
    else fail(`unknown argument '${flag}'`);
  }
  return opts;
}

function primary() {
  const opts = parseArgs(process.argv.slice(2));
  setTimeout(() => fail('watchdog'), WATCHDOG_MS).unref();
  const workers = [cluster.fork(), cluster.fork()];
  let online = 0;
  let done = 0;
  let started = 0;
  const result = {};
  const relay = (message) => {
    for (const w of workers) w.send(message);
  };
  const phase = (name) => {
    done = 0;
    started = performance.now();
    for (const w of workers) w.send({ t: 'start', phase: name, opts });
  };
  for (const w of workers) {
    w.on('online', () => {
      online += 1;
      if (online === 2) phase('throughput');
    });
    w.on('message', (m) => {
      if (m.t === 'pub') return relay(m);
      if (m.t === 'done' && m.phase === 'throughput') {
        done += 1;
        if (done === 2) {
          const seconds = (performance.now() - started) / 1000;
          result.throughput = { msgs_per_sec: opts.messages / seconds };
          phase('latency');
        }
      } else if (m.t === 'done' && m.phase === 'latency') {
        done += 1;
        if (m.latencies) result.latency = m.latencies;
        if (done === 2) {
          console.log(JSON.stringify(result));
          for (const worker of workers) worker.kill();
        }
      }
    });
  }
}

function worker() {
  const me = cluster.worker.id;
  let phase = null;
  let opts = null;
  let received = 0;
  let latencies = [];
  let next = 0;

  const publish = (data, cb) => process.send({ t: 'pub', data }, cb);

  // Throughput: keep at most 1000 sends unacknowledged.
  const flood = () => {
    let inFlight = 0;
    let sent = 0;
    const pump = () => {
      while (inFlight < 1000 && sent < opts.messages) {
        inFlight += 1;
        publish({ n: sent++ }, () => {
          inFlight -= 1;
          pump();
        });
      }
    };
    pump();
  };

  const ping = () => publish({ n: next, at: nowUs() });

  process.on('message', (m) => {
    if (m.t === 'start') {
      phase = m.phase;
      opts = m.opts;
      received = 0;
      latencies = [];
      next = 0;
      if (me === 1) (phase === 'throughput' ? flood : ping)();
      return;
    }
    if (m.t !== 'pub') return;
    received += 1;
    if (phase === 'throughput') {
      if (received === opts.messages) process.send({ t: 'done', phase });
      return;
    }
    // Latency: worker 2 measures, worker 1 paces.
    if (me === 2) {
      latencies.push(nowUs() - m.data.at);
      if (latencies.length === opts.pings) {
        latencies.sort((a, b) => a - b);
        const pick = (q) => latencies[Math.min(latencies.length - 1, Math.ceil(latencies.length * q) - 1)];
        process.send({ t: 'done', phase, latencies: { p50_us: pick(0.5), p99_us: pick(0.99) } });
      }
    } else {
      next += 1;
      if (next < opts.pings) ping();
      else process.send({ t: 'done', phase });
    }
  });
}

if (cluster.isPrimary) primary();
else worker();
