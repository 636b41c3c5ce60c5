#!/usr/bin/env bash
# Fills .whl/ (ignored by git) with the packages bench/device_check.sh needs on a lent GPU machine that its image
# lacks. That machine reaches no package registry, so the wheels travel with the working tree (64 MiB in all,
# this folder about 50 MiB). Run once, here, before the device call:
#
#     bash bench/fetch_device_wheels.sh            # for the device's Python 3.12
#     PY_VERSION=3.11 bash bench/fetch_device_wheels.sh   # for a local rehearsal (bench/device_check.sh --rehearse)
#
# Versions are this checkout's own (.venv), so the GPU run tests the code with the libraries the CPU suite used.
# transformers, accelerate, safetensors and torch are the image's own (a CUDA torch; transformers is 13 MiB that
# the 64 MiB limit cannot spare); bench/device_check.sh prints their versions.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
DEST=${DEST:-.whl}
PINNED=(liger-kernel==0.8.5)  # GPU-only (Triton), so not in the CPU .venv: the version tested on the device
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
spec() {  # name==version: the pin above, else this checkout's own
  for pin in "${PINNED[@]}"; do [ "${pin%%==*}" = "$1" ] && { echo "$pin"; return; }; done
  echo "$1==$(version "$1")"
}

# name==version of everything to carry: the GPU-only libraries, and what TuneForge or DeepSpeed imports that the
# image (bench/device_check.sh's header lists it) does not hold.
wheels=(bitsandbytes liger-kernel peft pydantic pydantic-core annotated-types typing-inspection hjson)
rm -rf "$DEST" && mkdir -p "$DEST"
for name in "${wheels[@]}"; do
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$DEST" "$(spec "$name")"
done
# DeepSpeed is published as a source archive only; device_check.sh builds it there without its C++ ops (they are
# compiled on first use, and nvcc is on that machine).
python3 -m pip download -q --disable-pip-version-check --no-deps --no-binary=:all: -d "$DEST" \
  "$(spec deepspeed)"
ls -la "$DEST"
du -sh "$DEST"
