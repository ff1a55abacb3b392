"""ops/k8s: the manifests render (kustomization lists every file, each parses), the core resources pass the
Kubernetes JSON schemas strictly (kubernetes-validate, offline), and the parts an operator relies on are there:
gRPC probes, grace above the drain, tokens from the Secret, a local NVMe volume for the cold tier."""

from __future__ import annotations

import pathlib
import tomllib

import pytest
import yaml

K8S = pathlib.Path(__file__).resolve().parents[2] / "ops" / "k8s"


def rendered() -> dict[str, dict]:
    """Every resource the kustomization names, by ``Kind/name`` (a kustomize build without the patches)."""
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    out = {}
    for name in kust["resources"]:
        for doc in yaml.safe_load_all((K8S / name).read_text()):
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


def test_kustomization_names_every_manifest_and_nothing_else():
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kust["resources"]) == files


def test_core_resources_pass_the_kubernetes_schemas_strictly():
    kv = pytest.importorskip("kubernetes_validate")
    checked = 0
    for key, doc in rendered().items():
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # a CRD: checked structurally below
        kv.validate(doc, kv.latest_version(), strict=True)  # raises ValidationError with the path
        checked += 1
    assert checked >= 5


def test_servicemonitor_scrapes_the_metrics_port_of_the_service():
    res = rendered()
    mon, svc = res["ServiceMonitor/kvtier"], res["Service/kvtier"]
    assert mon["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items()
    ports = {p["name"] for p in svc["spec"]["ports"]}
    assert {e["port"] for e in mon["spec"]["endpoints"]} <= ports


def test_daemonset_probes_grace_secret_and_local_volume():
    res = rendered()
    ds = res["DaemonSet/kvtier"]["spec"]["template"]["spec"]
    (c,) = ds["containers"]
    settings = tomllib.loads(res["ConfigMap/kvtier-config"]["data"]["kvtier.toml"])
    grpc_port = settings["server"]["port"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["grpc"]["port"] == grpc_port, probe
    assert ds["terminationGracePeriodSeconds"] > settings["server"]["grace_s"] + 10
    assert {p["containerPort"] for p in c["ports"]} == {grpc_port, settings["telemetry"]["metrics_port"]}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    vols = {v["name"]: v for v in ds["volumes"]}
    assert vols["secret"]["secret"]["secretName"] == "kvtier-secret"
    assert settings["security"]["tokens_file"].startswith(mounts["secret"] + "/")
    assert pathlib.PurePath(settings["security"]["tokens_file"]).name in res["Secret/kvtier-secret"]["stringData"]
    assert mounts["cold"] == settings["store"]["data_dir"] and "hostPath" in vols["cold"]
