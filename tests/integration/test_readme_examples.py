"""The documented shell examples run against a live demo service and succeed, so the docs cannot drift from
the service: every ```bash block of docs/api.md, and the README's quick start, whose first /detect must
find the test image's shapes.

The rule for examples (the format this test can run): every ```bash block of docs/api.md is run, in order,
by one bash process (variables such as IMG and JOB carry over from block to block) in an empty working
directory, against the demo model (`SSD_WEIGHTS=demo`, no token). Commands address the service as
`localhost:$PORT` and run `python` and `ssd`: `PORT` is set to the live server's port and this interpreter's
directory leads the PATH. Every command must succeed: bash runs with `set -e -o pipefail` and `curl` with
`--fail-with-body`, so any HTTP status of 400 or more fails the test, naming the command. Every `curl`
written must actually run. The README's quick start runs the same way, without its `make install` and
`make serve` lines: the live server stands for them, with `make serve`'s settings.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torchvision.ops import box_iou

from app.core.settings import Settings
from ssd_core.data.synthetic import CLASS_NAMES, ShapesDataset
from tests.integration.live import REPO, run_service

pytestmark = pytest.mark.integration

README = REPO / "README.md"
API_PAGE = REPO / "docs" / "api.md"
BLOCK = re.compile(r"^```bash\n(.*?)^```", re.DOTALL | re.MULTILINE)
SCRIPT_TIMEOUT_S = 300
DEMO = {"SSD_WEIGHTS": "demo", "SSD_CLASS_NAMES": "shapes"}  # with run_service's ssd-small, 4 classes: make serve's
DEFAULT_BACKEND = {"SSD_BACKEND": Settings.model_fields["backend"].default}  # make serve sets none

# curl fails on HTTP >= 400 and logs each call, so the test knows every written curl ran
PRELUDE = """set -e -o pipefail
trap '[[ $BASH_COMMAND == return* ]] || echo "example failed (exit $?): $BASH_COMMAND" >&2' ERR
curl() {
    local call="curl $*" status=0 args=() arg
    for arg in "$@"; do  # --fail-with-body below replaces a written -f (curl refuses both)
        case "$arg" in -f|--fail) ;; -sf|-fs) args+=(-s) ;; *) args+=("$arg") ;; esac
    done
    echo "${call//$'\\n'/ }" >> "$CURL_LOG"
    command curl --fail-with-body --show-error --max-time 120 "${args[@]}" || status=$?
    if [ "$status" -ne 0 ]; then echo "example failed (exit $status): $call" >&2; fi
    return "$status"
}
"""


def bash_blocks(text: str) -> list[str]:
    return BLOCK.findall(text)


def quick_start(text: str) -> str:
    """The README's quick-start block."""
    return bash_blocks(text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0])[0]


def curl_commands(block: str) -> int:
    """How many curl invocations a block writes (outside comments)."""
    code = "\n".join(line.split(" #", 1)[0] for line in block.splitlines() if not line.lstrip().startswith("#"))
    return len(re.findall(r"(?<![\w-])curl\s", code))


def json_objects(text: str) -> list[dict]:
    """The JSON objects printed one after another (curl adds no newline after a body)."""
    decoder, found, at = json.JSONDecoder(), [], text.find("{")
    while at >= 0:
        value, end = decoder.raw_decode(text, at)
        found.append(value)
        at = text.find("{", end)
    return found


def run_examples(script: str, service, tmp_path: Path) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `script` in an empty directory with PORT and PATH pointing at the live service and this venv."""
    workdir = tmp_path / "examples"
    workdir.mkdir()
    curl_log = tmp_path / "curl.log"
    curl_log.touch()
    (tmp_path / "examples.sh").write_text(PRELUDE + script)
    env = {**os.environ, "CURL_LOG": str(curl_log), "PYTHONPATH": str(REPO),
           "PORT": service.url.rsplit(":", 1)[1], "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(tmp_path / "examples.sh")], cwd=workdir, capture_output=True, text=True,
                          timeout=SCRIPT_TIMEOUT_S, check=False, env=env)
    assert done.returncode == 0, f"stderr:\n{done.stderr[-4000:]}\nstdout:\n{done.stdout[-2000:]}"
    return done, curl_log.read_text().splitlines()


def test_the_api_page_has_examples():
    blocks = bash_blocks(API_PAGE.read_text())
    assert len(blocks) >= 6 and sum(map(curl_commands, blocks)) >= 15, blocks


def test_every_api_page_example_runs(tmp_path):
    blocks = bash_blocks(API_PAGE.read_text())
    with run_service(tmp_path / "service", **DEMO) as service:
        _, ran = run_examples("\n".join(blocks), service, tmp_path)
    assert len(ran) == sum(map(curl_commands, blocks)), ran


def test_the_quick_start_finds_the_shapes_with_the_demo_model(tmp_path):
    block = quick_start(README.read_text())
    setup = [line for line in block.splitlines() if line.startswith("make ")]
    assert [line.split()[1] for line in setup] == ["install", "serve"], setup  # the server stands for them
    assert "export PORT=8000" in block.splitlines()
    with run_service(tmp_path / "service", module=True, **DEMO, **DEFAULT_BACKEND) as service:  # as make serve
        port = service.url.rsplit(":", 1)[1]
        script = "\n".join(f"export PORT={port}" if line == "export PORT=8000" else line
                           for line in block.splitlines() if not line.startswith("make "))
        done, ran = run_examples(script, service, tmp_path)
        log = service.log.read_text()
        served_by = httpx.get(f"{service.url}/model").json()["backend"]
        metrics = text_string_to_metric_families(httpx.get(f"{service.url}/metrics").text)
    # a CPU deployment's default: ONNX Runtime answers /detect from the first request
    assert served_by == "onnxruntime"
    forwards = {sample.labels["backend"]: sample.value for family in metrics for sample in family.samples
                if sample.name == "ssd_inference_compute_seconds_count" and sample.labels["route"] == "/detect"}
    assert forwards.get("onnxruntime", 0) >= 1 and forwards.get("torch", 0) == 0, forwards
    assert len(ran) == curl_commands(block), ran
    assert "weights from the demo model" in log, log[-2000:]
    answers = json_objects(done.stdout)
    detected = next(answer for answer in answers if "detections" in answer)["detections"][0]
    truth = ShapesDataset(1, image_size=256, seed=0, split="example")[0]  # what `ssd shapes shapes.png` writes
    assert detected, "the demo model found nothing"
    boxes = torch.tensor([d["box"] for d in detected])
    overlaps = box_iou(truth.boxes, boxes)  # [truths, detections]
    for t, label in enumerate(truth.labels.tolist()):
        found = [detected[d]["class_name"] for d in range(len(detected)) if overlaps[t, d] >= 0.5]
        assert CLASS_NAMES[label] in found, (CLASS_NAMES[label], detected)
    assert (tmp_path / "examples" / "detected.png").read_bytes()[:4] == b"\x89PNG"
    finetuned = next(answer for answer in answers if "job_id" in answer)
    assert finetuned["status"] == "succeeded", finetuned
    assert "warm-up of a fresh optimizer" in finetuned["warmup"], finetuned  # the demo model's first steps ramp up
