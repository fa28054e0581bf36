#!/usr/bin/env bash
# One prepared run on a lent NVIDIA GPU (H100/H200, nothing to fetch there): the CUDA backend's
# correctness first (crates/ember-cli/tests/devices.rs against transformers' references and the
# CPU, with `--device cuda`), then the rows of bench/gpu.sh that fit in the time left.
#
# Here, before the call (x86-64 release binaries; the device builds nothing):
#   scripts/device_check.sh --pack     # builds, strips and packs them into .gpu/bins.tar.xz (19 MB)
#   scripts/device_check.sh --slim     # the tracked tree is 83 MB, over the device's 64 MiB:
#                                      # untracks (index only) what the check does not read
# There, as the device command (carry .gpu, timeout 600):
#   BUDGET=540 scripts/device_check.sh
# Then here: scripts/device_check.sh --unslim (restores the index and .git/info/exclude).
# Logs land in $OUT (device.log, devices.log, bench.log).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd -P)"
TARGET="${CARGO_TARGET_DIR:-$ROOT/target}"

if [ "${1:-}" = "--pack" ]; then
    set -e
    build=(cargo test --release -p ember-cli -p ember-train --features ember-cli/cuda,ember-train/cuda
        --test devices --example step_bench --no-run)
    "${build[@]}"
    test_bin=$("${build[@]}" --message-format=json 2>/dev/null \
        | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "devices" and m.get("executable"):
        print(m["executable"])')
    mkdir -p .gpu
    grep -qs '^/.gpu/$' .git/info/exclude || echo /.gpu/ >> .git/info/exclude
    cp "$TARGET/release/ember" "$TARGET/release/examples/step_bench" .gpu/
    cp "$test_bin" .gpu/devices
    strip .gpu/ember .gpu/step_bench .gpu/devices
    # Where the test binary looks for the fixtures and for `ember` (compiled in).
    printf 'BUILT_ROOT=%q\nBUILT_EMBER=%q\n' "$ROOT" "$TARGET/release/ember" > .gpu/paths
    tar -C .gpu -cJf .gpu/bins.tar.xz ember step_bench devices paths
    rm .gpu/ember .gpu/step_bench .gpu/devices .gpu/paths
    ls -l .gpu
    exit 0
fi

# What the check does not read: merged references, datasets, the SmolLM2 logits, the
# wrapper/expert fixture families, gradient references (34 MB of 83).
SLIM=('/tests/fixtures/*/merged/' '/datasets/' '/tests/fixtures/smollm2/' '/tests/fixtures/*_wrapped/'
    '/tests/fixtures/*_experts/' 'lora_grads_step0.safetensors')
if [ "${1:-}" = "--slim" ]; then
    git diff --cached --quiet || { echo "the index has staged changes: commit them first" >&2; exit 1; }
    cp .git/info/exclude .git/info/exclude.before-slim
    printf '%s\n' "${SLIM[@]}" >> .git/info/exclude
    git ls-files -ci --exclude-standard -z | git rm -r -q --cached --pathspec-from-file=- --pathspec-file-nul
    echo "travels: $(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1) bytes tracked + .gpu"
    exit 0
fi
if [ "${1:-}" = "--unslim" ]; then
    git reset -q
    mv .git/info/exclude.before-slim .git/info/exclude
    git status --short
    exit 0
fi

OUT="${OUT:-${TMPDIR:-/tmp}/ember-device-check}"
mkdir -p "$OUT"
START=$(date +%s)
BUDGET="${BUDGET:-540}"
left() { echo $((BUDGET - ($(date +%s) - START))); }
exec > >(tee "$OUT/device.log") 2>&1

# (python3 rather than tar -J: the image need not have xz)
python3 -c "import tarfile; tarfile.open('.gpu/bins.tar.xz').extractall('.gpu')"
chmod +x .gpu/ember .gpu/step_bench .gpu/devices
# shellcheck source=/dev/null
source .gpu/paths
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# The test binary reads the fixtures under the checkout it was built in and runs `ember` from
# the target folder it was built in: put both where it expects them.
if [ "$(readlink -f "$BUILT_ROOT" 2>/dev/null)" != "$ROOT" ]; then
    mkdir -p "$(dirname "$BUILT_ROOT")" && rm -rf "$BUILT_ROOT" && ln -s "$ROOT" "$BUILT_ROOT"
fi
mkdir -p "$(dirname "$BUILT_EMBER")" && cp .gpu/ember "$BUILT_EMBER"

# burn-cuda compiles its kernels at run time with NVRTC against the toolkit's headers.
if [ -z "${CUDA_PATH:-}" ] && [ ! -d /usr/local/cuda ] && command -v nvcc > /dev/null; then
    CUDA_PATH="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
    export CUDA_PATH
fi
nvrtc=$(find "${CUDA_PATH:-/usr/local/cuda}/" /usr/lib /opt -name 'libnvrtc.so*' 2> /dev/null | head -1)
echo "CUDA_PATH=${CUDA_PATH:-/usr/local/cuda} nvrtc=$nvrtc"
export LD_LIBRARY_PATH="${nvrtc:+$(dirname "$nvrtc"):}${CUDA_PATH:-/usr/local/cuda}/lib64:${LD_LIBRARY_PATH:-}"

echo "== one forward on cuda (kernel compilation included)"
time timeout 120 .gpu/ember forward --device cuda --model tests/fixtures/llama \
    --inputs tests/fixtures/llama/inputs.json --out "$OUT/llama_cuda.safetensors" | tail -3

echo "== crates/ember-cli/tests/devices.rs on cuda ($(left) s left)"
EMBER_TEST_GPU=cuda timeout $(($(left) * 55 / 100)) .gpu/devices --nocapture 2>&1 | tee "$OUT/devices.log" \
    | grep -E "^test |test result|panicked|step [0-9]|bf16|on cuda|vs cpu"

echo "== bench/gpu.sh, llama-1b rows ($(left) s left)"
rows_left=4
RUN_TIMEOUT=$((($(left) - 40) / rows_left))
[ "$RUN_TIMEOUT" -gt 30 ] && OUT=/tmp/ember-gpu-bench MODELS=1b STEPS="${STEPS:-4}" RUN_TIMEOUT=$RUN_TIMEOUT \
    BIN=.gpu/step_bench ROWS="ember_bf16 peft_bf16 ember_f32 peft_f32" timeout $(($(left) - 5)) bench/gpu.sh \
    2>&1 | tee "$OUT/bench.log"
echo "done after $(($(date +%s) - START)) s"
