#!/usr/bin/env bash
# One GRPO step of npu-rft beside TRL's GRPOTrainer on a GPU machine that has no
# network: tools/bench_step.py at the real Qwen2.5 shapes, in both settings
# (2 prompts x 4 samples x 64 tokens, and 8 x 8 x 256), bf16.
#
#   tools/gpu_step_bench.sh gather     # here, with network: the wheels into .dev/gpu-wheels
#   tools/gpu_step_bench.sh run        # there, from the repository root, .dev/gpu-wheels carried in
#   tools/gpu_step_bench.sh run --device cpu --shapes tiny --repeats 1 --steps 1 --warmup 1   # a test here
#
# What the GPU machine is assumed to have: a python3 with torch built for CUDA
# and the packages both frameworks share (transformers, peft, accelerate,
# safetensors, tokenizers, numpy, pandas, pyarrow, click, pyyaml, tqdm, psutil,
# matplotlib, tensorboard, setuptools, wheel). `run` checks torch and CUDA first and
# stops with a message otherwise. What it lacks is carried in as wheels, all
# pure Python (about 2 MB): trl 1.16.0 and datasets with its dill and
# multiprocess. `gather` fetches them for Python 3.12 (the GPU machine's) and for
# the Python that runs it (for the test here); GATHER_EXTRA="name==version ..."
# adds more (pyarrow==26.0.1, 55 MB, if the machine's pyarrow is older than
# datasets needs: `run` says so).
#
# `run` installs the carried wheels and the project (`pip install --no-deps
# --no-index --target`) into a fresh folder, puts it on PYTHONPATH, prints the
# versions, and runs tools/bench_step.py for every shape and setting; each
# figure line names the card (or the CPU). Logs and JSON go to --out (default
# $OUT when set, else ./gpu-bench-out).
#   --device cuda|cpu     (default cuda)
#   --shapes "..."        (default "qwen2.5-1.5b qwen2.5-0.5b")
#   --settings "..."      (default "2x4x64 8x8x256": prompts x samples x new tokens)
#   --repeats N --steps N --warmup N   (default 2, 2, 1)
# A lent GPU machine gives one command 10 minutes: run one shape per command
# (`run --shapes qwen2.5-1.5b`, the one with targets, first), with .dev/gpu-wheels
# carried. Each case's JSON and the log are written as they finish, so a command
# stopped at its limit still returns the cases it completed.
#   --python PY           (default python3)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WHEELS=${WHEELS:-$REPO/.dev/gpu-wheels}
PACKAGES="trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19"

gather() {
    local py=${PYTHON:-python3} local_version
    local_version=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    mkdir -p "$WHEELS"
    for version in 3.12 "$local_version"; do
        # shellcheck disable=SC2086
        "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$WHEELS" $PACKAGES ${GATHER_EXTRA:-}
    done
    du -sh "$WHEELS"
    ls "$WHEELS"
}

run() {
    local device=cuda shapes="qwen2.5-1.5b qwen2.5-0.5b" settings="2x4x64 8x8x256" repeats=2 steps=2 warmup=1
    local py=${PYTHON:-python3} out=${OUT:-$PWD/gpu-bench-out}
    while [ $# -gt 0 ]; do
        case $1 in
            --device) device=$2 ;;
            --shapes) shapes=$2 ;;
            --settings) settings=$2 ;;
            --repeats) repeats=$2 ;;
            --steps) steps=$2 ;;
            --warmup) warmup=$2 ;;
            --python) py=$2 ;;
            --out) out=$2 ;;
            *) echo "unknown option $1; see the head of $0" >&2; exit 2 ;;
        esac
        shift 2
    done
    mkdir -p "$out"
    local threads=${THREADS:-1}  # OMP threads per worker: 1 on this shared CPU; 8 of the GPU machine's 16 cores
    [ "$device" = cuda ] && threads=${THREADS:-8}
    local log=$out/gpu_step_bench.log
    "$py" - "$device" <<'EOF' 2>&1 | tee "$log"
import sys, torch
device = sys.argv[1]
print(f"python {sys.version.split()[0]}, torch {torch.__version__}")
if device == "cuda":
    if not torch.cuda.is_available():
        sys.exit("torch sees no CUDA device: this script needs a python3 whose torch is built for CUDA, on a GPU machine")
    print(f"card: {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF
    [ "${PIPESTATUS[0]}" -eq 0 ] || exit 1
    ls "$WHEELS"/trl-*.whl >/dev/null 2>&1 || { echo "no wheels in $WHEELS: run '$0 gather' where there is network and carry that folder" >&2; exit 1; }

    local site
    site=$(mktemp -d)/site
    # the carried wheels and the project itself, built from this tree (setup.py says Python 3.11 for CI's
    # sake; the code runs on 3.12)
    # shellcheck disable=SC2046
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-build-isolation --ignore-requires-python \
        --find-links "$WHEELS" --target "$site" "$REPO" \
        $(for p in $PACKAGES; do echo "${p%%==*}"; done) $(for p in ${GATHER_EXTRA:-}; do echo "${p%%==*}"; done)
    export PYTHONPATH=$site TOKENIZERS_PARALLELISM=false
    (cd "$site" && "$py" - "$site") <<'EOF' 2>&1 | tee -a "$log"
import importlib.metadata as md, sys
from packaging.requirements import Requirement
import npu_rft, trl
assert npu_rft.__file__.startswith(sys.argv[1]), f"npu_rft imported from {npu_rft.__file__}, not the fresh install"
names = ["npu-rft", "trl", "datasets", "transformers", "peft", "accelerate", "torch", "pyarrow", "huggingface-hub"]
print(", ".join(f"{n} {md.version(n)}" for n in names))
unmet = []
for dist in ("trl", "datasets", "npu-rft"):
    for spec in md.requires(dist) or []:
        req = Requirement(spec)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        try:
            have = md.version(req.name)
        except md.PackageNotFoundError:
            unmet.append(f"{dist} needs {req}, which is missing")
            continue
        if have not in req.specifier:
            unmet.append(f"{dist} needs {req}, found {have}")
if unmet:
    sys.exit("unmet requirements (carry their wheels with GATHER_EXTRA='name==version' at gather time):\n  "
             + "\n  ".join(unmet))
EOF
    [ "${PIPESTATUS[0]}" -eq 0 ] || exit 1

    for shape in $shapes; do
        for setting in $settings; do
            IFS=x read -r prompts samples tokens <<< "$setting"
            local vocab=()
            [ "$shape" = tiny ] && vocab=(--vocab 8000)
            echo "== $shape, $setting, $device" | tee -a "$log"
            PYTHONUNBUFFERED=1 "$py" "$REPO/tools/bench_step.py" --shape "$shape" "${vocab[@]}" --device "$device" \
                --prompts "$prompts" --samples "$samples" --new-tokens "$tokens" --repeats "$repeats" \
                --steps "$steps" --warmup "$warmup" --threads "$threads" --trl-python "$py" \
                --json "$out/$shape-$setting-$device.json" 2>&1 | tee -a "$log"
            [ "${PIPESTATUS[0]}" -eq 0 ] || echo "FAILED: $shape $setting" | tee -a "$log"
        done
    done
}

case ${1:-} in
    gather) shift; gather "$@" ;;
    run) shift; run "$@" ;;
    *) echo "usage: $0 gather | run [--device cuda|cpu] [--shapes ...] [--settings ...] [--repeats N] [--steps N] [--warmup N]" >&2; exit 2 ;;
esac
