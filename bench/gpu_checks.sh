#!/usr/bin/env bash
# Issue 18's GPU checks in one command, for a session whose task is lent a GPU machine (the `device` tool): the GPU
# tests (tests/test_gpu.py: the main job and every defense under trainer=gpu, and compile=true), and the benches that
# print their device, re-taken on the GPU. That machine reaches no package registry; its image holds torch,
# torchvision, lightning, torchmetrics, pytest, matplotlib, rich and safetensors, but not Hydra, torch-pruning or
# espeak-ng, which travel as wheels (11 MB).
#
# Here, once per session (the wheels for the machine's Python 3.12, into the ignored .whl/):
#     echo /.whl/ >> .git/info/exclude; bash bench/gpu_checks.sh --fetch-wheels
# There (device run with carry [".whl"] and timeout_s 580: the steps' limits add up to 535 s; they should
# take about 6 min):
#     bash bench/gpu_checks.sh "$OUT"
# Each step writes its output to the folder (nvidia_smi.txt, test_gpu.txt, machine_limit.txt, train_throughput.txt,
# data_loading.txt; steps.txt says how each ended and how long it took) and runs under its own time limit, so one
# slow step leaves the others' figures. The built-in data are generated there first (about 45 s on one core).
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--fetch-wheels" ]]; then
    set -e
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        hydra-core==1.3.8 omegaconf==2.3.1 torch-pruning==1.6.1 espeakng-loader==0.2.4
    python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3 # Hydra's parser: an sdist, pure Python
    ls .whl
    exit 0
fi

out="${1:?usage: bash bench/gpu_checks.sh OUT_FOLDER (on the GPU machine), or --fetch-wheels (here, first)}"
if [[ -d .whl ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl ||
        exit 1
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/src:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 WANDB_MODE=disabled
export BACKDOOR_LAB_CACHE="${BACKDOOR_LAB_CACHE:-/tmp/backdoor_lab_cache}"
if ! python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "bench/gpu_checks.sh: no CUDA device here (torch.cuda.is_available() is False): these are the GPU checks;" \
        "run them on a GPU machine" >&2
    exit 1
fi
mkdir -p "$out"

step() { # step NAME SECONDS COMMAND...: COMMAND's output into NAME.txt, under a time limit; how it ended into steps.txt
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    timeout "$limit" "$@" >"$out/$name.txt" 2>&1
    rc=$?
    echo "$name: exit $rc$([[ $rc == 124 ]] && echo ' (time limit)') after $((SECONDS - start)) s" | tee -a "$out/steps.txt"
}

step nvidia_smi 20 nvidia-smi
step machine_limit 120 python3 bench/machine_limit.py --device cuda # generates the three tasks' data first
step test_gpu 150 python3 -m pytest -q -p no:cacheprovider -n 0 -rs tests/test_gpu.py
step train_throughput 200 python3 bench/train_throughput.py --accelerator gpu --epochs 2 --markdown --compile
step data_loading 45 python3 bench/data_loading.py --accelerator gpu
