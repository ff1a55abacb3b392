"""ops/k8s starts: ``kvtier serve`` run with exactly the argv, environment and files the DaemonSet, the
ConfigMap and the Secret give the container (and the image's ENV under them), no cluster needed.

The ConfigMap's ``kvtier.toml`` and the Secret's files are written to temp paths standing for their
mounts; only what cannot hold here is remapped: mount paths → temp paths, ``0.0.0.0`` → loopback, the
container ports → free ports, the Redis seeds → a real local cluster (its password set to the Secret's),
the OTLP collector → an in-process receiver, ``cuda:0`` → ``auto`` on a host without a GPU. Health must say SERVING, /metrics must show the remote tier,
a durable Put must reach the cluster, and a span must reach the collector.
"""

from __future__ import annotations

import json
import pathlib
import re
import time
import tomllib

import pytest
import torch

from kvtier.service.client.client import KVTierClient
from kvtier.tiering import Namespace
from tests.fixtures.fleet import LAYOUT, fetch, park
from tests.ops.launch import free_port, health_argv, scrape, serving
from tests.ops.stack import OPS, parse_dockerfile
from tests.ops.test_k8s import rendered

FIELD_VALUES = {"spec.nodeName": "gpu-node-1"}  # what the downward API gives the DaemonSet's env


def _container_env(image_env: dict[str, str], container: dict) -> dict[str, str]:
    """The image's ENV, then the container's ``env`` (downward API values, ``$(VAR)`` expanded)."""
    env = {k: v for k, v in image_env.items() if k != "PATH"}  # PATH: this venv's (tests/ops/launch.py)
    for item in container.get("env", []):
        value = item["value"] if "value" in item else FIELD_VALUES[item["valueFrom"]["fieldRef"]["fieldPath"]]
        env[item["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), value)
    return env


def _env_beats_toml(env: dict[str, str], settings: dict) -> dict[str, tuple[str, str]]:
    """Settings of the TOML that a ``KVTIER_*`` variable overrides with another value: name → (env, toml)."""
    out = {}
    for section, values in settings.items():
        for key, value in (values.items() if isinstance(values, dict) else []):
            name = f"KVTIER_{section}__{key}".upper()
            if name in env and env[name] != str(value):
                out[name] = (env[name], str(value))
    return out


def test_daemonset_starts_with_its_configmap_secret_and_image_env(redis_cluster_factory, tmp_path):
    from kvtier.service.apps.bench.tracing import otlp_sink

    res = rendered()
    pod = res["DaemonSet/kvtier"]["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert "command" not in c, "the image's ENTRYPOINT is kvtier"
    image = parse_dockerfile(OPS / "Dockerfile.cuda")  # the DaemonSet's image is built from it
    argv = [*image.entrypoint, *c["args"]]
    env = _container_env(image.env, c)
    toml_text = res["ConfigMap/kvtier-config"]["data"]["kvtier.toml"]
    settings = tomllib.loads(toml_text)
    assert not _env_beats_toml(env, settings), "the image's env silently overrides the ConfigMap"

    # mounts → temp paths: the ConfigMap's file, the Secret's files, the cold tier's hostPath
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret = res[f"Secret/{volumes['secret']['secret']['secretName']}"]["stringData"]
    paths = {}
    for m in c["volumeMounts"]:
        local = tmp_path / m["name"]
        if "configMap" in volumes[m["name"]]:
            local.mkdir()
            local = local / m["subPath"]
        elif "secret" in volumes[m["name"]]:
            local.mkdir()
            for name, text in secret.items():
                (local / name).write_text(text)
        paths[m["mountPath"]] = str(local)
    grpc_port, metrics_port = settings["server"]["port"], settings["telemetry"]["metrics_port"]
    assert {p["containerPort"] for p in c["ports"]} == {grpc_port, metrics_port}
    remap = {grpc_port: free_port(), metrics_port: free_port()}
    cluster = redis_cluster_factory()
    password = secret["redis-password"]
    for setting in ("masterauth", "requirepass"):  # the cluster asks for the Secret's password
        cluster.config_set(setting, password)

    def local(value: str) -> str:
        """A mount path (bare or TOML-quoted) → its temp path; 0.0.0.0 → loopback; cuda:0 → auto without a GPU."""
        quote = '"' if value.startswith('"') else ""
        bare = value.strip('"')
        if bare == "cuda:0" and not torch.cuda.is_available():
            bare = "auto"
        for mount, path in paths.items():
            if bare == mount or bare.startswith(mount + "/"):
                bare = path + bare[len(mount):]
        return (quote + bare + quote).replace("0.0.0.0", "127.0.0.1")

    with otlp_sink() as (endpoint, spans):
        lines = []
        for line in toml_text.splitlines():
            key, sep, value = line.partition(" = ")
            if sep:
                value = value.split("#")[0].strip()
                value = {"seeds": json.dumps(cluster.seeds), "otlp_endpoint": json.dumps(endpoint)}.get(key, value)
                value = str(remap.get(int(value), value)) if value.isdigit() else local(value)
                line = f"{key} = {value}"
            lines.append(line)
        config_file = pathlib.Path(local(argv[argv.index("--config") + 1]))
        config_file.write_text("\n".join(lines) + "\n")
        remapped = tomllib.loads(config_file.read_text())
        assert {s: set(v) for s, v in remapped.items()} == {s: set(v) for s, v in settings.items()}
        env = {k: str(remap.get(int(v), v)) if v.isdigit() else local(v) for k, v in env.items()}
        env["OTEL_BSP_SCHEDULE_DELAY"] = "100"
        env.update(OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="1.0")  # keep every trace
        argv = [local(a) for a in argv]
        health = health_argv(image.healthcheck, remap)  # the grpc probes ask the same health service
        assert all(c[p]["grpc"]["port"] == grpc_port for p in ("readinessProbe", "livenessProbe", "startupProbe"))
        with serving(argv, env, health, tmp_path, stop_grace_s=pod["terminationGracePeriodSeconds"]):
            text = scrape(remap[metrics_port])
            assert 'kvtier_remote_up{tier="remote"} 1.0' in text and "kvtier_build_info{" in text
            token = next(iter(json.loads(secret["tokens.json"])["tokens"]))
            tenant = json.loads(secret["tokens.json"])["tokens"][token]
            ns = Namespace(tenant, "k8s-model", "r1", LAYOUT)
            with KVTierClient(f"127.0.0.1:{remap[grpc_port]}", token=token, timeout=60) as kv:
                blocks = park(kv, 3, "k8s-chat", blocks=2, durable=True, ns=ns)  # WAITed on the cluster
                assert fetch(kv, "k8s-chat") == blocks
        deadline = time.monotonic() + 10  # stopped: its last spans are flushed
        while spans[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert spans[0] > 0, "no span reached the ConfigMap's otlp_endpoint"
