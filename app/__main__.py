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
import signal
import socket
import sys

import uvicorn
from uvicorn.supervisors import Multiprocess

from app.core.metrics import prepare_multiprocess_dir
from app.core.settings import Settings, load_settings

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


def main() -> None:
    settings = load_settings()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    warn_if_exposed(settings)
    prepare_multiprocess_dir(settings.workers)  # before any worker process writes metrics there
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_cleanly)
    config = uvicorn.Config(
        "app.main:app", host=settings.host, port=settings.port, timeout_graceful_shutdown=settings.shutdown_timeout_s,
        workers=settings.workers,
    )
    if config.workers > 1:  # SSD_ROLE=server only (settings): no trainer, uvicorn's own worker supervisor
        Multiprocess(config, sockets=[config.bind_socket()]).run()
    else:
        _Server(config).run()


if __name__ == "__main__":
    main()
