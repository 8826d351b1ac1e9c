#!/usr/bin/env bash
# The GPU check: run on a machine with an NVIDIA GPU, its driver and the CUDA toolkit (for
# libnvrtc), but no Rust toolchain. Binaries come prebuilt in device/bin/ (benches/gpu-build.sh).
#
#   bash benches/gpu-check.sh [--quick]        from the repository root; OUT=dir for the results
#
# Stages, each logged to $OUT/summary.txt as it finishes, so a run cut short still reports:
#   1. the machine: nvidia-smi, cores, memory, disk; where NVRTC is
#   2. the GPU tests: every kernel against the CPU (must not skip here), the NVRTC checks, and
#      the kernel throughput on Grok-1-sized matrices
#   3. the runner's --gpu-budget flag (fails loudly when the runner has no GPU integration yet)
#   4. models: synth presets `small` and `bench` (7.1 GB of bf16; skipped with --quick), each
#      converted with q8 and q4 experts (dense q8)
#   5. `grok1-run bench` three ways per model: CPU only (--gpu-budget 0), the GPU holding
#      everything (default budget), the GPU holding the dense weights and half the experts
#   6. a table of prefill / decode tok/s (and GPU stats when the runner reports them)
# Exit status: 0 when every stage passed; 2 when the runner lacks --gpu-budget; 1 otherwise.
# Time: about a minute for stages 1-3; with the bench preset, stages 4-6 take a few minutes more
# on 16 cores (synth and conversions are disk-bound; the CPU-only runs dominate).
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
bin=${DEVICE_BIN:-$repo/device/bin}
out=${OUT:-$repo/target/gpu-check}
work=${GPU_CHECK_DIR:-$repo/target/gpu-check-data}
stage_timeout=${STAGE_TIMEOUT:-300}
quick=0
[ "${1:-}" = "--quick" ] && quick=1
mkdir -p "$out" "$work"
summary=$out/summary.txt
: > "$summary"
failed=0

note() { echo "== $*" | tee -a "$summary"; }
fail() { note "FAIL: $*"; failed=1; }

# ---- 1. the machine
note "gpu-check started $(date -u +%Y-%m-%dT%H:%M:%SZ); binaries: $(tr '\n' ' ' < "$bin/BUILD" 2>/dev/null)"
for b in grok1-convert grok1-run test-gpu test-gpu_plan; do
    [ -x "$bin/$b" ] || { note "FAIL: $bin/$b missing: run benches/gpu-build.sh where Rust is, and carry device/bin"; exit 1; }
done
{ nvidia-smi; echo; nproc; free -g; df -h "$work"; ldd --version | head -n1; } > "$out/machine.txt" 2>&1
nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version --format=csv,noheader 2>&1 | tee -a "$summary"

