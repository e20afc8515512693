"""deploy/k8s: every rendered manifest (the base and each overlay) and every example validates against the
Kubernetes JSON schemas (kubernetes-validate, bundled and offline, strict: unknown fields are errors), and
the numbers that must agree across files agree: the drain budget, ports, selectors, flags, the metric."""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

import kubernetes_validate
import pytest

from kustomize_lite import load_documents, render
from rewardsvc.cli.serve import add_serve_arguments
from rewardsvc.serving.metrics import ServiceMetrics
from rewardsvc.serving.server import FLUSH_S

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUBERNETES_VERSION = "1.37.0"
KUSTOMIZATIONS = ["base", "overlays/cpu", "overlays/tls"]


def rendered(name: str) -> dict[str, dict]:
    objects = render(K8S / name)
    by_kind = {o["kind"]: o for o in objects}
    assert len(by_kind) == len(objects), f"{name}: one object per kind expected"
    return by_kind


def container(objects: dict[str, dict]) -> dict:
    [c] = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return c


def serve_args(c: dict) -> argparse.Namespace:
    """The container's args parsed by `rewardsvc serve`'s own parser: a misspelt flag fails here."""
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_serve_arguments(parser)
    return parser.parse_args(c["args"])


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_rendered_manifests_validate(name):
    objects = render(K8S / name)
    assert {o["kind"] for o in objects} == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler"}
    for obj in objects:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_examples_validate():
    files = sorted((K8S / "examples").glob("*.yaml"))
    assert [f.name for f in files] == ["prometheus-adapter.yaml", "secrets.yaml"]
    for f in files:
        for obj in load_documents(f):
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_validator_catches_a_bad_field():
    # The check above has teeth: a misspelt probe field is an error.
    deployment = rendered("base")["Deployment"]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 50051
    with pytest.raises(kubernetes_validate.ValidationError, match="prot"):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def _prestop_seconds(c: dict) -> float:
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_drain_budget(name):
    """SIGTERM comes after preStop; the server then drains for --grace and flushes for FLUSH_S. The kubelet's
    SIGKILL must come later, and liveness must not fail a draining pod before that."""
    objects = rendered(name)
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    c = container(objects)
    drain = _prestop_seconds(c) + serve_args(c).grace + FLUSH_S
    assert pod["terminationGracePeriodSeconds"] > drain, (pod["terminationGracePeriodSeconds"], drain)
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > drain


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_ports_probes_and_selectors_agree(name):
    objects = rendered(name)
    deployment, service = objects["Deployment"], objects["Service"]
    pod = deployment["spec"]["template"]
    c = container(objects)
    env = {e["name"]: e["value"] for e in c["env"]}
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert int(env["REWARDSVC_PORT"]) == ports["grpc"] and int(env["REWARDSVC_METRICS_PORT"]) == ports["metrics"]
    assert env["REWARDSVC_HOST"] == "0.0.0.0"
    # Otherwise a Service named rewardsvc injects REWARDSVC_PORT=tcp://... into the pod.
    assert pod["spec"]["enableServiceLinks"] is False
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and int(annotations["prometheus.io/port"]) == ports["metrics"]
    assert annotations["prometheus.io/path"] == "/metrics"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        spec = c[probe]
        if name == "overlays/tls":  # native gRPC probes cannot speak TLS
            command = spec["exec"]["command"]
            assert command[0] == "rewardsvc-healthcheck" and "--tls-ca" in command, command
            assert "grpc" not in spec
        else:
            assert spec["grpc"]["port"] == ports["grpc"] and spec["grpc"].get("service", "") == ""
    # Headless, so that dns:/// resolves every pod; it selects exactly the Deployment's pods.
    assert service["spec"]["clusterIP"] == "None"
    labels = pod["metadata"]["labels"]
    for selector in (service["spec"]["selector"], deployment["spec"]["selector"]["matchLabels"],
                     objects["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]):  # fmt: skip
        assert selector.items() <= labels.items()
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    # The auth token is read from a mounted Secret file, never passed as a flag or a literal.
    args = serve_args(c)
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    secrets = {v["name"]: v["secret"]["secretName"] for v in pod["spec"]["volumes"] if "secret" in v}
    assert secrets["auth"] == "rewardsvc-auth" and args.auth_token_file == f"{mounts['auth']}/token"
    if name == "overlays/tls":
        assert secrets["tls"] == "rewardsvc-tls"
        assert args.tls_cert == f"{mounts['tls']}/tls.crt" and args.tls_key == f"{mounts['tls']}/tls.key"


def test_gpu_only_where_meant():
    gpu = container(rendered("base"))
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == "1" and gpu["image"].endswith("-cuda")
    cpu = container(rendered("overlays/cpu"))
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"] and "nvidia.com/gpu" not in cpu["resources"]["requests"]
    assert cpu["image"].endswith("-cpu") and "tolerations" not in rendered("overlays/cpu")["Deployment"]["spec"]["template"]["spec"]


def test_autoscaling_signal_is_a_metric_the_server_exports():
    objects = rendered("base")
    hpa, deployment = objects["HorizontalPodAutoscaler"], objects["Deployment"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
    assert hpa["spec"]["minReplicas"] >= 2  # with the PDB's maxUnavailable 1, one replica always serves
    [metric] = hpa["spec"]["metrics"]
    exported = {family.name for family in ServiceMetrics().registry.collect()}
    assert metric["pods"]["metric"]["name"] in exported
    rule = (K8S / "examples" / "prometheus-adapter.yaml").read_text()
    assert re.search(rf"seriesQuery: '{metric['pods']['metric']['name']}\{{", rule)


def test_probe_command_is_an_installed_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["rewardsvc-healthcheck"] == "rewardsvc.cli.healthcheck:main"
