"""The ``kvtier`` command line (also ``python -m service``).

Commands:

* ``kvtier serve``: run the server (flags > ``KVTIER_*`` env > ``--config`` TOML > defaults, see
  ``service/server/config.py``);
* ``kvtier stats --target HOST:PORT``: a running server's Stats as tables (``--token``/``--token-file``,
  ``--tls-ca``/``--tls-cert``/``--tls-key`` for a server with auth or TLS);
* ``kvtier health --target HOST:PORT``: exit 0 when the server's gRPC health says SERVING (the
  container healthcheck);
* ``kvtier inspect DATA_DIR``: offline, read-only summary of a data directory (works while a server
  holds it);
* ``kvtier check DATA_DIR``: offline, read-only verification of every record, session and counter
  (exit 0 clean, 1 damage found, 2 the store could not be opened);
* ``kvtier demo``: a multi-turn chat that parks and resumes its KV cache (``service/apps/demo.py``).

``kvtier --version`` prints the version. Errors are one line on stderr, never a traceback.
Exit codes: 0 success, 1 the server could not start or the target could not be reached, 2 bad usage
or invalid settings.
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


def _fail(message: str, code: int) -> typer.Exit:
    """Print ``kvtier: message`` as one stderr line (no rich wrapping) and return the Exit to raise."""
    typer.echo(f"kvtier: {message}", err=True)
    return typer.Exit(code)


def _version(value: bool) -> None:
    if value:
        from kvtier.service import __version__

        typer.echo(f"kvtier {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False) -> None:
    """kvtier: park LLM KV caches across GPU, host RAM and disk; get them back token-exact."""


def _port_taken(host: str, port: int) -> bool:
    """Whether ``host:port`` cannot be bound now (checked before gRPC tries, so a clash is one clear
    line rather than gRPC's own log output). 0 and ``unix:`` hosts are never taken."""
    import socket

    if not port or host.startswith("unix:"):
        return False
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC and http.server do
        try:
            sock.bind((host.strip("[]"), port))
        except OSError:
            return True
    return False


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
    log_level: Annotated[Optional[str], typer.Option(help="debug | info | warning | error (any case)")] = None,
    log_format: Annotated[Optional[str], typer.Option(help="text | json (JSON lines with trace ids)")] = None,
    metrics_port: Annotated[Optional[int], typer.Option(help="Prometheus /metrics port (0 = off)")] = None,
    otlp_endpoint: Annotated[Optional[str], typer.Option(help="OTLP collector; turns traces on")] = None,
    verify_on_start: Annotated[bool, typer.Option(
        "--verify-on-start", help="decode and checksum every cold record before serving (O(store))")] = False,
) -> None:
    """Run the kvtier server until SIGTERM/SIGINT (then drain, flush to disk, exit 0)."""
    from kvtier.service.server.config import Settings, SettingsError
    from kvtier.service.server.logs import setup_logging

    overrides: dict[str, Any] = {
        "server": {"host": host, "port": port, "port_file": port_file},
        "store": {"data_dir": data_dir, "hot_device": hot_device, "hot_capacity": hot_capacity,
                  "warm_capacity": warm_capacity, "cold_capacity": cold_capacity, "policy": policy,
                  "write_policy": write_policy, "verify_on_start": True if verify_on_start else None},
        "telemetry": {"metrics_port": metrics_port, "otlp_endpoint": otlp_endpoint,
                      "traces": True if otlp_endpoint else None},
        "log_level": log_level, "log_format": log_format,
    }
    try:
        settings = Settings.load(config, **overrides)
    except SettingsError as exc:
        raise _fail(str(exc), 2) from None
    setup_logging(settings.log_level, settings.log_format)
    tel = settings.telemetry
    for what, h, p in (("gRPC", settings.server.host, settings.server.port),
                       ("metrics", tel.metrics_host, tel.metrics_port)):
        if _port_taken(h, p):
            raise _fail(f"could not start: {what} port {p} on {h} is already in use", 1)
    from kvtier.service.server.app import serve as run_server
    from kvtier.tiering.errors import TierUnavailable

    try:
        code = asyncio.run(run_server(settings))
    except (TierUnavailable, RuntimeError, ValueError, OSError) as exc:
        raise _fail(f"could not start: {exc}", 1) from None
    raise typer.Exit(code)


