"""OpenAPI documentation for bodies the routes parse themselves (JSON, safetensors, multipart on one path)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.api.errors import ErrorResponse

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
        "force": {"type": "boolean", "default": False, "description": "skip screening (the gate still applies)"},
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


def install_openapi(app: FastAPI) -> None:
    """Generate the schema once, adding the self-parsed request models to `components.schemas`."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            models = [(m, "validation") for m in dict.fromkeys(_DOCUMENTED)]
            _, definitions = models_json_schema(models, ref_template=_REF)
            schema.setdefault("components", {}).setdefault("schemas", {}).update(definitions.get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
