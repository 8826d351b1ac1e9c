#!/usr/bin/env bash
# Decode and prefill speed on the `bench` preset (d_model 2048, 8 layers, 8 experts top-2,
# ffn 8192, vocab 131072), then the same model under an expert RAM budget of a quarter of its
# expert bytes against the two baselines (everything in RAM; every expert read on demand with no
# cache), with peak RSS, disk traffic, and the plan's prediction beside the measurement.
#   bash benches/decode.sh            (BENCH_DIR=... for where the 7 + 6 GB go)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins -q
bin=$PWD/target/release
dir=${BENCH_DIR:-target/bench-data}
mkdir -p "$dir"
[ -f "$dir/bench/config.json" ] || "$bin/grok1-convert" synth --preset bench "$dir/bench"
for q in q8 q4; do
    [ -f "$dir/$q/manifest.json" ] || "$bin/grok1-convert" convert "$dir/bench" "$dir/$q" --experts "$q" --dense q8
done

echo "== all in RAM (grok1-run bench)"
for q in q8 q4; do
    echo "-- experts $q, dense q8"
    "$bin/grok1-run" bench --model "$dir/$q" --prompt-tokens 128 --gen-tokens 32
done

q=q4
experts=$(python3 -c "import json; m=json.load(open('$dir/$q/manifest.json')); print(sum(c['bytes'] for c in m['experts']))")
dense=$(python3 -c "import json; m=json.load(open('$dir/$q/manifest.json')); print(sum(d['bytes'] for d in m['dense']))")
budget=$((experts / 4))
echo "== expert residency, experts $q: expert bytes $experts, dense bytes $dense, budget $budget"
run() {
    /usr/bin/time -v "$bin/grok1-run" generate --model "$dir/$q" --tokens 100,200,300,400,500,600,700,800 -n 33 "$@" \
        > /dev/null 2> "$dir/run.txt"
    grep -E "decode:|disk:|hit rate|prefetch:" "$dir/run.txt" | sed 's/^/   /'
    rss=$(grep 'Maximum resident set size' "$dir/run.txt" | awk '{print $NF}')
    echo "   peak RSS $((rss / 1024)) MiB; dense + expert budget = $(( (dense + budget_used) / 1048576 )) MiB"
}
echo "-- everything in RAM";        budget_used=$experts run
echo "-- quarter budget";           budget_used=$budget  run --ram-budget "$budget"
echo "-- naive: no cache";          budget_used=0        run --no-expert-cache
echo "== sequential read speed of the expert shard (O_DIRECT, cold)"
dd if="$dir/$q/experts-00000.bin" of=/dev/null bs=16M iflag=direct 2>&1 | tail -1
echo "== plan's prediction for this model with the quarter budget"
disk_gbps=$(dd if="$dir/$q/experts-00000.bin" of=/dev/null bs=16M iflag=direct 2>&1 | tail -1 | awk '{ v=$(NF-1); u=$NF; if (u=="MB/s") v/=1000; print v }')
kv=$((8 * 2 * 4 * 128 * 4096 * 2))
"$bin/grok1-run" plan --model "$dir/$q" --ram "$((dense + budget + kv))" --ram-reserve 0 --disk-bw "$disk_gbps" --ram-bw 30