def _connection(target: str, token: str | None, token_file: Path | None, tls_ca: Path | None,
                tls_cert: Path | None, tls_key: Path | None):
    from kvtier.service.apps.connect import Connection

    return Connection(target, token, token_file, tls_ca, tls_cert, tls_key)


# The options every command that calls a server takes (Typer needs them spelled out per command).
TargetOpt = Annotated[str, typer.Option(help="server address host:port")]
TokenOpt = Annotated[Optional[str], typer.Option(help="bearer token (visible in `ps`: prefer --token-file)")]
TokenFileOpt = Annotated[Optional[Path], typer.Option(
    help="file holding the token, or the server's tokens file (*.json/*.toml: its first admin token)")]
TlsCaOpt = Annotated[Optional[Path], typer.Option(help="PEM CA bundle of the server's certificate (turns TLS on)")]
TlsCertOpt = Annotated[Optional[Path], typer.Option(help="PEM client certificate (mutual TLS)")]
TlsKeyOpt = Annotated[Optional[Path], typer.Option(help="PEM key of --tls-cert")]


def _call(conn, what: str, rpc, timeout: float):
    """``await rpc(channel, metadata, timeout)`` on a fresh channel of ``conn``; failures become one
    line and an exit: 2 for unusable options (token or TLS files), 1 when the call fails."""
    import grpc

    async def run():
        metadata = conn.metadata()
        async with conn.aio_channel() as channel:
            return await rpc(channel, metadata, timeout)

    try:
        return asyncio.run(run())
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    except grpc.RpcError as exc:
        raise _fail(f"{what} {conn.target}: {exc.code().name}: {exc.details()}", 1) from None


@app.command()
def stats(
    target: TargetOpt = "127.0.0.1:50051",
    timeout: Annotated[float, typer.Option(help="seconds to wait for the answer")] = 5.0,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw StatsResponse as JSON")] = False,
    token: TokenOpt = None, token_file: TokenFileOpt = None,
    tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None, tls_key: TlsKeyOpt = None,
) -> None:
    """Show a running server's per-tier usage and counters (an admin token when auth is on)."""
    from google.protobuf import json_format

    from kvtier.service.apps.tables import stats_tables
    from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
    from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2_grpc as pb_grpc

    conn = _connection(target, token, token_file, tls_ca, tls_cert, tls_key)
    resp = _call(conn, "cannot get stats from", lambda ch, md, t: pb_grpc.KVCacheStub(ch).Stats(
        pb.StatsRequest(), timeout=t, metadata=md), timeout)
    if as_json:
        typer.echo(json_format.MessageToJson(resp, preserving_proto_field_name=True))
        return
    for table in stats_tables(resp, target):
        console.print(table)
    for t in (t for t in resp.tiers if t.state):  # the remote tier: its breaker state and failures
        console.print(f"{pb.Tier.Name(t.tier).removeprefix('TIER_').lower()}: {t.state}, hits {t.hits}, "
                      f"misses {t.misses}, errors {t.errors}, dropped writes {t.dropped_writes}", highlight=False)


@app.command()
def health(
    target: TargetOpt = "127.0.0.1:50051",
    timeout: Annotated[float, typer.Option(help="seconds to wait for the answer")] = 3.0,
    tls_ca: TlsCaOpt = None, tls_cert: TlsCertOpt = None, tls_key: TlsKeyOpt = None,
) -> None:
    """Exit 0 when the server's gRPC health check says SERVING, else 1 (for container healthchecks)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    conn = _connection(target, None, None, tls_ca, tls_cert, tls_key)
    resp = _call(conn, "no health from", lambda ch, md, t: health_pb2_grpc.HealthStub(ch).Check(
        health_pb2.HealthCheckRequest(service="kvtier.v1.KVCache"), timeout=t, metadata=md), timeout)
    typer.echo(f"{target}: {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}")
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        raise typer.Exit(1)


@app.command()
def inspect(
    data_dir: Annotated[Path, typer.Argument(help="a kvtier data directory (holds cold/)")],
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Summarise a data directory offline and read-only: namespaces, sessions, blocks, bytes, ratio."""
    from kvtier.service.apps.inspect_dir import summarize
    from kvtier.service.apps.tables import inspect_tables

    try:
        summary = summarize(data_dir)
    except (FileNotFoundError, OSError) as exc:
        raise _fail(f"cannot inspect {data_dir}: {exc}", 1) from None
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for table in inspect_tables(summary):
        console.print(table)


