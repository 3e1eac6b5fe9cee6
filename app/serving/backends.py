"""What runs a published version's forward pass: torch, or ONNX Runtime (`SSD_BACKEND`; `auto`, the default,
picks ONNX Runtime on a CPU and torch on a GPU or in a trainer: `serving_backend`).

Training stays in torch whatever the backend; each published version gets a `Runner` built from its frozen
weights. For ONNX Runtime the network is exported to ONNX once (`OnnxGraph`): the graph is the same for
every version of the architecture and only the weights differ, so a version's session is that graph with
the version's state_dict as its initializers, constant-folded (BatchNorm into the convolutions) and
serialised: about half a second per publish (ssd-small, 2 CPU cores) instead of a trace (seconds, and
only under the host's `exclusive` lock). The graph is exported without constant folding, so that each
initializer is a state_dict entry (BatchNorm's running statistics included); ONNX Runtime's own
optimisations do not fold those BatchNorms, so the session runs the folded graph (25-35% faster).

A published version's session is built in the background (`BackgroundRunner`): publishing, which the
trainer does while holding its lock, never waits for it, and torch serves the version's first requests
until the session is ready. A version the ONNX Runtime backend cannot build (`OnnxGraph.runner` raising)
stays served by torch: the host logs it and counts it in `ssd_backend_fallbacks_total`.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch
from torch import Tensor

from ssd_core.models import SSD
from ssd_core.models.export import ONNX_WEIGHT_PREFIX, onnx_model, optimize_onnx

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16}
PRIORS_OUTPUT = "priors"  # a constant of the graph, the same for every version


class Runner(Protocol):
    """One version's forward pass: normalised images [B, 3, S, S] -> loc [B, P, 4], conf [B, P, C] (float32,
    on the host's device)."""

    backend: str

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]: ...


