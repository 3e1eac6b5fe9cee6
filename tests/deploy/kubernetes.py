"""The Kubernetes manifests as the cluster would receive them: `kubectl kustomize` output, parsed.

Helpers to find a workload, its container, the environment the kubelet would give it (ConfigMaps
through `envFrom`, then `env`; a Secret's value supplied by the caller) and its mounts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBERNETES = REPO / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu")
COMPONENTS = ("prometheus-operator", "autoscale-on-requests")
# the newest minor kubernetes-validate carries schemas for (docs/KUBERNETES.md names it too)
KUBERNETES_VERSION = "1.37"
TOKEN_SECRET = ("ssd-api-token", "token")


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        pytest.skip("`kubectl` is not installed: it renders the Kustomize manifests (`kubectl kustomize`)")
    return path


def render(directory: Path) -> list[dict]:
    """`kubectl kustomize DIRECTORY`, parsed: what `kubectl apply -k` would send."""
    result = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [document for document in yaml.safe_load_all(result.stdout) if document]


def render_overlay(name: str) -> list[dict]:
    return render(KUBERNETES / "overlays" / name)


def render_with_components(overlay: str, components: tuple[str, ...], workdir: Path) -> list[dict]:
    """An operator's own overlay on top of ours with some components added (as docs/KUBERNETES.md shows)."""
    def relative(path: Path) -> str:  # kustomize refuses absolute paths
        return os.path.relpath(path, workdir)

    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "ssd",
        "resources": [relative(KUBERNETES / "overlays" / overlay)],
        "components": [relative(KUBERNETES / "components" / name) for name in components],
    }))
    return render(workdir)


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [item for item in objects if item["kind"] == kind and name in (None, item["metadata"]["name"])]


def one(objects: list[dict], kind: str, name: str | None = None) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"{len(found)} {kind} named {name}"
    return found[0]


def workloads(objects: list[dict]) -> list[dict]:
    return [item for item in objects if item["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob",
                                                         "ReplicaSet", "Pod"}]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict) -> list[dict]:
    spec = pod_spec(workload)
    return spec.get("initContainers", []) + spec["containers"]


def service_container(workload: dict) -> dict:
    (container,) = pod_spec(workload)["containers"]
    return container


def environment(objects: list[dict], container: dict, secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """The variables the kubelet sets: every `envFrom` ConfigMap in order, then `env` (which wins)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert set(source) == {"configMapRef"}, f"unexpected envFrom source {source}"
        env.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    for variable in container.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            env[variable["name"]] = secrets[(ref["name"], ref["key"])]
    return env


def mounts(workload: dict, container: dict) -> dict[str, tuple[dict, bool]]:
    """mountPath -> (the volume, mounted read-only)."""
    volumes = {volume["name"]: volume for volume in pod_spec(workload).get("volumes", [])}
    return {mount["mountPath"]: (volumes[mount["name"]], bool(mount.get("readOnly", False)))
            for mount in container.get("volumeMounts", [])}


def mount_of(path: str, table: dict[str, tuple[dict, bool]]) -> tuple[str, dict, bool] | None:
    """The mount `path` lies on (the deepest one), or None: the container's root filesystem."""
    found = [mount for mount in table if path == mount or path.startswith(mount.rstrip("/") + "/")]
    if not found:
        return None
    deepest = max(found, key=len)
    return (deepest, *table[deepest])


def named_port(container: dict, name: str) -> int:
    return next(port["containerPort"] for port in container["ports"] if port.get("name") == name)


def role_of(workload: dict) -> str:
    return workload["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]
