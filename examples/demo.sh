#!/usr/bin/env bash
# The whole pipeline on a small synthetic Grok-architecture model the project generates itself:
# synthesize -> convert (int4 experts, int8 dense) -> verify -> inspect -> generate -> bench.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --bins
bin=target/release
out=${DEMO_DIR:-demo}
rm -rf "$out"
mkdir -p "$out"

$bin/grok1-convert synth --preset tiny --seed 1 "$out/checkpoint"
$bin/grok1-convert convert "$out/checkpoint" "$out/model" --experts q4 --dense q8
$bin/grok1-convert verify "$out/model"
$bin/grok1-convert inspect "$out/model"
$bin/grok1-run generate --model "$out/model" --prompt "The answer to life, the universe and everything is" -n 32 --temperature 0.8 --top-p 0.95 --seed 7
$bin/grok1-run bench --model "$out/model" --prompt-tokens 64 --gen-tokens 32
