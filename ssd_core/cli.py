"""The `ssd` command: train, evaluate, import ssd.pytorch weights, detect on an image, export.

    ssd train  --data synthetic|voc:ROOT|coco:IMAGES_DIR:ANN.json --model ssd-small --steps N ...
    ssd eval   --checkpoint-dir DIR --data ...
    ssd import SRC.pth --model ssd300 --num-classes 21 --checkpoint-dir DIR
    ssd detect --checkpoint-dir DIR IMAGE [--out OUT.png]
    ssd export --checkpoint-dir DIR [--version V] --format onnx|torchscript OUT
    ssd shapes OUT.png [--seed N]      a synthetic test image; prints its boxes and labels

Checkpoints are `CheckpointStore` directories; training also writes `history.json`, `loss_curve.png`
and (when it evaluates) `map_curve.png` there. `ssd train` also runs under torchrun (DDP, one data
shard per rank, rank 0 logs, evaluates and saves): `torchrun --nproc_per_node N -m ssd_core.cli train ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ssd_core.data.class_names import CLASS_NAME_PRESETS, expand_class_names
from ssd_core.data.datasets import VOC_CLASSES
from ssd_core.data.images import decode_image_bytes, encode_jpeg, encode_png
from ssd_core.data.synthetic import ShapesDataset
from ssd_core.evaluation.drawing import captions, draw_detections
from ssd_core.evaluation.mean_ap import evaluate, predict
from ssd_core.models import MODEL_NAMES, SSD, build_model
from ssd_core.models.convert import IMPORTABLE_MODELS, load_ssd_pytorch, ssd_pytorch_state_dict
from ssd_core.models.devices import resolve_device
from ssd_core.models.export import FORMATS, export_model, metadata
from ssd_core.ops.priors import PRIOR_SETS
from ssd_core.storage.checkpoint import CheckpointStore
from ssd_core.storage.checkpoint_meta import checkpoint_meta, next_version, recorded_priors
from ssd_core.training.run import load_dataset, run_training
from ssd_core.training.trainer import TrainConfig

__all__ = ["build_parser", "main"]

_OFFLINE = TrainConfig()  # `ssd train`'s optimizer defaults: the one source is TrainConfig
DEMO_COMMAND = (
    "ssd train --data synthetic --synthetic-images 100000 --no-augment --batch-size 16 --lr 0.05 --warmup 200 "
    "--clip-grad-norm 10 --steps 800 --eval-every 200 --eval-images 200 --workers 1 --checkpoint-dir runs/demo "
    "--weights-out ssd_core/models/weights/ssd-small-shapes.safetensors"
)
PRIORS_HELP = "prior set of ssd300/ssd512 (default: ssd.pytorch's rule: voc for 21 classes, else coco)"
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what `yes | head` leaves for `yes`
MAX_IMAGE_PIXELS = 40_000_000  # `detect` refuses larger images (decompression bombs)


def _load_model(checkpoint_dir: str, device: torch.device, version: int | None = None) -> tuple[SSD, dict[str, Any]]:
    """The newest loadable checkpoint, or `version`."""
    if not Path(checkpoint_dir).is_dir():
        raise ValueError(f"--checkpoint-dir {checkpoint_dir}: no such directory")
    store = CheckpointStore(checkpoint_dir, read_only=True)  # reads only: creates nothing
    loaded = store.load_latest() if version is None else store.load(version)
    if loaded is None:
        raise ValueError(f"--checkpoint-dir {checkpoint_dir}: no loadable checkpoint")
    model = build_model(loaded.meta["model"], loaded.meta["num_classes"], recorded_priors(loaded.meta))
    model.load_state_dict(loaded.state_dict)
    return model.to(device).eval(), loaded.meta


def _eval(args: argparse.Namespace) -> int:
    device = resolve_device(args.device, "--device")
    model, meta = _load_model(args.checkpoint_dir, device)
    dataset = load_dataset(
        args.data, split=args.split, synthetic_images=args.synthetic_images, synthetic_size=args.synthetic_size
    )
    scores = evaluate(model, dataset, batch_size=args.batch_size, device=device, progress=not args.quiet)
    print(json.dumps({"version": meta["version"], "step": meta["step"], "images": len(dataset), **scores}))
    return 0


def _import(args: argparse.Namespace) -> int:
    default_names = VOC_CLASSES if args.num_classes == len(VOC_CLASSES) + 1 else None
    class_names = expand_class_names(args.class_names or default_names or
                                     [f"class_{i}" for i in range(args.num_classes - 1)])
    if len(class_names) != args.num_classes - 1:
        raise ValueError(f"--class-names: {len(class_names)} names for {args.num_classes - 1} object classes")
    source = load_ssd_pytorch(args.source)
    model = build_model(args.model, args.num_classes, args.priors)
    model.load_state_dict(ssd_pytorch_state_dict(source, args.model, args.num_classes))
    store = CheckpointStore(args.checkpoint_dir, keep=args.keep)
    extra = {"imported_from": Path(args.source).name, "imported_tensors": len(source)}
    info = store.save(model.state_dict(), checkpoint_meta(model, class_names, next_version(store), 0, extra))
    print(f"imported {len(source)} of {len(model.state_dict())} tensors into {info.weights} "
          f"({model.spec.prior_set} priors)")
    return 0


def _detect(args: argparse.Namespace) -> int:
    """Prints one JSON object: the image, the model version and its detections (as `POST /detect` names them);
    with `--out` also draws them."""
    device = resolve_device(args.device, "--device")
    model, meta = _load_model(args.checkpoint_dir, device)
    image = decode_image_bytes(Path(args.image).read_bytes(), MAX_IMAGE_PIXELS)  # [3, H, W] uint8
    detections = predict(model, [image], device=device, score_threshold=args.score_threshold,
                         max_detections=args.max_detections)[0]
    labels = detections.labels.tolist()
    names = [meta["class_names"][label] for label in labels]
    if args.out is not None:
        png = draw_detections(image, detections.boxes, captions(names, detections.scores.tolist()), labels)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_bytes(png)
    found = [
        {"box": [round(v, 1) for v in box], "label": label, "class_name": name, "score": round(score, 4)}
        for box, label, name, score in zip(detections.boxes.tolist(), labels, names, detections.scores.tolist(),
                                           strict=True)
    ]
    print(json.dumps({"image": str(args.image), "model_version": meta["version"], "detections": found}))
    return 0


def _shapes(args: argparse.Namespace) -> int:
    """Writes one `ShapesDataset` image (PNG, or JPEG for .jpg/.jpeg) and prints its annotation as the
    service's labelled-image forms take it: {"boxes": pixel (x1, y1, x2, y2), "labels": 0-based classes}."""
    sample = ShapesDataset(1, image_size=args.size, seed=args.seed, split="example")[0]
    jpeg = args.out.suffix.lower() in (".jpg", ".jpeg")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(encode_jpeg(sample.image) if jpeg else encode_png(sample.image))
    print(json.dumps({"boxes": sample.boxes.tolist(), "labels": sample.labels.tolist()}))
    return 0


