"""OpenAPI documentation for bodies the routes parse themselves (JSON, safetensors, multipart on one path),
and a working example of every JSON body, so that "Try it out" in /docs succeeds as it stands."""

from __future__ import annotations

import base64
import functools
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.api.errors import ErrorResponse
from app.core.settings import Settings
from ssd_core.data.images import encode_png
from ssd_core.data.synthetic import ShapesDataset

_REF = "#/components/schemas/{model}"
_DOCUMENTED: list[type[BaseModel]] = []  # request models referenced only from `request_body`

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Malformed body (invalid JSON or safetensors)"),
        (413, "Body over SSD_MAX_BODY_BYTES"),
        (415, "Unsupported Content-Type"),
        (422, "A field holds an unusable value; `error.field` names it"),
        (503, "Model not loaded, or no trainer in this replica"),
    )
}
AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong Bearer token"}
}
ROLE_RESPONSES: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorResponse, "description": "This replica is a server (SSD_ROLE=server)"}
}


# labelled images as multipart (`/finetune`, `/validation`): the files, and their annotations in one JSON field
FINETUNE_MULTIPART: dict[str, Any] = {
    "type": "object",
    "required": ["images", "annotations"],
    "properties": {
        "images": {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "PNG/JPEG files"},
        "annotations": {
            "type": "string",
            "description": 'JSON list, one entry per file: {"boxes": [[x1, y1, x2, y2] pixels], "labels": [...], '
                           '"difficult": [...]?, "labelled_classes": [...]?}',
        },
        "labelled_classes": {"type": "string", "description": "JSON list of 0-based labels: partial labels of "
                             "every image whose annotation gives none (see the JSON form)"},
        "steps": {"type": "integer", "minimum": 1, "default": 1},
        "learning_rate": {"type": "number", "exclusiveMinimum": 0},
        "augment": {"type": "boolean", "default": False},
        "force": {"type": "boolean", "default": False, "description": "train quarantined images and a batch screening would reject (the gate still judges)"},
        "replay": {"type": "number", "minimum": 0, "maximum": 8, "description": "default: SSD_REPLAY_RATIO"},
    },
}
VALIDATION_MULTIPART: dict[str, Any] = {**FINETUNE_MULTIPART, "properties": {
    name: FINETUNE_MULTIPART["properties"][name] for name in ("images", "annotations")}}


def request_body(content: dict[str, type[BaseModel] | str | dict[str, Any]]) -> dict[str, Any]:
    """`openapi_extra` for a route reading its own body: media type -> pydantic model, a description
    of a binary body, or an explicit schema (e.g. multipart fields)."""
    documented = {}
    for media, spec in content.items():
        if isinstance(spec, type) and issubclass(spec, BaseModel):
            _DOCUMENTED.append(spec)
            schema: dict[str, Any] = {"$ref": _REF.format(model=spec.__name__)}
        elif isinstance(spec, str):
            schema = {"type": "string", "format": "binary", "description": spec}
        else:
            schema = spec
        documented[media] = {"schema": schema}
    return {"requestBody": {"required": True, "content": documented}}


# ---- examples: a 64 px synthetic image holding one rectangle (label 0, a class of every model)


@functools.cache
def example_image() -> tuple[str, list[list[float]], list[int]]:
    """(base64 PNG, its boxes in pixels, their labels): `ShapesDataset`'s 64 px image with one rectangle."""
    sample = ShapesDataset(1, image_size=64, seed=1, min_objects=1, max_objects=1, min_size=0.4, split="example")[0]
    return base64.b64encode(encode_png(sample.image)).decode(), sample.boxes.tolist(), sample.labels.tolist()


def _labelled(copies: int) -> list[dict[str, Any]]:
    image, boxes, labels = example_image()
    return [{"image": image, "boxes": boxes, "labels": labels} for _ in range(copies)]


def _examples(summary_to_value: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"examples": {name: {"summary": summary, "value": value}
                         for name, (summary, value) in summary_to_value.items()}}


def _score_loss_examples(settings: Settings) -> dict[str, Any]:
    zeros = [0.0] * settings.num_classes  # one prediction's logits: every class equally likely
    return _examples({
        "images": ("the hosted model on a labelled image", {"images": _labelled(1)}),
        "predictions": ("given predictions for 2 priors", {
            "predictions": {"loc": [[[0, 0, 0, 0], [0, 0, 0, 0]]], "conf": [[zeros, zeros]]},
            "targets": [[{"box": [0.1, 0.1, 0.5, 0.5], "label": 0}]],
            "priors": [[0.3, 0.3, 0.4, 0.4], [0.7, 0.7, 0.2, 0.2]],
        }),
    })


def _detect_examples(_: Settings) -> dict[str, Any]:
    images = [{"image": example_image()[0]}]
    return _examples({
        "json": ("detections as JSON", {"images": images, "score_threshold": 0.3}),
        "render": ("the image with its detections drawn (PNG)", {"images": images, "render": True}),
    })


# JSON request model -> its examples for the hosted model's settings
BODY_EXAMPLES: dict[str, Callable[[Settings], dict[str, Any]]] = {
    "DetectRequest": _detect_examples,
    "ScoreLossRequest": _score_loss_examples,
    # ssd-small has BatchNorm: a job needs 2 images
    "FinetuneRequest": lambda _: _examples({"job": ("a 5-step job, waited for with ?wait=true",
                                                    {"images": _labelled(2), "steps": 5})}),
    "ValidationRequest": lambda _: _examples({"image": ("one labelled image", {"images": _labelled(1)})}),
    "RollbackRequest": lambda _: _examples({"first": ("the first saved version (GET /model/versions lists them)",
                                                      {"version": 0})}),
}


def _add_examples(schema: dict[str, Any], settings: Settings) -> None:
    """Put `BODY_EXAMPLES` on every JSON request body of `schema` whose model has them."""
    for item in schema.get("paths", {}).values():
        for operation in item.values():
            content = operation.get("requestBody", {}).get("content", {}).get("application/json")
            model = content and content["schema"].get("$ref", "").rsplit("/", 1)[-1]
            if model in BODY_EXAMPLES:
                content.update(BODY_EXAMPLES[model](settings))


def install_openapi(app: FastAPI) -> None:
    """Generate the schema once, adding the self-parsed request models to `components.schemas` and an
    example of every JSON body."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            models = [(m, "validation") for m in dict.fromkeys(_DOCUMENTED)]
            _, definitions = models_json_schema(models, ref_template=_REF)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(definitions.get("$defs", {}))
            _add_examples(schema, app.state.settings)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
