"""Running ``kvtier serve`` the way a shipped ops file runs it, on this machine: a process with the file's
argv and environment, its health check polled until SERVING, stopped with SIGTERM like the orchestrator.

Imports the standard library only; the callers remap what cannot hold here (ports, paths, seeds).
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

BIN = pathlib.Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Tokens:
    """A tokens file's bearer tokens: ``tenant`` (tenant "default") and ``admin``."""

    tenant: str
    admin: str


def write_json_tokens(path: pathlib.Path) -> Tokens:
    """A JSON tokens file shaped as the README's one-liner makes it."""
    tokens = Tokens(secrets.token_urlsafe(32), secrets.token_urlsafe(32))
    path.write_text(json.dumps({"tokens": {tokens.tenant: "default"}, "admin_tokens": [tokens.admin]}))
    return tokens


def scrape(port: int) -> str:
    """The text of ``http://127.0.0.1:PORT/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return resp.read().decode()


def bin_argv(argv: list[str]) -> list[str]:
    """``argv`` with its program taken from this venv (``kvtier`` → ``.venv/bin/kvtier``)."""
    return [str(BIN / argv[0]), *argv[1:]]


@contextlib.contextmanager
def serving(argv: list[str], env: dict[str, str], health: list[str], workdir: pathlib.Path, *,
            stop_grace_s: float, timeout: float = 120.0) -> Iterator[pathlib.Path]:
    """Start ``argv`` (its program from this venv) with only ``env`` (+ PATH, HOME), wait until ``health``
    exits 0 saying SERVING, yield the log's path; SIGTERM on exit, which must end the process with code 0
    within ``stop_grace_s`` (the orchestrator kills after that)."""
    base = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": str(workdir)}
    log_path = workdir / f"kvtier-{len(list(workdir.glob('kvtier-*.log')))}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(bin_argv(argv), env={**base, **env}, cwd=workdir, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert proc.poll() is None, f"kvtier exited {proc.returncode}:\n{log_path.read_text()[-3000:]}"
            done = subprocess.run(bin_argv(health), env={**base, **env}, capture_output=True, text=True, timeout=60)
            if done.returncode == 0:
                break
            assert time.monotonic() < deadline, f"never healthy: {done.stderr}\n{log_path.read_text()[-3000:]}"
            time.sleep(0.5)
        assert "SERVING" in done.stdout, done.stdout
        yield log_path
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(stop_grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            raise AssertionError(f"kvtier did not stop within {stop_grace_s} s of SIGTERM") from None
    assert code == 0, log_path.read_text()[-3000:]


def health_argv(check: list[str], remap: dict[int, int]) -> list[str]:
    """A health check command with the ports it probes on loopback remapped (inside → outside)."""
    out = []
    for arg in check:
        for inside, outside in remap.items():
            arg = arg.replace(f"127.0.0.1:{inside}", f"127.0.0.1:{outside}")
        out.append(arg)
    return out
