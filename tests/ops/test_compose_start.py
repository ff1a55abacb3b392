"""The shipped stack starts: ``kvtier serve`` run with exactly the environment, argv, health check and
token file that ops/Dockerfile and ops/docker-compose.yml give the container (no Docker engine here).

Only what cannot hold on a CI machine is remapped: published ports → free ports, ``0.0.0.0`` →
``127.0.0.1`` (tests stay on loopback; the exposure rule is checked with the real host instead), the
data volume → a temp dir, the mounted token file → a temp file made as the README says, ``jaeger`` → an
in-process OTLP receiver, and ``kvtier`` → this venv's script.
"""

from __future__ import annotations

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

import pytest

from tests.ops.stack import OPS, kvtier_container, parse_dockerfile

yaml = pytest.importorskip("yaml")
BIN = pathlib.Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def container():
    return kvtier_container(yaml.safe_load((OPS / "docker-compose.yml").read_text()), parse_dockerfile(OPS / "Dockerfile"))


def _token_file(path: pathlib.Path) -> str:
    """A tokens file shaped as the README's one-liner makes it; returns the admin token."""
    admin = secrets.token_urlsafe(32)
    path.write_text(json.dumps({"tokens": {secrets.token_urlsafe(32): "default"}, "admin_tokens": [admin]}))
    return admin


def test_compose_env_passes_the_exposure_rule(container, tmp_path, monkeypatch):
    """With the real host (0.0.0.0) the settings the container gets are accepted: tokens are on."""
    from kvtier.service.server.auth import authenticator_from_settings
    from kvtier.service.server.config import Settings
    from kvtier.service.server.tls import check_exposure

    for name in [n for n in os.environ if n.startswith("KVTIER_")]:
        monkeypatch.delenv(name)
    env = dict(container.env)
    for target in container.binds:
        _token_file(tmp_path / "tokens.json")
        env = {k: v.replace(target, str(tmp_path / "tokens.json")) for k, v in env.items()}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    settings = Settings.load()
    assert settings.server.host == "0.0.0.0"
    check_exposure(settings.server.host, authenticated=authenticator_from_settings(settings.security).enabled,
                   allow_insecure_remote=settings.security.allow_insecure_remote)
    assert not settings.security.allow_insecure_remote  # tokens, not the opt-in


def test_kvtier_starts_serves_health_metrics_and_stats_then_drains(container, tmp_path):
    from kvtier.service.apps.bench.tracing import otlp_sink

    assert container.argv[:2] == ["kvtier", "serve"], container.argv
    env = dict(container.env)
    grpc_port, metrics_port = _free_port(), _free_port()
    remap = {int(env["KVTIER_SERVER__PORT"]): grpc_port, int(env["KVTIER_TELEMETRY__METRICS_PORT"]): metrics_port}
    assert set(remap) <= set(container.published), "compose must publish the gRPC and metrics ports"
    assert container.stop_grace_s > float(env.get("KVTIER_SERVER__GRACE_S", 10)), "drain must fit the stop grace"
    env["KVTIER_SERVER__PORT"], env["KVTIER_TELEMETRY__METRICS_PORT"] = str(grpc_port), str(metrics_port)
    for key in ("KVTIER_SERVER__HOST", "KVTIER_TELEMETRY__METRICS_HOST"):
        env[key] = env[key].replace("0.0.0.0", "127.0.0.1")
    assert env["KVTIER_STORE__DATA_DIR"] == "/data"
    env["KVTIER_STORE__DATA_DIR"] = str(tmp_path / "data")
    token = None
    for target, source in container.binds.items():
        assert source.parts[0] == "secrets", f"only the token file is bind-mounted, not {source}"
        host_file = tmp_path / source.name
        token = _token_file(host_file)
        env = {k: v.replace(target, str(host_file)) for k, v in env.items()}
    assert token is not None and env["KVTIER_SECURITY__TOKENS_FILE"].startswith(str(tmp_path))
    argv = [str(BIN / container.argv[0]), *container.argv[1:]]
    health = [str(BIN / container.healthcheck[0])]
    for arg in container.healthcheck[1:]:  # the health check probes the container's gRPC port
        for inside, outside in remap.items():
            arg = arg.replace(f"127.0.0.1:{inside}", f"127.0.0.1:{outside}")
        health.append(arg)
    assert f"127.0.0.1:{grpc_port}" in health, f"the health check must probe the gRPC port: {health}"
    base = {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "HOME": str(tmp_path),
            "OTEL_BSP_SCHEDULE_DELAY": "100"}
    with otlp_sink() as (endpoint, spans):
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = env["OTEL_EXPORTER_OTLP_ENDPOINT"].replace("http://jaeger:4317", endpoint)
        log_path = tmp_path / "kvtier.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(argv, env={**base, **env}, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, f"kvtier exited {proc.returncode}:\n{log_path.read_text()[-3000:]}"
                done = subprocess.run(health, env={**base, **env}, capture_output=True, text=True, timeout=60)
                if done.returncode == 0:
                    break
                assert time.monotonic() < deadline, f"never healthy: {done.stderr}\n{log_path.read_text()[-3000:]}"
                time.sleep(0.5)
            assert "SERVING" in done.stdout

            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
                scrape = resp.read().decode()
            for series in ("kvtier_build_info{", "kvtier_tier_capacity_bytes{", "process_resident_memory_bytes",
                           "python_info{"):
                assert series in scrape, series
            assert "_created" not in scrape

            target = f"127.0.0.1:{grpc_port}"
            kvtier = str(BIN / "kvtier")
            denied = subprocess.run([kvtier, "stats", "--target", target], capture_output=True, text=True,
                                    timeout=60, env={**base})
            assert denied.returncode == 1 and "UNAUTHENTICATED" in denied.stderr
            tokens_file = pathlib.Path(env["KVTIER_SECURITY__TOKENS_FILE"])
            stats = subprocess.run([kvtier, "stats", "--target", target, "--token-file", str(tokens_file), "--json"],
                                   capture_output=True, text=True, timeout=60, env={**base})
            assert stats.returncode == 0, stats.stderr
            assert {t["tier"] for t in json.loads(stats.stdout)["tiers"]} == {"TIER_WARM", "TIER_COLD"}
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(container.stop_grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
        assert code == 0, log_path.read_text()[-3000:]
        deadline = time.monotonic() + 10
        while spans[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert spans[0] > 0, "the Stats call's span never reached the OTLP endpoint"
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    assert lines and all({"level", "message", "trace_id", "span_id"} <= set(r) for r in lines)
    assert token not in log_path.read_text()