def _export(args: argparse.Namespace) -> int:
    model, meta = _load_model(args.checkpoint_dir, torch.device("cpu"), args.version)
    path = export_model(model, args.out, args.format, metadata(model, meta["version"], meta.get("class_names")))
    print(f"exported version {meta['version']} ({meta['model']}) as {args.format} to {path}")
    return 0


DEVICES = ("auto", "cpu", "cuda")


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every --help shows each option's default; required options, flags and options whose default is
    None (their help says what None means) get no `(default: ...)`. Descriptions and examples keep their
    line breaks."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _add_data_arguments(parser: argparse.ArgumentParser, split: str) -> None:
    parser.add_argument("--data", required=True, help="synthetic | voc:ROOT | coco:IMAGES_DIR:ANN.json")
    parser.add_argument("--split", default=split, help="synthetic split or VOC image set")
    parser.add_argument("--synthetic-images", type=int, default=512, help="images in the synthetic set")
    parser.add_argument("--synthetic-size", type=int, default=256, help="side of the synthetic images")
    parser.add_argument("--batch-size", type=int, default=16, help="images per step or forward pass")
    parser.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when available")


EXAMPLES = """examples:
  # train ssd-small on the synthetic shapes for 300 steps, measuring held-out mAP every 100
  ssd train --data synthetic --steps 300 --eval-every 100 --checkpoint-dir runs/shapes
  # mAP of its newest checkpoint on the held-out split
  ssd eval --data synthetic --checkpoint-dir runs/shapes
  # detections as JSON, and drawn (one colour per class)
  ssd detect --checkpoint-dir runs/shapes shapes.jpg --out shapes-detected.png
  # ssd.pytorch weights -> a checkpoint the service resumes (SSD_CHECKPOINT_DIR=checkpoints)
  ssd import ssd300_mAP_77.43_v2.pth --model ssd300 --num-classes 21 --checkpoint-dir checkpoints
  ssd export --checkpoint-dir runs/shapes --format onnx ssd-small.onnx
  # a synthetic test image, and its boxes and labels as the service takes them
  ssd shapes shapes.png

`ssd COMMAND --help` lists a command's options and their defaults; `ssd train --help` ends with the
command that made the shipped demo model."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `ssd` and its six subcommands."""
    parser = argparse.ArgumentParser(prog="ssd", description=__doc__.split("\n")[0], epilog=EXAMPLES,
                                     formatter_class=_DefaultsHelp)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train_command(commands)
    _add_eval_command(commands)
    _add_import_command(commands)
    _add_detect_command(commands)
    _add_export_command(commands)
    _add_shapes_command(commands)
    return parser


