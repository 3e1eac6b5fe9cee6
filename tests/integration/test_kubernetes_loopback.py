"""The rendered Kubernetes pods run as local processes: the cpu overlay's trainer and server.

Each process gets what its pod would: the image's command and environment (Dockerfile), the rendered
ConfigMaps and the token from the Secret, every volume as a local directory (one shared directory for the
checkpoint claim, a private one per emptyDir) with the variables that point into volumes rewritten to
them. What the pod mounts read-only is read-only here too: the image's working directory (on the pod's
read-only root filesystem) and, for the server, the checkpoint directory, bind-mounted read-only in a
private mount namespace when the test runs as root (`unshare`), so that even root cannot write there;
otherwise the working directory loses its write bits. Only the addresses change: a free loopback port
each instead of 0.0.0.0:8000.

Both start at once, as a fresh deployment does; the kubelet's part is played by following the rendered
probes (startup, then readiness). The server is ready only after the trainer's version 0 is on the shared
directory, refuses a fine-tune with `wrong_role`, and picks up a job's version from the trainer.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.deploy.kubernetes import (
    TOKEN_SECRET,
    environment,
    kubectl,
    mounts,
    named_port,
    render_overlay,
    role_of,
    service_container,
    workloads,
)
from tests.integration.live import _log_tail, _stop, free_port, labelled_images
from tests.integration.test_deploy_files import dockerfile_instructions, env_of, stages

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("integration-kubernetes")]

TOKEN = "loopback-token"
PICKUP_TIMEOUT_S = 60.0  # the rendered SSD_RELOAD_INTERVAL is 5 s


@dataclass(frozen=True)
class LocalPod:
    role: str
    url: str
    port: int
    container: dict
    workdir: Path  # read-only, as the image's WORKDIR on the pod's read-only root filesystem
    read_only: list[Path]  # the workdir and what the pod mounts read-only
    process: subprocess.Popen
    log: Path

    def probe(self, kind: str) -> bool:
        """One try of the container's rendered probe, as the kubelet makes it (2xx and 3xx pass)."""
        probe = self.container[kind]["httpGet"]
        port = self.port if probe["port"] in ("http", named_port(self.container, "http")) else None
        assert port is not None, f"{kind} probes an unknown port {probe['port']}"
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.get(f"http://127.0.0.1:{port}{probe['path']}",
                                 timeout=self.container[kind].get("timeoutSeconds", 1))
            return 200 <= response.status_code < 400
        return False

    def wait_for(self, kind: str, budget_s: float | None = None) -> float:
        """Seconds until the probe passes; fails past its budget (period x failure threshold) or if the process dies."""
        probe = self.container[kind]
        budget_s = budget_s or probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)
        start = time.monotonic()
        while not self.probe(kind):
            assert self.process.poll() is None, f"{self.role} exited {self.process.returncode}:\n{_log_tail(self.log)}"
            assert time.monotonic() - start < budget_s, f"{self.role}: {kind} failing after {budget_s} s:\n" \
                                                       f"{_log_tail(self.log)}"
            time.sleep(0.25)
        return time.monotonic() - start


def image_runtime() -> tuple[list[str], dict[str, str], str]:
    """The runtime stage's CMD, ENV and WORKDIR."""
    runtime = stages(dockerfile_instructions())[-1]
    command = json.loads(next(args for keyword, args in runtime if keyword == "CMD"))
    workdir = [args for keyword, args in runtime if keyword == "WORKDIR"][-1]
    return command, env_of(runtime), workdir


