"""ops/ without a Docker engine: parse the compose, Prometheus and Grafana files and check that
services, ports, targets, data-source uids and dashboard metric names are wired consistently."""

from __future__ import annotations

import json
import os
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
            src = vol["source"] if isinstance(vol, dict) else vol.split(":")[0]
            if src.startswith(".") and not src.startswith("./secrets/"):  # secrets/: made by the operator
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
    """Every series a panel queries, and every label it groups by, is in a real /metrics scrape."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    from kvtier.service.server.telemetry import setup_telemetry
    from kvtier.tiering import StoreConfig, TieredStore

    dash = json.loads((OPS / "grafana/dashboards/kvtier.json").read_text())
    uids = {d["uid"] for d in load_yaml("grafana/provisioning/datasources/datasources.yml")["datasources"]}
    tel = setup_telemetry(None)
    with TieredStore(StoreConfig(data_dir=data_dir, hot_device="cpu", hot_capacity=1 << 20,
                                 warm_capacity=1 << 20, warm_pin="off", cold_capacity=4 << 20)) as store:
        port = tel.start_metrics(store, port=0)
        store.stats.bytes_moved["hot->warm"] += 1  # so the labelled family has a sample
        tel.metrics.observe_rpc("Get", "OK", 0.01)
        tel.metrics.observe_timing("resume", 0.1)
        tel.metrics.observe_timing("prefetch", 0.1)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        tel.shutdown()
    labels: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    titles = set()
    for panel in dash["panels"]:
        titles.add(panel["title"].lower())
        assert panel["datasource"]["uid"] in uids
        for target in panel["targets"]:
            names = set(re.findall(r"\b(?:kvtier|process|python)_[a-z_]+", target["expr"]))
            assert names and names <= set(labels), f"{panel['title']}: {names - set(labels)}"
            have = set().union(*(labels[n] for n in names)) | {"le", "job", "instance"}
            for group in re.findall(r"by \(([^)]*)\)", target["expr"]):
                wanted = {g.strip() for g in group.split(",")}
                assert wanted <= have, f"{panel['title']}: groups by {wanted - have}"
    for wanted in ("hit ratio", "bytes per tier", "evictions", "latency", "prefix hit rate"):
        assert any(wanted in t for t in titles), wanted


def test_jaeger_v2_config_keeps_otlp_traces_in_badger(compose):
    jaeger = compose["services"]["jaeger"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in jaeger["volumes"]}
    config_path = jaeger["command"][jaeger["command"].index("--config") + 1]
    assert mounts[config_path] == "./jaeger/config.yaml"
    cfg = load_yaml("jaeger/config.yaml")
    pipeline = cfg["service"]["pipelines"]["traces"]
    assert pipeline["receivers"] == ["otlp"] and pipeline["exporters"] == ["jaeger_storage_exporter"]
    grpc_port = int(cfg["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].rsplit(":", 1)[1])
    otlp = compose["services"]["kvtier"]["environment"]["OTEL_EXPORTER_OTLP_ENDPOINT"]
    assert otlp.endswith(f":{grpc_port}") and grpc_port in host_ports(jaeger)
    store = cfg["exporters"]["jaeger_storage_exporter"]["trace_storage"]
    assert cfg["extensions"]["jaeger_query"]["storage"]["traces"] == store
    assert set(cfg["service"]["extensions"]) >= {"jaeger_storage", "jaeger_query", "healthcheckv2"}
    badger = cfg["extensions"]["jaeger_storage"]["backends"][store]["badger"]
    assert badger["ephemeral"] is False
    volume_dirs = [d for d, src in mounts.items() if not src.startswith(".")]
    for path in badger["directories"].values():  # on the named volume, so traces survive a restart
        assert any(path.startswith(d.rstrip("/") + "/") for d in volume_dirs), path
    health = cfg["extensions"]["healthcheckv2"]["http"]["endpoint"].rsplit(":", 1)[1]
    assert f":{health}/" in " ".join(jaeger["healthcheck"]["test"])


def test_every_service_has_a_healthcheck_and_kvtier_drains_before_the_kill(compose):
    services = compose["services"]
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    kvtier = services["kvtier"]
    from tests.ops.stack import parse_dockerfile

    for name in ("Dockerfile", "Dockerfile.cuda"):  # `docker run` of either image checks what compose checks
        assert ["CMD", *parse_dockerfile(OPS / name).healthcheck] == kvtier["healthcheck"]["test"], name
    grace = float(kvtier["environment"]["KVTIER_SERVER__GRACE_S"])
    assert int(kvtier["stop_grace_period"].rstrip("s")) >= grace + 10  # drain, then flush the write queue
    assert services["prometheus"]["depends_on"]["kvtier"]["condition"] == "service_healthy"
    assert kvtier["restart"] != "unless-stopped"  # a server that cannot start must not loop forever


def test_images_cache_dependencies_apart_from_code_without_the_model_stack():
    from tests.ops.stack import parse_dockerfile

    torch_pin = re.search(r"TORCH_SPEC \?= (torch==[\d.]+)", (OPS.parent / "Makefile").read_text()).group(1)
    for name in ("Dockerfile", "Dockerfile.cuda"):
        steps = parse_dockerfile(OPS / name).instructions
        text = [f"{i} {rest}" for i, rest in steps]
        at = {key: next(n for n, t in enumerate(text) if key in t)
              for key in ("torch==", "COPY pyproject.toml setup.py", "pip install . ", "COPY service",
                          "pip install --no-deps .")}
        assert at["torch=="] < at["COPY pyproject.toml setup.py"] < at["pip install . "] < at["COPY service"] \
            < at["pip install --no-deps ."], name
        assert f'"{torch_pin}"' in text[at["torch=="]], f"{name}: not the tests' {torch_pin}"
        assert not any("[hf]" in t or "transformers" in t for t in text), f"{name} installs the model stack"
        assert any(t.startswith("HEALTHCHECK") for t in text), name


def test_dockerignore_keeps_the_context_small_but_complete():
    lines = [ln.strip() for ln in (OPS.parent / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"  # deny by default: .venv, data and bench results never enter the context
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    copied = set()
    for line in (OPS / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            copied |= {p.rstrip("/").removeprefix("./") for p in line.split()[1:-1]}
    assert copied <= allowed, copied - allowed


def test_readme_toml_example_is_valid_and_uses_the_stack_ports(compose, tmp_path, monkeypatch):
    """The README's settings example loads (no unknown names) and names the ports the stack uses."""
    from kvtier.service.server.config import Settings

    readme = (OPS.parent / "README.md").read_text()
    # the Configuration section's example (the one with every section), not a feature's one-line snippet
    example = next(b for b in re.findall(r"```toml\n(.*?)```", readme, re.S) if "[telemetry]" in b)
    (tmp_path / "kvtier.toml").write_text(example)
    for name in [n for n in os.environ if n.startswith("KVTIER_")]:
        monkeypatch.delenv(name)
    settings = Settings.load(tmp_path / "kvtier.toml")
    env = compose["services"]["kvtier"]["environment"]
    assert settings.telemetry.metrics_port == int(env["KVTIER_TELEMETRY__METRICS_PORT"])
    assert settings.server.port == int(env["KVTIER_SERVER__PORT"])
    assert f"KVTIER_TELEMETRY__METRICS_PORT={env['KVTIER_TELEMETRY__METRICS_PORT']}" in readme
