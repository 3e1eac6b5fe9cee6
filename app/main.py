"""Placeholder app until the service lands."""
from fastapi import FastAPI

app = FastAPI(title="ssd-service")


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}
