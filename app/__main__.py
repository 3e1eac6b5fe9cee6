"""`python -m app`: serve the application with uvicorn on SSD_HOST:SSD_PORT.

On SIGTERM (or SIGINT) uvicorn shuts down gracefully (the lifespan stops the trainer and writes
the final checkpoint) and then re-raises the signal against the handler installed before it
started; the handler below turns that into a clean exit with status 0, which is what process
supervisors and the reliability tests expect from an orderly shutdown.
"""

from __future__ import annotations

import signal
import sys

import uvicorn

from app.settings import load_settings


def _exit_cleanly(signum: int, _frame: object) -> None:
    sys.exit(0)


def main() -> None:
    settings = load_settings()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _exit_cleanly)
    uvicorn.run("app.main:app", host=settings.host, port=settings.port, timeout_graceful_shutdown=settings.shutdown_timeout_s)


if __name__ == "__main__":
    main()
