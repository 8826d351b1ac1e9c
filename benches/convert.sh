#!/usr/bin/env bash
# Conversion speed and peak memory on the `bench` preset (the runner's benchmark shape: 7.1 GB of
# bf16 tensors), from a cold page cache. Prints wall time, input GB/s and peak RSS per setting.
#   bash benches/convert.sh            (BENCH_DIR=... to choose where the 7 + 4 GB go)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins -q
bin=$PWD/target/release
dir=${BENCH_DIR:-target/bench-data}
preset=${PRESET:-bench}
mkdir -p "$dir"
if [ ! -f "$dir/$preset/config.json" ]; then
    "$bin/grok1-convert" synth --preset "$preset" "$dir/$preset"
fi
evict() {
    # Drop the input from the page cache (dropping all caches needs privileges we may lack).
    sync
    python3 - "$@" <<'PY'
import os, sys
for f in sys.argv[1:]:
    fd = os.open(f, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
PY
}
input_bytes=$(cat "$dir/$preset"/*.safetensors | wc -c)
printf '%-28s %10s %10s %12s\n' setting "wall s" "input GB/s" "peak RSS MB"
for setting in "q8 q8" "q4 q8" "bf16 bf16"; do
    set -- $setting
    out="$dir/out-$1-$2"
    rm -rf "$out"
    evict "$dir/$preset"/*.safetensors
    /usr/bin/time -v "$bin/grok1-convert" convert "$dir/$preset" "$out" --experts "$1" --dense "$2" \
        2> "$dir/time.txt" >/dev/null
    wall=$(grep 'Elapsed (wall clock)' "$dir/time.txt" | awk '{print $NF}' | awk -F: '{ if (NF==3) print $1*3600+$2*60+$3; else print $1*60+$2 }')
    rss=$(grep 'Maximum resident set size' "$dir/time.txt" | awk '{print $NF}')
    printf '%-28s %10.1f %10.2f %12.0f\n' "experts $1, dense $2" "$wall" \
        "$(echo "$input_bytes / $wall / 1000000000" | bc -l)" "$(echo "$rss / 1024" | bc -l)"
    rm -rf "$out"
done
