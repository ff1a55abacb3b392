"""ops/docker-compose.fleet.yml: two kvtier nodes on a Redis Cluster, with Jaeger and Prometheus.

The file is checked for its wiring (six cluster nodes and the one-shot ``--cluster create`` job, health
checks, the shared Jaeger config, Prometheus scraping both nodes), then BOTH kvtier services are started
with exactly their compose environment and command (``tests/ops/stack.py``), only the unreachable parts
remapped: published ports → free ports, ``0.0.0.0`` → loopback, volumes → temp paths, the seeds → the
test's real Redis Cluster, Jaeger → an in-process OTLP receiver. A durable session put on node 1 is
resumed on node 2 from the remote tier.
"""

from __future__ import annotations

import contextlib
import json
import re

import pytest

from kvtier.service.client.client import KVTierClient
from tests.fixtures.fleet import fetch, park
from tests.ops.launch import free_port, health_argv, scrape, serving, write_json_tokens
from tests.ops.stack import OPS, kvtier_container, parse_dockerfile

yaml = pytest.importorskip("yaml")
NODES = ("kvtier-1", "kvtier-2")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((OPS / "docker-compose.fleet.yml").read_text())


def test_fleet_file_wires_the_cluster_jaeger_and_prometheus(compose):
    services = compose["services"]
    redis = sorted(n for n in services if re.fullmatch(r"redis-\d+", n))
    assert len(redis) == 6
    for name in redis:
        cmd = " ".join(services[name]["command"])
        assert "--cluster-enabled yes" in cmd and "--appendonly yes" in cmd, name
    init = services["redis-cluster-init"]
    cmd = " ".join(init["command"])
    assert "--cluster create" in cmd and "--cluster-replicas 1" in cmd and all(n in cmd for n in redis)
    assert init["restart"] == "no" and init["depends_on"] == {n: {"condition": "service_healthy"} for n in redis}
    for name, svc in services.items():  # every long-running service says when it is up
        assert name == "redis-cluster-init" or svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "./jaeger/config.yaml:/etc/jaeger/config.yaml:ro" in services["jaeger"]["volumes"]
    prom_file = next(v.split(":")[0] for v in services["prometheus"]["volumes"] if v.endswith("prometheus.yml:ro"))
    prom = yaml.safe_load((OPS / prom_file).read_text())
    scraped = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    published = set()
    for node in NODES:
        svc = services[node]
        assert svc["depends_on"]["redis-cluster-init"] == {"condition": "service_completed_successfully"}
        assert services["prometheus"]["depends_on"][node] == {"condition": "service_healthy"}
        env = svc["environment"]
        assert f"{node}:{env['KVTIER_TELEMETRY__METRICS_PORT']}" in scraped, node
        assert {s.rsplit(":", 1)[0] for s in json.loads(env["KVTIER_REMOTE__SEEDS"])} <= set(redis)
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
        ports = {str(p).rsplit(":", 1)[0] for p in svc["ports"]}
        assert not ports & published, "two nodes publish the same host port"
        published |= ports


def test_both_nodes_start_with_their_compose_settings_and_share_durable_sessions(compose, redis_cluster, tmp_path):
    from kvtier.service.apps.bench.tracing import otlp_sink

    image = parse_dockerfile(OPS / "Dockerfile")
    tokens_file = tmp_path / "tokens.json"
    tokens = write_json_tokens(tokens_file)
    targets, metrics = {}, {}
    with otlp_sink() as (endpoint, _spans), contextlib.ExitStack() as stack:
        for node in NODES:
            c = kvtier_container(compose, image, node)
            assert c.argv[:2] == ["kvtier", "serve"], c.argv
            assert c.stop_grace_s > float(c.env["KVTIER_SERVER__GRACE_S"]), "drain must fit the stop grace"
            env = dict(c.env)
            targets[node], metrics[node] = free_port(), free_port()
            remap = {int(env["KVTIER_SERVER__PORT"]): targets[node],
                     int(env["KVTIER_TELEMETRY__METRICS_PORT"]): metrics[node]}
            assert set(remap) <= set(c.published), "compose must publish the gRPC and metrics ports"
            env["KVTIER_SERVER__PORT"], env["KVTIER_TELEMETRY__METRICS_PORT"] = map(str, remap.values())
            for key in ("KVTIER_SERVER__HOST", "KVTIER_TELEMETRY__METRICS_HOST"):
                env[key] = env[key].replace("0.0.0.0", "127.0.0.1")
            env["KVTIER_STORE__DATA_DIR"] = str(tmp_path / node / "data")
            assert list(c.binds) == [env["KVTIER_SECURITY__TOKENS_FILE"]], "only the token file is bind-mounted"
            env["KVTIER_SECURITY__TOKENS_FILE"] = str(tokens_file)
            env["KVTIER_REMOTE__SEEDS"] = json.dumps(redis_cluster.seeds)
            env["OTEL_EXPORTER_OTLP_ENDPOINT"] = env["OTEL_EXPORTER_OTLP_ENDPOINT"].replace("http://jaeger:4317", endpoint)
            (tmp_path / node).mkdir()
            stack.enter_context(serving(c.argv, env, health_argv(c.healthcheck, remap), tmp_path / node,
                                        stop_grace_s=c.stop_grace_s))
        for node in NODES:
            text = scrape(metrics[node])
            assert 'kvtier_remote_up{tier="remote"} 1.0' in text and "kvtier_build_info{" in text, node
        with KVTierClient(f"127.0.0.1:{targets['kvtier-1']}", token=tokens.tenant, timeout=60) as one:
            blocks = park(one, 7, "compose-chat", blocks=3, durable=True)
        with KVTierClient(f"127.0.0.1:{targets['kvtier-2']}", token=tokens.tenant, timeout=60) as two:
            assert two.resume("compose-chat").tiers == ["remote"] * 3
            assert fetch(two, "compose-chat") == blocks
