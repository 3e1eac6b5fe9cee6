"""The `ssd` command: train, evaluate, import ssd.pytorch weights, detect on an image.

    ssd train  --data synthetic|voc:ROOT|coco:IMAGES_DIR:ANN.json --model ssd-small --steps N ...
    ssd eval   --checkpoint-dir DIR --data ...
    ssd import SRC.pth --model ssd300 --num-classes 21 --checkpoint-dir DIR
    ssd detect --checkpoint-dir DIR IMAGE --out OUT.png
    ssd export --checkpoint-dir DIR [--version V] --format onnx|torchscript OUT

Checkpoints are `CheckpointStore` directories; training also writes `history.json`, `loss_curve.png`
and (when it evaluates) `map_curve.png` there. `ssd train` also runs under torchrun (DDP, one data
shard per rank, rank 0 logs, evaluates and saves): `torchrun --nproc_per_node N -m ssd_core.cli train ...`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ssd_core.data.class_names import CLASS_NAME_PRESETS, expand_class_names
from ssd_core.data.datasets import VOC_CLASSES
from ssd_core.data.images import decode_image_bytes
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

__all__ = ["build_parser", "main"]

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
    device = resolve_device(args.device, "--device")
    model, meta = _load_model(args.checkpoint_dir, device)
    image = decode_image_bytes(Path(args.image).read_bytes(), MAX_IMAGE_PIXELS)  # [3, H, W] uint8
    detections = predict(model, [image], device=device, score_threshold=args.score_threshold)[0]
    names = [meta["class_names"][int(label)] for label in detections.labels]
    png = draw_detections(image, detections.boxes, captions(names, detections.scores.tolist()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_bytes(png)
    for name, score, box in zip(names, detections.scores.tolist(), detections.boxes.tolist(), strict=True):
        print(json.dumps({"label": name, "score": round(score, 4), "box": [round(v, 1) for v in box]}))
    return 0


def _export(args: argparse.Namespace) -> int:
    model, meta = _load_model(args.checkpoint_dir, torch.device("cpu"), args.version)
    path = export_model(model, args.out, args.format, metadata(model, meta["version"], meta.get("class_names")))
    print(f"exported version {meta['version']} ({meta['model']}) as {args.format} to {path}")
    return 0


DEVICES = ("auto", "cpu", "cuda")


class _DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Every --help shows each option's default; required options, flags and options whose default is
    None (their help says what None means) get no `(default: ...)`."""

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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `ssd` and its five subcommands."""
    parser = argparse.ArgumentParser(prog="ssd", description=__doc__.split("\n")[0], formatter_class=_DefaultsHelp)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train_command(commands)
    _add_eval_command(commands)
    _add_import_command(commands)
    _add_detect_command(commands)
    _add_export_command(commands)
    return parser


def _add_train_command(commands: argparse._SubParsersAction) -> None:
    train = commands.add_parser("train", help="train a model, writing checkpoints and a loss curve",
                                formatter_class=_DefaultsHelp)
    _add_data_arguments(train, split="train")
    train.add_argument("--model", choices=MODEL_NAMES, default="ssd-small", help="architecture")
    train.add_argument("--num-classes", type=int,
                       help="conf columns incl. background (default: the data set's classes + 1)")
    train.add_argument("--priors", choices=PRIOR_SETS, help=PRIORS_HELP)
    train.add_argument("--steps", type=int, default=1000, help="optimizer steps in all (with --resume: up to)")
    train.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    train.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    train.add_argument("--clip-grad-norm", type=float, help="clip the gradient norm to this (default: no clipping)")
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
    detect = commands.add_parser("detect", help="draw the newest checkpoint's detections on an image",
                                 formatter_class=_DefaultsHelp)
    detect.add_argument("image", type=Path, help="PNG or JPEG")
    detect.add_argument("--checkpoint-dir", required=True, help="read only: nothing is created or written")
    detect.add_argument("--out", required=True, type=Path, help="PNG to write")
    detect.add_argument("--score-threshold", type=float, default=0.3, help="least score of a detection")
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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `ssd`; returns the exit status (2 with a message for bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
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
