# syntax=docker/dockerfile:1
# Multi-stage image for the SSD service.
# The default PyPI torch wheels carry CUDA, so one image runs on a GPU host (NVIDIA container toolkit)
# and on CPU. For a smaller CPU-only image build with
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# (pip then prefers the `+cpu` torch/torchvision wheels from that index).

FROM python:3.11-slim AS builder
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Only what `pip install .` needs: metadata first, then the two packages.
COPY pyproject.toml README.md ./
COPY ssd_core ./ssd_core
COPY app ./app
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} .

FROM python:3.11-slim AS runtime
RUN groupadd --system --gid 10001 ssd \
    && useradd --system --uid 10001 --gid ssd --no-create-home --shell /usr/sbin/nologin ssd \
    && mkdir -p /var/lib/ssd/checkpoints \
    && chown -R ssd:ssd /var/lib/ssd
COPY --from=builder /opt/venv /opt/venv
# Every setting is an SSD_* variable (docs/configuration.md); these are the container's defaults: SSD300 with
# VOC's 21 classes, for GPUs. The demo model ships in the package too (SSD_MODEL=ssd-small SSD_NUM_CLASSES=4
# SSD_WEIGHTS=demo).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SSD_MODEL=ssd300 \
    SSD_DEVICE=auto \
    SSD_CHECKPOINT_DIR=/var/lib/ssd/checkpoints \
    SSD_HOST=0.0.0.0 \
    SSD_PORT=8000
VOLUME ["/var/lib/ssd/checkpoints"]
WORKDIR /home/ssd
USER ssd:ssd
EXPOSE 8000
# Liveness only (process answers); /readyz is for load balancers. Plain Python, no curl in the image.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('SSD_PORT', '8000'), timeout=4)" || exit 1
# `python -m app` runs uvicorn with app.main:app on SSD_HOST:SSD_PORT as PID 1; on SIGTERM (docker stop)
# it lets the trainer finish its step, writes the final checkpoint and exits 0.
CMD ["python", "-m", "app"]
