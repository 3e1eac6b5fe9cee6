"""The Kubernetes manifests (deploy/kubernetes), checked short of a cluster.

Every overlay is rendered with `kubectl kustomize` and validated with kubernetes-validate (strict, the
Kubernetes minor of KUBERNETES_VERSION). Policy tests read the rendered objects for what the service's
design depends on: one trainer that is never two, servers that never write the checkpoint volume, the
token only from a required Secret, probes, the hardening a restricted namespace admits, and settings
that the application's own `Settings` accepts. The route tests derive the trainer-only endpoints from
the application's route table and check the Ingress sends exactly those to the trainer.
tests/integration/test_kubernetes_loopback.py starts the rendered trainer and server as local processes.
"""

from __future__ import annotations

import copy
import os
import re

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError

from app.core.settings import Settings
from tests.deploy.kubernetes import (
    COMPONENTS,
    KUBERNETES,
    KUBERNETES_VERSION,
    OVERLAYS,
    REPO,
    TOKEN_SECRET,
    containers,
    environment,
    find,
    mount_of,
    mounts,
    named_port,
    one,
    pod_spec,
    render_overlay,
    render_with_components,
    role_of,
    service_container,
    workloads,
)
from tests.deploy.routes import SERVER, TRAINER, app_endpoints, ingress_path_matches, ingress_service

SERVICE_OF_ROLE = {TRAINER: "ssd-trainer", SERVER: "ssd-server"}
# environment variables that name a directory the service writes outside the checkpoint volume
WRITTEN_PATHS = ("TMPDIR", "HOME", "XDG_CACHE_HOME", "MPLCONFIGDIR", "TORCH_HOME", "PROMETHEUS_MULTIPROC_DIR")
A_TOKEN = {TOKEN_SECRET: "a-token-from-the-secret"}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render_overlay(request.param)


def by_role(objects: list[dict]) -> dict[str, dict]:
    found: dict[str, list[dict]] = {}
    for workload in workloads(objects):
        found.setdefault(role_of(workload), []).append(workload)
    assert set(found) == {TRAINER, SERVER}, set(found)
    assert all(len(items) == 1 for items in found.values()), "one workload per role"
    return {role: items[0] for role, items in found.items()}


def settings_of(objects: list[dict], workload: dict, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, Settings]:
    """The container's environment, and the Settings the application builds from it."""
    env = environment(objects, service_container(workload), A_TOKEN)
    with monkeypatch.context() as patch:
        for name in [name for name in os.environ if name.startswith("SSD_")]:
            patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        return env, Settings()


def image_user_id() -> int:
    return int(re.search(r"useradd [^\n]*--uid (\d+)", (REPO / "Dockerfile").read_text()).group(1))


def seconds(probe: dict) -> float:
    """How long a probe keeps failing before the kubelet acts."""
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


# ---- rendering and schema validation --------------------------------------------------------------------


def test_every_overlay_renders_and_validates_strictly(rendered):
    overlay, objects = rendered
    kinds = {item["kind"] for item in objects}
    assert {"StatefulSet", "Deployment", "Service", "PersistentVolumeClaim", "ConfigMap", "Ingress",
            "HorizontalPodAutoscaler", "PodDisruptionBudget", "Namespace"} <= kinds, kinds
    assert not find(objects, "Secret"), "the manifests ship no Secret: the operator creates the token's"
    for item in objects:
        # raises ValidationError (a wrong field, a wrong type, a missing required field) or
        # SchemaNotFoundError (a kind or apiVersion this Kubernetes does not serve)
        validated = kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)
        assert validated == KUBERNETES_VERSION, (overlay, item["kind"])
        namespaced = item["kind"] != "Namespace"
        assert (item["metadata"].get("namespace") == "ssd") == namespaced, item["metadata"]


def test_strict_validation_catches_a_misspelt_field(rendered):
    """The validator is not a no-op: one unknown field in the trainer's container is refused."""
    _, objects = rendered
    trainer = copy.deepcopy(by_role(objects)[TRAINER])
    service_container(trainer)["readinesProbe"] = {"httpGet": {"path": "/readyz", "port": "http"}}
    with pytest.raises(kubernetes_validate.ValidationError, match="readinesProbe"):
        kubernetes_validate.validate(trainer, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_components_render_on_each_overlay(overlay, tmp_path):
    objects = render_with_components(overlay, COMPONENTS, tmp_path / "mine")
    roles = by_role(objects)
    (monitor,) = find(objects, "PodMonitor")
    with pytest.raises(SchemaNotFoundError):  # a CRD: the Prometheus Operator's, not in the validator
        kubernetes_validate.validate(monitor, KUBERNETES_VERSION, strict=True)
    assert monitor["metadata"]["namespace"] == "ssd"
    selector = monitor["spec"]["selector"]["matchLabels"]
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    for workload in roles.values():  # every pod is its own target, on its own port
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), role_of(workload)
        named_port(service_container(workload), endpoint["port"])
        assert set(monitor["spec"]["podTargetLabels"]) <= labels.keys()
    assert endpoint["path"] == "/metrics"
    for item in objects:
        if item["kind"] != "PodMonitor":
            kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)


