# syntax=docker/dockerfile:1.7
# Two images from one file:
#   docker build --target api    -t distillery-api .     # slim: distillery[server], no torch (~400 MB)
#   docker build --target worker -t distillery-worker .  # distillery[worker]: torch with CUDA, a GPU or CPU worker
# Both install the project as a regular wheel (built in the `wheel` stage), not an editable checkout:
# the migrations travel inside the `service` package.
# docker-compose.yml builds both. The worker needs no CUDA base image: torch's Linux wheels on
# PyPI carry the CUDA runtime libraries (the nvidia-*-cu12 wheels); only the driver comes from
# the host, through the NVIDIA Container Toolkit (`gpus: all` or compose's device reservation).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    DISTILLERY_DATA_DIR=/data \
    DISTILLERY_LOG_JSON=true
RUN groupadd --system --gid 10001 distillery \
 && useradd --system --uid 10001 --gid distillery --home-dir /data --create-home distillery
WORKDIR /app

# -- the wheel: built once, installed as a regular package by both images ------------------------
FROM base AS wheel
COPY pyproject.toml README.md ./
COPY distillery ./distillery
COPY client ./client
COPY service ./service
COPY api ./api
COPY worker ./worker
COPY kdcore ./kdcore
RUN pip wheel --no-deps --wheel-dir /wheels .

# -- the API: distillery[server], no torch --------------------------------------------------------
FROM base AS api
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install "$(ls /wheels/distillery-*.whl)[server]" s3fs \
 && python -c "import sys; sys.modules['torch'] = None; import api.main, distillery.cli"
USER distillery
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/livez', timeout=2)"
CMD ["distillery", "api", "--host", "0.0.0.0", "--port", "8000"]

# -- a worker: distillery[worker], torch (CUDA wheels by default; TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu for CPU only)
FROM base AS worker
ARG TORCH_INDEX_URL=https://pypi.org/simple
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# torch first and from its own index: the worker extra then finds it installed.
RUN pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple \
      torch==2.14.1 torchvision==0.29.1
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install "$(ls /wheels/distillery-*.whl)[worker]" s3fs
USER distillery
# One worker per GPU: give each container one device (compose does) and --concurrency 1.
CMD ["distillery", "worker", "--queue", "default", "--concurrency", "1"]
