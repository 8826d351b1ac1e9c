#!/usr/bin/env bash
# Installs NVRTC (NVIDIA's run-time CUDA compiler, a shared library from the PyPI wheel
# nvidia-cuda-nvrtc) into target/nvrtc, where `cargo test --features cuda --test gpu` finds it
# to compile and assemble every GPU kernel on a machine without a GPU or CUDA toolkit.
# Idempotent: does nothing when the library is already there. Without it those tests skip when run
# by hand; CI installs it and runs them with GROK1_REQUIRE_NVRTC=1, so a failed install fails CI.
# Version 13.0 matches the cudarc binding (cuda-13000) and the driver the GPU runs are made on.
set -euo pipefail
cd "$(dirname "$0")/.."

version=${NVRTC_VERSION:-13.0.88}
dest=target/nvrtc

if compgen -G "$dest/nvidia/*/lib/libnvrtc.so.*" >/dev/null; then
    echo "NVRTC already installed: $(ls "$dest"/nvidia/*/lib/libnvrtc.so.*)"
    exit 0
fi

python=$(command -v python3 || command -v python || true)
if [ -z "$python" ]; then
    echo "install-nvrtc: failed: no python3 or python on PATH to run pip" >&2
    exit 1
fi
if ! "$python" -m pip --version >/dev/null 2>&1; then
    echo "install-nvrtc: failed: $python has no pip module" >&2
    exit 1
fi

mkdir -p "$dest"
if ! "$python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-deps \
    --target "$dest" "nvidia-cuda-nvrtc==$version"; then
    echo "install-nvrtc: failed: pip could not install nvidia-cuda-nvrtc==$version from PyPI (its error is above)" >&2
    exit 1
fi
lib=$(ls "$dest"/nvidia/*/lib/libnvrtc.so.* 2>/dev/null | head -n1)
if [ -z "$lib" ]; then
    echo "install-nvrtc: failed: the nvidia-cuda-nvrtc==$version wheel holds no libnvrtc.so.*" >&2
    exit 1
fi
echo "NVRTC $version installed: $lib"
