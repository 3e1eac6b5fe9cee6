"""The `ssd` command in-process: train (with eval, save, resume), eval, import, detect, and bad input."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssd_core.cli import DEMO_COMMAND, build_parser, main
from ssd_core.data.class_names import expand_class_names
from ssd_core.data.datasets import VOC_CLASSES
from ssd_core.data.images import decode_image_bytes, encode_png
from ssd_core.data.synthetic import ShapesDataset
from ssd_core.models import SSD300
from ssd_core.storage.checkpoint import CheckpointStore
from ssd_core.storage.weights_file import load_weights
from ssd_core.training.trainer import TrainConfig

TINY_DATA = ["--data", "synthetic", "--synthetic-images", "6", "--synthetic-size", "64", "--batch-size", "2"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
REPO = Path(__file__).resolve().parents[2]


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


def test_detect_prints_json_and_draws_boxes_into_a_png(trained, tmp_path, capsys):
    image = ShapesDataset(1, image_size=96, split="demo")[0].image
    source = tmp_path / "in.png"
    source.write_bytes(encode_png(image))
    out = tmp_path / "out" / "boxes.png"
    argv = ["detect", str(source), "--checkpoint-dir", str(trained), "--out", str(out)]
    assert main([*argv, "--score-threshold", "0.0"]) == 0
    drawn = decode_image_bytes(out.read_bytes(), max_pixels=96 * 96)
    assert drawn.shape == image.shape
    assert not torch.equal(drawn, image)  # boxes were drawn
    answer = json.loads(capsys.readouterr().out)  # one JSON object
    assert answer["image"] == str(source) and answer["model_version"] == 2
    found = answer["detections"]
    assert found and all(d["class_name"] == ShapesDataset.class_names[d["label"]] for d in found)
    assert all(0 <= v <= 96 for d in found for v in d["box"])
    assert [d["score"] for d in found] == sorted((d["score"] for d in found), reverse=True)


def test_detect_without_out_only_prints_and_keeps_max_detections(trained, tmp_path, capsys):
    source = tmp_path / "in.png"
    source.write_bytes(encode_png(ShapesDataset(1, image_size=96, split="demo")[0].image))
    argv = ["detect", str(source), "--checkpoint-dir", str(trained), "--score-threshold", "0.0"]
    assert main(argv) == 0
    everything = json.loads(capsys.readouterr().out)["detections"]
    assert len(everything) > 3  # an almost untrained model at threshold 0: many boxes
    assert main([*argv, "--max-detections", "3"]) == 0
    best = json.loads(capsys.readouterr().out)["detections"]
    assert best == everything[:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.png"]  # nothing drawn without --out


def test_shapes_writes_an_image_and_prints_its_annotation(tmp_path, capsys):
    assert main(["shapes", str(tmp_path / "s.png"), "--seed", "3"]) == 0
    annotation = json.loads(capsys.readouterr().out)
    sample = ShapesDataset(1, image_size=256, seed=3, split="example")[0]
    assert annotation == {"boxes": sample.boxes.tolist(), "labels": sample.labels.tolist()}
    assert torch.equal(decode_image_bytes((tmp_path / "s.png").read_bytes(), 256 * 256), sample.image)
    assert main(["shapes", str(tmp_path / "s.jpg")]) == 0
    assert (tmp_path / "s.jpg").read_bytes()[:2] == b"\xff\xd8"  # JPEG for .jpg


def test_help_shows_examples_and_the_demo_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "examples:" in text and "ssd detect --checkpoint-dir" in text and "ssd shapes" in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert " ".join(DEMO_COMMAND.split()) in " ".join(capsys.readouterr().out.split())


def test_train_defaults_come_from_train_config():
    train = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]
    defaults = {a.dest: a.default for a in train._actions}
    config = TrainConfig()
    assert (defaults["lr"], defaults["warmup"], defaults["clip_grad_norm"]) == (
        config.lr, config.warmup_steps, config.clip_grad_norm)


def test_weights_out_writes_half_precision_weights_and_a_card(tmp_path, capsys):
    out = tmp_path / "release" / "tiny.safetensors"
    argv = ["train", *TINY_DATA, "--steps", "2", "--eval-images", "2", "--checkpoint-dir", str(tmp_path / "ck"),
            "--weights-out", str(out), "--quiet"]
    assert main(argv) == 0
    card = json.loads(out.with_suffix(".json").read_text())
    assert card["command"] == "ssd " + " ".join(argv)
    assert (card["model"], card["num_classes"], card["priors"], card["steps"]) == ("ssd-small", 4, "scaled", 2)
    assert card["class_names"] == list(ShapesDataset.class_names)
    history = json.loads((tmp_path / "ck" / "history.json").read_text())  # evaluated at the end although
    assert history["eval_steps"] == [2]                                   # --eval-every was 0
    assert card["held_out"] == {"data": "synthetic", "split": "val", "images": 2,
                                "map_50": round(history["map_50"][-1], 4), "map": round(history["map"][-1], 4)}
    served = CheckpointStore(tmp_path / "ck").load_latest().state_dict
    loaded = load_weights(out)
    assert all(torch.equal(loaded[k], v.half().float() if v.is_floating_point() else v) for k, v in served.items())


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
    out = capsys.readouterr().out
    assert f"imported {len(base)} of" in out and "(coco priors)" in out
    state_dict, meta, optimizer_state, _ = CheckpointStore(directory).load_latest()
    assert (meta["model"], meta["num_classes"], meta["class_names"]) == ("ssd300", 4, ["cat", "dog", "bird"])
    assert meta["priors"] == "coco"  # ssd.pytorch's rule: COCO priors for every class count but 21
    assert main([*argv, "--class-names", "cat", "dog", "bird", "--priors", "voc"]) == 0
    assert "(voc priors)" in capsys.readouterr().out
    assert CheckpointStore(directory).load_latest().meta["priors"] == "voc"
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
        (["train", *TINY_DATA, "--device", "cpu", "--amp", "--checkpoint-dir", "{tmp}"], "--amp (bfloat16 autocast) needs CUDA"),
        (["train", *TINY_DATA, "--model", "ssd-small", "--priors", "coco", "--checkpoint-dir", "{tmp}"],
         "ssd-small has its own scaled priors"),
    ],
)
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, argv, message):
    assert main([arg.replace("{tmp}", str(tmp_path)) for arg in argv]) == 2
    assert message in capsys.readouterr().err


def test_unknown_model_is_rejected_by_the_parser(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--data", "synthetic", "--model", "yolo", "--checkpoint-dir", str(tmp_path)])
    assert exit_info.value.code == 2


def test_every_help_shows_the_defaults():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(subparsers) == {"train", "eval", "import", "detect", "export", "shapes"}
    for name, sub in subparsers.items():
        text = " ".join(sub.format_help().split())  # argparse wraps lines
        defaults = [a for a in sub._actions if a.default not in (None, False, argparse.SUPPRESS) and not a.required]
        assert defaults, name
        for action in defaults:
            shown = action.default.__name__ if callable(action.default) else action.default
            assert f"(default: {shown})" in text, (name, action.dest, text)


def test_eval_shows_progress(trained, capsys):
    assert main(["eval", *TINY_DATA, "--checkpoint-dir", str(trained)]) == 0
    err = capsys.readouterr().err
    assert "eval" in err and "6/6" in err  # tqdm: images done / all


def test_eval_of_a_missing_directory_creates_nothing(tmp_path, capsys):
    missing = tmp_path / "missing"
    assert main(["eval", *TINY_DATA, "--checkpoint-dir", str(missing)]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert not missing.exists()


def test_import_of_a_file_that_is_not_a_pytorch_checkpoint(tmp_path, capsys):
    source = tmp_path / "weights.pth"
    source.write_text("these are not weights\n")
    assert main(["import", str(source), "--checkpoint-dir", str(tmp_path / "out")]) == 2
    assert "not a PyTorch checkpoint: torch.save writes a zip archive" in capsys.readouterr().err


def test_class_name_presets_are_the_library_names(tmp_path, capsys):
    assert expand_class_names(["shapes"]) == list(ShapesDataset.class_names)
    assert expand_class_names(["voc"]) == list(VOC_CLASSES)
    assert expand_class_names(["cat", "dog"]) == ["cat", "dog"]


def test_detect_into_a_closed_pipe_exits_quietly(trained, tmp_path):
    """`ssd detect ... | head`: the reader is gone before anything is printed; no traceback, status 141."""
    source = tmp_path / "in.png"
    source.write_bytes(encode_png(ShapesDataset(1, image_size=64, split="demo")[0].image))
    argv = [sys.executable, "-m", "ssd_core.cli", "detect", str(source), "--checkpoint-dir", str(trained),
            "--out", str(tmp_path / "out.png"), "--score-threshold", "0.0", "--device", "cpu"]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    process.stdout.close()  # as `head` does once it has its lines
    _, err = process.communicate(timeout=120)
    assert process.returncode == 141, err.decode()
    assert b"Traceback" not in err and b"BrokenPipeError" not in err, err.decode()
    assert (tmp_path / "out.png").read_bytes()[:8] == PNG_MAGIC
