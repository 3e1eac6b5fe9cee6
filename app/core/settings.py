"""Service configuration: one pydantic-settings class, read from `SSD_*` environment variables."""

from __future__ import annotations

import ipaddress
import json
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, HttpUrl, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from ssd_core.data.class_names import expand_class_names
from ssd_core.models.demo import DEMO_MODEL, DEMO_NUM_CLASSES, DEMO_WEIGHTS, DEMO_WEIGHTS_NAME
from ssd_core.ops.priors import resolve_prior_set

ModelName = Literal["ssd300", "ssd512", "ssd-small"]


class Settings(BaseSettings):
    """Everything the service can be told; `SSD_<NAME>` in the environment sets `<name>`."""

    model_config = SettingsConfigDict(env_prefix="SSD_", extra="ignore")

    # model
    model: ModelName = Field("ssd300", description="architecture: ssd300, ssd512 or ssd-small (the small CPU model "
                             "of the demo and the tests); ssd300 with VOC's 21 classes is the GPU and Compose default")
    num_classes: int = Field(21, ge=2, description="classes counting background, as ssd.pytorch's num_classes")
    class_names: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="object class names (background excluded); JSON list or comma list, "
        "or a preset: shapes (the synthetic data set's), voc"
    )
    priors: Literal["voc", "coco"] | None = Field(
        None, description="prior set of ssd300/ssd512; None: ssd.pytorch's rule (voc for 21 classes, else coco)"
    )
    weights: Path | None = Field(
        None, description="safetensors weights used when no checkpoint exists; `demo`: the shipped demo model "
        "(ssd-small trained on the synthetic shapes; needs model ssd-small and num_classes 4)")
    checkpoint_dir: Path | None = Field(
        Path("checkpoints"), description="where versions are saved (the image: /var/lib/ssd/checkpoints); a restart "
        "resumes from the newest readable one")
    checkpoint_keep: int = Field(5, ge=1, description="checkpoints kept (pinned ones on top)")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto: CUDA when available; cuda fails at start without a GPU")
    role: Literal["all", "trainer", "server"] = Field(
        "all", description="trainer: runs fine-tuning; server: inference only; all: both"
    )
    reload_interval: float = Field(
        5.0, gt=0, description="seconds between a server replica's polls of the checkpoint directory"
    )
    workers: int = Field(1, ge=1, description="uvicorn worker processes of `python -m app`; > 1 only for role server")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads (ONNX Runtime's too); None "
                                      "leaves their defaults")
    backend: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto", description="what runs the served forward passes: torch, or ONNX Runtime (the graph is exported once "
        "at start-up, seconds, and each published version's weights put into it; CUDA/TensorRT providers with the "
        "onnxruntime-gpu wheel); auto: ONNX Runtime on a CPU (1.2-1.6x torch's images/s over HTTP), torch on a GPU "
        "(float16, and the image ships no onnxruntime-gpu) and for role trainer (a session per published version, "
        "and the servers answer /detect); training stays in torch")
    inference_dtype: Literal["float32", "float16"] = Field(
        "float32", description="precision of the served forward passes; float16 needs SSD_DEVICE cuda (or auto on a "
        "GPU) and the torch backend")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="level of the service's log; debug adds the traceback of a start-up failure"
    )

    # HTTP
    api_token: SecretStr | None = Field(
        None, description="Bearer token for mutating endpoints and export; empty or blank is the same as unset")
    allow_unauthenticated: bool = Field(
        False, description="start although `host` is reachable beyond loopback and no api_token is set: anyone "
        "who reaches the port may then fine-tune, roll back and export the model")
    host: str = Field("127.0.0.1", description="interface `python -m app` listens on (the image sets 0.0.0.0)")
    port: int = Field(8000, ge=1, le=65535, description="port of `python -m app` (`make serve` reads PORT too)")
    max_body_bytes: int = Field(64 * 2**20, ge=1024, description="larger request bodies get 413")
    body_stall_timeout_s: float = Field(
        10.0, gt=0, description="a request whose body sends no byte for this long is dropped with 408 (a stalled "
        "upload would hold its connection and a worker slot)")
    max_images_per_request: int = Field(32, ge=1, description="images per request")
    max_image_pixels: int = Field(4096 * 4096, ge=1, description="pixels per image, checked from the header before "
                                  "decoding")
    max_boxes_per_image: int = Field(1000, ge=1, description="boxes per image")

    # dynamic batching of forward passes
    max_batch_images: int = Field(32, ge=1, description="images in one forward pass of the hosted model")
    max_batch_delay_ms: float = Field(
        5.0, ge=0, le=10_000, description="longest wait for others to batch with of requests that queued while a "
        "forward pass ran (a request that finds the inference thread idle runs at once); 0: no batching"
    )
    inference_queue_size: int = Field(128, ge=1, description="images waiting for a forward pass; beyond: 503")

    # fine-tuning
    finetune_queue_size: int = Field(8, ge=1, description="queued fine-tune jobs; POST /finetune answers 429 beyond")
    finetune_max_steps: int = Field(1000, ge=1, description="most steps one job may ask for")
    # the online recipe (docs/online-learning.md, "The online recipe"): chosen by benchmarks/bench_recipe.py
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="the fine-tune optimizer; sgd (momentum 0.9) for pretrained SSD300 weights"
    )
    learning_rate: float = Field(1e-3, gt=0, description="a job's learning rate unless it sends one")
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
    warmup_steps: int = Field(100, ge=0, description="the first steps of a fresh optimizer (random weights, SSD_WEIGHTS "
                              "or the demo model) ramp the lr up linearly from 1/100; a job's view says when it applied")

    # online learning that never makes the served model worse (docs/online-learning.md, "Publishing")
    publish: Literal["gated", "every_step"] = Field(
        "gated", description="gated: publish a job's weights only if the validation gate passes; every_step: "
        "publish after every step, unprotected")
    publish_every_steps: int | None = Field(
        None, ge=1, description="gated: also judge and publish every N steps of a longer job; None: at its end only")
    holdout_fraction: float = Field(0.1, ge=0, lt=1, description="share of job images kept for validation")
    validation_max_images: int = Field(200, ge=1, description="images in the validation set (reservoir once full)")
    validation_max_bytes: int = Field(64 * 2**20, ge=1, description="image bytes in the validation set")
    gate_min_images: int = Field(10, ge=1, description="fewer validation images: jobs publish `ungated`")
    gate_tolerance: float = Field(0.01, ge=0, description="mAP@0.5 a candidate may lose before the noise margin")
    gate_noise_z: float = Field(3.0, ge=0, description="bootstrap standard errors added to the tolerance")
    gate_bootstrap: int = Field(200, ge=0, description="paired bootstrap resamples of the validation images")
    gate_loss_tolerance: float = Field(
        0.1, ge=0, description="paired per-image test: reject a candidate whose per-image validation loss is "
        "significantly above (1 + this) x the reference's")
    gate_detection_tolerance: float = Field(
        0.05, ge=0, description="paired per-image test: reject a candidate whose per-image average precision "
        "falls significantly by more than this")
    gate_paired_z: float = Field(2.0, ge=0, description="standard errors of the paired per-image tests")
    screen_ratio: float = Field(
        3.0, gt=1, description="quarantine an image whose served-model loss_l or loss_c (per matched prior) exceeds "
        "this x the served model's median on the validation set now")
    screen_min_map: float = Field(
        0.2, ge=0, le=1, description="screening judges once the served model's validation mAP@0.5 reaches this "
        "(on >= 4 validation images); below, it is quiet")
    screen_label_min_map: float = Field(
        0.7, ge=0, le=1, description="the per-box label checks run once the served model's validation mAP@0.5 "
        "reaches this (on >= 8 validation images)")
    screen_confidence: float = Field(
        0.9, gt=0, lt=1, description="a served-model detection this confident contradicts an annotation (label "
        "checks; at 0.8 a model learning from fresh quarantined 0.4-1.4% of clean images for detections at 0.80-0.91)")
    screen_reject_share: float = Field(
        0.5, gt=0, le=1, description="a job with more than this share of its images quarantined is rejected")

    # detection defaults
    score_threshold: float = Field(0.3, ge=0, lt=1, description="default score_threshold of /detect")
    nms_iou: float = Field(0.45, gt=0, le=1, description="IoU threshold of the per-class NMS")
    max_detections: int = Field(100, ge=1, description="default max_detections per image")

    # Label Studio's ML backend at /labelstudio (docs/LABEL_STUDIO.md)
    label_studio_url: HttpUrl | None = Field(
        None, description="Label Studio's URL as the service reaches it (task images, annotations, projects)")
    label_studio_api_key: SecretStr | None = Field(
        None, description="a Label Studio legacy token or personal access token (its refresh JWT)")
    label_studio_label_map: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="JSON {Label Studio label: class name} for labels spelt otherwise "
        "than the classes")
    label_studio_timeout_s: float = Field(10.0, gt=0, description="per request to Label Studio")
    stream_batch_images: int = Field(
        8, ge=2, description="newly annotated images that start one fine-tune job of the annotation stream")
    stream_steps: int = Field(
        32, ge=1, description="steps of each annotation-stream job (benchmarks/bench_label_studio.py: pre-annotation "
        "mAP@0.5 after 160 annotated images 0.14 at 4 steps, 0.35 at 16, 0.56 at 32 without augmentation, 0.93 with flip)")
    stream_augment: Literal["none", "flip", "ssd"] = Field(
        "flip", description="augmentation of annotation-stream jobs: flip (photometric and horizontal flip), ssd "
        "(SSD's, with zoom out and crops) or none (benchmarks/bench_recipe.py, 8 images x 32 steps: held-out "
        "mAP@0.5 after 80 images 0.81 flip, 0.48 ssd, 0.41 none)")

    @field_validator("api_token", mode="before")
    @classmethod
    def _blank_token_is_unset(cls, value: object) -> object:
        """An empty token (`SSD_API_TOKEN=` or Compose's `${SSD_API_TOKEN:-}`) must not read as a token that
        an empty Authorization header matches: it is no token."""
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("label_studio_api_key", "label_studio_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, value: object) -> object:
        """Compose's `${SSD_LABEL_STUDIO_URL:-}` passes an empty string: no Label Studio."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("label_studio_label_map", mode="before")
    @classmethod
    def _parse_label_map(cls, value: object) -> object:
        if isinstance(value, str):
            value = json.loads(value) if value.strip() else {}
        return value

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

    @field_validator("weights", mode="before")
    @classmethod
    def _demo_weights(cls, value: object) -> object:
        return DEMO_WEIGHTS if value == DEMO_WEIGHTS_NAME else value

    @model_validator(mode="after")
    def _demo_fits_the_model(self) -> Settings:
        if self.weights == DEMO_WEIGHTS and (self.model, self.num_classes) != (DEMO_MODEL, DEMO_NUM_CLASSES):
            raise ValueError(
                f"weights=demo is {DEMO_MODEL} with num_classes={DEMO_NUM_CLASSES}, settings say model={self.model}, "
                f"num_classes={self.num_classes}; set SSD_MODEL={DEMO_MODEL} SSD_NUM_CLASSES={DEMO_NUM_CLASSES} "
                "or leave SSD_WEIGHTS unset"
            )
        return self

    def serves_demo(self) -> bool:
        """Whether `weights` is the shipped demo model."""
        return self.weights == DEMO_WEIGHTS

    @model_validator(mode="after")
    def _names_match_classes(self) -> Settings:
        if self.class_names and len(self.class_names) != self.num_classes - 1:
            raise ValueError(
                f"class_names has {len(self.class_names)} names but num_classes={self.num_classes} "
                f"needs {self.num_classes - 1} (background excluded)"
            )
        return self

    @model_validator(mode="after")
    def _label_map_names_classes(self) -> Settings:
        unknown = sorted(set(self.label_studio_label_map.values()) - set(self.object_class_names()))
        if unknown:
            raise ValueError(f"label_studio_label_map maps to {unknown}, which are not class names "
                             f"{self.object_class_names()}")
        return self

    @model_validator(mode="after")
    def _float16_runs_on_torch(self) -> Settings:
        if self.inference_dtype == "float16" and self.backend == "onnxruntime":
            raise ValueError("inference_dtype float16 runs on the torch backend (the ONNX graph is float32): set "
                             "SSD_BACKEND=torch or SSD_INFERENCE_DTYPE=float32")
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

    @model_validator(mode="after")
    def _token_beyond_loopback(self) -> Settings:
        if self.exposed_without_token() and not self.allow_unauthenticated:
            raise ValueError(
                f"SSD_HOST={self.host} listens beyond loopback but SSD_API_TOKEN is unset or empty: set "
                "SSD_API_TOKEN, or SSD_HOST=127.0.0.1, or SSD_ALLOW_UNAUTHENTICATED=true to let anyone who "
                "reaches the port change the model")
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