@app.command()
def check(
    data_dir: Annotated[Path, typer.Argument(help="a kvtier data directory (holds cold/)")],
    cold_key_file: Annotated[Optional[Path], typer.Option(
        help="the server's security.cold_key_file, for an encrypted store (else $KVTIER_COLD_KEY)")] = None,
    write_back: Annotated[bool, typer.Option(
        "--write-back", help="the store was served with write_policy=write_back (sessions may name blocks "
                             "that never reached disk: not damage)")] = False,
) -> None:
    """Verify a data directory offline and read-only: every record decoded against its checksum, every
    session's chain, the accounting. Prints a summary line and each problem; exit 0 clean, 1 damage, 2
    could not open."""
    from kvtier.service.apps.inspect_dir import check_dir
    from kvtier.tiering.crypto import RecordSealer, load_keys
    from kvtier.tiering.errors import TierUnavailable

    try:
        keys = load_keys(cold_key_file)
        report = check_dir(data_dir, RecordSealer(keys) if keys is not None else None, write_back=write_back)
    except (FileNotFoundError, OSError, TierUnavailable, ValueError) as exc:
        raise _fail(f"cannot check {data_dir}: {exc}", 2) from None
    typer.echo(f"{data_dir}: {report.summary()}")
    for line in report.problems:
        typer.echo(f"  {line}")
    if report.problems:
        raise typer.Exit(1)


@app.command()
def demo(
    target: Annotated[Optional[str], typer.Option(help="a running server (else one is started in-process)")] = None,
    data_dir: Annotated[Optional[Path], typer.Option(help="data directory of the in-process server")] = None,
    turns: Annotated[int, typer.Option(help="conversation turns")] = 3,
    max_new_tokens: Annotated[int, typer.Option(help="tokens generated per turn")] = 24,
) -> None:
    """Chat with SmolLM2-135M, park the KV cache between turns and resume it token-exact."""
    from kvtier.service.apps.demo import run_demo
    from kvtier.service.server.logs import setup_logging

    setup_logging(os.environ.get("KVTIER_LOG_LEVEL", "WARNING"), os.environ.get("KVTIER_LOG_FORMAT", "text"))
    run_demo(target=target, data_dir=str(data_dir) if data_dir is not None else None, turns=turns,
             max_new_tokens=max_new_tokens)


@app.command()
def bench(
    quick: Annotated[bool, typer.Option("--quick", help="the few-minute run (CI's smoke run)")] = False,
    out: Annotated[Path, typer.Option("--out", help="results folder")] = Path("bench-results"),
    scenarios: Annotated[Optional[str], typer.Option(
        help="comma-separated subset of transport,resume,codec,scale,concurrency,tracing,quality,fleet")] = None,
    peers: Annotated[Optional[str], typer.Option(
        help="also measure these peers beside kvtier, after the scenarios: lmcache (needs `make lmcache-venv`)")] = None,
) -> None:
    """Measure kvtier beside its limits (memcpy, bare gRPC, Redis, LMDB+zstd); write OUT/results.{json,md} and PNGs."""
    from kvtier.service.apps.bench import parse_scenarios, run_bench
    from kvtier.service.apps.bench.runner import parse_peers
    from kvtier.service.server.logs import setup_logging

    try:
        chosen = parse_scenarios(scenarios)
        chosen_peers = parse_peers(peers)
    except ValueError as exc:
        console.print(f"[red]{exc}[/red]", highlight=False)
        raise typer.Exit(2) from None
    setup_logging(os.environ.get("KVTIER_LOG_LEVEL", "WARNING"), os.environ.get("KVTIER_LOG_FORMAT", "text"))
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
