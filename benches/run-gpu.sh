#!/usr/bin/env bash
# The end-to-end benchmark (issue 9) in one device call. Here, first: scripts/gpu-pack.sh (packs glm-bench
# too) and the pruned bitsandbytes wheel in .whl/ (benches/README.md); then
#   run(command="bash benches/run-gpu.sh", carry=[".gpu-pack", ".whl"], timeout_s=600)
# On the GPU machine it unpacks the pack, installs the wheel into /tmp/site, makes the synthetic
# GLM-4-9B-shaped checkpoint on local disk (benches/peers.py make-synthetic), then measures, each in its own
# process so that each starts with an empty device: glm-run NF4, NF4 with the minimum-memory options and
# BF16 (glm-bench run), transformers BF16 and transformers + bitsandbytes NF4 (benches/peers.py peer). The
# run records, env.json (device, driver, commit) and the log land in $OUT; merge them here with
#   glm-bench report <files>/ours-*.json <files>/peer-*.json --env <files>/env.json \
#       --quality benches/results/quality-demo.json
# A step that fails or runs out of its time is reported and the others still run; the whole stays under
# 570 s (the device call's limit is 600 s).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/.bench-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/run-gpu.log") 2>&1
export PYTHONUNBUFFERED=1

PACK=${PACK:-.gpu-pack/glm-gpu.tar.xz}
PRESET=${PRESET:-glm4-9b}
MODEL=${MODEL:-/tmp/$PRESET-synthetic}
CONTEXT=${CONTEXT:-4096}
LENGTHS=${LENGTHS:-128,512,2048}
NEW_TOKENS=${NEW_TOKENS:-32}
WARMUP=${WARMUP:-1}
REPS=${REPS:-3}
DEADLINE=${DEADLINE:-570}
ours=(--context "$CONTEXT")
common=(--prompt-lengths "$LENGTHS" --new-tokens "$NEW_TOKENS" --warmup "$WARMUP" --reps "$REPS")

elapsed() { echo $((SECONDS)); }
failed=0
# step NAME LIMIT COMMAND...: runs COMMAND for at most LIMIT seconds and never past the deadline.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS))
    [ "$limit" -lt "$left" ] || limit=$left
    echo "=== [$(elapsed) s] $name (at most $limit s)"
    if [ "$limit" -le 5 ]; then
        echo "run-gpu: $name skipped: no time left"
        failed=$((failed + 1))
        return
    fi
    timeout "$limit" "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "run-gpu: $name failed (exit $rc$([ $rc -eq 124 ] && echo ', out of time'))"
        failed=$((failed + 1))
    fi
}

work=$(mktemp -d)
tar -C "$work" -xJf "$PACK" || {
    echo "run-gpu: no $PACK: run scripts/gpu-pack.sh and carry .gpu-pack"
    exit 2
}
BENCH=$work/bin/glm-bench
[ -x "$BENCH" ] || {
    echo "run-gpu: the pack has no glm-bench: rebuild it with scripts/gpu-pack.sh"
    exit 2
}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || {
    echo "run-gpu: installing .whl/*.whl failed: carry .whl with the pruned bitsandbytes wheel"
    exit 2
}
export PYTHONPATH=/tmp/site
python3 benches/peers.py gpu-env --build-info "$work/build-info.txt" --out "$OUT/env.json"
cat "$OUT/env.json"

if [ ! -f "$MODEL/bench-prompts.json" ]; then
    step make-synthetic 120 python3 benches/peers.py make-synthetic --preset "$PRESET" --out "$MODEL"
fi
du -sh "$MODEL"

step glm-run-nf4-dq 110 "$BENCH" run "${ours[@]}" --model "$MODEL" --quant 4bit "${common[@]}" --full-context \
    --out "$OUT/ours-nf4-dq.json"
step glm-run-nf4-dq-min 100 "$BENCH" run "${ours[@]}" --model "$MODEL" --quant 4bit --min-memory "${common[@]}" \
    --full-context --out "$OUT/ours-nf4-dq-min.json"
step glm-run-bf16 100 "$BENCH" run "${ours[@]}" --model "$MODEL" --quant none "${common[@]}" --out "$OUT/ours-bf16.json"
step transformers-bf16 130 python3 benches/peers.py peer --model "$MODEL" --variant bf16 "${common[@]}" \
    --out "$OUT/peer-bf16.json"
step transformers-bnb-nf4-dq 170 python3 benches/peers.py peer --model "$MODEL" --variant nf4-dq \
    "${common[@]}" --out "$OUT/peer-nf4-dq.json"

echo "=== [$(elapsed) s] done: $failed step(s) failed"
ls -la "$OUT"
