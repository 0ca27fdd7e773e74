# syntax=docker/dockerfile:1
# The classifier server (`triage serve`) on an NVIDIA GPU, bf16 (the engine's default on CUDA).
# Build from the repository root:  docker build -f docker/classifier.Dockerfile -t triage-classifier .
# Pick a base whose CUDA version the host's driver supports; its Python must be 3.11 (pyproject).
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}
LABEL org.opencontainers.image.title="triage-classifier" \
      org.opencontainers.image.description="triage classifier server (CUDA)"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /tmp/src
# Exactly the locked versions, each checked against its hash (docker/lock.sh refreshes the lock). The lock
# leaves torch out: the base image's CUDA build is kept (the base image's tag pins it).
COPY docker/requirements-classifier.lock ./docker/
RUN python -c "import torch; assert torch.version.cuda, 'the base image has no CUDA torch'" \
    && pip install --require-hashes -r docker/requirements-classifier.lock
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY classifier ./classifier
COPY migrations ./migrations
# The project alone; its dependencies are the lock's (and the base image's torch).
RUN pip install --no-deps . \
    && python -c "import torch, transformers, classifier.server; assert torch.version.cuda" \
    && rm -rf /tmp/src
# The same uid/gid as the bot image: both write the shared model registry volume.
RUN groupadd --system --gid 10001 triage \
    && useradd --system --uid 10001 --gid triage --home-dir /home/triage --create-home --shell /usr/sbin/nologin triage \
    && mkdir /data \
    && chown triage:triage /data
ENV PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    TRIAGE_DATA_DIR=/data \
    CLASSIFIER_DEVICE=cuda
USER 10001:10001
WORKDIR /home/triage
VOLUME ["/data"]
EXPOSE 8080
# /healthz: the process answers (/readyz would also wait for the model to load).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=4)"]
# Needs CLASSIFIER_TOKEN (and CLASSIFIER_ADMIN_TOKEN for the admin endpoints) and a model in /data/models.
CMD ["triage", "serve", "--host", "0.0.0.0", "--port", "8080"]
