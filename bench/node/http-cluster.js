'use strict';
// Node `cluster` HTTP server, the baseline procluster is compared against
// under wrk. Usage:
//
//   node bench/node/http-cluster.js --workers N --port P --policy rr|none
//                                   [--max-seconds S]
//
// Defaults: --workers = available CPUs, --port 0, --policy rr,
// --max-seconds 60. Once every worker is listening the primary prints
//   listening on http://127.0.0.1:<port>
// on stdout; everything else goes to stderr. SIGTERM/SIGINT shut it down
// gracefully (exit 0), forced after 5 s (exit 1). --max-seconds is the
// watchdog: the server refuses to outlive it and exits 1 with a message, so
// a forgotten server never lingers; raise it for wrk runs longer than ~50 s.

const cluster = require('node:cluster');
const http = require('node:http');
const os = require('node:os');

const HOST = '127.0.0.1';
const SHUTDOWN_GRACE_MS = 5_000;
// Longer than a typical wrk run so that the server never closes an idle keep-alive
// connection mid-run (Node's default is 5 s).
const KEEP_ALIVE_TIMEOUT_MS = 65_000;

function fail(message) {
  process.stderr.write(`http-cluster.js (${cluster.isPrimary ? 'primary' : 'worker'}): ${message}\n`);
  if (cluster.isPrimary) {
    for (const worker of Object.values(cluster.workers)) worker.process.kill('SIGKILL');
  }
  process.exit(1);
}

// ---------------------------------------------------------------- primary --

function parseArgs(argv) {
  const opts = { workers: os.availableParallelism(), port: 0, policy: 'rr', maxSeconds: 60 };
  for (let i = 0; i < argv.length; i++) {
    // Accept both `--flag value` and `--flag=value`.
    let [flag, value] = argv[i].split(/=(.*)/s, 2);
    if (value === undefined) value = argv[++i];
    if (value === undefined) fail(`missing value for ${flag}`);
    const int = /^[0-9]+$/.test(value) ? Number(value) : NaN;
    if (flag === '--workers') {
      if (!(int >= 1 && int <= 1024)) fail(`--workers expects 1..1024, got '${value}'`);
      opts.workers = int;
    } else if (flag === '--port') {
      if (!(int >= 0 && int <= 65535)) fail(`--port expects 0..65535, got '${value}'`);
      opts.port = int;
    } else if (flag === '--policy') {
      if (value !== 'rr' && value !== 'none') fail(`--policy expects rr|none, got '${value}'`);
      opts.policy = value;
    } else if (flag === '--max-seconds') {
      if (!(int >= 1)) fail(`--max-seconds expects a positive integer, got '${value}'`);
      opts.maxSeconds = int;
    } else {
      fail(`unknown argument '${flag}'`);
    }
  }
  return opts;
}

function primaryMain() {
  const opts = parseArgs(process.argv.slice(2));
  setTimeout(() => fail(`watchdog: still running after ${opts.maxSeconds} s`), opts.maxSeconds * 1000).unref();

  // Node freezes the policy at the first setupPrimary()/fork(), so it must be
  // assigned before either; calling setupPrimary() right away pins it
  // explicitly instead of relying on the implicit call inside fork().
  cluster.schedulingPolicy = opts.policy === 'rr' ? cluster.SCHED_RR : cluster.SCHED_NONE;
  // Workers read their port from the environment, not from our argv.
  cluster.setupPrimary({ args: [] });
  process.stderr.write(`http-cluster.js: ${opts.workers} workers, policy ${opts.policy}, pid ${process.pid}\n`);

  let shuttingDown = false;
  let listeningCount = 0;
  // Own count: cluster.workers may still list a worker when its 'exit' fires
  // (it is removed only once both exit and IPC disconnect have happened).
  let alive = 0;
  let actualPort;

  cluster.on('listening', (worker, address) => {
    // With port 0 cluster hands every worker the same kernel-chosen port; a
    // mismatch would mean wrk only reaches part of the cluster.
    if (actualPort === undefined) actualPort = address.port;
    else if (address.port !== actualPort) fail(`worker ${worker.id} got port ${address.port}, others ${actualPort}`);
    listeningCount++;
    if (listeningCount === opts.workers) {
      // Pipes and files are written synchronously on Linux, so the line is
      // out before anything else happens.
      process.stdout.write(`listening on http://${HOST}:${actualPort}\n`);
    }
  });

  cluster.on('exit', (worker, code, signal) => {
    if (!shuttingDown) {
      // No respawn: a benchmark silently running on fewer workers is worse
      // than one that stops.
      fail(`worker ${worker.id} (pid ${worker.process.pid}) died (code ${code}, signal ${signal})`);
    }
    alive--;
    if (alive === 0) process.exit(0);
  });

  const shutdown = (signal) => {
    if (shuttingDown) return;
    shuttingDown = true;
    process.stderr.write(`http-cluster.js: ${signal}, disconnecting workers\n`);
    setTimeout(() => fail(`workers still alive ${SHUTDOWN_GRACE_MS} ms after ${signal}`), SHUTDOWN_GRACE_MS).unref();
    if (alive === 0) process.exit(0);
    // disconnect() closes each worker's server and lets in-flight requests
    // finish; the worker then exits on its own and 'exit' above counts it.
    for (const worker of Object.values(cluster.workers)) {
      if (worker.isConnected()) worker.disconnect();
    }
  };
  process.on('SIGTERM', () => shutdown('SIGTERM'));
  process.on('SIGINT', () => shutdown('SIGINT'));

  for (let i = 0; i < opts.workers; i++) {
    cluster.fork({ BENCH_PORT: String(opts.port) });
    alive++;
  }
}

// ----------------------------------------------------------------- worker --

function workerMain() {
  // Shutdown is the primary's job (a terminal Ctrl-C reaches the whole
  // process group). If the primary dies instead, the IPC channel closes and
  // cluster exits this worker, so ignoring the signals cannot orphan it.
  process.on('SIGTERM', () => {});
  process.on('SIGINT', () => {});

  // The reply never changes for a given worker, so build it once.
  const body = Buffer.from(`hello from worker ${cluster.worker.id} (pid ${process.pid})`);
  const headers = { 'content-type': 'text/plain', 'content-length': body.length };

  const server = http.createServer((req, res) => {
    res.writeHead(200, headers);
    res.end(body);
  });
  server.keepAliveTimeout = KEEP_ALIVE_TIMEOUT_MS;
  // Node advises headersTimeout > keepAliveTimeout, otherwise an idle
  // keep-alive connection can be cut by the headers timer first.
  server.headersTimeout = KEEP_ALIVE_TIMEOUT_MS + 1_000;
  server.on('error', (err) => fail(`server error: ${err.message}`));
  server.listen(Number(process.env.BENCH_PORT), HOST);
}

if (cluster.isPrimary) primaryMain();
else workerMain();