def test_request_based_autoscaling_reads_the_metric_the_adapter_rule_makes(tmp_path):
    from tests.integration.live import architecture_metrics

    objects = render_with_components("cpu", ("autoscale-on-requests",), tmp_path / "mine")
    hpa = one(objects, "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    rules = yaml.safe_load((KUBERNETES / "components" / "autoscale-on-requests" / "prometheus-adapter-rules.yaml")
                           .read_text())["rules"]["custom"]
    (rule,) = rules
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    series = re.match(r"([a-z_]+)\{", rule["seriesQuery"]).group(1)
    assert re.fullmatch(rule["name"]["matches"], series)
    assert architecture_metrics()[series] == "counter"  # a metric the service really exports


# ---- policy -------------------------------------------------------------------------------------------------


def test_one_trainer_that_is_never_two(rendered, monkeypatch):
    _, objects = rendered
    trainer = by_role(objects)[TRAINER]
    assert trainer["spec"]["replicas"] == 1
    if trainer["kind"] == "StatefulSet":
        # a StatefulSet starts a pod's replacement only once the old pod is gone, even on a lost node
        assert trainer["spec"].get("podManagementPolicy", "OrderedReady") == "OrderedReady"
        assert trainer["spec"].get("updateStrategy", {}).get("type", "RollingUpdate") == "RollingUpdate"
    else:
        assert trainer["kind"] == "Deployment", trainer["kind"]
        assert trainer["spec"]["strategy"]["type"] == "Recreate"  # a rolling update runs two for a while
    targets = {(hpa["spec"]["scaleTargetRef"]["kind"], hpa["spec"]["scaleTargetRef"]["name"])
               for hpa in find(objects, "HorizontalPodAutoscaler")}
    assert (trainer["kind"], trainer["metadata"]["name"]) not in targets, "an autoscaler would add trainers"
    for workload in workloads(objects):
        _, settings = settings_of(objects, workload, monkeypatch)
        writes = settings.role != "server"
        assert writes == (workload is trainer), f"{workload['metadata']['name']} runs SSD_ROLE={settings.role}"
    _, settings = settings_of(objects, trainer, monkeypatch)
    assert settings.workers == 1
    assert pod_spec(trainer)["terminationGracePeriodSeconds"] > settings.shutdown_timeout_s


