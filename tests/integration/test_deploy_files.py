"""Static checks of the deployment files: Dockerfile, compose files, Prometheus and Grafana provisioning.

No Docker engine runs here, so what an engine would reject or silently get wrong is checked by parsing:
the non-root user, the health check, ports, volumes, the GPU reservation, that the Prometheus scrape
target is the compose service and its container port, that Grafana's provisioning is mounted where its
provider config points, and that every dashboard query uses only metric names from docs/ARCHITECTURE.md.
`docker-compose config -q` (Debian's docker-compose, no engine needed) validates both compose files.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.integration.live import (
    DASHBOARD,
    REPO,
    architecture_metrics,
    dashboard_expressions,
    exposed_names,
    free_port,
    grafana_to_promql,
    require_tool,
)

COMPOSE_FILES = ("docker-compose.yml", "docker-compose.cpu.yml")
PROMQL_FUNCTIONS = {
    "abs", "avg", "ceil", "clamp_min", "clamp_max", "count", "delta", "floor", "histogram_quantile",
    "increase", "irate", "label_replace", "max", "min", "quantile", "rate", "round", "sort", "sort_desc", "sum",
    "topk", "vector",
}
PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


# ---- parsing helpers ---------------------------------------------------------------------------------


def dockerfile_instructions(path: Path = REPO / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, with line continuations joined and comments dropped."""
    instructions, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, args = line.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
    return instructions


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """Instructions split into build stages (each starts with FROM)."""
    result: list[list[tuple[str, str]]] = []
    for keyword, args in instructions:
        if keyword == "FROM":
            result.append([])
        if result:
            result[-1].append((keyword, args))
    return result


def env_of(stage: list[tuple[str, str]]) -> dict[str, str]:
    """ENV key=value pairs of one stage."""
    env: dict[str, str] = {}
    for keyword, args in stage:
        if keyword == "ENV":
            for pair in shlex.split(args):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def load_yaml(relative: str) -> dict:
    return yaml.safe_load((REPO / relative).read_text())


def container_ports(service: dict) -> set[int]:
    """Container-side ports of a compose service's `ports` (short syntax "host:container")."""
    return {int(str(spec).rsplit(":", 1)[-1].split("/")[0]) for spec in service.get("ports", [])}


def bind_mounts(service: dict) -> dict[str, str]:
    """Container path -> host path (relative to the repo) for a compose service's bind mounts."""
    mounts = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        if source.startswith("."):
            mounts[target] = source
    return mounts


def named_volumes(service: dict) -> dict[str, str]:
    """Container path -> named volume for a compose service."""
    result = {}
    for spec in service.get("volumes", []):
        source, target = spec.split(":")[:2]
        if not source.startswith((".", "/")):
            result[target] = source
    return result


def metric_names_in(expr: str) -> set[str]:
    """Metric names a PromQL expression selects; fails on identifiers that are neither functions nor keywords."""
    stripped = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    stripped = re.sub(r"\{[^}]*\}", "", stripped)  # label matchers
    stripped = re.sub(r"\[[^\]]*\]", "", stripped)  # range selectors
    stripped = GROUPING.sub("", stripped)  # by (...) / on (...) label lists
    names = set()
    for match in IDENTIFIER.finditer(stripped):
        word = match.group(0)
        is_call = stripped[match.end():].lstrip().startswith("(")
        if is_call:
            assert word in PROMQL_FUNCTIONS, f"unexpected function {word!r} in {expr!r}"
        elif word not in PROMQL_KEYWORDS:
            names.add(word)
    return names


# ---- Dockerfile ------------------------------------------------------------------------------------------


def test_dockerfile_is_multi_stage_with_venv_copied_from_builder():
    built = stages(dockerfile_instructions())
    assert len(built) >= 2
    assert all(stage[0][1].split()[0] == "python:3.11-slim" for stage in built)
    builder_name = built[0][0][1].split()[-1]
    builder_runs = " ".join(args for keyword, args in built[0] if keyword == "RUN")
    assert "venv" in builder_runs and re.search(r"pip install .*\.$", builder_runs)
    runtime = built[-1]
    copies = [args for keyword, args in runtime if keyword == "COPY"]
    assert any(f"--from={builder_name}" in args and "/opt/venv" in args for args in copies)
    assert "/opt/venv/bin" in env_of(runtime)["PATH"]


def test_dockerfile_runs_as_non_root_user():
    runtime = stages(dockerfile_instructions())[-1]
    users = [args for keyword, args in runtime if keyword == "USER"]
    assert users, "the runtime stage must switch to a non-root USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    runs = " ".join(args for keyword, args in runtime if keyword == "RUN")
    assert re.search(rf"useradd .*\b{user}\b", runs), f"user {user!r} is never created"


