#!/usr/bin/env bash
# Builds what benches/gpu-check.sh runs on a GPU machine that has CUDA but no Rust toolchain:
# grok1-convert and grok1-run with the `cuda` feature, and the GPU test executables, stripped of
# debug info and copied into DIR (default device/bin/, git-ignored). Run it here, then carry DIR
# to the GPU machine with the working tree and run `bash benches/gpu-check.sh DIR` there.
#   bash benches/gpu-build.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-${DEVICE_BIN:-device/bin}}

cargo build --release --features cuda --bins
# The test executables' names carry a hash; cargo's JSON messages say which files they are.
mapfile -t tests < <(
    cargo test --release --features cuda --no-run --message-format=json --test gpu --test gpu_plan |
        python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m["target"]["kind"]:
        print(m["target"]["name"] + " " + m["executable"])
'
)
if [ ${#tests[@]} -ne 2 ]; then
    echo "gpu-build: expected the gpu and gpu_plan test executables, got: ${tests[*]:-none}" >&2
    exit 1
fi

rm -rf "$out"
mkdir -p "$out"
for b in grok1-convert grok1-run; do
    strip --strip-debug -o "$out/$b" "target/release/$b"
done
for t in "${tests[@]}"; do
    name=${t%% *}
    strip --strip-debug -o "$out/test-$name" "${t#* }"
done
{
    echo "commit $(git rev-parse HEAD)$(git diff --quiet HEAD -- src tests Cargo.toml || echo ' (with uncommitted changes)')"
    echo "built  $(date -u +%Y-%m-%dT%H:%M:%SZ) with $(rustc --version)"
    # The GPU machine's C library must be at least this new (ldd --version there).
    echo "needs  $(objdump -T "$out"/grok1-run "$out"/test-* 2>/dev/null | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -n1)"
} > "$out/BUILD"
ls -l "$out"
du -sh "$out"
