#!/usr/bin/env bash
# Issue 7's GPU case, one prepared run on the lent H100/H200 (fits in ~8 minutes):
#   Ember's step_bench (an x86-64 release binary built HERE with `--features cuda` and carried:
#   cargo build --release -p ember-train --example step_bench --features cuda) against
#   transformers + PEFT with the PyTorch installed on the device, on a Llama-3.2-1B-shaped model
#   with random weights (bf16 on disk), seq 2048, batch 1, r 16 / alpha 32 all-linear, AdamW.
# Prints tokens/s, peak device memory, Ember / PEFT ratios and MFU = 4·N·tokens/s / 989 TFLOP/s.
# Ember computes in f32 (bf16 compute is not implemented yet), so PEFT runs twice: bf16 (what
# users run) and f32 (like for like).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-${TMPDIR:-/tmp}/ember-gpu-bench}"
STEPS="${STEPS:-6}"
BIN="${BIN:-target/release/examples/step_bench}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 - "$OUT/llama-1b" <<'PY'
import sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
config = LlamaConfig(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
    num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
    rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "high_freq_factor": 4.0,
                     "low_freq_factor": 1.0, "original_max_position_embeddings": 8192},
)
torch.manual_seed(0)
model = LlamaForCausalLM(config).to(torch.bfloat16)
model.save_pretrained(sys.argv[1])
print("params", sum(p.numel() for p in model.parameters()))
PY
N=$(python3 -c "print(1_235_814_400)")

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

EMBER_DEVICE=cuda peak "$OUT/ember" timeout 240 "$BIN" "$OUT/llama-1b" 2048 1 "$STEPS" 0 > "$OUT/ember" 2> "$OUT/ember.err"
echo "ember rc $? (stderr tail:)"; tail -3 "$OUT/ember.err"
peak "$OUT/peft_bf16" timeout 150 python3 bench/peft_reference.py train "$OUT/llama-1b" --seq 2048 --batch 1 \
    --steps "$STEPS" --dtype bfloat16 --device cuda > "$OUT/peft_bf16"
peak "$OUT/peft_f32" timeout 150 python3 bench/peft_reference.py train "$OUT/llama-1b" --seq 2048 --batch 1 \
    --steps "$STEPS" --dtype float32 --device cuda > "$OUT/peft_f32"

echo
echo "| run | tokens/s | peak MiB | MFU | Ember / run |"
echo "|---|---:|---:|---:|---:|"
e=$(tps "$OUT/ember")
for run in ember peft_bf16 peft_f32; do
    t=$(tps "$OUT/$run")
    python3 -c "
import sys
t, e, n = float(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
mfu = 4 * n * t / 989e12
ratio = e / t if t else float('nan')
print(f'| {sys.argv[4]} | {t:.0f} | {sys.argv[5]} | {100 * mfu:.1f}% | {ratio:.2f} |')
" "$t" "$e" "$N" "$run" "$(cat "$OUT/$run.peak" 2>/dev/null)"
done
