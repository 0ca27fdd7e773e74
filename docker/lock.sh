#!/usr/bin/env bash
# Refresh the Docker images' locks: every dependency of pyproject.toml pinned, with hashes, for
# Python 3.11 on linux/amd64. Needs uv (`pip install uv`). Run after changing dependencies in
# pyproject.toml, or to take newer releases; commit the two files. CI keeps installing from
# pyproject.toml's ranges, so the ranges stay honest; the images install exactly what is locked.
#
#   docker/requirements-bot.lock         CPU torch (the PyTorch CPU wheel) and everything else
#   docker/requirements-classifier.lock  everything but torch: the CUDA base image brings its own
#
# TORCH_FIND_LINKS: where the CPU torch wheel is listed (a folder with the wheel works offline).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
TORCH_FIND_LINKS="${TORCH_FIND_LINKS:-https://download.pytorch.org/whl/cpu/torch/}"

constraints="$(mktemp)"
trap 'rm -f "$constraints"' EXIT
echo "torch==${TORCH_VERSION}+cpu" >"$constraints"
compile=(
    uv pip compile pyproject.toml --generate-hashes --no-header --no-annotate --python-version 3.11
    --python-platform x86_64-manylinux_2_28 --index-url https://pypi.org/simple
    --find-links "$TORCH_FIND_LINKS" --constraint "$constraints"
)
"${compile[@]}" -o docker/requirements-bot.lock
"${compile[@]}" --no-emit-package torch -o docker/requirements-classifier.lock
