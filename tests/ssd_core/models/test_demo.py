"""The shipped demo model (ssd_core.models.demo): it finds held-out shapes (mAP@0.5 >= 0.8), its card
matches the file and the command that made it, and git, the Docker build context and the package data
all include it, so a fresh clone, `pip install .` and the image serve it."""

from __future__ import annotations

import fnmatch
import subprocess
import tomllib
from pathlib import Path

import pytest

from ssd_core.cli import DEMO_COMMAND
from ssd_core.data.synthetic import CLASS_NAMES, ShapesDataset
from ssd_core.evaluation.mean_ap import evaluate
from ssd_core.models import build_model
from ssd_core.models.demo import DEMO_MODEL, DEMO_NUM_CLASSES, DEMO_WEIGHTS
from ssd_core.storage.weights_file import card_path, load_weights, read_card

REPO = Path(__file__).resolve().parents[3]
MAX_BYTES = 8 * 2**20  # "a few MB"
HELD_OUT_IMAGES = 64
FILES = [DEMO_WEIGHTS, card_path(DEMO_WEIGHTS)]


@pytest.fixture(scope="module")
def demo():
    model = build_model(DEMO_MODEL, DEMO_NUM_CLASSES)
    model.load_state_dict(load_weights(DEMO_WEIGHTS))  # strict: every tensor of the architecture
    return model.eval()


def test_the_demo_model_finds_held_out_shapes(demo):
    # a split neither training ("train") nor the card's figures ("val") nor `ssd shapes` ("example") used
    held_out = ShapesDataset(HELD_OUT_IMAGES, image_size=demo.spec.image_size, seed=7, split="demo-test")
    scores = evaluate(demo, held_out, batch_size=16, device="cpu")
    assert scores["map_50"] >= 0.8, scores


def test_the_card_describes_the_file_and_how_it_was_made(demo):
    card = read_card(DEMO_WEIGHTS)
    assert (card["model"], card["num_classes"], card["priors"]) == (DEMO_MODEL, DEMO_NUM_CLASSES,
                                                                    demo.spec.prior_set)
    assert card["class_names"] == list(CLASS_NAMES)
    assert card["command"] == DEMO_COMMAND  # the documented command is the one that ran
    assert f"--steps {card['steps']}" in DEMO_COMMAND
    held_out = card["held_out"]
    assert (held_out["data"], held_out["split"], held_out["images"]) == ("synthetic", "val", 200)
    assert held_out["map_50"] >= 0.85


def test_the_file_is_small():
    assert DEMO_WEIGHTS.stat().st_size < MAX_BYTES


def test_git_tracks_the_demo_files():
    for path in FILES:
        ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=REPO, check=False)
        assert ignored.returncode == 1, f"{path} is git-ignored"


def _docker_ignores(path: str) -> bool:
    """.dockerignore's rule: the last pattern that matches decides; `!` patterns re-include."""
    ignored = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(Path(path).name, pattern.removeprefix("**/")):
            ignored = not negated
    return ignored


def test_the_docker_build_context_and_the_package_data_include_the_demo_files():
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = REPO / "ssd_core" / "models"
    for path in FILES:
        relative = path.relative_to(REPO).as_posix()
        assert not _docker_ignores(relative), relative
        assert any(fnmatch.fnmatch(path.relative_to(package).as_posix(), glob)
                   for glob in package_data["ssd_core.models"]), relative
    assert _docker_ignores("runs/other.safetensors") and _docker_ignores("model.pth")  # the rule still holds
