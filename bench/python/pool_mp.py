"""Python's multiprocessing.Pool on the same tasks as bench/node/pool-broker.js.

Usage: python3 bench/python/pool_mp.py [--tasks N] [--rounds N] [--cpu-tasks N]
       [--cpu-rounds N] [--workers N] [--payload-mib N]

Prints one JSON object last: tiny_per_sec, p50_us, p99_us, cpu_per_sec,
large_ms.
"""

import hashlib
import json
import multiprocessing
import sys
import time


def run(task):
    kind, value, rounds = task
    if kind == "hash":
        digest = hashlib.sha256(value.to_bytes(8, "little")).digest()
        for _ in range(1, rounds):
            digest = hashlib.sha256(digest).digest()
        return digest.hex()
    return value


def quantile(sorted_samples, q):
    at = min(len(sorted_samples) - 1, max(0, -(-len(sorted_samples) * q // 1) - 1))
    return sorted_samples[int(at)]


def main():
    opts = {"tasks": 200000, "rounds": 20000, "cpu-tasks": 2000, "cpu-rounds": 3000,
            "workers": 2, "payload-mib": 16}
    argv = sys.argv[1:]
    for flag, value in zip(argv[::2], argv[1::2]):
        opts[flag.lstrip("-")] = int(value)
    with multiprocessing.Pool(opts["workers"]) as pool:
        pool.map(run, [("echo", n, 0) for n in range(1000)])
        start = time.perf_counter()
        # imap_unordered with a chunk size is the idiomatic way to stream many
        # small tasks through a Pool.
        for _ in pool.imap_unordered(run, (("echo", n, 0) for n in range(opts["tasks"])), chunksize=256):
            pass
        tiny = opts["tasks"] / (time.perf_counter() - start)
        samples = []
        for n in range(opts["rounds"]):
            t0 = time.perf_counter()
            pool.apply(run, (("echo", n, 0),))
            samples.append((time.perf_counter() - t0) * 1e6)
        samples.sort()
        start = time.perf_counter()
        pool.map(run, [("hash", seed, opts["cpu-rounds"]) for seed in range(opts["cpu-tasks"])])
        cpu = opts["cpu-tasks"] / (time.perf_counter() - start)
        large = b"x" * (opts["payload-mib"] << 20)
        trips = []
        for _ in range(5):
            t0 = time.perf_counter()
            back = pool.apply(run, (("echo", large, 0),))
            assert len(back) == len(large)
            trips.append((time.perf_counter() - t0) * 1e3)
        trips.sort()
    print(json.dumps({"bench": "multiprocessing.Pool", "tiny_per_sec": tiny,
                      "p50_us": quantile(samples, 0.5), "p99_us": quantile(samples, 0.99),
                      "cpu_per_sec": cpu, "large_ms": quantile(trips, 0.5)}))


if __name__ == "__main__":
    main()