def _add_train_command(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser(
        "train", help="train a model, writing checkpoints and a loss curve", formatter_class=_DefaultsHelp,
        description="Train a model offline. The optimizer defaults are `TrainConfig`'s, ssd.pytorch's recipe "
                    "(SGD, no warm-up, no clipping); the service's online recipe differs on purpose "
                    "(docs/online-learning.md, \"Offline and online defaults\").",
        epilog="example (the shipped demo model, docs/demo-model.md):\n  " + DEMO_COMMAND)
    _add_data_arguments(train, split="train")
    train.add_argument("--model", choices=MODEL_NAMES, default="ssd-small", help="architecture")
    train.add_argument("--num-classes", type=int,
                       help="conf columns incl. background (default: the data set's classes + 1)")
    train.add_argument("--priors", choices=PRIOR_SETS, help=PRIORS_HELP)
    train.add_argument("--steps", type=int, default=1000, help="optimizer steps in all (with --resume: up to)")
    train.add_argument("--lr", type=float, default=_OFFLINE.lr, help="peak learning rate (SGD, momentum "
                       f"{_OFFLINE.momentum}, weight decay {_OFFLINE.weight_decay})")
    train.add_argument("--warmup", type=int, default=_OFFLINE.warmup_steps, help="linear warm-up steps")
    train.add_argument("--clip-grad-norm", type=float, default=_OFFLINE.clip_grad_norm,
                       help="clip the gradient norm to this (default: no clipping)")
    train.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA only; refused on CPU)")
    train.add_argument(
        "--sync-bn", action="store_true", help="SyncBatchNorm across torchrun ranks (CUDA only)"
    )
    train.add_argument("--checkpoint-dir", required=True, help="checkpoints, history and curves go here")
    train.add_argument("--keep", type=int, default=5, help="checkpoints kept")
    train.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: at the end)")
    train.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    train.add_argument("--eval-every", type=int, default=0, help="held-out mAP every N steps (0: never)")
    train.add_argument("--val-data", help="held-out data (default: --data)")
    train.add_argument("--val-split", default="val", help="held-out split (synthetic) or VOC image set")
    train.add_argument("--eval-images", type=int, default=64, help="size of the synthetic held-out set")
    train.add_argument("--time-limit", type=float, default=0, help="stop after this many training seconds (0: none)")
    train.add_argument("--weights-out", type=Path,
                       help="also write the final weights as float16 safetensors with a JSON card beside it "
                            "(command, held-out mAP@0.5; evaluates at the end): how the demo model is made")
    train.add_argument("--seed", type=int, default=0, help="seeds weights, shuffling and augmentation")
    train.add_argument("--augment", action=argparse.BooleanOptionalAction, default=True,
                       help="SSD photometric and geometric augmentation")
    train.add_argument("--workers", type=int, default=0, help="data loader processes")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(handler=run_training)


