#!/usr/bin/env bash
# The aarch64 NEON kernels, cross-compiled and run under qemu's user-mode emulation: the kernel
# tests once on a CPU with the dot-product extension (`-cpu max`: the `sdot` paths) and once on a
# Cortex-A53 (NEON without it: the `smull`/`sadalp` paths). Installs the cross toolchain (Debian:
# gcc-aarch64-linux-gnu, libc6-dev-arm64-cross, qemu-user) and the Rust target when missing.
# Both come from registries CI reaches (Debian's archive, rustup's), so a failed install fails
# it, saying what could not be installed, as failing tests do.
set -euo pipefail
cd "$(dirname "$0")/.."

fail() {
    echo "neon.sh: failed: $*" >&2
    exit 1
}

packages=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    apt-cache show "${missing[@]}" >/dev/null 2>&1 || $sudo apt-get update || fail "apt-get update failed (its error is above)"
    $sudo apt-get install -y --no-install-recommends "${missing[@]}" || fail "apt-get could not install ${missing[*]} (its error is above)"
fi
target=aarch64-unknown-linux-gnu
rustup target list --installed | grep -qx "$target" || rustup target add "$target" || fail "rustup could not add the $target target (its error is above)"

export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
for cpu in max cortex-a53; do
    echo "== kernels on aarch64, qemu -cpu $cpu"
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu -cpu $cpu" \
        cargo test --release --target "$target" --test kernels
    # Which path ran (sdot or smull/sadalp).
    CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu -cpu $cpu" \
        cargo test --release --target "$target" --test kernels -q describe_names_the_path -- --nocapture 2>&1 | grep '^kernels:'
done
