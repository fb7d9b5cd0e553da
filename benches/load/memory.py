#!/usr/bin/env python3
"""Memory of chosen scenarios: RSS idle, with 10,000 idle keepalive
connections, and 5 s after they close; each scenario several times,
interleaved.

Usage: BENCH_ONLY="tollgate pass-through,tollgate base" TOLLGATE_BASE=path \
       python3 benches/load/memory.py [ROUNDS]
"""
import os
import sys

import bench

rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
names = [n.strip() for n in os.environ.get("BENCH_ONLY", "tollgate pass-through").split(",")]
chosen = [s for s in bench.SCENARIOS if s.name in names]
bench.RAW.mkdir(parents=True, exist_ok=True)
upstream = bench.start_upstream()
bench.wait_port(bench.UPSTREAM)
try:
    for _ in range(rounds):
        for s in chosen:
            s.result = {}
            bench.run_scenario(s, "memory")
finally:
    upstream.stop()
