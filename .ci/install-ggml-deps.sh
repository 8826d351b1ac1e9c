#!/usr/bin/env bash
# Installs what `cargo test --features ggml` needs to build the vendored ggml: cmake (ggml's build),
# clang + libclang-dev (bindgen generates the Rust bindings from ggml.h).
# Idempotent: installs only what is missing, and refreshes the package lists only when apt
# cannot find a package (or has never fetched its lists).
set -euo pipefail

packages=(cmake clang libclang-dev)

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if [ ${#missing[@]} -eq 0 ]; then
    echo "ggml build dependencies already installed: ${packages[*]}"
    exit 0
fi

sudo=""
if [ "$(id -u)" -ne 0 ]; then
    sudo="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
# Only refresh the lists when some missing package is not known to apt yet.
needs_update=0
for p in "${missing[@]}"; do
    if ! apt-cache show "$p" >/dev/null 2>&1; then
        needs_update=1
    fi
done
if [ "$needs_update" -eq 1 ]; then
    $sudo apt-get update
fi

echo "installing: ${missing[*]}"
$sudo apt-get install -y --no-install-recommends "${missing[@]}"