def test_dockerfile_healthcheck_hits_healthz_with_python():
    runtime = stages(dockerfile_instructions())[-1]
    checks = [args for keyword, args in runtime if keyword == "HEALTHCHECK"]
    assert len(checks) == 1
    assert "CMD python -c" in checks[0] and "urllib.request" in checks[0] and "/healthz" in checks[0]
    assert "curl" not in checks[0]


def test_dockerfile_settings_port_volume_and_command():
    runtime = stages(dockerfile_instructions())[-1]
    env = env_of(runtime)
    assert {"SSD_MODEL", "SSD_DEVICE", "SSD_CHECKPOINT_DIR", "SSD_HOST", "SSD_PORT"} <= env.keys()
    assert env["SSD_HOST"] == "0.0.0.0"  # reachable from outside the container
    exposed = {int(port) for keyword, args in runtime if keyword == "EXPOSE" for port in args.split()}
    assert exposed == {int(env["SSD_PORT"])}
    volumes = [json.loads(args) for keyword, args in runtime if keyword == "VOLUME"]
    assert [env["SSD_CHECKPOINT_DIR"]] in volumes
    commands = [json.loads(args) for keyword, args in runtime if keyword == "CMD"]
    assert commands == [["python", "-m", "app"]]  # exec form: the server is PID 1 and gets SIGTERM
    entry = (REPO / "app" / "__main__.py").read_text()
    assert '"app.main:app"' in entry and "settings.port" in entry and "settings.host" in entry


def test_docker_build_context_keeps_what_pip_needs_and_drops_the_rest():
    """Every COPY source exists and survives .dockerignore; .venv, caches and checkpoints stay out."""
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    ignored = [pattern for pattern in ignored if pattern and not pattern.startswith("#")]
    for required in (".venv", "**/__pycache__", "checkpoints", ".pytest_cache", ".git"):
        assert required in ignored

    def is_ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.removeprefix("**/"))
                   for pattern in ignored)

    for keyword, args in dockerfile_instructions():
        if keyword == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert (REPO / source).exists(), f"COPY source {source} missing"
                assert not is_ignored(source), f"COPY source {source} is excluded by .dockerignore"
    pyproject = (REPO / "pyproject.toml").read_text()
    readme = re.search(r'readme\s*=\s*"([^"]+)"', pyproject).group(1)
    copied = " ".join(args for keyword, args in dockerfile_instructions() if keyword == "COPY")
    assert readme in copied and "pyproject.toml" in copied


