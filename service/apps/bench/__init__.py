"""``kvtier bench``: kvtier measured beside its limits, on the same bytes, in one run.

Scenarios (one module each, ``run(ctx) -> {"rows": [...], "notes": [...]}``):

* :mod:`~service.bench.transport`: Put/Get through gRPC and in-process per tier, beside memcpy, a bare
  gRPC stream, Redis and raw LMDB + zstd (:mod:`~service.bench.peers`);
* :mod:`~service.bench.resume`: time to first token, recompute vs restore (warm, cold, after restart);
* :mod:`~service.bench.codec`: compression ratio and speed on real KV per dtype, level, shuffle;
* :mod:`~service.bench.scale`: index RAM, lookup latency and reopen time up to 10^6 blocks;
* :mod:`~service.bench.concurrency`: 1-32 concurrent async clients;
* :mod:`~service.bench.tracing`: throughput with tracing on vs off;
* :mod:`~service.bench.fleet`: nodes sharing a Redis Cluster (remote tier) beside redis-py on the same cluster.

:func:`~service.bench.runner.run_bench` runs them and :mod:`~service.bench.report` writes
``results.json``, ``results.md`` and PNGs; :mod:`~service.bench.targets` judges each target as a ratio
measured in the same run. Benchmarks live here, apart from the tests; nothing here asserts timings.
"""

from kvtier.service.apps.bench.runner import SCENARIOS, parse_scenarios, run_bench

__all__ = ["SCENARIOS", "parse_scenarios", "run_bench"]
