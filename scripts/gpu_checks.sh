#!/usr/bin/env bash
# The checks the CPU suite cannot make: every test that needs CUDA or NCCL, in one run.
#
#   scripts/gpu_checks.sh wheels [PYTHON_VERSION]   # where PyPI is reachable: the wheels a GPU machine
#                                                   # without package access needs, into .whl/
#   scripts/gpu_checks.sh [PYTEST_ARGS...]          # on the GPU machine, from the repository root
#
# `wheels` saves DeepSpeed (built here: PyPI has only its source), megatron-core and the packages they
# need that a CUDA PyTorch image usually lacks, for CPython PYTHON_VERSION (default 3.12) on x86-64
# Linux; the python3 it runs must import torch (DeepSpeed's build does). The run installs .whl/*.whl
# (if present) into a private folder, imports base_plugin from this tree (building the optional CPU
# kernel in place when a compiler is there), prints the GPUs and package versions, then runs
# tests/test_cuda.py, tests/test_megatron_gpu.py and the CUDA test of tests/test_assignment.py under a
# wall-clock limit, so a hang still returns a log. Tests that need two GPUs skip on one, and say so in
# the summary; without any CUDA device the run fails at once. Then examples/deepspeed/train_gpt.py runs
# briefly with configs/deepspeed/gpu.json on every GPU, and benchmarks/layer.py prints its table for
# one GPU (reported, not checked). Time limits in seconds, which keep a whole run under 10 minutes:
# GPU_CHECKS_TIMEOUT 270, GPU_RECIPE_TIMEOUT 240 (DeepSpeed compiles its fused Adam on a first run),
# GPU_BENCH_TIMEOUT 75.
# Logs go to $OUT (default ./gpu-checks/): gpu-checks.log (everything) and junit.xml.
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "wheels" ]]; then
    set -e
    py="${2:-3.12}"
    mkdir -p .whl
    pip=(python3 -m pip)
    "${pip[@]}" download -q --no-deps --only-binary=:all: --implementation cp --python-version "$py" \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl \
        "megatron-core>=0.16,<0.17" hjson pydantic pydantic-core annotated-types typing-inspection
    # DeepSpeed ships a source archive only; its wheel (no prebuilt ops: they compile on first use) is
    # pure Python, so one built here installs anywhere.
    DS_BUILD_OPS=0 "${pip[@]}" wheel -q --no-deps --no-build-isolation -w .whl "deepspeed>=0.16"
    ls -l .whl
    exit 0
fi

out="${OUT:-gpu-checks}"
mkdir -p "$out"
log="$out/gpu-checks.log"
{
    if compgen -G ".whl/*.whl" >/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/base-plugin-site .whl/*.whl || exit 1
        export PYTHONPATH="/tmp/base-plugin-site${PYTHONPATH:+:$PYTHONPATH}"
    fi
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    python3 setup.py -q build_ext --inplace >/dev/null 2>&1 || echo "CPU kernel not built: the torch path runs"
    nvidia-smi -L || true
    python3 - <<'EOF'
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "gpus", torch.cuda.device_count(),
      "nccl", torch.cuda.nccl.version() if torch.cuda.is_available() else None)
for name in ("deepspeed", "megatron.core", "transformer_engine", "apex"):
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "?"))
    except Exception as e:  # report and go on: the tests skip what is missing
        print(name, "missing:", type(e).__name__, str(e)[:200])
raise SystemExit(0 if torch.cuda.is_available() else "no CUDA device: nothing here for these checks to run on")
EOF
    [[ $? == 0 ]] || exit 1
    timeout --kill-after=20 "${GPU_CHECKS_TIMEOUT:-270}" python3 -m pytest -p no:cacheprovider -v -rs --timeout=240 \
        --junitxml="$out/junit.xml" tests/test_cuda.py tests/test_megatron_gpu.py \
        "tests/test_assignment.py::test_cuda_matches_cpu" "$@"
    echo "pytest exit code: $?"
    # A smoke run of the DeepSpeed recipe with the GPU config (bf16, ZeRO 2, DeepSpeed's fused AdamW,
    # compiled on first use) on every GPU: it must finish; the log shows its losses (the config's LR
    # warm-up is 2000 steps, so a short run hardly learns).
    timeout --kill-after=20 "${GPU_RECIPE_TIMEOUT:-240}" python3 -m torch.distributed.run --nnodes 1 \
        --nproc_per_node "$(python3 -c 'import torch; print(torch.cuda.device_count())')" \
        --master_addr 127.0.0.1 --master_port 29517 examples/deepspeed/train_gpt.py \
        --deepspeed_config configs/deepspeed/gpu.json --steps "${GPU_RECIPE_STEPS:-60}" --eval-every 20
    echo "recipe exit code: $?"
    # BaseLayer vs dense vs DeepSpeed MoE on one GPU (a table for docs/benchmarks.md; not a check)
    timeout --kill-after=10 "${GPU_BENCH_TIMEOUT:-75}" python3 benchmarks/layer.py --device cuda --ranks 1 \
        --experts 8 32 --tokens 32768 --steps 9
    echo "benchmark exit code: $?"
} 2>&1 | tee "$log"
grep -q "^pytest exit code: 0$" "$log" && grep -q "^recipe exit code: 0$" "$log"
