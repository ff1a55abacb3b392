"""The ``kvtier`` command line (also ``python -m service``).

Commands:

* ``kvtier serve``: run the server (flags > ``KVTIER_*`` env > ``--config`` TOML > defaults, see
  ``service/server/config.py``);
* ``kvtier stats --target HOST:PORT``: a running server's Stats as tables;
* ``kvtier inspect DATA_DIR``: offline, read-only summary of a data directory (works while a server
  holds it);
* ``kvtier demo``: a multi-turn chat that parks and resumes its KV cache (``service/apps/demo.py``).

Exit codes: 0 success, 1 the server could not start or the target could not be reached, 2 bad usage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="kvtier: park LLM KV caches across GPU, host RAM and disk; get them back token-exact.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
console = Console()
log = logging.getLogger("kvtier")


def setup_logging(level: str) -> None:
    """Log to stderr with trace correlation (``trace_id``/``span_id`` on every line)."""
    from kvtier.service.server.telemetry import LOG_FORMAT, TraceContextFilter

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(TraceContextFilter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@app.command()
def serve(
    config: Annotated[Optional[Path], typer.Option("--config", "-c",
                                                   help="TOML settings file (else $KVTIER_CONFIG)")] = None,
    host: Annotated[Optional[str], typer.Option(help="address to bind [127.0.0.1]")] = None,
    port: Annotated[Optional[int], typer.Option(help="port; 0 picks a free one [50051]")] = None,
    port_file: Annotated[Optional[Path], typer.Option(help="write the bound port to this file")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="store directory [./kvtier-data]")] = None,
    hot_device: Annotated[Optional[str], typer.Option(help="auto | off | cpu | cuda:N [auto]")] = None,
    hot_capacity: Annotated[Optional[str], typer.Option(help="GPU bytes for blocks, e.g. 4GiB")] = None,
    warm_capacity: Annotated[Optional[str], typer.Option(help="host RAM for blocks, e.g. 2GiB (0 = off)")] = None,
    cold_capacity: Annotated[Optional[str], typer.Option(help="LMDB map size, e.g. 16GiB")] = None,
    policy: Annotated[Optional[str], typer.Option(help="eviction policy: lru | s3fifo")] = None,
    write_policy: Annotated[Optional[str], typer.Option(help="write_through | write_back")] = None,
    log_level: Annotated[Optional[str], typer.Option(help="DEBUG | INFO | WARNING | ERROR")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="Prometheus /metrics port (0 = off)")] = None,
    otlp_endpoint: Annotated[Optional[str], typer.Option(help="OTLP collector; turns traces on")] = None,
) -> None:
    """Run the kvtier server until SIGTERM/SIGINT (then drain, flush to disk, exit 0)."""
    import pydantic

    from kvtier.service.server.config import Settings

    overrides: dict[str, Any] = {
        "server": {"host": host, "port": port, "port_file": port_file},
        "store": {"data_dir": data_dir, "hot_device": hot_device, "hot_capacity": hot_capacity,
                  "warm_capacity": warm_capacity, "cold_capacity": cold_capacity, "policy": policy,
                  "write_policy": write_policy},
        "telemetry": {"metrics_port": metrics_port, "otlp_endpoint": otlp_endpoint,
                      "traces": True if otlp_endpoint else None},
        "log_level": log_level.upper() if log_level else None,
    }
    try:
        settings = Settings.load(config, **overrides)
    except (pydantic.ValidationError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]invalid settings:[/red] {exc}", highlight=False)
        raise typer.Exit(2) from None
    setup_logging(settings.log_level)
    from kvtier.service.server.app import serve as run_server
    from kvtier.tiering.errors import TierUnavailable

    try:
        code = asyncio.run(run_server(settings))
    except (TierUnavailable, RuntimeError, ValueError, OSError) as exc:
        log.error("kvtier could not start: %s", exc)
        raise typer.Exit(1) from None
    raise typer.Exit(code)


async def _fetch_stats(target: str, timeout: float):
    import grpc

    from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
    from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(target) as channel:
        return await pb_grpc.KVCacheStub(channel).Stats(pb.StatsRequest(), timeout=timeout)


@app.command()
def stats(
    target: Annotated[str, typer.Option(help="server address host:port")] = "127.0.0.1:50051",
    timeout: Annotated[float, typer.Option(help="seconds to wait for the answer")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw StatsResponse as JSON")] = False,
) -> None:
    """Show a running server's per-tier usage and counters."""
    import grpc
    from google.protobuf import json_format

    from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb

    try:
        resp = asyncio.run(_fetch_stats(target, timeout))
    except grpc.RpcError as exc:
        console.print(f"[red]cannot get stats from {target}:[/red] {exc.code().name}: {exc.details()}",
                      highlight=False)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json_format.MessageToJson(resp, preserving_proto_field_name=True))
        return
    tiers = Table(title=f"kvtier {resp.version} at {target}")
    for col in ("tier", "blocks", "used", "capacity", "hits", "misses", "hit%", "promoted", "demoted", "evicted",
                "bad sum"):
        tiers.add_column(col, justify="left" if col == "tier" else "right")
    for t in resp.tiers:
        looked = t.hits + t.misses
        tiers.add_row(pb.Tier.Name(t.tier).removeprefix("TIER_").lower(), str(t.blocks), _human(t.used_bytes),
                      _human(t.capacity_bytes), str(t.hits), str(t.misses),
                      f"{t.hits / looked:.1%}" if looked else "-", str(t.promotions), str(t.demotions),
                      str(t.evictions), str(t.checksum_failures))
    console.print(tiers)
    for t in (t for t in resp.tiers if t.state):  # the remote tier: its breaker state and failures
        console.print(f"{pb.Tier.Name(t.tier).removeprefix('TIER_').lower()}: {t.state}, hits {t.hits}, "
                      f"misses {t.misses}, errors {t.errors}, dropped writes {t.dropped_writes}", highlight=False)
    summary = Table(show_header=False, title="store")
    summary.add_column("name")
    summary.add_column("value", justify="right")
    summary.add_row("pinned blocks", str(resp.pinned_blocks))
    summary.add_row("write queue depth", str(resp.write_queue_depth))
    summary.add_row("pending writes", str(resp.pending_writes))
    summary.add_row("compression ratio", f"{resp.compression_ratio:.2f}x" if resp.compression_ratio else "-")
    for name, value in sorted(resp.bytes_moved.items()):
        summary.add_row(f"moved {name}", _human(value))
    for name, value in sorted(resp.counters.items()):
        summary.add_row(name, str(value))
    console.print(summary)