def _add_eval_command(commands: argparse._SubParsersAction) -> None:
    evaluate_ = commands.add_parser("eval", help="mAP of the newest checkpoint on a data set", formatter_class=_DefaultsHelp)
    _add_data_arguments(evaluate_, split="val")
    evaluate_.add_argument("--checkpoint-dir", required=True, help="read only: nothing is created or written")
    evaluate_.add_argument("--quiet", action="store_true", help="no progress bar")
    evaluate_.set_defaults(handler=_eval)


def _add_import_command(commands: argparse._SubParsersAction) -> None:
    import_ = commands.add_parser("import", help="convert an ssd.pytorch .pth into a checkpoint",
                                  formatter_class=_DefaultsHelp)
    import_.add_argument("source", type=Path, help="ssd.pytorch state dict (.pth)")
    import_.add_argument("--model", choices=IMPORTABLE_MODELS, default="ssd300", help="architecture of the .pth")
    import_.add_argument("--num-classes", type=int, default=21, help="conf columns incl. background")
    import_.add_argument("--priors", choices=PRIOR_SETS, help=PRIORS_HELP)
    import_.add_argument("--class-names", nargs="+",
                         help=f"object class names in label order, or a preset ({', '.join(CLASS_NAME_PRESETS)}); "
                              "(default: voc for 21 classes, else class_<label>)")
    import_.add_argument("--checkpoint-dir", required=True, help="where the checkpoint is written")
    import_.add_argument("--keep", type=int, default=5, help="checkpoints kept")
    import_.set_defaults(handler=_import)


def _add_detect_command(commands: argparse._SubParsersAction) -> None:
    detect = commands.add_parser(
        "detect", help="the newest checkpoint's detections on an image, as JSON (and drawn with --out)",
        formatter_class=_DefaultsHelp,
        epilog="prints {\"image\", \"model_version\", \"detections\": [{\"box\" (x1, y1, x2, y2 pixels), "
               "\"label\", \"class_name\", \"score\"}]}\nexample:\n  ssd detect --checkpoint-dir runs/shapes "
               "shapes.jpg --out drawn.png | jq '.detections[].class_name'")
    detect.add_argument("image", type=Path, help="PNG or JPEG")
    detect.add_argument("--checkpoint-dir", required=True, help="read only: nothing is created or written")
    detect.add_argument("--out", type=Path, help="also write the image with its detections drawn here (PNG)")
    detect.add_argument("--score-threshold", type=float, default=0.3, help="least score of a detection")
    detect.add_argument("--max-detections", type=int, default=100, help="most detections kept (the best)")
    detect.add_argument("--device", choices=DEVICES, default="auto", help="auto: CUDA when available")
    detect.set_defaults(handler=_detect)


def _add_export_command(commands: argparse._SubParsersAction) -> None:
    export = commands.add_parser("export", help="write a checkpoint as ONNX or TorchScript (loc, conf, priors)",
                                 formatter_class=_DefaultsHelp)
    export.add_argument("out", type=Path, help="file to write")
    export.add_argument("--checkpoint-dir", required=True)
    export.add_argument("--version", type=int, help="checkpoint version (default: the newest loadable)")
    export.add_argument("--format", choices=FORMATS, default="onnx", help="file format")
    export.set_defaults(handler=_export)


def _add_shapes_command(commands: argparse._SubParsersAction) -> None:
    shapes = commands.add_parser(
        "shapes", help="write a synthetic test image and print its boxes and labels as JSON",
        formatter_class=_DefaultsHelp,
        epilog="example: ANNOTATION=$(ssd shapes shapes.png); curl localhost:8000/finetune -F images=@shapes.png "
               "-F images=@shapes.png -F annotations=\"[$ANNOTATION, $ANNOTATION]\"")
    shapes.add_argument("out", type=Path, help="image to write: PNG, or JPEG for .jpg/.jpeg")
    shapes.add_argument("--seed", type=int, default=0, help="which image (each seed another)")
    shapes.add_argument("--size", type=int, default=256, help="side in pixels")
    shapes.set_defaults(handler=_shapes)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `ssd`; returns the exit status (2 with a message for bad input)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["ssd", *argv])  # what made a `ssd train --weights-out` file, for its card
    try:
        status = args.handler(args)
        sys.stdout.flush()  # here, not at exit: a reader that left (`| head`) is then handled below
        return status
    except (ValueError, FileNotFoundError) as error:
        print(f"ssd {args.command}: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `ssd detect ... | head`: the reader left; stop quietly as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit's flush
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
