"""The FastAPI application: `create_app(settings)`; `app` for `uvicorn app.main:app`.

The model is loaded in the lifespan (not at import), and the trainer thread started there; on
shutdown (SIGTERM) the trainer finishes its current step and the current version is checkpointed.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

import torch
from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry
from starlette.concurrency import run_in_threadpool
from starlette.routing import Mount, Route

from app.api.errors import install_error_handlers
from app.api.openapi import install_openapi
from app.api.routes import detect, finetune, health, label_studio, model, score_loss, v2, validation
from app.core.metrics import Metrics
from app.core.middleware import BodyLimitMiddleware, RequestMetricsMiddleware
from app.core.settings import Settings, load_settings
from app.labelstudio.backend import start_label_studio
from app.online.worker import start_worker
from app.serving.export import remove_leftover_exports
from app.serving.inference import InferenceWorker, batch_policy
from app.serving.model_host import initial_model, start_host
from app.serving.replica import start_watcher
from ssd_core.storage.checkpoint import CheckpointStore, LoadedCheckpoint
from ssd_core.storage.weights_file import read_card

logger = logging.getLogger(__name__)


def _package_version() -> str:
    try:
        return version("ssd-service")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "0+unknown"


def weights_origin(settings: Settings, checkpoint: LoadedCheckpoint | None) -> str | None:
    """Where the served weights came from, in words; None for a random initialisation."""
    if checkpoint is not None:
        return f"checkpoint version {checkpoint.meta['version']} in {settings.checkpoint_dir}"
    if settings.role == "server":  # serves nothing until the trainer's first checkpoint appears
        return f"the trainer's checkpoints in {settings.checkpoint_dir} (none yet: not ready until one appears)"
    if settings.serves_demo():
        held_out = read_card(settings.weights).get("held_out", {})
        return f"the demo model (held-out mAP@0.5 {held_out.get('map_50', 'unknown')} on synthetic shapes)"
    if settings.weights is not None:
        return f"SSD_WEIGHTS={settings.weights}"
    return None


def log_served_model(settings: Settings, device: torch.device, checkpoint: LoadedCheckpoint | None) -> None:
    """The start-up line that says what is served: model, classes, prior set, device and the weights' origin;
    a warning instead when the weights are random."""
    names = settings.object_class_names()
    shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
    served = (f"serving {settings.model} with {len(names)} classes ({shown}), {settings.prior_set} priors, "
              f"on {device.type}")
    origin = weights_origin(settings, checkpoint)
    if origin is not None:
        logger.info("%s; weights from %s", served, origin)
    else:
        logger.warning(
            "%s; weights RANDOM: this model detects nothing until trained. Serve the demo model with `make serve` "
            "(no SSD_MODEL), or set SSD_WEIGHTS, or import ssd.pytorch weights with `ssd import`", served,
        )


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    if settings.torch_threads is not None:
        torch.set_num_threads(settings.torch_threads)
    metrics: Metrics = app.state.metrics
    # a server only reads the trainer's directory (and must not remove its temp files: writes in flight)
    read_only = settings.role == "server"
    store = (CheckpointStore(settings.checkpoint_dir, settings.checkpoint_keep, read_only=read_only)
             if settings.checkpoint_dir else None)
    app.state.store = store
    model, checkpoint = await run_in_threadpool(initial_model, settings, store)
    host = await run_in_threadpool(start_host, settings, metrics, model, checkpoint, store)
    await run_in_threadpool(remove_leftover_exports)  # a kill -9 during an export leaves its directory
    app.state.host = host
    log_served_model(settings, host.device, checkpoint)
    app.state.inference = InferenceWorker(host, batch_policy(settings), metrics)
    if settings.role != "server":  # the trainer takes over `model`; the host serves its own copy
        app.state.worker = await run_in_threadpool(start_worker, host, model, store, checkpoint, settings, metrics)
    else:  # follows the trainer's checkpoints (settings guarantee a checkpoint directory)
        app.state.watcher = start_watcher(host, store, settings, metrics, synced=checkpoint is not None)
    app.state.label_studio = start_label_studio(settings, metrics, getattr(app.state, "worker", None))
    try:
        yield
    finally:
        await run_in_threadpool(app.state.label_studio.stop, settings.shutdown_timeout_s)
        await run_in_threadpool(app.state.inference.stop, settings.shutdown_timeout_s)
        watcher = getattr(app.state, "watcher", None)
        if watcher is not None:
            await run_in_threadpool(watcher.stop, settings.shutdown_timeout_s)
        worker = getattr(app.state, "worker", None)
        if worker is not None:
            await run_in_threadpool(worker.stop, settings.shutdown_timeout_s)


def create_app(settings: Settings | None = None, registry: CollectorRegistry | None = None) -> FastAPI:
    """Build the application (nothing heavy happens before the lifespan starts).

    Args:
        settings: defaults to the `SSD_*` environment.
        registry: Prometheus registry for this app's metrics; a fresh one by default.
    """
    settings = settings or load_settings()
    app = FastAPIOffline(  # /docs and /redoc with Swagger UI and ReDoc served from the package: no CDN
        title="ssd-service",
        version=_package_version(),
        description="SSD MultiBoxLoss scoring, online fine-tuning and detection.",
        lifespan=lifespan,
    )
    metrics = Metrics(registry or CollectorRegistry(), settings.object_class_names())
    metrics.build.info({"version": app.version, "torch": torch.__version__})
    app.state.settings = settings
    app.state.metrics = metrics
    routers = (score_loss.router, finetune.router, validation.router, detect.router, model.router, health.router,
               v2.router, label_studio.router)
    routes = [route for route in app.routes if isinstance(route, Route | Mount)]  # /docs, its assets, ...
    for router in routers:
        app.include_router(router)
        routes.extend(router.routes)
    install_error_handlers(app)
    install_openapi(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes,
                       stall_timeout_s=settings.body_stall_timeout_s, metrics=metrics)
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics, routes=routes)  # outermost: sees 413s
    return app


app = create_app()
