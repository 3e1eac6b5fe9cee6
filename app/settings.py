"""Service configuration: one pydantic-settings class, read from `SSD_*` environment variables."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ModelName = Literal["ssd300", "ssd512", "ssd-small"]


class Settings(BaseSettings):
    """Everything the service can be told; `SSD_<NAME>` in the environment sets `<name>`."""

    model_config = SettingsConfigDict(env_prefix="SSD_", extra="ignore")

    # model
    model: ModelName = "ssd300"
    num_classes: int = Field(21, ge=2, description="classes counting background, as the seed's num_classes")
    class_names: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="object class names (background excluded); JSON list or comma list"
    )
    weights: Path | None = Field(None, description="safetensors weights used when no checkpoint exists")
    checkpoint_dir: Path | None = Field(Path("checkpoints"), description="None: no checkpoints")
    checkpoint_keep: int = Field(5, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    role: Literal["all", "trainer", "server"] = Field(
        "all", description="trainer: runs fine-tuning; server: inference only; all: both"
    )
    reload_interval: float = Field(
        5.0, gt=0, description="seconds between a server replica's polls of the checkpoint directory"
    )
    workers: int = Field(1, ge=1, description="uvicorn worker processes of `python -m app`; > 1 only for role server")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads; None leaves torch's")

    # HTTP
    api_token: SecretStr | None = Field(None, description="Bearer token for mutating endpoints")
    host: str = Field("0.0.0.0", description="interface `python -m app` listens on")
    port: int = Field(8000, ge=1, le=65535)
    max_body_bytes: int = Field(64 * 2**20, ge=1024)
    max_images_per_request: int = Field(32, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    max_boxes_per_image: int = Field(1000, ge=1)

    # fine-tuning
    finetune_queue_size: int = Field(8, ge=1)
    finetune_max_steps: int = Field(1000, ge=1, description="most steps one job may ask for")
    learning_rate: float = Field(1e-3, gt=0)
    job_history: int = Field(1000, ge=1, description="finished jobs kept for GET /finetune/{id}")
    shutdown_timeout_s: float = Field(30.0, gt=0, description="wait for the running step on shutdown")
    max_learning_rate: float = Field(0.1, gt=0, description="a job's learning_rate above this is a 422")
    clip_grad_norm: float | None = Field(10.0, gt=0, description="clip each step's gradient L2 norm; None: off")
    warmup_steps: int = Field(50, ge=0, description="a fresh model's first steps ramp the lr up linearly")

    # online learning that never makes the served model worse (README, "Publishing")
    publish: Literal["gated", "every_step"] = Field(
        "gated", description="gated: publish a job's weights only if the validation gate passes; every_step: "
        "publish after every step, unprotected")
    publish_every_steps: int | None = Field(
        None, ge=1, description="gated: also judge and publish every N steps of a longer job; None: at its end only")
    holdout_fraction: float = Field(0.1, ge=0, lt=1, description="share of job images kept for validation")
    validation_max_images: int = Field(200, ge=1)
    validation_max_bytes: int = Field(64 * 2**20, ge=1)
    gate_min_images: int = Field(10, ge=1, description="fewer validation images: jobs publish `ungated`")
    gate_tolerance: float = Field(0.01, ge=0, description="mAP@0.5 a candidate may lose before the noise margin")
    gate_noise_z: float = Field(2.0, ge=0, description="bootstrap standard errors added to the tolerance")
    gate_bootstrap: int = Field(200, ge=0, description="paired bootstrap resamples of the validation images")
    screen_ratio: float = Field(1.5, gt=1, description="reject a batch whose loss exceeds this x the median")
    screen_window: int = Field(20, ge=5, description="accepted jobs whose pre-training loss makes the median")

    # detection defaults
    score_threshold: float = Field(0.3, ge=0, lt=1)
    nms_iou: float = Field(0.45, gt=0, le=1)
    max_detections: int = Field(100, ge=1)

    @field_validator("class_names", mode="before")
    @classmethod
    def _split_names(cls, value: object) -> object:
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                return json.loads(value)
            return [name.strip() for name in value.split(",") if name.strip()]
        return value

    @model_validator(mode="after")
    def _names_match_classes(self) -> Settings:
        if self.class_names and len(self.class_names) != self.num_classes - 1:
            raise ValueError(
                f"class_names has {len(self.class_names)} names but num_classes={self.num_classes} "
                f"needs {self.num_classes - 1} (background excluded)"
            )
        return self

    @model_validator(mode="after")
    def _learning_rate_allowed(self) -> Settings:
        if self.learning_rate > self.max_learning_rate:
            raise ValueError(f"learning_rate={self.learning_rate} exceeds max_learning_rate={self.max_learning_rate}")
        return self

    @model_validator(mode="after")
    def _one_trainer_process(self) -> Settings:
        if self.workers > 1 and self.role != "server":
            raise ValueError(
                f"workers={self.workers} needs role=server (got role={self.role!r}): every worker process would "
                "run its own trainer on the same checkpoint directory"
            )
        if self.role == "server" and self.checkpoint_dir is None:
            raise ValueError("role=server needs checkpoint_dir: the trainer's shared checkpoint directory to follow")
        return self

    def class_name(self, label: int) -> str:
        """Name of a 0-based object label (background excluded); `class_<label>` when unnamed."""
        return self.class_names[label] if self.class_names else f"class_{label}"


@lru_cache
def load_settings() -> Settings:
    """The settings from the environment, read once per process."""
    return Settings()