@pytest.mark.integration
def test_image_build_steps_give_an_install_that_serves_and_passes_its_healthcheck(tmp_path):
    """The builder stage without an engine: copy exactly what it COPYs, `pip install` it (no editable
    install, no repo on the path), start the runtime CMD with the runtime ENV, run the HEALTHCHECK
    command itself, then SIGTERM (docker stop) must end the server with status 0."""
    built = stages(dockerfile_instructions())
    context = tmp_path / "context"
    for keyword, args in built[0]:
        if keyword == "COPY":
            *sources, destination = args.split()
            for source in sources:
                target = context / destination / source if destination.endswith("/") else context / destination
                if (REPO / source).is_dir():
                    shutil.copytree(REPO / source, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy(REPO / source, target)
    site = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(context)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr

    runtime = built[-1]
    port = free_port()
    env = {
        **{key: value for key, value in os.environ.items() if not key.startswith("SSD_")},
        **{key: value for key, value in env_of(runtime).items() if key.startswith("SSD_")},
        "PYTHONPATH": str(site),
        "SSD_PORT": str(port),
        "SSD_MODEL": "ssd-small",  # the image's default ssd300 would only be slower to build here
        "SSD_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "SSD_TORCH_THREADS": "1",
        "SSD_API_TOKEN": "image-test-token",  # the image listens on 0.0.0.0, where a token is required
    }
    command = json.loads(next(args for keyword, args in runtime if keyword == "CMD"))
    command[0] = sys.executable if command[0] == "python" else command[0]
    where = subprocess.run([sys.executable, "-c", "import app; print(app.__file__)"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert where.stdout.startswith(str(site)), f"app imported from {where.stdout!r}, not the install"

    healthcheck = next(args for keyword, args in runtime if keyword == "HEALTHCHECK")
    probe = shlex.split(healthcheck.split(" CMD ", 1)[1].split(" || ")[0])
    probe[0] = sys.executable
    log = tmp_path / "server.log"
    with log.open("wb") as log_file:
        server = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while subprocess.run(probe, env=env, capture_output=True, timeout=30).returncode != 0:
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "HEALTHCHECK never passed:\n" + log.read_text()[-3000:]
            time.sleep(0.5)
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=30)


# ---- compose ---------------------------------------------------------------------------------------------


def test_compose_gpu_service_reserves_a_gpu_and_maps_the_exposed_port():
    ssd = load_yaml("docker-compose.yml")["services"]["ssd"]
    devices = ssd["deploy"]["resources"]["reservations"]["devices"]
    assert any(device["driver"] == "nvidia" and "gpu" in device["capabilities"] for device in devices)
    runtime_env = env_of(stages(dockerfile_instructions())[-1])
    assert container_ports(ssd) == {int(runtime_env["SSD_PORT"])}
    assert ssd["environment"]["SSD_PORT"] == runtime_env["SSD_PORT"]
    assert ssd["build"]["context"] == "."


@pytest.mark.parametrize("compose_file", COMPOSE_FILES)
def test_compose_checkpoints_on_a_named_volume(compose_file):
    compose = load_yaml(compose_file)
    ssd = compose["services"]["ssd"]
    checkpoint_dir = ssd["environment"]["SSD_CHECKPOINT_DIR"]
    volume = named_volumes(ssd).get(checkpoint_dir)
    assert volume is not None and volume in compose["volumes"]


@pytest.mark.parametrize("compose_file", COMPOSE_FILES)
def test_compose_stop_grace_period_outlasts_the_service_shutdown_timeout(compose_file):
    """docker stop must not SIGKILL the service before it has written its final checkpoint."""
    from app.core.settings import Settings

    ssd = load_yaml(compose_file)["services"]["ssd"]
    grace_s = float(re.fullmatch(r"(\d+)s", ssd["stop_grace_period"]).group(1))
    shutdown_s = float(ssd["environment"].get("SSD_SHUTDOWN_TIMEOUT_S", Settings().shutdown_timeout_s))
    assert grace_s > shutdown_s


def test_compose_cpu_variant_has_no_gpu_reservation_and_reuses_prometheus_and_grafana():
    compose = load_yaml("docker-compose.cpu.yml")
    ssd = compose["services"]["ssd"]
    assert "deploy" not in ssd
    assert ssd["environment"]["SSD_DEVICE"] == "cpu"
    for name in ("prometheus", "grafana"):
        assert compose["services"][name]["extends"] == {"file": "docker-compose.yml", "service": name}


def test_prometheus_scrapes_the_compose_service_on_its_container_port():
    compose = load_yaml("docker-compose.yml")
    prometheus_service = compose["services"]["prometheus"]
    config_flag = next(arg for arg in prometheus_service["command"] if arg.startswith("--config.file="))
    config_path = config_flag.split("=", 1)[1]
    assert bind_mounts(prometheus_service)[config_path] == "./deploy/prometheus/prometheus.yml"

    config = load_yaml("deploy/prometheus/prometheus.yml")
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = [target for group in jobs["ssd"]["static_configs"] for target in group["targets"]]
    assert jobs["ssd"].get("metrics_path", "/metrics") == "/metrics"
    assert targets, "the ssd job scrapes nothing"
    for target in targets:
        host, port = target.split(":")
        assert host in compose["services"]
        assert int(port) in container_ports(compose["services"][host])


@pytest.mark.integration
def test_promtool_accepts_the_prometheus_config():
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "config", "deploy/prometheus/prometheus.yml"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_grafana_provisioning_is_mounted_and_points_at_prometheus():
    compose = load_yaml("docker-compose.yml")
    grafana = compose["services"]["grafana"]
    mounts = bind_mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"

    providers = load_yaml("deploy/grafana/provisioning/dashboards/dashboards.yml")["providers"]
    dashboard_dir = providers[0]["options"]["path"]
    assert mounts[dashboard_dir] == "./deploy/grafana/dashboards"
    assert (REPO / mounts[dashboard_dir].removeprefix("./") / DASHBOARD.name).is_file()

    datasources = load_yaml("deploy/grafana/provisioning/datasources/prometheus.yml")["datasources"]
    assert len(datasources) == 1 and datasources[0]["type"] == "prometheus"
    host, port = re.fullmatch(r"http://([a-z0-9_-]+):(\d+)", datasources[0]["url"]).groups()
    assert host in compose["services"] and int(port) in container_ports(compose["services"][host])

    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for item in (panel, *panel.get("targets", [])):
            if "datasource" in item:
                assert item["datasource"]["uid"] == datasources[0]["uid"], panel["title"]


# ---- dashboard ---------------------------------------------------------------------------------------


def test_promql_name_extraction_sees_metrics_not_functions_or_labels():
    expr = 'histogram_quantile(0.99, sum by (le, route) (rate(ssd_a_bucket{status=~"5.."}[1m]))) / on() ssd_b'
    assert metric_names_in(expr) == {"ssd_a_bucket", "ssd_b"}
    with pytest.raises(AssertionError, match="unexpected function"):
        metric_names_in("made_up(ssd_a)")


def test_dashboard_queries_use_only_metric_names_from_the_architecture_table():
    allowed = exposed_names(architecture_metrics())
    assert "ssd_loss_loc_bucket" in allowed and "ssd_finetune_steps_total" in allowed  # the table was read
    expressions = dashboard_expressions()
    assert expressions
    for title, expr in expressions:
        names = metric_names_in(grafana_to_promql(expr))
        assert names, f"{title}: {expr!r} selects no metric"
        assert names <= allowed, f"{title}: unknown metric(s) {sorted(names - allowed)} in {expr!r}"


def test_dashboard_shows_every_required_quantity():
    used = set().union(*(metric_names_in(grafana_to_promql(expr)) for _, expr in dashboard_expressions()))
    required = {
        "ssd_loss_loc_sum", "ssd_loss_conf_sum",  # loss over time by source
        "ssd_positives_per_image_sum", "ssd_hard_negatives_per_image_sum",
        "ssd_matched_iou_bucket",  # IoU distribution
        "ssd_forced_matches_total", "ssd_ground_truth_boxes_total",  # forced-match rate
        "ssd_finetune_steps_total", "ssd_finetune_skipped_steps_total", "ssd_finetune_queue_depth",
        "ssd_model_version",
        "ssd_http_requests_total", "ssd_http_request_duration_seconds_bucket",  # rate, latency, errors
        "ssd_class_forced_matches_total", "ssd_class_ground_truth_boxes_total", "ssd_class_positives_total",
        "ssd_class_matched_iou_total", "ssd_class_loss_conf_total",  # the "By class" row
        "ssd_validation_ap_50",
    }
    assert required <= used, sorted(required - used)
    panels = json.loads(DASHBOARD.read_text())["panels"]
    heatmaps = [panel for panel in panels if panel["type"] == "heatmap"]
    assert any("ssd_matched_iou_bucket" in target["expr"] and target.get("format") == "heatmap"
               for panel in heatmaps for target in panel["targets"])
    errors = [expr for _, expr in dashboard_expressions() if 'status=~"5..' in expr]
    assert errors, "no 5xx error panel"


def test_dashboard_panels_do_not_overlap():
    panels = json.loads(DASHBOARD.read_text())["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"panel {panel['title']!r} overlaps another at {(x, y)}"
                cells.add((x, y))


# ---- docker-compose config (Debian's docker-compose validates without an engine) -------------------


@pytest.mark.parametrize("compose_file", COMPOSE_FILES)
@pytest.mark.integration
def test_docker_compose_config_accepts_the_file(compose_file):
    docker_compose = require_tool("docker-compose")
    result = subprocess.run(
        [docker_compose, "-f", compose_file, "config", "-q"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    resolved = subprocess.run(
        [docker_compose, "-f", compose_file, "config"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    services = yaml.safe_load(resolved.stdout)["services"]
    assert set(services) == {"ssd", "prometheus", "grafana"}
    # extends resolved: the CPU variant's prometheus mounts the same scrape config
    assert any(volume.endswith("/etc/prometheus/prometheus.yml:ro") for volume in services["prometheus"]["volumes"])
    has_gpu = "deploy" in services["ssd"]
    assert has_gpu == (compose_file == "docker-compose.yml")


# ---- the scaled variant: one trainer, N servers, nginx, per-replica scrapes (docs/SCALING.md) ---------------

SCALE_FILE = "docker-compose.scale.yml"


def test_compose_scale_has_one_trainer_and_replicated_servers_on_one_checkpoint_volume():
    from app.core.settings import Settings

    compose = load_yaml(SCALE_FILE)
    trainer, server = compose["services"]["trainer"], compose["services"]["ssd-server"]
    assert trainer["environment"]["SSD_ROLE"] == "trainer" and "replicas" not in trainer.get("deploy", {})
    assert server["environment"]["SSD_ROLE"] == "server"
    assert re.fullmatch(r"\$\{SSD_SERVER_REPLICAS:-([2-9]|\d\d+)\}", str(server["deploy"]["replicas"]))
    checkpoint_dir = trainer["environment"]["SSD_CHECKPOINT_DIR"]
    assert server["environment"]["SSD_CHECKPOINT_DIR"] == checkpoint_dir
    volume = named_volumes(trainer)[checkpoint_dir]
    assert volume in compose["volumes"] and named_volumes(server)[checkpoint_dir] == volume
    assert f"{volume}:{checkpoint_dir}:ro" in server["volumes"]  # only the trainer writes
    # several workers per server container only with multiprocess metrics, emptied per container (tmpfs)
    assert "SSD_WORKERS" not in trainer["environment"]
    metrics_dir = server["environment"]["PROMETHEUS_MULTIPROC_DIR"]
    assert any(entry.split(":")[0] == metrics_dir for entry in server["tmpfs"])
    # the servers start once the trainer is ready (its version 0 is on the volume)
    assert server["depends_on"]["trainer"]["condition"] == "service_healthy"
    assert "/readyz" in " ".join(trainer["healthcheck"]["test"])
    grace_s = float(re.fullmatch(r"(\d+)s", trainer["stop_grace_period"]).group(1))
    assert grace_s > Settings().shutdown_timeout_s


def test_compose_scale_proxy_routes_to_the_compose_services():
    """nginx.conf is mounted where nginx reads it, listens on the published port, and names the trainer
    and server services on their SSD_PORT (which route goes where: tests/integration/test_proxy_routes.py)."""
    compose = load_yaml(SCALE_FILE)
    services = compose["services"]
    proxy = services["proxy"]
    assert bind_mounts(proxy)["/etc/nginx/nginx.conf"] == "./deploy/nginx/nginx.conf"
    config = (REPO / "deploy" / "nginx" / "nginx.conf").read_text()
    listen = int(re.search(r"^\s*listen (\d+);", config, re.MULTILINE).group(1))
    assert container_ports(proxy) == {listen}
    backends = set(re.findall(r"\b([a-z][a-z0-9-]*):(\d+);", config))
    assert {host for host, _ in backends} == {"trainer", "ssd-server"}
    for host, port in backends:
        assert services[host]["environment"]["SSD_PORT"] == port
    assert re.search(r"set \$trainer trainer:8000;", config) and re.search(r"set \$servers ssd-server:8000;", config)


def test_compose_scale_prometheus_scrapes_every_replica_separately():
    compose = load_yaml(SCALE_FILE)
    prometheus = compose["services"]["prometheus"]
    assert prometheus["extends"] == {"file": "docker-compose.yml", "service": "prometheus"}
    assert bind_mounts(prometheus)["/etc/prometheus/prometheus.yml"] == "./deploy/prometheus/prometheus.scale.yml"
    jobs = {job["job_name"]: job for job in load_yaml("deploy/prometheus/prometheus.scale.yml")["scrape_configs"]}
    trainer_targets = [target for group in jobs["ssd-trainer"]["static_configs"] for target in group["targets"]]
    assert trainer_targets == [f"trainer:{compose['services']['trainer']['environment']['SSD_PORT']}"]
    (dns,) = jobs["ssd-server"]["dns_sd_configs"]
    assert dns["names"] == ["ssd-server"] and dns["type"] == "A"
    assert str(dns["port"]) == compose["services"]["ssd-server"]["environment"]["SSD_PORT"]
    assert not any("proxy" in str(job) for job in jobs.values())  # never through the load balancer


@pytest.mark.integration
def test_docker_compose_config_accepts_the_scaled_variant():
    docker_compose = require_tool("docker-compose")
    result = subprocess.run([docker_compose, "-f", SCALE_FILE, "config"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert set(services) == {"trainer", "ssd-server", "proxy", "prometheus", "grafana"}
    assert services["ssd-server"]["deploy"]["replicas"] == 3
    # extends resolved, the scale scrape config mounted over the default one (the same target path)
    mounts = [volume for volume in services["prometheus"]["volumes"] if "/etc/prometheus/prometheus.yml" in volume]
    assert mounts == [f"{REPO}/deploy/prometheus/prometheus.scale.yml:/etc/prometheus/prometheus.yml:ro"]


@pytest.mark.integration
def test_promtool_and_nginx_accept_the_scaled_configs():
    promtool = require_tool("promtool")
    result = subprocess.run([promtool, "check", "config", "deploy/prometheus/prometheus.scale.yml"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "SUCCESS" in result.stdout, result.stdout + result.stderr
    nginx = require_tool("nginx")
    result = subprocess.run([nginx, "-t", "-c", str(REPO / "deploy" / "nginx" / "nginx.conf")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "test is successful" in result.stderr, result.stderr