@app.command()
def inspect(
    data_dir: Annotated[Path, typer.Argument(help="a kvtier data directory (holds cold/)")],
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Summarise a data directory offline and read-only: namespaces, sessions, blocks, bytes, ratio."""
    from kvtier.service.apps.inspect_dir import summarize

    try:
        summary = summarize(data_dir)
    except (FileNotFoundError, OSError) as exc:
        console.print(f"[red]cannot inspect {data_dir}:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    head = Table(show_header=False, title=f"kvtier data in {summary['data_dir']}")
    head.add_column("name")
    head.add_column("value", justify="right")
    head.add_row("blocks", str(summary["blocks"]))
    head.add_row("sessions", str(summary["sessions"]))
    head.add_row("stored bytes", _human(summary["stored_bytes"]))
    head.add_row("raw bytes", _human(summary["raw_bytes"]))
    head.add_row("compression ratio", f"{summary['compression_ratio']:.2f}x" if summary["compression_ratio"] else "-")
    head.add_row("file size", _human(summary["file_bytes"]))
    console.print(head)
    if summary["namespaces"]:
        ns_table = Table(title="namespaces")
        for col in ("tenant", "model", "revision", "layout", "blocks", "sessions"):
            ns_table.add_column(col, justify="right" if col in ("blocks", "sessions") else "left")
        for ns in summary["namespaces"]:
            ns_table.add_row(ns["tenant"], ns["model"], ns["revision"], ns["layout"], str(ns["blocks"]),
                             str(ns["sessions"]))
        console.print(ns_table)


@app.command()
def demo(
    target: Annotated[Optional[str], typer.Option(help="a running server (else one is started in-process)")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="data directory of the in-process server")] = None,
    turns: Annotated[int, typer.Option(help="conversation turns")] = 3,
    max_new_tokens: Annotated[int, typer.Option(help="tokens generated per turn")] = 24,
) -> None:
    """Chat with SmolLM2-135M, park the KV cache between turns and resume it token-exact."""
    from kvtier.service.apps.demo import run_demo

    setup_logging(os.environ.get("KVTIER_LOG_LEVEL", "WARNING"))
    run_demo(target=target, data_dir=str(data_dir) if data_dir is not None else None, turns=turns,
             max_new_tokens=max_new_tokens)


@app.command()
def bench(
    quick: Annotated[bool, typer.Option("--quick", help="the few-minute run (CI's smoke run)")] = False,
    out: Annotated[Path, typer.Option("--out", help="results folder")] = Path("bench-results"),
    scenarios: Annotated[Optional[str], typer.Option(
        help="comma-separated subset of transport,resume,codec,scale,concurrency,tracing")] = None,
    peers: Annotated[Optional[str], typer.Option(
        help="also measure these peers beside kvtier, after the scenarios: lmcache (needs `make lmcache-venv`)")] = None,
) -> None:
    """Measure kvtier beside its limits (memcpy, bare gRPC, Redis, LMDB+zstd); write OUT/results.{json,md} and PNGs."""
    from kvtier.service.apps.bench import parse_scenarios, run_bench
    from kvtier.service.apps.bench.runner import parse_peers

    try:
        chosen = parse_scenarios(scenarios)
        chosen_peers = parse_peers(peers)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(2) from None
    setup_logging(os.environ.get("KVTIER_LOG_LEVEL", "WARNING"))
    results = run_bench(out, quick=quick, scenarios=chosen, peers=chosen_peers)
    table = Table(title=f"kvtier bench targets ({results['mode']}, {results['seconds']:.0f} s)")
    for col in ("target", "value", "goal", "result", "measured at"):
        table.add_column(col, justify="right" if col in ("value", "goal") else "left")
    for t in results["targets"]:
        res = "-" if t["met"] is None else "[green]met[/green]" if t["met"] else "[red]missed[/red]"
        value = "-" if t["value"] is None else f"{t['value']:.3g}"
        table.add_row(t["description"], value, f"{t['op']} {t['threshold']:g}", res, t["measured_at"] or "-")
    console.print(table)
    failed = [n for n, s in results["scenarios"].items() if s["status"] == "error"]
    console.print(f"results in {out}/results.md" + (f"; [red]failed: {', '.join(failed)}[/red]" if failed else ""),
                  highlight=False)
    if failed:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point (``kvtier``)."""
    app(prog_name="kvtier")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
