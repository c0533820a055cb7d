#!/usr/bin/env bash
# The prepared GPU check of gradspec (issue 22): the CUDA tests, per-matrix times at
# Llama-3.1-8B shapes, the engine and the training monitor end to end on a random model of
# Llama-3.1-8B's shapes, in under 8 minutes on one H200; ONE Markdown results file.
#
#   bash bench/gpu_check.sh --pack               here, before: fills .gpu_check/ (ignored)
#                                                with the shared data, the bench tokenizer
#                                                and the wheels the GPU machine lacks
#   bash bench/gpu_check.sh [--out DIR]          on the GPU machine (DIR: default $OUT),
#                                                with .gpu_check carried along
#   bash bench/gpu_check.sh --cpu-dry-run --out DIR   every stage on tiny shapes on the CPU
#
# Python: .venv/bin/python where it runs, else python3 (the GPU machine's, which has torch,
# transformers, pandas, pyarrow, typer, rich and pytest). The shared data: as gradspec finds
# it ($GRADSPEC_SHARED_DATA, else ../shared/data), else .gpu_check/data.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PACK=.gpu_check
# Wheels for the GPU machine's Python 3.12 that its image lacks: datasets (the monitor's
# tests) and its two dependencies that are missing there; versions from requirements.lock.
WHEELS=(datasets dill multiprocess)

if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi

pin() { grep -i "^$1==" requirements.lock; }

pack() {
    local data
    data=$(PYTHONPATH=src "$PYTHON" -c 'from gradspec.shared_data import shared_data_dir; print(shared_data_dir())')
    rm -rf "$PACK" && mkdir -p "$PACK/wheels" "$PACK/cache/bench"
    cp -r "$data" "$PACK/data" && chmod -R u+w "$PACK/data"
    PYTHONPATH=src:bench "$PYTHON" -c 'from bench_profile import bench_tokenizer; bench_tokenizer()'
    local cache
    cache=$(PYTHONPATH=src "$PYTHON" -c 'from gradspec.paths import cache_root; print(cache_root())')
    cp -r "$cache"/bench/tokenizer-v* "$PACK/cache/bench/"
    local pins=()
    for name in "${WHEELS[@]}"; do pins+=("$(pin "$name")"); done
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$PACK/wheels" "${pins[@]}"
    "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation -w "$PACK/wheels" .
    du -sh "$PACK"
    echo "packed $PACK: carry it to the GPU machine (run's carry: [\"$PACK\"])"
}

# Installs what the pack brought where it is missing: the wheels into a temporary folder
# (gradspec's own only for its metadata: src/ comes first on the path).
use_pack() {
    if [[ -d "$PACK/wheels" ]] && ! "$PYTHON" -c 'import datasets, importlib.metadata as m; m.version("gradspec")' 2>/dev/null; then
        local site
        site=$(mktemp -d)
        "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
            --target "$site" "$PACK"/wheels/*.whl
        export PYTHONPATH="$PYTHONPATH:$site"
    fi
    if [[ -z "${GRADSPEC_SHARED_DATA:-}" && ! -d ../shared/data && -d "$PACK/data" ]]; then
        export GRADSPEC_SHARED_DATA="$PWD/$PACK/data"
    fi
    if [[ -z "${GRADSPEC_CACHE:-}" && -d "$PACK/cache" ]]; then
        export GRADSPEC_CACHE="$PWD/$PACK/cache"
    fi
}

export PYTHONPATH="$PWD/src:$PWD/bench"
export PYTHONUNBUFFERED=1
if [[ "${1:-}" == "--pack" ]]; then
    pack
    exit
fi
use_pack
exec "$PYTHON" bench/gpu_check.py run "$@"