if [ -z "${GROK1_NVRTC:-}" ]; then
    for cand in $(ldconfig -p 2>/dev/null | awk '/libnvrtc\.so\.[0-9]+ /{print $NF}') \
        /usr/local/cuda/lib64/libnvrtc.so.* /usr/local/cuda-*/lib64/libnvrtc.so.* \
        /usr/local/cuda/targets/*/lib/libnvrtc.so.*; do
        case $cand in *builtins*|*alt*) continue ;; esac
        if [ -f "$cand" ]; then export GROK1_NVRTC=$cand; break; fi
    done
fi
note "NVRTC: ${GROK1_NVRTC:-not found (the GPU tests will fail)}"

# ---- 2. GPU tests
run_test() {  # name, args...
    local name=$1; shift
    local t0=$SECONDS
    timeout "$stage_timeout" "$bin/$name" "$@" > "$out/$name$TEST_SUFFIX.txt" 2>&1
    local rc=$?
    note "$name $* -> exit $rc in $((SECONDS - t0)) s ($(grep -E '^test result' "$out/$name$TEST_SUFFIX.txt" | tail -n1))"
    return $rc
}
TEST_SUFFIX="" run_test test-gpu_plan || fail "test-gpu_plan"
TEST_SUFFIX="" run_test test-gpu --test-threads 1 --nocapture || fail "test-gpu"
if grep -q "skipping" "$out/test-gpu.txt"; then
    fail "GPU tests skipped on the GPU machine:"
    grep -B1 "skipping" "$out/test-gpu.txt" | tee -a "$summary"
fi
grep -E "largest error|^GPU:" "$out/test-gpu.txt" | tee -a "$summary"
TEST_SUFFIX="-throughput" run_test test-gpu --ignored --nocapture --test-threads 1 matrix_kernel_throughput \
    || fail "kernel throughput"
grep -A8 "^matrix \[" "$out/test-gpu-throughput.txt" | tee -a "$summary"

# ---- 3. the runner's GPU flag
if ! "$bin/grok1-run" bench --help 2>&1 | grep -q -- "--gpu-budget"; then
    note "FAIL: grok1-run bench has no --gpu-budget flag: the runner is not integrated with the GPU tier yet"
    note "      (src/gpu/mod.rs describes the integration); stages 4-6 not run"
    exit 2
fi

# ---- 4. models
presets=(small)
[ $quick -eq 0 ] && presets+=(bench)
models=()
for preset in "${presets[@]}"; do
    ck=$work/$preset
    if [ ! -f "$work/$preset-q8/manifest.json" ] || [ ! -f "$work/$preset-q4/manifest.json" ] && [ ! -f "$ck/config.json" ]; then
        if [ "$preset" = bench ]; then
            avail=$(df -Pk "$work" | awk 'NR==2{print $4}')
            if [ "$avail" -lt $((16 * 1024 * 1024)) ]; then
                fail "bench preset needs about 14 GB of disk (7.1 checkpoint + 4.3 q8 + 2.4 q4), $((avail / 1024 / 1024)) GB free"
                continue
            fi
        fi
        t0=$SECONDS
        timeout "$stage_timeout" "$bin/grok1-convert" synth --preset "$preset" "$ck" > "$out/synth-$preset.txt" 2>&1 \
            || { fail "synth $preset (see synth-$preset.txt)"; continue; }
        note "synth $preset in $((SECONDS - t0)) s"
    fi
    for q in q8 q4; do
        m=$work/$preset-$q
        if [ ! -f "$m/manifest.json" ]; then
            t0=$SECONDS
            timeout "$stage_timeout" "$bin/grok1-convert" convert "$ck" "$m" --experts "$q" --dense q8 \
                > "$out/convert-$preset-$q.txt" 2>&1 || { fail "convert $preset $q"; continue; }
            note "convert $preset experts $q, dense q8 in $((SECONDS - t0)) s"
        fi
        "$bin/grok1-convert" inspect "$m" --json > "$out/inspect-$preset-$q.json" 2>/dev/null
        models+=("$preset-$q")
    done
    # Both conversions exist: the checkpoint is no longer needed (7.1 GB for bench).
    [ -f "$work/$preset-q8/manifest.json" ] && [ -f "$work/$preset-q4/manifest.json" ] && rm -rf "$ck"
done

# ---- 5. bench three ways
# Dense weights plus half the experts, plus 256 MiB for the KV cache and scratch of a short run.
part_budget() {
    python3 - "$1" <<'PY' 2>/dev/null || jq '[.classes[] | select(.class != "experts") | .bytes] | add + ([.classes[] | select(.class == "experts") | .bytes] | add) / 2 + 268435456 | floor' "$1"
import json, sys
i = json.load(open(sys.argv[1]))
dense = sum(c["bytes"] for c in i["classes"] if c["class"] != "experts")
experts = sum(c["bytes"] for c in i["classes"] if c["class"] == "experts")
print(dense + experts // 2 + (256 << 20))
PY
}
for m in "${models[@]}"; do
    budget=$(part_budget "$out/inspect-$m.json")
    for mode in cpu gpu-all gpu-part; do
        case $mode in
            cpu) flag=(--gpu-budget 0) ;;
            gpu-all) flag=() ;;
            gpu-part) flag=(--gpu-budget "$budget") ;;
        esac
        t0=$SECONDS
        if timeout "$stage_timeout" "$bin/grok1-run" bench --model "$work/$m" --prompt-tokens 128 --gen-tokens 32 \
            --json "${flag[@]}" > "$out/bench-$m-$mode.json" 2> "$out/bench-$m-$mode.err"; then
            note "bench $m $mode ${flag[*]} in $((SECONDS - t0)) s"
        else
            fail "bench $m $mode ${flag[*]} (see bench-$m-$mode.err)"
            tail -n3 "$out/bench-$m-$mode.err" | tee -a "$summary"
        fi
    done
done

# ---- 6. the table
python3 - "$out" > "$out/table.txt" <<'PY' || echo "(no python3: the JSON files are in $out)" > "$out/table.txt"
import glob, json, os, sys
rows = []
for f in sorted(glob.glob(os.path.join(sys.argv[1], "bench-*.json"))):
    name = os.path.basename(f)[len("bench-"):-len(".json")]
    try:
        r = json.load(open(f))
    except ValueError:
        continue
    gpu = {k: v for k, v in r.items() if "gpu" in k or "pcie" in k}
    rows.append((name, r.get("prefill_tok_s"), r.get("decode_tok_s"), gpu))
cpu = {n.rsplit("-", 1)[0]: d for n, _, d, _ in rows if n.endswith("-cpu")}
print(f"{'model-mode':<24} {'prefill tok/s':>14} {'decode tok/s':>13} {'vs cpu':>7}  gpu stats")
for name, p, d, g in rows:
    fmt = lambda v: f"{v:.2f}" if isinstance(v, (int, float)) else "-"
    base = cpu.get(name.replace("-gpu-all", "").replace("-gpu-part", "").rsplit("-cpu", 1)[0])
    ratio = f"{d / base:.2f}x" if isinstance(d, (int, float)) and base else "-"
    print(f"{name:<24} {fmt(p):>14} {fmt(d):>13} {ratio:>7}  {json.dumps(g) if g else ''}")
PY
cat "$out/table.txt" | tee -a "$summary"
note "gpu-check finished $(date -u +%Y-%m-%dT%H:%M:%SZ), $([ $failed -eq 0 ] && echo 'all stages passed' || echo 'with failures')"
exit $failed
