"""Smoke test of ``kvtier bench``: every scenario's code path runs and writes its results.

Runs ``kvtier bench --quick`` with ``KVTIER_BENCH_TINY=1`` (toy sizes and a random toy model instead
of SmolLM2) into a temporary folder. Checks files and structure only: timings are never asserted.
"""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from kvtier.service.apps.bench import SCENARIOS
from kvtier.service.apps.bench.runner import TINY_ENV
from kvtier.service.apps.cli import app

pytestmark = pytest.mark.timeout(300)


def _numbers(row: dict) -> list[float]:
    return [v for v in row.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def test_quick_bench_writes_every_scenario(tmp_path, monkeypatch):
    monkeypatch.setenv(TINY_ENV, "1")
    out = tmp_path / "results"
    result = CliRunner().invoke(app, ["bench", "--quick", "--out", str(out)])
    assert result.exit_code == 0, result.output

    assert (out / "results.md").is_file()
    assert list(out.glob("*.png")), "no plots were drawn"
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "tiny"
    assert results["machine"]["cpu_count"] >= 1
    assert set(results["scenarios"]) == set(SCENARIOS)
    for name, sc in results["scenarios"].items():
        assert sc["status"] in ("ok", "not measured"), (name, sc.get("notes"), sc.get("traceback"))
        if sc["status"] == "ok":
            assert sc["rows"], name
            for row in sc["rows"]:
                nums = _numbers(row)
                assert nums and all(math.isfinite(v) for v in nums), (name, row)
    ids = {t["id"] for t in results["targets"]}
    assert {"grpc_get_vs_echo", "resume_warm_speedup", "bf16_disk_fraction", "index_ram_per_block",
            "concurrency_p99_ms", "tracing_overhead"} <= ids
    for t in results["targets"]:
        assert t["met"] in (True, False, None)
        assert t["met"] is None or isinstance(t["value"], (int, float))


def test_unknown_scenario_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--scenarios", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown scenario" in result.output
