"""Results of a bench run: ``results.json``, ``results.md`` and one PNG per scenario (matplotlib, Agg).

The JSON is the source of truth (machine, mode, every row, targets); the Markdown and the plots are
rendered from it. A plot that cannot be drawn is skipped with a note; it never fails the run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from pathlib import Path

from kvtier.service.apps.bench.targets import evaluate


def machine_info() -> dict:
    """CPU, memory, GPU and library versions of this machine, for reading the numbers later."""
    import grpc
    import lmdb
    import torch
    import zstandard

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as fh:
            mem = int(next(ln for ln in fh if ln.startswith("MemTotal")).split()[1]) * 1024
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parents[2], timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)), "mem_bytes": mem,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "grpcio": grpc.__version__, "lmdb": lmdb.version(),
            "zstandard": zstandard.__version__, "git_commit": commit}


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}" if abs(v) >= 10000 else str(v)
    return "-" if v is None else str(v)


def _table(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return lines


def markdown(results: dict) -> str:
    """The whole run as Markdown: machine, targets (met / missed / not measured), one table per scenario."""
    m = results["machine"]
    out = [f"# kvtier bench ({results['mode']})", "",
           f"{m['cpu']} x{m['affinity']} cores, {(m['mem_bytes'] or 0) / 2**30:.0f} GiB RAM, "
           f"GPU: {m['cuda'] or 'none'}; torch {m['torch']}, grpcio {m['grpcio']}; commit {m['git_commit']}; "
           f"{results['seconds']:.0f} s", "",
           "Every target is a ratio or bound measured in this run; numbers on a shared machine are noisy.", "",
           "## Targets", "", "| target | value | goal | result | measured at | goal at |", "|---|---|---|---|---|---|"]
    for t in results["targets"]:
        res = "not measured" if t["met"] is None else ("met" if t["met"] else "**MISSED**")
        out.append(f"| {t['description']} | {_fmt(t['value'])} | {t['op']} {t['threshold']:g} | {res} | "
                   f"{t['measured_at'] or '-'} | {t['target_at'] or '-'} |")
    for name, sc in results["scenarios"].items():
        out += ["", f"## {name}", "", f"status: {sc.get('status')}, {sc.get('seconds', 0):.0f} s", ""]
        out += [f"- {n}" for n in sc.get("notes", [])]
        if sc.get("rows"):
            out += [""] + _table(sc["rows"])
    return "\n".join(out) + "\n"


def _plot_transport(plt, rows: list[dict], path: Path) -> None:
    sizes = sorted({r["block_bytes"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 6), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        sel = [r for r in rows if r["block_bytes"] == size]
        labels = [f"{r['path']}/{r['tier']}/{r['op']}" + (f" x{r['blocks_per_call']}" if r.get("blocks_per_call") else "")
                  for r in sel]
        ax.barh(labels, [r["gbps"] for r in sel], color=["C0" if r["op"] == "get" else "C1" for r in sel])
        ax.set_title(f"{size // 1024} KiB blocks")
        ax.set_xlabel("GB/s (higher is better)")
        ax.set_xscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _plot_xy(plt, rows: list[dict], x: str, ys: list[str], path: Path, title: str, logx: bool = False) -> None:
    fig, axes = plt.subplots(1, len(ys), figsize=(5 * len(ys), 4), squeeze=False)
    groups = sorted({r.get("path", "") for r in rows})
    for ax, y in zip(axes[0], ys):
        for g in groups:  # one line per data path where rows have one
            sel = [r for r in rows if r.get("path", "") == g]
            ax.plot([r[x] for r in sel], [r[y] for r in sel], marker="o", label=g or None)
        if groups != [""]:
            ax.legend()
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if logx:
            ax.set_xscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _plot_bars(plt, labels: list[str], values: list[float], path: Path, title: str, xlabel: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(labels) + 1.5))
    ax.barh(labels, values)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def plots(results: dict, out: Path) -> list[str]:
    """Draw the PNGs of the scenarios that have rows; returns notes about plots that failed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sc = results["scenarios"]
    notes = []
    jobs = {
        "transport": lambda r: _plot_transport(plt, r, out / "transport.png"),
        "resume": lambda r: _plot_bars(plt, [f"{x['source']} @{x['tokens']}" for x in r], [x["ttft_s"] for x in r],
                                       out / "resume.png", "time to first new token", "seconds (lower is better)"),
        "codec": lambda r: _plot_bars(plt, [f"{x['dtype']} {x['codec']} L{x['level']}" for x in r],
                                      [x["disk_fraction"] for x in r], out / "codec.png",
                                      "bytes on disk / raw", "fraction (lower is better)"),
        "scale": lambda r: _plot_xy(plt, r, "blocks", ["index_bytes_per_block", "reopen_s", "lookup_p99_ms"],
                                    out / "scale.png", "scale", logx=True),
        "concurrency": lambda r: _plot_xy(plt, r, "clients", ["gbps", "p50_ms", "p99_ms"], out / "concurrency.png",
                                          "concurrent Get of 360 KiB"),
        "tracing": lambda r: _plot_bars(plt, [x["tracing"] for x in r], [x["gbps"] for x in r], out / "tracing.png",
                                        "Get throughput, tracing on vs off", "GB/s"),
        "fleet": lambda r: _plot_xy(plt, [x for x in r if x.get("part") == "hits"], "nodes", ["hit_rate"],
                                    out / "fleet.png", "hit rate vs nodes, turns on random nodes"),
    }
    for name, draw in jobs.items():
        rows = sc.get(name, {}).get("rows")
        if not rows:
            continue
        try:
            draw(rows)
        except Exception as exc:  # a plot is a convenience: report it, keep the results
            notes.append(f"plot {name}: {type(exc).__name__}: {exc}")
        finally:
            plt.close("all")
    return notes


def _clean(v):
    """NaN and infinities become ``None`` (strict JSON has neither)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def write(results: dict, out: Path) -> None:
    """Evaluate the targets and write ``results.json``, ``results.md`` and the PNGs into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    results["targets"] = evaluate(results)
    results.setdefault("notes", []).extend(plots(results, out))
    (out / "results.json").write_text(json.dumps(_clean(results), indent=2, default=str, allow_nan=False))
    (out / "results.md").write_text(markdown(results))
