#!/usr/bin/env bash
# Every check issue 11 left for a GPU, as one command on a lent GPU machine (its steps' limits add up to 570 s;
# a device run's timeout_s is at most 600):
#
#   here, once:  bash bench/fetch_device_wheels.sh          # .whl/: bitsandbytes, DeepSpeed, Liger, peft, ...
#   device tool: run(command="bash bench/device_check.sh", carry=[".whl"], timeout_s=600)
#   rehearsal:   PY_VERSION=3.11 DEST=/tmp/whl bash bench/fetch_device_wheels.sh
#                WHEELS=/tmp/whl PY=/path/to/python bash bench/device_check.sh      # CPU: the tiny shape
#
# The machine reaches no registry: its image holds CUDA torch, transformers, accelerate, safetensors, triton,
# pytest (with pytest-timeout) and most of TuneForge's needs; .whl/ brings the rest (bench/fetch_device_wheels.sh).
# Most important first, each step under its own time limit, everything written to $OUT as it goes, so a step that
# hangs or a call cut short still returns what ran before it:
#   1. bench_gpu.py lora (Llama-3-8B shape) and full (1B shape): tokens/s and MFU against the 45% goals;
#   2. the gpu-marked tests: estimator vs CUDA peaks, Liger vs the chunked loss, bitsandbytes export, LoftQ and
#      paged AdamW, DeepSpeed ZeRO-3 bf16, FlashAttention varlen (skips without flash_attn);
#   3. bench_gpu.py qlora: 8B QLoRA peak memory against `tuneforge estimate` (saves and reloads a 16 GB base).
# Files back (at most 8): summary.txt, env.txt, bench.log, bench_{lora,full,qlora}.json, pytest.log.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/device}
PY=${PY:-python3}
SITE=${SITE:-/tmp/tuneforge-site}
WHEELS=${WHEELS:-.whl}  # another folder for a rehearsal (see above)
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

log() { echo "[$(date +%T)] $*" | tee -a "$OUT/summary.txt"; }

step() {  # step NAME SECONDS LOGFILE CMD...: run under a time limit, append to LOGFILE, record the outcome
  local name=$1 limit=$2 logfile=$3
  shift 3
  log "start $name (limit ${limit}s)"
  local t0=$SECONDS
  timeout -k 15 "$limit" "$@" >>"$OUT/$logfile" 2>&1
  local rc=$?
  log "end $name: rc=$rc after $((SECONDS - t0))s$([ $rc -eq 124 ] && echo ' (TIME LIMIT)')"
}

install_wheels() {
  [ -d "$WHEELS" ] || { echo "no $WHEELS/: run bash bench/fetch_device_wheels.sh here first and carry it"; return 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl &&
    # DeepSpeed is a source archive; its C++/CUDA ops are left to be compiled on first use (DS_BUILD_OPS=0)
    DS_BUILD_OPS=0 "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir \
      --target "$SITE" "$WHEELS"/deepspeed-*.tar.gz
}

environment() {
  nvidia-smi || echo "no nvidia-smi"
  "$PY" - <<'PYTHON'
import importlib, sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
for name in ["transformers", "peft", "accelerate", "safetensors", "bitsandbytes", "deepspeed", "liger_kernel",
             "triton", "flash_attn", "pydantic", "tuneforge"]:
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} {getattr(module, '__file__', '')}")
    except Exception as e:  # a missing or broken package is what this line is for
        print(f"{name}: MISSING ({type(e).__name__}: {str(e)[:200]})")
PYTHON
}

GPU_TESTS=(tests/training/test_chunked_loss.py tests/test_estimate.py tests/inference/test_export.py
           tests/methods/test_peft_methods.py tests/training/test_deepspeed.py tests/training/test_padding_free.py)

log "device_check in $PWD, OUT=$OUT"
export PY SITE WHEELS
export -f install_wheels environment  # `timeout` runs programs, so the two functions run in bash -c
step install 60 env.txt bash -c install_wheels
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
step environment 40 env.txt bash -c environment
tail -n 16 "$OUT/env.txt"
if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  BENCH=(--steps 10 --warmup 2)
else  # rehearsal on a CPU: the same steps on the tiny shape
  BENCH=(--shape tiny --device cpu --steps 2 --warmup 1 --seq 64)
fi
step bench-lora 110 bench.log "$PY" bench/bench_gpu.py --method lora "${BENCH[@]}" --json "$OUT/bench_lora.json"
step bench-full 70 bench.log "$PY" bench/bench_gpu.py --method full "${BENCH[@]}" --json "$OUT/bench_full.json"
# test_real_shapes_on_gpu repeats the two runs above at 3 steps: deselected to save the minutes
step pytest-gpu 170 pytest.log "$PY" -m pytest -p no:cacheprovider -o addopts= -m gpu --timeout 120 -rA \
  --deselect tests/training/test_bench_gpu.py::test_real_shapes_on_gpu "${GPU_TESTS[@]}"
# the 16 GB bf16 base it saves and loads back quantized goes to memory, not to the disk, where /dev/shm has room
shm_kb=$(df --output=avail -k /dev/shm 2>/dev/null | tail -n 1)
[ "${shm_kb:-0}" -gt 25000000 ] && export TMPDIR=/dev/shm
step bench-qlora 120 bench.log "$PY" bench/bench_gpu.py --method qlora "${BENCH[@]}" --json "$OUT/bench_qlora.json"
grep -E "^(lora|full|qlora):|MFU against" "$OUT/bench.log" | tee -a "$OUT/summary.txt"
grep -E "^(PASSED|FAILED|SKIPPED|ERROR)|passed|failed" "$OUT/pytest.log" | tail -n 30 | tee -a "$OUT/summary.txt"