def test_servers_never_mount_the_checkpoints_writable(rendered, monkeypatch):
    _, objects = rendered
    claim = one(objects, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # servers on other nodes read it
    roles = by_role(objects)
    for role, workload in roles.items():
        _, settings = settings_of(objects, workload, monkeypatch)
        table = mounts(workload, service_container(workload))
        found = mount_of(str(settings.checkpoint_dir), table)
        assert found is not None, f"{role}: SSD_CHECKPOINT_DIR is not on a volume"
        _, volume, read_only = found
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        if role == TRAINER:
            assert not read_only
        else:
            assert read_only and volume["persistentVolumeClaim"]["readOnly"] is True
    for workload in workloads(objects):  # nobody else mounts the claim writable
        for container in containers(workload):
            for _, (volume, read_only) in mounts(workload, container).items():
                if "persistentVolumeClaim" in volume and workload is not roles[TRAINER]:
                    assert read_only, workload["metadata"]["name"]


def test_the_token_comes_only_from_a_required_secret(rendered):
    _, objects = rendered
    for config_map in find(objects, "ConfigMap"):
        assert "SSD_API_TOKEN" not in config_map["data"], config_map["metadata"]["name"]
    for workload in workloads(objects):
        for container in containers(workload):
            (token,) = [variable for variable in container.get("env", []) if variable["name"] == "SSD_API_TOKEN"]
            assert "value" not in token
            ref = token["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == TOKEN_SECRET
            assert ref.get("optional", False) is False  # no token, no pod: never an open trainer


def test_every_service_container_has_its_probes(rendered):
    _, objects = rendered
    healthcheck_start = int(re.search(r"--start-period=(\d+)s", (REPO / "Dockerfile").read_text()).group(1))
    for workload in workloads(objects):
        container = service_container(workload)
        port = named_port(container, "http")
        for kind, path in (("startupProbe", "/healthz"), ("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            probe = container[kind]
            assert probe["httpGet"]["path"] == path, (kind, probe)
            assert probe["httpGet"]["port"] in ("http", port)
            assert probe.get("timeoutSeconds", 1) < probe.get("periodSeconds", 10)
        # the model loads before the port answers: at least as long as the image's HEALTHCHECK allows
        assert seconds(container["startupProbe"]) >= healthcheck_start
        assert "initialDelaySeconds" not in container["livenessProbe"]  # the startup probe covers loading


def test_the_settings_are_accepted_by_the_application(rendered, monkeypatch):
    overlay, objects = rendered
    for config_map in find(objects, "ConfigMap"):
        for name in config_map["data"]:
            if name.startswith("SSD_"):  # Settings ignores unknown SSD_* names: a typo would be silent
                assert name.removeprefix("SSD_").lower() in Settings.model_fields, (config_map["metadata"], name)
    for role, workload in by_role(objects).items():
        env, settings = settings_of(objects, workload, monkeypatch)
        container = service_container(workload)
        assert settings.role == role
        assert settings.port == named_port(container, "http")
        assert settings.host == "0.0.0.0" and settings.api_token is not None
        assert settings.device == {"cpu": "cpu", "gpu": "cuda"}[overlay]
        grace = pod_spec(workload)["terminationGracePeriodSeconds"]
        pause = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert grace > pause + settings.shutdown_timeout_s, role
        if settings.workers > 1:  # multiprocess metrics, on the pod's own memory
            _, volume, read_only = mount_of(env["PROMETHEUS_MULTIPROC_DIR"], mounts(workload, container))
            assert volume["emptyDir"].get("medium") == "Memory" and not read_only


def test_pods_are_hardened_as_a_restricted_namespace_admits(rendered, monkeypatch):
    _, objects = rendered
    namespace = one(objects, "Namespace")
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for workload in workloads(objects):
        spec = pod_spec(workload)
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == image_user_id()
        assert pod["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        assert not {"hostNetwork", "hostPID", "hostIPC"} & spec.keys()
        for volume in spec["volumes"]:
            assert {"name", "emptyDir"} == volume.keys() or {"name", "persistentVolumeClaim"} == volume.keys()
        env, _ = settings_of(objects, workload, monkeypatch)
        for container in containers(workload):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert not context.get("privileged", False)
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= container["resources"][bound].keys(), (container["name"], bound)
            table = mounts(workload, container)
            for name in WRITTEN_PATHS:  # the root filesystem is read-only: every written path on an emptyDir
                if name in env:
                    found = mount_of(env[name], table)
                    assert found is not None and "emptyDir" in found[1] and not found[2], (name, env[name])
            assert {"TMPDIR", "HOME"} <= env.keys()


def test_servers_autoscale_and_keep_one_up_through_disruptions(rendered):
    _, objects = rendered
    server = by_role(objects)[SERVER]
    assert server["kind"] == "Deployment"
    assert "replicas" not in server["spec"], "the HPA owns the replica count"
    rolling = server["spec"]["strategy"]["rollingUpdate"]
    assert server["spec"]["strategy"]["type"] == "RollingUpdate" and rolling["maxUnavailable"] == 0
    (hpa,) = find(objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": server["metadata"]["name"]}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    (budget,) = find(objects, "PodDisruptionBudget")
    labels = server["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert budget["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]


def test_every_pod_is_scraped_on_its_own(rendered):
    _, objects = rendered
    for workload in workloads(objects):
        annotations = workload["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/path"] == "/metrics"
        assert int(annotations["prometheus.io/port"]) == named_port(service_container(workload), "http")


def test_gpu_pods_ask_for_a_gpu_and_cpu_pods_do_not(rendered):
    overlay, objects = rendered
    for workload in workloads(objects):
        spec = pod_spec(workload)
        limits = service_container(workload)["resources"]["limits"]
        if overlay == "gpu":
            assert limits["nvidia.com/gpu"] == 1
            assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        else:
            assert "nvidia.com/gpu" not in limits and "nodeSelector" not in spec


def test_each_service_selects_the_pods_of_one_role(rendered):
    _, objects = rendered
    roles = by_role(objects)
    for role, name in SERVICE_OF_ROLE.items():
        service = one(objects, "Service", name)
        for other, workload in roles.items():
            labels = workload["spec"]["template"]["metadata"]["labels"]
            assert (service["spec"]["selector"].items() <= labels.items()) == (other == role), (name, other)
        for port in service["spec"]["ports"]:
            named_port(service_container(roles[role]), port["targetPort"])


# ---- routes -----------------------------------------------------------------------------------------------


def test_trainer_only_endpoints_come_from_the_route_table():
    endpoints = {(endpoint.method, endpoint.template): endpoint.role for endpoint in app_endpoints()}
    # the derivation sees router-level dependencies (/finetune, /validation) and route-level ones (pins)
    assert endpoints[("POST", "/finetune")] == TRAINER and endpoints[("GET", "/validation")] == TRAINER
    assert endpoints[("DELETE", "/model/versions/{version}/pin")] == TRAINER
    assert endpoints[("POST", "/detect")] == SERVER and endpoints[("GET", "/model/versions")] == SERVER
    assert endpoints[("GET", "/model/export")] == SERVER  # needs the token, not the trainer


# The examples table of the Ingress API's documentation ("Examples" under "Path types"):
# (rules as (pathType, path), request path, whether a rule matches, which rule wins).
INGRESS_EXAMPLES = [
    ([("Prefix", "/")], "/anything/at/all", True),
    ([("Exact", "/foo")], "/foo", True),
    ([("Exact", "/foo")], "/bar", False),
    ([("Exact", "/foo")], "/foo/", False),
    ([("Exact", "/foo/")], "/foo", False),
    ([("Prefix", "/foo")], "/foo", True),
    ([("Prefix", "/foo")], "/foo/", True),
    ([("Prefix", "/foo/")], "/foo", True),
    ([("Prefix", "/foo/")], "/foo/", True),
    ([("Prefix", "/aaa/bb")], "/aaa/bbb", False),
    ([("Prefix", "/aaa/bbb")], "/aaa/bbb", True),
    ([("Prefix", "/aaa/bbb/")], "/aaa/bbb", True),
    ([("Prefix", "/aaa/bbb")], "/aaa/bbb/", True),
    ([("Prefix", "/aaa/bbb")], "/aaa/bbb/ccc", True),
    ([("Prefix", "/aaa/bbb")], "/aaa/bbbxyz", False),
    ([("Prefix", "/aaa")], "/ccc", False),
]
INGRESS_PRECEDENCE = [
    ([("Prefix", "/"), ("Prefix", "/aaa")], "/aaa/ccc", ("Prefix", "/aaa")),
    ([("Prefix", "/"), ("Prefix", "/aaa"), ("Prefix", "/aaa/bbb")], "/aaa/bbb", ("Prefix", "/aaa/bbb")),
    ([("Prefix", "/"), ("Prefix", "/aaa"), ("Prefix", "/aaa/bbb")], "/ccc", ("Prefix", "/")),
    ([("Prefix", "/foo"), ("Exact", "/foo")], "/foo", ("Exact", "/foo")),
    ([("Exact", "/foo"), ("Prefix", "/foo")], "/foo", ("Exact", "/foo")),
]


def ingress_of(rules: list[tuple[str, str]]) -> dict:
    paths = [{"pathType": kind, "path": path, "backend": {"service": {"name": f"{kind} {path}"}}}
             for kind, path in rules]
    return {"spec": {"rules": [{"http": {"paths": paths}}]}}


@pytest.mark.parametrize(("rules", "request_path", "matches"), INGRESS_EXAMPLES)
def test_ingress_matching_follows_the_documented_examples(rules, request_path, matches):
    ((kind, path),) = rules
    assert ingress_path_matches(kind, path, request_path) == matches
    assert (ingress_service(ingress_of(rules), request_path) is not None) == matches


@pytest.mark.parametrize(("rules", "request_path", "winner"), INGRESS_PRECEDENCE)
def test_ingress_precedence_follows_the_documented_examples(rules, request_path, winner):
    assert ingress_service(ingress_of(rules), request_path) == " ".join(winner)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_ingress_sends_every_trainer_only_endpoint_to_the_trainer_and_the_rest_to_the_servers(overlay):
    objects = render_overlay(overlay)
    (ingress,) = find(objects, "Ingress")
    services = {service["metadata"]["name"] for service in find(objects, "Service")}
    for rule in ingress["spec"]["rules"]:
        for entry in rule["http"]["paths"]:
            assert entry["backend"]["service"]["name"] in services
    wrong = [f"{endpoint.method} {endpoint.template} -> {ingress_service(ingress, endpoint.path)}"
             for endpoint in app_endpoints()
             if ingress_service(ingress, endpoint.path) != SERVICE_OF_ROLE[endpoint.role]]
    assert not wrong, wrong
    # the Label Studio backend: its webhook feeds the trainer, its predictions come from the servers
    assert ingress_service(ingress, "/labelstudio/webhook") == SERVICE_OF_ROLE[TRAINER]
    assert ingress_service(ingress, "/labelstudio/predict") == SERVICE_OF_ROLE[SERVER]
