"""Runs the bench: the chosen scenarios one after another, progress on stderr, results in one folder.

A scenario that fails is recorded with ``status: error`` and its exception, and the run goes on: the
results of the others are still written. Scratch data (stores, server logs) lives in a temporary
directory that is removed at the end; the servers' logs are copied to ``OUT/logs/`` first.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from kvtier.service.wire.memtune import tune_malloc

from kvtier.service.apps.bench import report
from kvtier.service.apps.bench.context import BenchContext

log = logging.getLogger(__name__)

#: Scenario name -> module of ``service.bench`` with ``run(ctx) -> dict`` (imported when chosen).
SCENARIOS: dict[str, str] = {
    "transport": "transport",
    "resume": "resume",
    "codec": "codec",
    "scale": "scale",
    "concurrency": "concurrency",
    "tracing": "tracing",
    "quality": "quality",
    "fleet": "fleet",
}
#: Optional peers (``--peers``), run after the scenarios, never by default: name -> module, as above.
PEERS: dict[str, str] = {
    "lmcache": "lmcache_peer",
}
#: Env var that shrinks every size to a toy (the test suite's smoke run).
TINY_ENV = "KVTIER_BENCH_TINY"


def parse_peers(text: str | None) -> list[str]:
    """``"lmcache"`` -> ``["lmcache"]``; ``None`` or ``""`` -> no peer.

    :raises ValueError: naming unknown peers and the known ones.
    """
    chosen = [s.strip() for s in (text or "").split(",") if s.strip()]
    unknown = [s for s in chosen if s not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer(s) {', '.join(unknown)}; choose from {', '.join(PEERS)}")
    return [s for s in PEERS if s in chosen]


def parse_scenarios(text: str | None) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]`` in run order; ``None`` or ``""`` -> every scenario.

    :raises ValueError: naming unknown scenarios and the known ones.
    """
    if not text:
        return list(SCENARIOS)
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    return [s for s in SCENARIOS if s in chosen]


def run_bench(out: Path, *, quick: bool = False, tiny: bool | None = None, scenarios: list[str] | None = None,
              console: Console | None = None, peers: list[str] | None = None) -> dict:
    """Run ``scenarios`` (default: all), then ``peers`` (default: none; each is one more entry of
    ``scenarios`` in the results), and write ``results.json``, ``results.md`` and PNGs into ``out``.

    :param quick: the few-minute run (512-token resume, 10^4 blocks, fewer repetitions).
    :param tiny: toy sizes (default: ``$KVTIER_BENCH_TINY`` is set); implies ``quick``.
    :param console: where progress goes (default: a stderr console).
    :returns: the results dict as written to ``results.json``.
    """
    if tiny is None:
        tiny = os.environ.get(TINY_ENV, "") not in ("", "0")
    # In-process engine rows run with the allocator setting `kvtier serve` uses (service/wire/memtune.py),
    # so both sides of a comparison pay the same page-fault cost for fresh block buffers.
    tune_malloc()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    names = (scenarios or list(SCENARIOS)) + list(peers or [])
    workdir = Path(tempfile.mkdtemp(prefix="kvtier-bench-"))
    console = console or Console(stderr=True)
    results: dict = {"mode": "tiny" if tiny else "quick" if quick else "full", "machine": report.machine_info(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "scenarios": {}, "notes": []}
    t_run = time.perf_counter()
    # A live bar on a terminal; one timestamped line per step in CI logs (rich draws nothing live there).
    progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.fields[scenario]}"), BarColumn(),
                        TextColumn("{task.completed}/{task.total}"), TextColumn("{task.description}"),
                        TimeElapsedColumn(), console=console, transient=False, disable=not console.is_terminal)
    try:
        with progress:
            task = progress.add_task("", total=len(names), scenario="")
            for i, name in enumerate(names):
                def on_step(text: str, name: str = name, i: int = i) -> None:
                    progress.update(task, description=text)
                    if not console.is_terminal:
                        console.log(f"[{i + 1}/{len(names)}] {name}: {text}", highlight=False)

                progress.update(task, scenario=name)
                on_step("starting")
                ctx = BenchContext(out=out, workdir=workdir, quick=quick or tiny, tiny=tiny, on_step=on_step)
                ctx.shared = results.setdefault("_shared", {})
                results["scenarios"][name] = _run_one(name, ctx)
                progress.advance(task)
                on_step(f"{results['scenarios'][name]['status']} in {results['scenarios'][name]['seconds']:.0f} s")
    finally:
        results.pop("_shared", None)
        _keep_logs(workdir, out)
        shutil.rmtree(workdir, ignore_errors=True)
    results["seconds"] = time.perf_counter() - t_run
    report.write(results, out)
    return results


def _run_one(name: str, ctx: BenchContext) -> dict:
    t0 = time.perf_counter()
    try:
        module = importlib.import_module(f"kvtier.service.apps.bench.{SCENARIOS.get(name) or PEERS[name]}")
        res = module.run(ctx)
        status = res.pop("status", "ok")
    except Exception as exc:  # one broken scenario must not cost the others their results
        log.debug("scenario %s failed", name, exc_info=True)
        res = {"rows": [], "notes": [f"failed: {type(exc).__name__}: {exc}"],
               "traceback": traceback.format_exc(limit=8)}
        status = "error"
    return {"status": status, "seconds": time.perf_counter() - t0, **res}


def _keep_logs(workdir: Path, out: Path) -> None:
    logs = sorted(workdir.glob("*.log"))
    if logs:
        (out / "logs").mkdir(exist_ok=True)
        for f in logs:
            shutil.copy(f, out / "logs" / f.name)