class TorchRunner:
    """The version's eval-mode network in torch, on `device`, in `dtype`; channels-last on CUDA (the layout
    cuDNN's convolution kernels prefer). Images arrive on the CPU: on CUDA they are copied from pinned memory
    without blocking the host thread.

    Args:
        model: the published network (frozen, float32); left untouched: a float16 or channels-last runner
            holds its own copy, since the version's float32 weights are what checkpoints and the gate read.
    """

    backend = "torch"

    def __init__(self, model: SSD, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.device, self.dtype = device, dtype
        self.memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        converted = dtype != torch.float32 or self.memory_format != torch.contiguous_format
        self.model = copy.deepcopy(model).to(dtype=dtype, memory_format=self.memory_format) if converted else model

    @torch.inference_mode()
    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if self.device.type == "cuda" and images.device.type == "cpu":
            images = images.pin_memory().to(self.device, non_blocking=True)
        images = images.to(self.device, self.dtype).contiguous(memory_format=self.memory_format)
        loc, conf, _ = self.model(images)
        return loc.float(), conf.float()


class OnnxRunner:
    """One version's ONNX Runtime session; images go through host memory (numpy in, numpy out)."""

    backend = "onnxruntime"

    def __init__(self, session, device: torch.device) -> None:
        self.session, self.device = session, device

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        pixels = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        loc, conf = self.session.run(["loc", "conf"], {"images": pixels})
        return torch.from_numpy(loc).to(self.device), torch.from_numpy(conf).to(self.device)


class BackgroundRunner:
    """Serves with `fallback` (torch, the same weights) until `build`'s runner is ready, built by a background
    thread; when `build` fails, logs it, calls `on_failure` and keeps `fallback`.

    Attributes:
        ready: set once the build has finished, successfully or not.
    """

    def __init__(self, fallback: Runner, build: Callable[[], Runner], on_failure: Callable[[], None]) -> None:
        self._runner = fallback
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._build, args=(build, on_failure), name="onnx-session", daemon=True)
        self._thread.start()

    @property
    def backend(self) -> str:
        return self._runner.backend

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self._runner(images)

    def join(self, timeout: float | None = None) -> bool:
        """Wait until the build's thread has ended; returns whether it has. A process must not exit while one
        runs: ONNX Runtime's native code would abort it ("terminate called without an active exception")."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _build(self, build: Callable[[], Runner], on_failure: Callable[[], None]) -> None:
        try:
            self._runner = build()  # one attribute write: a forward pass uses the old or the new runner whole
        except Exception:
            logger.exception("ONNX Runtime cannot build a session of these weights: serving them with torch")
            on_failure()
        finally:
            self.ready.set()


def serving_backend(setting: str, device: torch.device, role: str = "all") -> str:
    """The backend `SSD_BACKEND` names for a process of `role` (`SSD_ROLE`) on `device`. `auto` is ONNX Runtime
    where detection traffic is answered on a CPU, roles `all` and `server`: there it answered 1.2-1.6x torch's
    images/s over HTTP (benchmarks/README.md). It is torch on a GPU, where float16 and cuDNN serve and the
    image's onnxruntime wheel has no CUDA provider, and for role `trainer`, which publishes a version per job
    (each an ONNX Runtime session to build: SSD300 +2.2 GB at its peak) while the servers answer `/detect`.
    `torch` and `onnxruntime` are taken as they are.

    Raises:
        ValueError: `setting` is none of `auto`, `torch`, `onnxruntime`.
    """
    if setting == "auto":
        return "onnxruntime" if device.type == "cpu" and role != "trainer" else "torch"
    if setting not in ("torch", "onnxruntime"):
        raise ValueError(f"SSD_BACKEND must be auto, torch or onnxruntime, got {setting!r}")
    return setting


def providers(device: torch.device) -> list[str]:
    """ONNX Runtime execution providers for `device`, best first, among those this installation has:
    TensorRT, then CUDA, on a GPU; the CPU provider always last."""
    import onnxruntime

    available = onnxruntime.get_available_providers()
    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider"] if device.type == "cuda" else []
    return [name for name in wanted if name in available] + ["CPUExecutionProvider"]


class OnnxGraph:
    """The architecture's ONNX graph, exported once from `model`; `runner` builds any version's session.

    Args:
        model: a network of the served architecture (its weights do not matter).
        device: the host's device (picks the execution providers).
        threads: ONNX Runtime intra-op threads (None: its default, one per physical core).

    Raises:
        ValueError: an initializer of the graph is not a state_dict entry of `model` (the graph folded a
            weight away): it could not run other weights.
    """

    def __init__(self, model: SSD, device: torch.device, threads: int | None = None) -> None:
        import onnx

        self.device, self.threads = device, threads
        self.providers = providers(device)
        proto = onnx_model(model, optimize=False)
        state = model.state_dict()
        self.weights: dict[str, str] = {}  # initializer -> state_dict key
        for initializer in proto.graph.initializer:
            key = initializer.name.removeprefix(ONNX_WEIGHT_PREFIX)
            if initializer.name == PRIORS_OUTPUT:
                continue
            if key not in state:
                raise ValueError(f"the ONNX graph's initializer {initializer.name!r} is no weight of the model")
            self.weights[initializer.name] = key
        self._template = onnx.ModelProto()
        self._template.CopyFrom(proto)

    def runner(self, model: SSD) -> OnnxRunner:
        """`model`'s weights in the graph, folded, as an ONNX Runtime session."""
        import onnx
        import onnxruntime
        from onnx import numpy_helper

        state = model.state_dict()
        proto = onnx.ModelProto()
        proto.CopyFrom(self._template)
        for initializer in proto.graph.initializer:
            key = self.weights.get(initializer.name)
            if key is not None:
                initializer.CopyFrom(numpy_helper.from_array(state[key].detach().cpu().numpy(), initializer.name))
        proto = optimize_onnx(proto)  # the new weights are constants now: fold them
        options = onnxruntime.SessionOptions()
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        # no per-session arena: it would keep the largest batch's activations for the session's life (SSD300 at
        # batch 8: 840 MB in every worker), where torch gives them back; without it a forward pass took 3%
        # (SSD300) to 8% (ssd-small, batch 1) longer in process, and /detect over HTTP was not slower
        options.enable_cpu_mem_arena = False
        if self.threads is not None:
            options.intra_op_num_threads = self.threads
        session = onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=self.providers)
        return OnnxRunner(session, self.device)
