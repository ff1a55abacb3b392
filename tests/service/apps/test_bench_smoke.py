"""Smoke test of ``kvtier bench``: every scenario's code path runs and writes its results.

Runs ``kvtier bench --quick`` with ``KVTIER_BENCH_TINY=1`` (toy sizes and a random toy model instead
of SmolLM2) into a temporary folder. Every scenario must run and produce rows of numbers, and every target
a tiny run can measure must be measured; the checks are shown to fail on a planted broken scenario.
Timings are never asserted.
"""

from __future__ import annotations

import io
import json
import math

import pytest
from rich.console import Console
from typer.testing import CliRunner

from kvtier.service.apps.bench import SCENARIOS, run_bench
from kvtier.service.apps.bench.redis_cluster import redis_installed
from kvtier.service.apps.bench.runner import TINY_ENV
from kvtier.service.apps.cli import app

pytestmark = pytest.mark.timeout(300)


#: Targets a tiny run cannot measure: tiny mode skips the cold-only servers; the peers run only with --peers.
NOT_MEASURED_IN_TINY = {"resume_cold_speedup", "resume_cold_fp8_speedup", "resume_cold_vs_oracle", "lmcache_same_host",
                        "lmcache_same_host_store", "lmcache_grpc"}
#: Targets of the fleet scenario, which needs redis-server (without it: "not measured", with a note).
FLEET_TARGETS = {"fleet_resume_speedup", "fleet_get_vs_redis", "fleet_write_vs_raw"}
#: Targets computed from the codec scenario's rows alone.
CODEC_TARGETS = {"bf16_disk_fraction"}


def _numbers(row: dict) -> list[float]:
    return [v for v in row.values() if isinstance(v, (int, float)) and not isinstance(v, bool)]


def check_scenarios(results: dict, scenarios) -> None:
    """Every scenario ran (``ok``: not ``error``, not ``not measured``) and produced rows of finite numbers."""
    assert set(results["scenarios"]) == set(scenarios)
    for name, sc in results["scenarios"].items():
        assert sc["status"] == "ok", (name, sc["status"], sc.get("notes"), sc.get("traceback"))
        assert sc["rows"], f"scenario {name} measured nothing"
        for row in sc["rows"]:
            nums = _numbers(row)
            assert nums and all(math.isfinite(v) for v in nums), (name, row)


def check_targets(results: dict, ids: set[str] | None = None) -> None:
    """Every target a tiny run can measure (or those of ``ids``) was measured: met or missed, with a finite value."""
    for t in results["targets"]:
        if t["id"] in NOT_MEASURED_IN_TINY or (ids is not None and t["id"] not in ids):
            continue
        assert t["met"] in (True, False), (t["id"], t.get("note"))
        assert isinstance(t["value"], (int, float)) and math.isfinite(t["value"]), t


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
    if not redis_installed():  # .ci/run installs it; elsewhere the fleet scenario says why it measured nothing
        assert results["scenarios"].pop("fleet")["status"] == "not measured"
        results["targets"] = [t for t in results["targets"] if t["id"] not in FLEET_TARGETS]
    check_scenarios(results, [s for s in SCENARIOS if s != "fleet" or redis_installed()])
    ids = {t["id"] for t in results["targets"]}
    assert {"grpc_get_vs_echo", "resume_warm_speedup", "bf16_disk_fraction", "index_ram_per_block",
            "concurrency_p99_vs_echo", "shm_one_get_vs_redis", "shm_get_vs_copyto", "tracing_overhead"} <= ids
    check_targets(results)


def _raises(ctx):
    raise RuntimeError("planted failure")


@pytest.mark.parametrize("broken", [None, _raises, lambda ctx: {"rows": [], "notes": []},
                                    lambda ctx: {"status": "not measured", "rows": [], "notes": ["no tool"]},
                                    lambda ctx: {"rows": [{"dtype": "bfloat16", "ratio": float("nan")}], "notes": []}],
                         ids=["working", "raises", "no rows", "not measured", "nan"])
def test_the_checks_catch_a_scenario_that_fails_or_measures_nothing(tmp_path, monkeypatch, broken):
    """One scenario (codec) run alone: the checks pass on the real one and fail on each planted breakage."""
    from kvtier.service.apps.bench import codec

    if broken is not None:
        monkeypatch.setattr(codec, "run", broken)
    results = run_bench(tmp_path / "out", tiny=True, scenarios=["codec"], console=Console(file=io.StringIO()))
    if broken is None:
        check_scenarios(results, ["codec"])
        check_targets(results, CODEC_TARGETS)
        return
    with pytest.raises(AssertionError):
        check_scenarios(results, ["codec"])
    with pytest.raises(AssertionError):
        check_targets(results, CODEC_TARGETS)


def test_unknown_scenario_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--scenarios", "nope", "--out", str(tmp_path)])
    assert result.exit_code == 2
    assert "unknown scenario" in result.output
