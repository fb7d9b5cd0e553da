#!/usr/bin/env python3
"""A/B: CPU microseconds per request of scenarios, interleaved several times
and summarised by the median, since one run on a shared VM is noisy.

Usage: BENCH_ONLY="tollgate pass-through,bare Pingora" python3 benches/load/ab.py [ROUNDS]
"""
import os
import statistics
import sys

import bench

bench.DURATION = int(os.environ.get("AB_SECONDS", "5"))
bench.ROUNDS = 1  # this script does its own rounds
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
names = [n.strip() for n in os.environ.get("BENCH_ONLY", "tollgate pass-through,bare Pingora").split(",")]
chosen = [s for s in bench.SCENARIOS if s.name in names]
samples = {s.name: [] for s in chosen}
bench.RAW.mkdir(parents=True, exist_ok=True)
upstream = bench.start_upstream()
bench.wait_port(bench.UPSTREAM)
try:
    for _ in range(rounds):
        for s in chosen:
            s.result, s.samples = {}, []
            bench.run_scenario(s, "max")
            samples[s.name].append((s.result.get("cpu_us", 0), s.result.get("rps", 0)))
finally:
    upstream.stop()
for name, vals in samples.items():
    cpu = statistics.median(v[0] for v in vals)
    rps = statistics.median(v[1] for v in vals)
    print(f"{name}: median {cpu:.1f} us/req, {rps:.0f} req/s; all: {[round(v[0], 1) for v in vals]}")
