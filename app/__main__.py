"""`python -m app`: serve the application with uvicorn on SSD_HOST:SSD_PORT.

On SIGTERM (or SIGINT) uvicorn shuts down gracefully (the lifespan stops the trainer and writes
the final checkpoint) and then re-raises the signal against the handler installed before it
started; the handler below turns that into a clean exit with status 0, which is what process
supervisors and the reliability tests expect from an orderly shutdown.

uvicorn waits for open requests before it runs the lifespan's shutdown, and a `POST /finetune?wait=true`
stays open until its job ends: so the fine-tune worker is told to stop (queued jobs cancelled, the
running one after its current step) as soon as shutdown begins, not after that wait times out.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sys
from typing import NoReturn

import uvicorn
from pydantic import ValidationError
from uvicorn.supervisors import Multiprocess

from app.core.metrics import prepare_multiprocess_dir
from app.core.settings import Settings, load_settings
from app.serving.model_host import check_compatible
from ssd_core.storage.checkpoint import CheckpointStore

logger = logging.getLogger("app")


def _exit_cleanly(signum: int, _frame: object) -> None:
    sys.exit(0)


class _Server(uvicorn.Server):
    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        from app.main import app  # the object uvicorn imported from "app.main:app"

        worker = getattr(app.state, "worker", None)
        if worker is not None:
            worker.begin_stop()
        await super().shutdown(sockets)


def warn_if_exposed(settings: Settings) -> None:
    """Log a warning when the service listens beyond loopback with no SSD_API_TOKEN: anyone who reaches
    the port can then fine-tune, roll back or checkpoint the model."""
    if settings.exposed_without_token():
        logger.warning(
            "listening on %s:%d without SSD_API_TOKEN: anyone who can reach this port can change the model "
            "(POST /finetune, /model/*); set SSD_API_TOKEN or SSD_HOST=127.0.0.1", settings.host, settings.port,
        )


EXIT_BAD_SETTINGS = 2
SETTINGS_HELP = "every setting: docs/configuration.md; SSD_LOG_LEVEL=debug shows the traceback"


def settings_problem(error: ValidationError) -> str:
    """One line per invalid setting, each naming its `SSD_*` variable, the value given and what is allowed."""
    fields = "|".join(sorted(Settings.model_fields, key=len, reverse=True))
    as_variable = re.compile(rf"\b({fields})\b(?=\s*=|\s+has\b)")  # `workers=2` in a validator's message
    lines = []
    for problem in error.errors(include_url=False):
        message = as_variable.sub(lambda match: f"SSD_{match.group(1).upper()}", problem["msg"])
        message = message.removeprefix("Value error, ")
        if problem["loc"]:
            variable = f"SSD_{str(problem['loc'][0]).upper()}"
            lines.append(f"{variable}={problem['input']!r}: {message}")
        else:
            lines.append(message)
    return "; ".join(lines)


def startup_problem(settings: Settings) -> str | None:
    """What would stop the model from loading, said before uvicorn starts (which would print it as a long
    traceback): a missing SSD_WEIGHTS file, or a newest checkpoint that does not fit the settings."""
    if settings.weights is not None and not settings.weights.is_file():
        return (f"SSD_WEIGHTS={settings.weights}: no such file; give a safetensors file, `demo` (the shipped demo "
                "model, with SSD_MODEL=ssd-small SSD_NUM_CLASSES=4) or leave it unset")
    if settings.checkpoint_dir is None or not settings.checkpoint_dir.is_dir():
        return None
    versions = CheckpointStore(settings.checkpoint_dir, read_only=True).versions()  # sidecars only: cheap
    try:
        if versions:
            check_compatible(versions[-1].meta, settings)
    except RuntimeError as error:
        return str(error)
    return None


def _fail(message: str) -> NoReturn:
    """Exit with a one- or two-line reason; the traceback only at debug level."""
    logger.debug("start-up failure", exc_info=True)
    logger.error("cannot start: %s", message)
    logger.error("(%s)", SETTINGS_HELP)
    sys.exit(EXIT_BAD_SETTINGS)


def main() -> None:
    log_level = os.environ.get("SSD_LOG_LEVEL", "info").upper()
    logging.basicConfig(level=getattr(logging, log_level, logging.INFO), format="%(levelname)s:     %(message)s")
    try:
        settings = load_settings()
    except ValidationError as error:
        _fail(settings_problem(error))
    problem = startup_problem(settings)
    if problem is not None:
        _fail(problem)
    warn_if_exposed(settings)
    prepare_multiprocess_dir(settings.workers)  # before any worker process writes metrics there
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_cleanly)
    config = uvicorn.Config(
        "app.main:app", host=settings.host, port=settings.port, timeout_graceful_shutdown=settings.shutdown_timeout_s,
        workers=settings.workers, log_level=settings.log_level,
    )
    if config.workers > 1:  # SSD_ROLE=server only (settings): no trainer, uvicorn's own worker supervisor
        Multiprocess(config, sockets=[config.bind_socket()]).run()
    else:
        _Server(config).run()


if __name__ == "__main__":
    main()