def read_only_mounts() -> bool:
    """Whether read-only bind mounts in a private mount namespace work here (root, util-linux `unshare`)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=30).returncode == 0


def in_namespace_with_read_only(paths: list[Path], command: list[str]) -> list[str]:
    """`command` in its own mount namespace where each of `paths` is bind-mounted onto itself read-only:
    as a read-only mount in a pod, even root cannot write there (the command keeps its PID: exec)."""
    binds = " && ".join(f"mount --bind {shlex.quote(str(path))} {shlex.quote(str(path))} && "
                        f"mount -o remount,bind,ro {shlex.quote(str(path))}" for path in paths)
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", f'{binds} && exec "$@"', "sh", *command]


@contextlib.contextmanager
def start_pod(objects: list[dict], workload: dict, root: Path, shared: Path) -> Iterator[LocalPod]:
    role = role_of(workload)
    container = service_container(workload)
    image_command, image_env, image_workdir = image_runtime()
    command = container.get("command") or image_command
    pod_dir = root / role
    pod_dir.mkdir()
    local_of: dict[str, Path] = {}
    for mount_path, (volume, _read_only) in mounts(workload, container).items():
        if "persistentVolumeClaim" in volume:
            local_of[mount_path] = shared
        else:
            local_of[mount_path] = pod_dir / volume["name"]
            local_of[mount_path].mkdir()
    port = free_port()
    env = {**image_env, **environment(objects, container, {TOKEN_SECRET: TOKEN})}
    for name, value in env.items():
        for mount_path, local in local_of.items():
            if value == mount_path or value.startswith(mount_path.rstrip("/") + "/"):
                env[name] = str(local) + value[len(mount_path.rstrip("/")):]
    env.update(SSD_HOST="127.0.0.1", SSD_PORT=str(port),
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    workdir = pod_dir / image_workdir.strip("/").replace("/", "-")
    workdir.mkdir()
    command = [sys.executable if command[0] == "python" else command[0], *command[1:]]
    read_only = [workdir] + [local_of[path] for path, (_, ro) in mounts(workload, container).items() if ro]
    if read_only_mounts():
        command = in_namespace_with_read_only(read_only, command)
    else:  # not root: the permission bits hold for this user (the server shares the trainer's, so it stays writable)
        workdir.chmod(0o555)
    log = pod_dir / "pod.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(command, cwd=workdir, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        yield LocalPod(role, f"http://127.0.0.1:{port}", port, container, workdir, read_only, process, log)
    finally:
        _stop(process)


@pytest.fixture(scope="module")
def pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, LocalPod]]:
    kubectl()
    objects = render_overlay("cpu")
    root = tmp_path_factory.mktemp("kubernetes")
    shared = root / "checkpoint-volume"
    shared.mkdir()
    with contextlib.ExitStack() as stack:
        started = {role_of(workload): stack.enter_context(start_pod(objects, workload, root, shared))
                   for workload in workloads(objects)}
        for pod in started.values():
            print(f"{pod.role}: startup probe passed after {pod.wait_for('startupProbe'):.1f} s")
        for pod in started.values():
            print(f"{pod.role}: ready after {pod.wait_for('readinessProbe', budget_s=120):.1f} s more")
        yield started


def test_the_rendered_pods_serve_their_roles_from_a_read_only_working_directory(pods):
    for pod in pods.values():
        assert pod.probe("livenessProbe") and pod.probe("readinessProbe")
        model = httpx.get(f"{pod.url}/model", timeout=10).json()
        assert model["role"] == pod.role and model["architecture"] == "ssd-small"
        assert not list(pod.workdir.iterdir()), f"{pod.role} wrote into its working directory"
        if read_only_mounts():  # the process really sees them read-only
            fields = [line.split() for line in Path(f"/proc/{pod.process.pid}/mountinfo").read_text().splitlines()]
            read_only = {Path(field[4]) for field in fields if "ro" in field[5].split(",")}
            assert set(pod.read_only) <= read_only, (pod.role, pod.read_only)
    assert len(pods["server"].read_only) == 2  # the working directory and the checkpoint volume


def test_the_server_refuses_a_fine_tune_and_follows_the_trainers_job(pods):
    trainer, server = pods["trainer"], pods["server"]
    auth = {"Authorization": f"Bearer {TOKEN}"}
    images = labelled_images(4, seed=11)
    refused = httpx.post(f"{server.url}/finetune", json={"images": images}, headers=auth, timeout=30)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "wrong_role", refused.text
    unauthenticated = httpx.post(f"{trainer.url}/finetune", json={"images": images}, timeout=30)
    assert unauthenticated.status_code == 401, unauthenticated.text  # the Secret's token is in force
    start = httpx.get(f"{server.url}/model", timeout=10).json()["version"]
    job = httpx.post(f"{trainer.url}/finetune", params={"wait": "true"}, json={"images": images, "steps": 2},
                     headers=auth, timeout=300)
    assert job.status_code == 200 and job.json()["status"] == "succeeded", job.text
    version = job.json()["model_version"]
    assert version > start
    returned = time.monotonic()
    while (served := httpx.get(f"{server.url}/model", timeout=10).json()["version"]) != version:
        assert time.monotonic() - returned < PICKUP_TIMEOUT_S, f"server still on {served}, trainer on {version}"
        time.sleep(0.5)
    print(f"server on version {version} {time.monotonic() - returned:.1f} s after the job returned")
    assert server.probe("readinessProbe") and server.probe("livenessProbe")
