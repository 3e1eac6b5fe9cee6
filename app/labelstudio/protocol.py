"""Label Studio's ML backend protocol as data: the label config's rectangle labels, task images, the
service's detections as Label Studio rectangle results, and annotations back as pixel boxes.

Pure functions of JSON and XML, no HTTP. Label Studio's rectangles are in percent of the image with
the top-left corner at (x, y); the service's boxes are (x1, y1, x2, y2) pixels.
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

RECTANGLE_TYPE = "rectanglelabels"


class LabelConfigError(ValueError):
    """The label config cannot be served: no RectangleLabels on an Image, or labels naming no class."""


@dataclass(frozen=True)
class RectangleControl:
    """The one `<RectangleLabels>` of a label config the service answers.

    Attributes:
        from_name: the RectangleLabels' `name` (results' `from_name`).
        to_name: the Image's `name` (results' `to_name`).
        image_key: the task data key holding the image URL (`<Image value="$image">` -> "image").
        labels: Label Studio label -> the service's 0-based class.
    """

    from_name: str
    to_name: str
    image_key: str
    labels: dict[str, int]

    @property
    def label_of_class(self) -> dict[int, str]:
        """0-based class -> the Label Studio label answered for it (the first one mapped to it)."""
        inverse: dict[int, str] = {}
        for name, label in self.labels.items():
            inverse.setdefault(label, name)
        return inverse

    @property
    def labelled_classes(self) -> list[int]:
        """The classes the project labels: its annotations are complete for these only."""
        return sorted(set(self.labels.values()))


def parse_label_config(
    config: str, class_names: Sequence[str], label_map: Mapping[str, str] | None = None
) -> RectangleControl:
    """The first `<RectangleLabels>` of `config` (Label Studio's label config XML) and its image.

    Args:
        config: the project's label config.
        class_names: the service's object classes, 0-based (background excluded).
        label_map: Label Studio label -> class name, for labels spelt otherwise (SSD_LABEL_STUDIO_LABEL_MAP);
            labels not in it must be class names themselves.

    Raises:
        LabelConfigError: not XML, no RectangleLabels, its image missing, or labels naming no class (all
            listed in the message, which Label Studio shows to the user).
    """
    label_map = label_map or {}
    try:
        root = ElementTree.fromstring(config)
    except ElementTree.ParseError as error:
        raise LabelConfigError(f"the label config is not XML: {error}") from None
    rectangles = [node for node in root.iter() if node.tag == "RectangleLabels"]
    if not rectangles:
        raise LabelConfigError("the label config has no <RectangleLabels>: this backend answers bounding boxes")
    control = rectangles[0]
    from_name, to_name = control.get("name"), control.get("toName")
    images = {node.get("name"): node for node in root.iter() if node.tag == "Image"}
    image = images.get(to_name)
    if not from_name or image is None:
        raise LabelConfigError(f"<RectangleLabels name={from_name!r}> must have a name and a toName naming an "
                               f"<Image>; the config's images are {sorted(n for n in images if n)}")
    value = image.get("value", "")
    if not value.startswith("$") or len(value) < 2:
        raise LabelConfigError(f"<Image name={to_name!r}> needs value=\"$<task data key>\", got {value!r}")
    index = {name: label for label, name in enumerate(class_names)}
    labels, unknown = {}, []
    for node in control.iter("Label"):
        name = node.get("value")
        if name is None:
            continue
        target = label_map.get(name, name)
        if target in index:
            labels[name] = index[target]
        else:
            unknown.append(name)
    if unknown:
        raise LabelConfigError(
            f"labels {unknown} of <RectangleLabels name={from_name!r}> name none of the model's classes "
            f"{list(class_names)}; rename them in the labeling interface or map them to classes with "
            "SSD_LABEL_STUDIO_LABEL_MAP (JSON: {\"<Label Studio label>\": \"<class name>\"})")
    if not labels:
        raise LabelConfigError(f"<RectangleLabels name={from_name!r}> has no <Label value=...>")
    return RectangleControl(from_name, to_name, value[1:], labels)


def task_image_url(task: Mapping, control: RectangleControl) -> str:
    """The image URL of a task (its `data[image_key]`); ValueError naming the key when absent."""
    data = task.get("data")
    url = data.get(control.image_key) if isinstance(data, Mapping) else None
    if not isinstance(url, str) or not url:
        raise ValueError(f"task {task.get('id')} has no image URL at data.{control.image_key}")
    return url


def detections_to_results(
    boxes: Sequence[Sequence[float]], labels: Sequence[int], scores: Sequence[float], image_hw: tuple[int, int],
    control: RectangleControl,
) -> list[dict]:
    """Detections -> Label Studio rectangle results.

    Args:
        boxes: K boxes (x1, y1, x2, y2) in pixels of an image of `image_hw` (height, width).
        labels: K 0-based classes; classes the project does not label are left out.
        scores: K confidences.

    Returns:
        results with `value` x, y, width, height in percent of the image (top-left corner), the label and
        per-box `score`.
    """
    height, width = image_hw
    names = control.label_of_class
    results = []
    for (x1, y1, x2, y2), label, score in zip(boxes, labels, scores, strict=True):
        if label not in names:
            continue
        results.append({
            "id": f"ssd-{len(results)}",
            "from_name": control.from_name,
            "to_name": control.to_name,
            "type": RECTANGLE_TYPE,
            "original_width": width,
            "original_height": height,
            "image_rotation": 0,
            "value": {
                "x": 100.0 * x1 / width,
                "y": 100.0 * y1 / height,
                "width": 100.0 * (x2 - x1) / width,
                "height": 100.0 * (y2 - y1) / height,
                "rotation": 0,
                "rectanglelabels": [names[label]],
            },
            "score": float(score),
        })
    return results


def task_score(results: Sequence[Mapping]) -> float:
    """A task's prediction score: the mean confidence of its pre-annotated boxes, 0 without any.

    Sorted ascending ("sort by prediction score"), the tasks the model is least sure of come first: label
    those first (active learning by uncertainty)."""
    scores = [float(result["score"]) for result in results]
    return sum(scores) / len(scores) if scores else 0.0


@dataclass
class AnnotatedBoxes:
    """An annotation's boxes in pixels: `boxes` [[x1, y1, x2, y2], ...], `labels` 0-based, and the boxes
    left out by reason (`rotated`, `unknown_label`, `not_rectangle`, `empty`)."""

    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)


def annotation_boxes(result: Sequence[Mapping], control: RectangleControl, image_hw: tuple[int, int]) -> AnnotatedBoxes:
    """An annotation's `result` -> pixel boxes of the image (height, width) `image_hw`.

    Results of other controls (another from_name) are ignored; of this control, rotated boxes, boxes whose
    label is not one of the config's (or not exactly one label), boxes of another type and boxes empty
    after clipping to the image are skipped and counted."""
    height, width = image_hw
    out = AnnotatedBoxes()
    for item in result:
        if item.get("from_name") != control.from_name:
            continue
        value = item.get("value") or {}
        if item.get("type") != RECTANGLE_TYPE or not all(key in value for key in ("x", "y", "width", "height")):
            out.skipped["not_rectangle"] += 1
            continue
        if float(value.get("rotation") or 0.0) % 360.0 > 1e-6:
            out.skipped["rotated"] += 1
            continue
        names = value.get("rectanglelabels") or []
        if len(names) != 1 or names[0] not in control.labels:
            out.skipped["unknown_label"] += 1
            continue
        x1 = min(max(float(value["x"]) * width / 100.0, 0.0), width)
        y1 = min(max(float(value["y"]) * height / 100.0, 0.0), height)
        x2 = min(max((float(value["x"]) + float(value["width"])) * width / 100.0, 0.0), width)
        y2 = min(max((float(value["y"]) + float(value["height"])) * height / 100.0, 0.0), height)
        if x2 - x1 < 1.0 or y2 - y1 < 1.0:  # under a pixel: the service's own rule for boxes
            out.skipped["empty"] += 1
            continue
        out.boxes.append([x1, y1, x2, y2])
        out.labels.append(control.labels[names[0]])
    return out
