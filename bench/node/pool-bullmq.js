'use strict';
// BullMQ (npm) on the same redis-server as procluster's pool on Redis, same
// run: tiny tasks (an echo of a number) run by WORKERS worker processes, each
// a BullMQ Worker with CONCURRENCY jobs at once; jobs acked when done and
// taken back by the stalled-job check when a worker dies (at-least-once, as
// the pool on Redis). The submitter learns each result from QueueEvents, as
// procluster's submitter gets each result from its result stream.
//
//   node pool-bullmq.js --socket PATH --tasks N --rounds R --workers W --concurrency C
//
// The procluster bench installs bullmq from npm into target/bench-npm and runs
// this with NODE_PATH pointing there. Prints one JSON object last:
// tiny_per_sec, p50_us, p99_us.

const { fork } = require('node:child_process');

const opts = { socket: '', tasks: 20000, rounds: 2000, workers: 2, concurrency: 64 };
const argv = process.argv.slice(2);
for (let i = 0; i < argv.length; i += 2) {
  const key = argv[i].replace(/^--/, '');
  opts[key] = key === 'socket' ? argv[i + 1] : Number(argv[i + 1]);
}
const connection = { path: opts.socket, maxRetriesPerRequest: null };
const QUEUE = 'procluster-bench';

if (process.env.BULLMQ_BENCH_WORKER) {
  const { Worker } = require('bullmq');
  const worker = new Worker(QUEUE, async (job) => job.data.n, {
    connection,
    concurrency: opts.concurrency,
  });
  worker.waitUntilReady().then(() => process.send('ready'));
  process.on('message', async (message) => {
    if (message === 'stop') {
      await worker.close();
      process.exit(0);
    }
  });
} else {
  const { Queue, QueueEvents } = require('bullmq');
  const quantile = (sorted, q) => sorted[Math.min(sorted.length - 1, Math.max(0, Math.ceil(sorted.length * q) - 1))];
  (async () => {
    const queue = new Queue(QUEUE, { connection });
    await queue.obliterate({ force: true });
    const events = new QueueEvents(QUEUE, { connection });
    await events.waitUntilReady();
    const workers = [];
    for (let i = 0; i < opts.workers; i++) {
      const child = fork(__filename, argv, { env: { ...process.env, BULLMQ_BENCH_WORKER: '1' } });
      await new Promise((resolve) => child.once('message', resolve));
      workers.push(child);
    }
    const jobOptions = { removeOnComplete: true, removeOnFail: true };

    // Throughput: every task added (in bulks of 1000), every result seen.
    let completed = 0;
    let finished;
    const allDone = new Promise((resolve) => { finished = resolve; });
    events.on('completed', () => {
      completed += 1;
      if (completed === opts.tasks) finished();
    });
    const start = process.hrtime.bigint();
    for (let from = 0; from < opts.tasks; from += 1000) {
      const bulk = [];
      for (let n = from; n < Math.min(opts.tasks, from + 1000); n++) {
        bulk.push({ name: 'echo', data: { n }, opts: jobOptions });
      }
      await queue.addBulk(bulk);
    }
    await allDone;
    const tinySeconds = Number(process.hrtime.bigint() - start) / 1e9;
    events.removeAllListeners('completed');

    // Latency: one job at a time, submit to result.
    const samples = [];
    for (let n = 0; n < opts.rounds; n++) {
      const t0 = process.hrtime.bigint();
      // Kept once done: waitUntilFinished reads the finished job.
      const job = await queue.add('echo', { n });
      await job.waitUntilFinished(events);
      samples.push(Number(process.hrtime.bigint() - t0) / 1000);
    }
    samples.sort((a, b) => a - b);

    for (const child of workers) child.send('stop');
    await Promise.all(workers.map((child) => new Promise((resolve) => child.once('exit', resolve))));
    await events.close();
    await queue.close();
    console.log(JSON.stringify({
      bench: 'bullmq',
      tiny_per_sec: opts.tasks / tinySeconds,
      p50_us: quantile(samples, 0.5),
      p99_us: quantile(samples, 0.99),
    }));
  })().catch((error) => {
    console.error(error);
    process.exit(1);
  });
}
