'use strict';
// Node `cluster` with @socket.io/sticky in front of a plain HTTP server, the
// way its README sets it up: the primary listens, reads each connection's
// first chunk and passes the socket and that chunk to a worker. Usage:
//
//   NODE_PATH=target/bench-node/node_modules \
//     node bench/node/sticky-cluster.js --workers N [--method round-robin]
//                                       [--max-seconds S]
//
// The workers answer `hello from worker <id> (pid <pid>)`, as the hello
// example does. Once every worker is up the primary prints
//   listening on http://127.0.0.1:<port>
// on stdout. SIGTERM stops it; --max-seconds (default 600) is a watchdog.
// A plain HTTP server has no Socket.IO engine: `setupWorker` gets the HTTP
// server and an engine that never reports a session, so the method decides
// every connection (least-connection would send them all to one worker).

const cluster = require('node:cluster');
const http = require('node:http');
const { EventEmitter } = require('node:events');
const { setupMaster, setupWorker } = require('@socket.io/sticky');

function parseArgs(argv) {
  const opts = { workers: 2, method: 'round-robin', maxSeconds: 600 };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (value === undefined) throw new Error(`missing value for ${flag}`);
    if (flag === '--workers') opts.workers = Number(value);
    else if (flag === '--method') opts.method = value;
    else if (flag === '--max-seconds') opts.maxSeconds = Number(value);
    else throw new Error(`unknown argument ${flag}`);
  }
  return opts;
}

if (cluster.isPrimary) {
  const opts = parseArgs(process.argv.slice(2));
  const server = http.createServer();
  setupMaster(server, { loadBalancingMethod: opts.method });
  let online = 0;
  cluster.on('message', (_worker, message) => {
    if (message === 'up' && ++online === opts.workers) {
      server.listen(0, '127.0.0.1', () => {
        process.stdout.write(`listening on http://127.0.0.1:${server.address().port}\n`);
      });
    }
  });
  for (let i = 0; i < opts.workers; i++) cluster.fork();
  const stop = () => {
    for (const worker of Object.values(cluster.workers)) worker.process.kill('SIGTERM');
    process.exit(0);
  };
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  setTimeout(() => {
    process.stderr.write('sticky-cluster.js: --max-seconds reached\n');
    for (const worker of Object.values(cluster.workers)) worker.process.kill('SIGKILL');
    process.exit(1);
  }, opts.maxSeconds * 1000).unref();
} else {
  const body = `hello from worker ${cluster.worker.id} (pid ${process.pid})`;
  const server = http.createServer((req, res) => {
    res.setHeader('Content-Type', 'text/plain');
    res.setHeader('Content-Length', Buffer.byteLength(body));
    res.end(body);
  });
  server.keepAliveTimeout = 65_000;
  setupWorker({ httpServer: server, engine: new EventEmitter() });
  process.send('up');
}
