#!/usr/bin/env bash
# The GPU case, one prepared run on a lent H100/H200 (about 8 minutes with MODELS=1b, 14 with both):
#   Ember's step_bench (an x86-64 release binary built HERE and carried:
#   cargo build --release -p ember-train --example step_bench --features cuda) against
#   transformers + PEFT with the PyTorch installed on the device (sdpa attention), on random
#   models shaped as Llama-3.2-1B and Llama-3.1-8B (bf16 on disk), seq 2048, batch 1,
#   r 16 / alpha 32 all-linear, AdamW.
# Rows: Ember with a bf16 frozen base (EMBER_DTYPE=bfloat16; LoRA, moments and loss in f32),
# Ember f32, PEFT bf16 (what users run) and PEFT f32 (like for like). Prints tokens/s, peak
# device memory, MFU = 4·N·tokens/s / 989 TFLOP/s (bf16 dense peak of an H100/H200 SXM) and
# Ember-bf16 / row.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-${TMPDIR:-/tmp}/ember-gpu-bench}"
STEPS="${STEPS:-6}"
MODELS="${MODELS:-1b 8b}"
ROWS="${ROWS:-ember_bf16 ember_f32 peft_bf16 peft_f32}"   # which of the four rows to run
RUN_TIMEOUT="${RUN_TIMEOUT:-240}"   # seconds per row
BIN="${BIN:-target/release/examples/step_bench}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

# A random Llama of the given shape, saved in bf16; prints its parameter count last.
make_model() {
    python3 - "$OUT/llama-$1" "$1" <<'PY'
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
shapes = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
config = LlamaConfig(
    vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5, **shapes[sys.argv[2]],
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
                     "low_freq_factor": 1.0, "original_max_position_embeddings": 8192},
)
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(sys.argv[1])
print(sum(p.numel() for p in model.parameters()))
PY
}
# Peak device memory for a command: poll nvidia-smi while it runs (MiB used, max).
peak() {
    local log="$1"; shift
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$log.mem" &
    local poll=$!
    "$@"
    local rc=$?
    kill "$poll" 2>/dev/null
    sort -n "$log.mem" | tail -1 > "$log.peak"
    return $rc
}
tps() { python3 -c "import json,sys; print(json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])['tokens_per_s'])" "$1" 2>/dev/null || echo 0; }

for shape in $MODELS; do
N=$(make_model "$shape" | tail -1)
M="$OUT/llama-$shape"
echo "== llama-$shape ($N parameters)"
for run in $ROWS; do
    case "$run" in
    ember_bf16) EMBER_DEVICE=cuda EMBER_DTYPE=bfloat16 peak "$OUT/$run" timeout "$RUN_TIMEOUT" "$BIN" "$M" 2048 1 "$STEPS" 0 \
            > "$OUT/$run" 2> "$OUT/$run.err" ;;
    ember_f32) EMBER_DEVICE=cuda peak "$OUT/$run" timeout "$RUN_TIMEOUT" "$BIN" "$M" 2048 1 "$STEPS" 0 \
            > "$OUT/$run" 2> "$OUT/$run.err" ;;
    peft_bf16) peak "$OUT/$run" timeout "$RUN_TIMEOUT" python3 bench/peft_reference.py train "$M" --seq 2048 --batch 1 \
            --steps "$STEPS" --dtype bfloat16 --device cuda > "$OUT/$run" 2> "$OUT/$run.err" ;;
    peft_f32) peak "$OUT/$run" timeout "$RUN_TIMEOUT" python3 bench/peft_reference.py train "$M" --seq 2048 --batch 1 \
            --steps "$STEPS" --dtype float32 --device cuda > "$OUT/$run" 2> "$OUT/$run.err" ;;
    *) echo "unknown row $run"; continue ;;
    esac
    echo "$run rc $? (stdout, stderr tails:)"; tail -2 "$OUT/$run"; tail -3 "$OUT/$run.err"
done
echo
echo "| llama-$shape | tokens/s | peak MiB | MFU | Ember bf16 / row |"
echo "|---|---:|---:|---:|---:|"
e=$(tps "$OUT/ember_bf16")
for run in $ROWS; do
    t=$(tps "$OUT/$run")
    python3 -c "
import sys
t, e, n = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
mfu = 4 * n * t / 989e12
ratio = e / t if t else float('nan')
print(f'| {sys.argv[4]} | {t:.0f} | {sys.argv[5]} | {100 * mfu:.1f}% | {ratio:.2f} |')
" "$t" "$e" "$N" "$run" "$(cat "$OUT/$run.peak" 2>/dev/null)"
done
rm -rf "$M"
done
