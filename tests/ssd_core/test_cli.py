"""The `ssd` command in-process: train (with eval, save, resume), eval, import, detect, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from ssd_core.checkpoint import CheckpointStore
from ssd_core.cli import main
from ssd_core.images import decode_image_bytes, encode_png
from ssd_core.models import SSD300
from ssd_core.synthetic import ShapesDataset

TINY_DATA = ["--data", "synthetic", "--synthetic-images", "6", "--synthetic-size", "64", "--batch-size", "2"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A checkpoint directory after `ssd train` for 3 steps (eval at 2 and 3, checkpoints at 2 and 3)."""
    directory = tmp_path_factory.mktemp("train")
    argv = ["train", *TINY_DATA, "--steps", "3", "--lr", "0.01", "--warmup", "2", "--eval-every", "2"]
    argv += ["--eval-images", "2", "--save-every", "2", "--checkpoint-dir", str(directory), "--quiet"]
    assert main(argv) == 0
    return directory


def test_train_writes_checkpoints_history_and_curves(trained, capsys):
    assert [info.version for info in CheckpointStore(trained).versions()] == [1, 2]
    loaded = CheckpointStore(trained).load_latest()
    assert loaded.meta["step"] == 3 and loaded.meta["model"] == "ssd-small"
    assert loaded.meta["class_names"] == list(ShapesDataset.class_names)
    assert loaded.meta["config"]["lr"] == 0.01
    assert loaded.optimizer_state is not None
    history = json.loads((trained / "history.json").read_text())
    assert history["steps"] == [1, 2, 3]
    assert history["lr"] == pytest.approx([0.005, 0.01, 0.01])  # warm-up over 2 steps
    assert history["eval_steps"] == [2, 3]
    assert all(0.0 <= m <= 1.0 for m in history["map_50"])
    assert history["images_per_second"] > 0
    for name in ("loss_curve.png", "map_curve.png"):
        assert (trained / name).read_bytes()[:8] == PNG_MAGIC


def test_train_resumes_from_the_newest_checkpoint(trained, tmp_path, capsys):
    directory = tmp_path / "resumed"
    directory.mkdir()
    for path in trained.glob("ckpt-*"):
        (directory / path.name).write_bytes(path.read_bytes())
    argv = [
        "train",
        *TINY_DATA,
        "--steps",
        "5",
        "--lr",
        "0.01",
        "--resume",
        "--checkpoint-dir",
        str(directory),
    ]
    assert main([*argv, "--quiet"]) == 0
    assert "trained 5 steps" in capsys.readouterr().out
    loaded = CheckpointStore(directory).load_latest()
    assert (loaded.meta["version"], loaded.meta["step"]) == (3, 5)
    assert json.loads((directory / "history.json").read_text())["steps"] == [4, 5]


def test_eval_prints_map_of_the_newest_checkpoint(trained, capsys):
    assert main(["eval", *TINY_DATA, "--checkpoint-dir", str(trained)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["version"] == 2 and result["step"] == 3 and result["images"] == 6
    assert 0.0 <= result["map_50"] <= 1.0 and 0.0 <= result["map"] <= result["map_50"]


def test_detect_draws_boxes_into_a_png(trained, tmp_path, capsys):
    image = ShapesDataset(1, image_size=96, split="demo")[0].image
    source = tmp_path / "in.png"
    source.write_bytes(encode_png(image))
    out = tmp_path / "out" / "boxes.png"
    argv = ["detect", str(source), "--checkpoint-dir", str(trained), "--out", str(out)]
    assert main([*argv, "--score-threshold", "0.0"]) == 0
    drawn = decode_image_bytes(out.read_bytes(), max_pixels=96 * 96)
    assert drawn.shape == image.shape
    assert not torch.equal(drawn, image)  # boxes were drawn
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines and all(line["label"] in ShapesDataset.class_names for line in lines)
    assert all(0 <= v <= 96 for line in lines for v in line["box"])


def test_import_writes_a_checkpoint_from_an_ssd_pytorch_base(tmp_path, capsys):
    torch.manual_seed(0)
    base = SSD300(4).vgg.state_dict()  # ssd.pytorch's vgg16_reducedfc.pth layout: '0.weight', ...
    source = tmp_path / "vgg16_reducedfc.pth"
    torch.save(base, source)
    directory = tmp_path / "imported"
    argv = [
        "import",
        str(source),
        "--model",
        "ssd300",
        "--num-classes",
        "4",
        "--checkpoint-dir",
        str(directory),
    ]
    assert main([*argv, "--class-names", "cat", "dog", "bird"]) == 0
    assert f"imported {len(base)} of" in capsys.readouterr().out
    state_dict, meta, optimizer_state, _ = CheckpointStore(directory).load_latest()
    assert (meta["model"], meta["num_classes"], meta["class_names"]) == ("ssd300", 4, ["cat", "dog", "bird"])
    assert optimizer_state is None
    assert all(torch.equal(state_dict[f"vgg.{key}"], value) for key, value in base.items())
    assert "conf.0.weight" in state_dict  # the heads are freshly initialised, not missing


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--data", "imagenet", "--checkpoint-dir", "{tmp}"], "--data"),
        (["eval", "--data", "synthetic", "--checkpoint-dir", "{tmp}"], "no loadable checkpoint"),
        (["train", *TINY_DATA, "--num-classes", "3", "--checkpoint-dir", "{tmp}"], "--num-classes"),
        (["import", "{tmp}/missing.pth", "--checkpoint-dir", "{tmp}"], "missing.pth"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, argv, message):
    assert main([arg.replace("{tmp}", str(tmp_path)) for arg in argv]) == 2
    assert message in capsys.readouterr().err


def test_unknown_model_is_rejected_by_the_parser(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", "synthetic", "--model", "yolo", "--checkpoint-dir", str(tmp_path)])
    assert exit_info.value.code == 2
