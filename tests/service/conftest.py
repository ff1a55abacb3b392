"""Fixtures for service tests: a real ``kvtier serve`` process on 127.0.0.1 with a free port.

:class:`KVTierProcess` starts ``python -m service serve --port 0 --port-file F`` and reads the port
from ``F``; ``stop(sig)`` sends a signal and returns the exit code; ``restart()`` starts it again on
the same data directory (a new port). Every wait is bounded. The ``server`` fixture yields one with a
CPU "hot" tier and small capacities, so eviction and demotion happen with a few MiB of blocks.

Other test modules may use ``KVTierProcess`` directly for their own settings::

    proc = KVTierProcess(tmp_path, extra_env={"KVTIER_STORE__WRITE_POLICY": "write_back"}).start()
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import grpc
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

#: Settings of the ``server`` fixture (env form, so they also exercise the KVTIER_* layer).
#: ``KVTIER_TEST_HOT_DEVICE=cuda:0`` runs the same tests with the hot tier on a GPU.
SMALL_STORE_ENV = {
    "KVTIER_STORE__HOT_DEVICE": os.environ.get("KVTIER_TEST_HOT_DEVICE", "cpu"),
    "KVTIER_STORE__HOT_CAPACITY": "8MiB",
    "KVTIER_STORE__WARM_CAPACITY": "16MiB",
    "KVTIER_STORE__COLD_CAPACITY": "256MiB",
    "KVTIER_STORE__DURABLE_SYNC": "false",  # a commit still survives SIGKILL; skips fsync on slow CI disks
    "KVTIER_SERVER__GRACE_S": "3",
    "KVTIER_LOG_LEVEL": "INFO",
}


class KVTierProcess:
    """A ``kvtier serve`` child process.

    :param workdir: holds ``data/`` (unless ``data_dir`` is given), the port file and ``server.log``.
    :param args: extra ``serve`` flags.
    :param extra_env: environment on top of :data:`SMALL_STORE_ENV`.
    :param start_timeout: seconds to wait for the port file.
    """

    def __init__(self, workdir: pathlib.Path, *, data_dir: pathlib.Path | None = None, args: tuple[str, ...] = (),
                 extra_env: dict[str, str] | None = None, start_timeout: float = 60.0) -> None:
        self.workdir = pathlib.Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = pathlib.Path(data_dir) if data_dir is not None else self.workdir / "data"
        self.port_file = self.workdir / "port"
        self.log_path = self.workdir / "server.log"
        self.args = tuple(args)
        self.env = {**os.environ, **SMALL_STORE_ENV, **(extra_env or {})}
        self.env.pop("KVTIER_CONFIG", None)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    @property
    def target(self) -> str:
        assert self.port is not None, "server not started"
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> "KVTierProcess":
        """Start the process and wait until it listens. Returns self.

        :raises RuntimeError: if it exits or does not listen within ``start_timeout`` (log included).
        """
        self.port_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", "0",
               "--port-file", str(self.port_file), "--data-dir", str(self.data_dir), *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        end = time.monotonic() + self.start_timeout
        while time.monotonic() < end:
            if self.port_file.exists():
                text = self.port_file.read_text().strip()
                if text:
                    self.port = int(text)
                    self._wait_serving(end)
                    return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"kvtier exited with {self.proc.returncode} during start:\n"
                                   f"{self.log_text()[-4000:]}")
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"kvtier did not listen within {self.start_timeout} s:\n{self.log_text()[-4000:]}")

    def _wait_serving(self, end: float) -> None:
        with grpc.insecure_channel(self.target) as channel:
            grpc.channel_ready_future(channel).result(timeout=max(end - time.monotonic(), 1.0))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit. Returns the exit code (negative: killed by a signal)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc is not None else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError(f"kvtier ignored signal {sig} for {timeout} s:\n{self.log_text()[-4000:]}") from None

    def kill(self) -> None:
        """SIGKILL, if still running (cleanup path)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, sig: int = signal.SIGTERM) -> int:
        """Stop with ``sig`` and start again on the same data directory. Returns the stop's exit code."""
        code = self.stop(sig)
        self.start()
        return code


@pytest.fixture
def kvtier_process(tmp_path):
    """Factory of :class:`KVTierProcess` under ``tmp_path``; every one made is killed at teardown."""
    made: list[KVTierProcess] = []

    def make(name: str = "srv", **kwargs) -> KVTierProcess:
        proc = KVTierProcess(tmp_path / name, **kwargs)
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.kill()


@pytest.fixture
def server(kvtier_process) -> KVTierProcess:
    """A started server with a CPU hot tier (8 MiB), warm 16 MiB, cold 256 MiB, 3 s grace.

    Its own process and data: tests may stop, kill or restart it.
    """
    return kvtier_process().start()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory) -> KVTierProcess:
    """Like ``server`` but one per test module (starting one costs seconds): do not stop it, and use
    namespaces, tenants or session ids of your own so tests stay independent."""
    proc = KVTierProcess(tmp_path_factory.mktemp("shared")).start()
    yield proc
    proc.kill()
