"""Service configuration: one pydantic-settings class, read from `SSD_*` environment variables."""

from __future__ import annotations

import ipaddress
import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ssd_core.data.class_names import expand_class_names
from ssd_core.ops.priors import resolve_prior_set

ModelName = Literal["ssd300", "ssd512", "ssd-small"]


class Settings(BaseSettings):
    """Everything the service can be told; `SSD_<NAME>` in the environment sets `<name>`."""

    model_config = SettingsConfigDict(env_prefix="SSD_", extra="ignore")

    # model
    model: ModelName = "ssd300"
    num_classes: int = Field(21, ge=2, description="classes counting background, as ssd.pytorch's num_classes")
    class_names: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="object class names (background excluded); JSON list or comma list, "
        "or a preset: shapes (the synthetic data set's), voc"
    )
    priors: Literal["voc", "coco"] | None = Field(
        None, description="prior set of ssd300/ssd512; None: ssd.pytorch's rule (voc for 21 classes, else coco)"
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
    host: str = Field("127.0.0.1", description="interface `python -m app` listens on (the image sets 0.0.0.0)")
    port: int = Field(8000, ge=1, le=65535)
    max_body_bytes: int = Field(64 * 2**20, ge=1024)
    max_images_per_request: int = Field(32, ge=1)
    max_image_pixels: int = Field(4096 * 4096, ge=1)
    max_boxes_per_image: int = Field(1000, ge=1)

    # dynamic batching of forward passes
    max_batch_images: int = Field(32, ge=1, description="images in one forward pass of the hosted model")
    max_batch_delay_ms: float = Field(
        5.0, ge=0, le=10_000, description="longest wait of a request for others to batch with; 0: no batching"
    )
    inference_queue_size: int = Field(128, ge=1, description="images waiting for a forward pass; beyond: 503")

    # fine-tuning
    finetune_queue_size: int = Field(8, ge=1)
    finetune_max_steps: int = Field(1000, ge=1, description="most steps one job may ask for")
    # the online recipe (README, "The online recipe"): chosen by benchmarks/bench_recipe.py
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="the fine-tune optimizer; sgd (momentum 0.9) for pretrained SSD300 weights"
    )
    learning_rate: float = Field(1e-3, gt=0)
    ema_decay: float = Field(
        0.99, ge=0, lt=1, description="decay of the served EMA of the trainer's weights; 0: serve the raw weights"
    )
    ema_tau: float = Field(50.0, gt=0, description="steps of the EMA's decay ramp d * (1 - exp(-updates / tau))")
    replay_ratio: float = Field(
        1.0, ge=0, le=8, description="replayed images per new image in each fine-tune step; 0: no replay"
    )
    replay_max_images: int = Field(2000, ge=1, description="images the replay memory keeps (reservoir)")
    replay_max_bytes: int = Field(512 * 2**20, ge=1, description="PNG bytes the replay memory keeps")
    job_history: int = Field(1000, ge=1, description="finished jobs kept for GET /finetune/{id}")
    shutdown_timeout_s: float = Field(30.0, gt=0, description="wait for the running step on shutdown")
    max_learning_rate: float | None = Field(
        None, gt=0, description="a job's learning_rate above this is a 422 (unset: 10 x learning_rate)")
    clip_grad_norm: float | None = Field(10.0, gt=0, description="clip each step's gradient L2 norm; None: off")
    warmup_steps: int = Field(100, ge=0, description="a fresh model's first steps ramp the lr up linearly")

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
    gate_noise_z: float = Field(3.0, ge=0, description="bootstrap standard errors added to the tolerance")
    gate_bootstrap: int = Field(200, ge=0, description="paired bootstrap resamples of the validation images")
    screen_ratio: float = Field(1.75, gt=1, description="reject a batch whose loss exceeds this x the median")
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
                value = json.loads(value)
            else:
                value = [name.strip() for name in value.split(",") if name.strip()]
        if isinstance(value, list | tuple) and all(isinstance(name, str) for name in value):
            return expand_class_names(value)  # a preset name: shapes, voc
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
    def _priors_fit_the_model(self) -> Settings:
        resolve_prior_set(self.model, self.num_classes, self.priors)  # ValueError: voc/coco asked of ssd-small
        return self

    @property
    def prior_set(self) -> str:
        """The prior set the hosted model uses: `priors`, else ssd.pytorch's rule ("scaled" for ssd-small)."""
        return resolve_prior_set(self.model, self.num_classes, self.priors)

    @model_validator(mode="after")
    def _queue_holds_a_batch(self) -> Settings:
        needed = max(self.max_batch_images, self.max_images_per_request)
        if self.inference_queue_size < needed:
            raise ValueError(f"inference_queue_size={self.inference_queue_size} must be >= max_batch_images and "
                             f"max_images_per_request ({needed}): a request that fits no queue is always refused")
        return self

    @model_validator(mode="after")
    def _learning_rate_allowed(self) -> Settings:
        if self.learning_rate > self.learning_rate_limit():
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

    def exposed_without_token(self) -> bool:
        """True when `host` is reachable beyond loopback and no API token guards the mutating endpoints."""
        return self.api_token is None and not is_loopback(self.host)

    def class_name(self, label: int) -> str:
        """Name of a 0-based object label (background excluded); `class_<label>` when unnamed."""
        return self.class_names[label] if self.class_names else f"class_{label}"

    def learning_rate_limit(self) -> float:
        """The highest `learning_rate` a job may send: SSD_MAX_LEARNING_RATE, else 10 x the recipe's rate
        (0.01 for AdamW's 1e-3: AdamW moves every weight by about the rate whatever its gradient, so the
        SGD-sized rates a fixed limit of 0.1 allowed are 20-100 x anything measured safe)."""
        return self.max_learning_rate if self.max_learning_rate is not None else 10 * self.learning_rate

    def object_class_names(self) -> list[str]:
        """Names of the object labels 0 .. num_classes - 2 (`class_name` of each)."""
        return [self.class_name(label) for label in range(self.num_classes - 1)]


def is_loopback(host: str) -> bool:
    """Whether listening on `host` (an address or a name) stays on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost: may resolve to any interface
        return False


@lru_cache
def load_settings() -> Settings:
    """The settings from the environment, read once per process."""
    return Settings()
