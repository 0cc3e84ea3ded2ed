"""deploy/ checked offline: every overlay renders with `kubectl kustomize`, passes strict schema
validation (kubernetes-validate's bundled schemas), and keeps the security settings; and
`loraplex serve` started with exactly the ConfigMap's env answers the kubelet's probes.
No cluster is used (none can run here): the Kubernetes API server is the part that is not tested."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import grpc
import httpx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.integration.server_harness import free_port, wait_ready

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
OVERLAYS = ["cpu", "gpu", "onnx-cpu"]
K8S_VERSION = "1.33.0"

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (make test installs it where apt-get works)")


def render(overlay: str) -> list[dict]:
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s/overlays" / overlay)], capture_output=True, text=True, check=True).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def by_kind(docs: list[dict], kind: str) -> dict:
    [doc] = [d for d in docs if d["kind"] == kind]
    return doc


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(overlay):
    import kubernetes_validate

    docs = render(overlay)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(["ServiceAccount", "ConfigMap", "Secret", "Deployment", "Service", "PersistentVolumeClaim", "HorizontalPodAutoscaler", "PodDisruptionBudget"])
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_extras_validate():
    import kubernetes_validate

    job = yaml.safe_load((DEPLOY / "k8s/extras/train-job.yaml").read_text())
    kubernetes_validate.validate(job, K8S_VERSION, strict=True)
    assert job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "loraplex-adapters"
    pool, route = [d for d in yaml.safe_load_all((DEPLOY / "k8s/extras/inferencepool.yaml").read_text()) if d]
    deployment = by_kind(render("cpu"), "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in pool["spec"]["selector"]["matchLabels"].items())
    assert pool["spec"]["targetPorts"] == [{"number": 8000}]
    assert route["spec"]["rules"][0]["backendRefs"][0]["name"] == pool["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_security_and_operations_settings(overlay):
    docs = render(overlay)
    deployment = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for each in pod["containers"] + pod.get("initContainers", []):
        sc = each["securityContext"]
        assert sc["readOnlyRootFilesystem"] and not sc["allowPrivilegeEscalation"] and sc["capabilities"]["drop"] == ["ALL"]
        assert each["resources"]["requests"] and each["resources"]["limits"]
    assert pod["automountServiceAccountToken"] is False
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert container["startupProbe"]["httpGet"]["path"] == "/health" and container["livenessProbe"]["httpGet"]["path"] == "/health"
    readiness = container["readinessProbe"]
    assert readiness.get("httpGet", {}).get("path") == "/ready" or readiness["grpc"]["service"] == "loraplex.v1.Inference"
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["adapters"]["readOnly"] and mounts["tmp"]["mountPath"] == "/tmp"
    assert pod["terminationGracePeriodSeconds"] > int(by_kind(docs, "ConfigMap")["data"]["LORAPLEX_SHUTDOWN_TIMEOUT"])
    assert "preStop" in container["lifecycle"]
    ports = {p["name"]: p for p in by_kind(docs, "Service")["spec"]["ports"]}
    assert ports["http"]["port"] == 8000 and ports["grpc"]["port"] == 50051 and ports["grpc"]["appProtocol"] == "grpc"
    hpa = by_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "loraplex_num_requests_waiting"
    if overlay == "onnx-cpu":
        data = by_kind(docs, "ConfigMap")["data"]
        assert data["LORAPLEX_BACKEND"] == "onnx" and data["LORAPLEX_MODEL"] == "/models/multi-adapter"
        [init] = pod["initContainers"]
        assert init["command"] == ["loraplex"] and init["args"][:3] == ["export-onnx", "--output_path", data["LORAPLEX_MODEL"]]
        assert {m["mountPath"]: m.get("readOnly", False) for m in container["volumeMounts"]}["/models"] is True
    if overlay == "gpu":
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1" == container["resources"]["requests"]["nvidia.com/gpu"]
        assert by_kind(docs, "ConfigMap")["data"]["LORAPLEX_QUANTIZE"] == "nf4"


def test_serve_with_the_configmap_env_answers_the_kubelet(tiny_base, tmp_path):
    """Exactly the ConfigMap's env; only what differs on this machine is moved: the base (a tiny
    model instead of the baked-in one), the adapter store, the cache, the ports (free loopback
    ports) and the host (loopback instead of 0.0.0.0)."""
    import os
    import sys

    from tests.oracle import make_random_adapter

    env_map = by_kind(render("cpu"), "ConfigMap")["data"]
    store = tmp_path / "adapters"
    store.mkdir()
    make_random_adapter(tiny_base, store / "k8s", seed=90)
    keys = tmp_path / "keys.yaml"
    keys.write_text((DEPLOY / "k8s/base/api-keys.yaml").read_text())
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, **env_map, "LORAPLEX_BASE": str(tiny_base), "LORAPLEX_ADAPTERS_DIR": str(store), "LORAPLEX_CACHE": str(tmp_path / "cache"),
           "LORAPLEX_API_KEYS_FILE": str(keys), "LORAPLEX_HOST": "127.0.0.1", "LORAPLEX_PORT": str(http_port), "LORAPLEX_GRPC_PORT": str(grpc_port)}
    proc = subprocess.Popen([sys.executable, "-m", "loraplex.server.cli", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_ready(url, proc)
        assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/ready").status_code == 200
        assert "vllm:num_requests_waiting" in httpx.get(url + "/metrics").text
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="loraplex.v1.Inference"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # the base Secret holds no keys: every API call needs a key (secure default)
        assert httpx.get(url + "/v1/models").status_code == 401
    finally:
        proc.terminate()
        proc.wait(30)


def test_the_image_command_line_and_env_serve(tiny_base, tmp_path):
    """The CPU image's ENTRYPOINT + CMD and ENV, run locally: only the base, the store, the cache
    and the ports are moved (as a volume mount and port mapping would), and the host is loopback."""
    import json
    import os
    import re
    import sys

    from tests.oracle import make_random_adapter

    dockerfile = (DEPLOY / "Dockerfile").read_text()
    entrypoint = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", dockerfile, re.M).group(1))
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))
    env_line = re.search(r"^ENV (.*?)(?<!\\)$", dockerfile, re.M | re.S).group(1).replace("\\\n", " ")
    image_env = dict(pair.split("=", 1) for pair in env_line.split())
    assert entrypoint == ["loraplex", "serve"] and "--adapters-dir" in cmd
    store = tmp_path / "adapters"
    store.mkdir()
    make_random_adapter(tiny_base, store / "img", seed=91)
    args = [str(store) if a == "/adapters" else ("127.0.0.1" if a == "0.0.0.0" else a) for a in cmd]
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, **image_env, "LORAPLEX_CACHE": str(tmp_path / "cache"), "LORAPLEX_BASE": str(tiny_base),
           "LORAPLEX_PORT": str(http_port), "LORAPLEX_GRPC_PORT": str(grpc_port)}
    proc = subprocess.Popen([sys.executable, "-m", "loraplex.server.cli", "serve", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_ready(url, proc)
        reply = httpx.post(url + "/v1/completions", json={"model": "img", "prompt": [1, 2, 3], "max_tokens": 2}, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2
        # the HEALTHCHECK's own command, against this server
        health_cmd = re.search(r'CMD (python -c ".*")$', dockerfile, re.M).group(1).replace("127.0.0.1:8000", f"127.0.0.1:{http_port}")
        assert subprocess.run(health_cmd.replace("python", sys.executable, 1), shell=True).returncode == 0
    finally:
        proc.terminate()
        proc.wait(30)


def test_onnx_cpu_overlay_init_container_and_server_run_locally(tiny_base, tmp_path):
    """The onnx-cpu pod, run here: the init container's exact command line (the tiny base in place
    of the baked-in one, its output in a temp dir), then `loraplex serve` with the overlay's
    ConfigMap env serving that export; probed as the kubelet would, and answering a request with
    an adapter from the store (converted to .onnx_adapter on load, into a writable temp cache)."""
    import os
    import sys

    from tests.oracle import make_random_adapter

    docs = render("onnx-cpu")
    env_map = by_kind(docs, "ConfigMap")["data"]
    [init] = by_kind(docs, "Deployment")["spec"]["template"]["spec"]["initContainers"]
    models = tmp_path / "models"
    args = [str(models / "multi-adapter") if a == env_map["LORAPLEX_MODEL"] else a for a in init["args"]]
    export = subprocess.run([sys.executable, "-m", "loraplex.server.cli", *args, "--model_name_or_path", str(tiny_base)],
                            env={**os.environ, **env_map, "LORAPLEX_CACHE": str(tmp_path / "cache")}, capture_output=True, text=True, timeout=600)
    assert export.returncode == 0, export.stderr[-2000:]
    store = tmp_path / "adapters"
    store.mkdir()
    make_random_adapter(tiny_base, store / "k8s", seed=92)
    http_port, grpc_port = free_port(), free_port()
    env = {**os.environ, **env_map, "LORAPLEX_MODEL": str(models / "multi-adapter"), "LORAPLEX_ADAPTERS_DIR": str(store),
           "LORAPLEX_CACHE": str(tmp_path / "cache"), "LORAPLEX_API_KEY": "test-admin",
           "LORAPLEX_HOST": "127.0.0.1", "LORAPLEX_PORT": str(http_port), "LORAPLEX_GRPC_PORT": str(grpc_port)}
    env.pop("LORAPLEX_API_KEYS_FILE")  # the Secret's file holds no keys; one admin key instead, to call the API
    proc = subprocess.Popen([sys.executable, "-m", "loraplex.server.cli", "serve"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_ready(url, proc)
        assert httpx.get(url + "/health").status_code == 200
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="loraplex.v1.Inference"), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        headers = {"Authorization": "Bearer test-admin"}
        reply = httpx.post(url + "/v1/completions", headers=headers, json={"model": "k8s", "prompt": [1, 2, 3], "max_tokens": 2, "ignore_eos": True}, timeout=60)
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 2
        assert "vllm:num_requests_waiting" in httpx.get(url + "/metrics", headers=headers).text
    finally:
        proc.terminate()
        proc.wait(30)
