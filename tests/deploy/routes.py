"""Which endpoint belongs to the trainer, from the application's own route table, and where an Ingress
sends a path (the matching rules of the Kubernetes Ingress API).

A route belongs to the trainer when its dependencies include `require_trainer_role` (a server replica
answers it `409 wrong_role`). Every proxy in front of the replicas (deploy/nginx/nginx.conf, the Ingress
of deploy/kubernetes) must send exactly those to the trainer and the rest to the servers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import fastapi.routing
from fastapi.dependencies.models import Dependant
from starlette.routing import Mount

from app.api.deps import require_trainer_role
from app.core.settings import Settings
from app.main import create_app

TRAINER, SERVER = "trainer", "server"
_PATH_PARAMETER = re.compile(r"\{[^}]+\}")


@dataclass(frozen=True)
class Endpoint:
    method: str
    template: str  # the route's path, e.g. /model/versions/{version}/pin
    role: str  # TRAINER or SERVER

    @property
    def path(self) -> str:
        """A concrete request path: every path parameter filled with `1` (routing never reads values)."""
        return _PATH_PARAMETER.sub("1", self.template)


def _depends_on(dependant: Dependant | None, call: object) -> bool:
    if dependant is None:
        return False
    return any(sub.call is call or _depends_on(sub, call) for sub in dependant.dependencies)


def _route_table(app: fastapi.FastAPI) -> list:
    """Every route with its full path: FastAPI >= 0.160 keeps included routers as nested entries of
    `app.routes` and flattens them with `iter_route_contexts`; older releases list the routes flat."""
    flatten = getattr(fastapi.routing, "iter_route_contexts", None)
    return list(flatten(app.routes)) if flatten is not None else list(app.routes)


def app_endpoints() -> list[Endpoint]:
    """(method, path template, role) of every route of the application, HEAD aside (a proxy routes it
    with its GET); a mount (the offline docs' assets) counts as a GET below its path."""
    app = create_app(Settings(model="ssd-small", num_classes=4, device="cpu", checkpoint_dir=None))
    endpoints = []
    for route in _route_table(app):
        if isinstance(getattr(route, "original_route", route), Mount):
            endpoints.append(Endpoint("GET", f"{route.path}/asset", SERVER))
            continue
        trainer_only = _depends_on(getattr(route, "dependant", None), require_trainer_role)
        for method in sorted(route.methods - {"HEAD"}):
            endpoints.append(Endpoint(method, route.path, TRAINER if trainer_only else SERVER))
    return endpoints


# ---- the Ingress API's path matching (networking.k8s.io/v1, "Path types" and "Multiple matches") -------


def _elements(path: str) -> list[str]:
    return [element for element in path.split("/") if element]


def ingress_path_matches(path_type: str, rule_path: str, request_path: str) -> bool:
    """Exact: the whole path, case-sensitive. Prefix: element by element split on `/` (`/foo` matches
    `/foo`, `/foo/` and `/foo/bar`, never `/foobar`), a trailing slash ignored on either side."""
    if path_type == "Exact":
        return request_path == rule_path
    if path_type == "Prefix":
        prefix = _elements(rule_path)
        return _elements(request_path)[: len(prefix)] == prefix
    raise AssertionError(f"pathType {path_type!r}: only Exact and Prefix have portable semantics")


def ingress_service(ingress: dict, request_path: str) -> str | None:
    """The Service an Ingress sends `request_path` to: the longest matching path wins, Exact before
    Prefix at equal length; None when nothing matches and there is no default backend."""
    best: tuple[int, int, str] | None = None
    for rule in ingress["spec"]["rules"]:
        for entry in rule["http"]["paths"]:
            if ingress_path_matches(entry["pathType"], entry["path"], request_path):
                rank = (len("/".join(_elements(entry["path"]))), entry["pathType"] == "Exact",
                        entry["backend"]["service"]["name"])
                if best is not None and rank[:2] == best[:2] and rank[2] != best[2]:
                    raise AssertionError(f"{request_path}: two rules of one rank name {best[2]} and {rank[2]}")
                if best is None or rank[:2] > best[:2]:
                    best = rank
    if best is not None:
        return best[2]
    default = ingress["spec"].get("defaultBackend")
    return default["service"]["name"] if default else None
