# syntax=docker/dockerfile:1
# The Slack bot (and the one-shot jobs: migrations, the starter model, retraining) on the CPU.
# Build from the repository root:  docker build -f docker/bot.Dockerfile -t triage-bot .
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---- build: a virtual environment with CPU-only torch and the project; compilers stay here -----------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# Only needed when a dependency has no wheel for the platform (e.g. some arm64 builds).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Exactly the locked versions, each checked against its hash (docker/lock.sh refreshes the lock). Torch is
# the CPU wheel (torch==...+cpu), found on PyTorch's CPU page; everything else comes from PyPI.
COPY docker/requirements-bot.lock ./docker/
RUN pip install --require-hashes --find-links https://download.pytorch.org/whl/cpu/torch/ \
        -r docker/requirements-bot.lock
COPY pyproject.toml README.md ./
COPY bot ./bot
COPY classifier ./classifier
COPY migrations ./migrations
# A regular (not editable) install of the project alone; `pip check` fails the build if the lock no longer
# satisfies pyproject.toml. The source folder is not copied to the runtime image.
RUN pip install --no-deps . \
    && pip check \
    && python -c "import torch; assert torch.version.cuda is None, 'a CUDA build of torch was installed'"

# ---- runtime ------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="triage-bot" \
      org.opencontainers.image.description="triage Slack bot (CPU)"
# The same uid/gid as the classifier image: both write the shared model registry volume.
RUN groupadd --system --gid 10001 triage \
    && useradd --system --uid 10001 --gid triage --home-dir /home/triage --create-home --shell /usr/sbin/nologin triage \
    && mkdir /data \
    && chown triage:triage /data
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    TRIAGE_DATA_DIR=/data \
    PORT=3000
USER 10001:10001
WORKDIR /home/triage
VOLUME ["/data"]
EXPOSE 3000
# GET /healthz on $PORT, in HTTP and in Socket Mode (503 while the Socket Mode link is down).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '3000'), timeout=4)"]
CMD ["triage", "bot"]
