"""ops/ without a Docker engine: parse the compose, Prometheus and Grafana files and check that
services, ports, targets, data-source uids and dashboard metric names are wired consistently."""

from __future__ import annotations

import json
import pathlib
import re

import pytest

yaml = pytest.importorskip("yaml")

OPS = pathlib.Path(__file__).resolve().parents[2] / "ops"


def load_yaml(rel: str):
    return yaml.safe_load((OPS / rel).read_text())


@pytest.fixture(scope="module")
def compose():
    return load_yaml("docker-compose.yml")


def host_ports(service: dict) -> dict[int, int]:
    """container port → host port, from ``"H:C"`` or ``"IP:H:C"`` entries."""
    out = {}
    for p in service.get("ports", []):
        parts = str(p).split(":")
        out[int(parts[-1])] = int(parts[-2])
    return out


def test_compose_services_and_images(compose):
    services = compose["services"]
    assert set(services) >= {"kvtier", "jaeger", "prometheus", "grafana"}
    assert re.fullmatch(r"jaegertracing/jaeger:2\.\d+\.\d+", services["jaeger"]["image"])
    assert {4317, 16686} <= set(host_ports(services["jaeger"]))
    build = services["kvtier"]["build"]
    assert (OPS / build["context"] / build["dockerfile"]).resolve() == (OPS / "Dockerfile").resolve()
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (OPS / src).exists(), f"{name} mounts missing {src}"


def test_kvtier_exports_to_jaeger_and_exposes_metrics(compose):
    services = compose["services"]
    env = services["kvtier"]["environment"]
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", env["OTEL_EXPORTER_OTLP_ENDPOINT"]).groups()
    assert host == "jaeger" and int(port) == 4317 and int(port) in host_ports(services["jaeger"])
    metrics_port = int(env["KVTIER_TELEMETRY__METRICS_PORT"])
    assert env["KVTIER_TELEMETRY__METRICS_HOST"] == "0.0.0.0"  # reachable from the prometheus container
    grpc_port = int(env["KVTIER_SERVER__PORT"])
    assert {grpc_port, metrics_port} <= set(host_ports(services["kvtier"]))
    exposed = set()
    for line in (OPS / "Dockerfile").read_text().splitlines():
        if line.startswith("EXPOSE"):
            exposed |= {int(p) for p in line.split()[1:]}
    assert {grpc_port, metrics_port} <= exposed
    assert (OPS / "Dockerfile.cuda").exists()


def test_prometheus_scrapes_kvtier(compose):
    env = compose["services"]["kvtier"]["environment"]
    prom = load_yaml("prometheus.yml")
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "kvtier")
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == [f"kvtier:{env['KVTIER_TELEMETRY__METRICS_PORT']}"]
    mount = compose["services"]["prometheus"]["volumes"][0].split(":")
    assert mount[0] == "./prometheus.yml" and mount[1] == "/etc/prometheus/prometheus.yml"


def test_grafana_provisioning_points_at_the_services(compose):
    services = compose["services"]
    ds = {d["uid"]: d for d in load_yaml("grafana/provisioning/datasources/datasources.yml")["datasources"]}
    assert ds["prometheus"]["url"] == f"http://prometheus:{next(iter(host_ports(services['prometheus'])))}"
    assert ds["jaeger"]["url"] == "http://jaeger:16686"
    providers = load_yaml("grafana/provisioning/dashboards/dashboards.yml")["providers"]
    mounts = dict(v.split(":")[:2] for v in services["grafana"]["volumes"])
    assert mounts["./grafana/dashboards"] == providers[0]["options"]["path"]
    assert mounts["./grafana/provisioning"] == "/etc/grafana/provisioning"


def test_dashboard_queries_use_exported_metrics(data_dir):
    """Every metric a panel queries is one the server exports (checked against a live registry)."""
    from kvtier.service.server.metrics import KVTierMetrics
    from kvtier.tiering import StoreConfig, TieredStore

    dash = json.loads((OPS / "grafana/dashboards/kvtier.json").read_text())
    uids = {d["uid"] for d in load_yaml("grafana/provisioning/datasources/datasources.yml")["datasources"]}
    metrics = KVTierMetrics()
    with TieredStore(StoreConfig(data_dir=data_dir, hot_device="cpu", hot_capacity=1 << 20,
                                 warm_capacity=1 << 20, warm_pin="off", cold_capacity=4 << 20)) as store:
        metrics.attach(store)
        store.stats.bytes_moved["hot->warm"] += 1  # so the labelled family has a sample
        metrics.observe_rpc("Get", "OK", 0.01)
        metrics.observe_timing("resume", 0.1)
        metrics.observe_timing("prefetch", 0.1)
        exported = {s.name for fam in metrics.registry.collect() for s in fam.samples}
        metrics.detach()
    titles = set()
    for panel in dash["panels"]:
        titles.add(panel["title"].lower())
        assert panel["datasource"]["uid"] in uids
        for target in panel["targets"]:
            names = set(re.findall(r"\bkvtier_[a-z_]+", target["expr"]))
            assert names and names <= exported, f"{panel['title']}: {names - exported}"
    for wanted in ("hit ratio", "bytes per tier", "evictions", "latency"):
        assert any(wanted in t for t in titles), wanted
