"""Subprocesses the bench measures against: a real kvtier server, the bare echo server, redis-server.

Every process listens on 127.0.0.1 only, logs into the run's work directory, and is stopped by the
context manager that started it (SIGTERM, then SIGKILL after a grace period), so a failed scenario
never leaves a server behind. The kvtier server is configured through ``KVTIER_*`` environment
variables (``service/server/config.py``), so it does not depend on the CLI's flag names.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc

#: Started by ``python -c``: the real server process (``service.server.serve``) with env settings.
_SERVE = ("import asyncio, logging, sys; logging.basicConfig(level=logging.WARNING); "
          "from kvtier.service.server.config import Settings; from kvtier.service.server.app import serve; "
          "sys.exit(asyncio.run(serve(Settings.load())))")


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra: dict[str, str]) -> dict[str, str]:
    # The bench decides about tracing itself: an OTLP endpoint in the caller's environment would
    # silently turn it on in every server (service/server/telemetry.py reads these).
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_EXPORTER_OTLP", "KVTIER_"))}
    env.update(extra)
    return env


def _stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _wait_port_file(path: Path, proc: subprocess.Popen, log_path: Path, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            raise RuntimeError(f"server exited with code {proc.returncode} before listening:\n{tail}")
        if path.exists():
            text = path.read_text().strip()
            if text:
                return int(text)
        time.sleep(0.05)
    raise TimeoutError(f"server did not write {path} within {timeout_s:.0f} s")


@contextlib.contextmanager
def kvtier_server(workdir: Path, name: str, data_dir: Path, *, store: dict[str, str] | None = None,
                  telemetry: dict[str, str] | None = None, remote: dict[str, str] | None = None,
                  timeout_s: float = 120.0) -> Iterator[str]:
    """Run ``service.server.serve`` in a subprocess; yields its ``127.0.0.1:port`` address.

    :param workdir: where the port file and the log go (``<name>.log``).
    :param data_dir: the store's data directory (reuse it to restart a server on the same data).
    :param store: ``StoreSettings`` fields as strings (``{"warm_capacity": "1GiB"}``).
    :param telemetry: ``TelemetrySettings`` fields as strings.
    :param remote: ``RemoteSettings`` fields as strings (``{"seeds": '["127.0.0.1:7000"]'}``).
    :raises RuntimeError: if the server exits before listening. :raises TimeoutError: if it is slow.
    """
    port_file = workdir / f"{name}.port"
    port_file.unlink(missing_ok=True)
    log_path = workdir / f"{name}.log"
    extra = {"KVTIER_SERVER__HOST": "127.0.0.1", "KVTIER_SERVER__PORT": "0",
             "KVTIER_SERVER__PORT_FILE": str(port_file), "KVTIER_SERVER__GRACE_S": "0.5",
             "KVTIER_SERVER__MAX_CONCURRENT_RPCS": "256", "KVTIER_STORE__DATA_DIR": str(data_dir),
             "KVTIER_LOG_LEVEL": "WARNING"}
    for section, values in (("STORE", store), ("TELEMETRY", telemetry), ("REMOTE", remote)):
        extra.update({f"KVTIER_{section}__{k.upper()}": str(v) for k, v in (values or {}).items()})
    with open(log_path, "ab") as log_fh:
        proc = subprocess.Popen([sys.executable, "-c", _SERVE], env=_env(extra), cwd=str(workdir),
                                stdout=log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        port = _wait_port_file(port_file, proc, log_path, timeout_s)
        address = f"127.0.0.1:{port}"
        with grpc.insecure_channel(address) as ch:
            grpc.channel_ready_future(ch).result(timeout=timeout_s)
        yield address
    finally:
        _stop(proc)


@contextlib.contextmanager
def echo_server(workdir: Path, timeout_s: float = 60.0) -> Iterator[str]:
    """Run the bare grpc.aio echo server (:mod:`service.bench.echo`) in a subprocess; yields its address."""
    port_file = workdir / "echo.port"
    port_file.unlink(missing_ok=True)
    log_path = workdir / "echo.log"
    with open(log_path, "ab") as log_fh:
        proc = subprocess.Popen([sys.executable, "-m", "kvtier.service.apps.bench.echo", str(port_file)], env=_env({}),
                                cwd=str(workdir), stdout=log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        port = _wait_port_file(port_file, proc, log_path, timeout_s)
        yield f"127.0.0.1:{port}"
    finally:
        _stop(proc, 5.0)


def redis_binary() -> str | None:
    """Path of ``redis-server``, or ``None`` when it is not installed."""
    return shutil.which("redis-server")


@contextlib.contextmanager
def redis_server(workdir: Path, timeout_s: float = 30.0) -> Iterator[int]:
    """Run ``redis-server`` without persistence on a free 127.0.0.1 port; yields the port.

    :raises FileNotFoundError: if ``redis-server`` is not installed (callers skip Redis then).
    """
    binary = redis_binary()
    if binary is None:
        raise FileNotFoundError("redis-server is not installed (apt-get install -y redis-server)")
    port = free_port()
    log_path = workdir / "redis.log"
    with open(log_path, "ab") as log_fh:
        proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                 "--appendonly", "no", "--dir", str(workdir), "--protected-mode", "yes"],
                                stdout=log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with code {proc.returncode}; see {log_path}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("redis-server did not start") from None
                time.sleep(0.05)
        yield port
    finally:
        _stop(proc, 5.0)
