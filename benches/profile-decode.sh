#!/usr/bin/env bash
# Where a decode step's time goes (issue 10), on the GPU machine after scripts/gpu-pack.sh here:
#   run(command="bash benches/profile-decode.sh", carry=[".gpu-pack"])
# Builds a GLM-4-9B-shaped checkpoint with LAYERS layers (default 4: every per-layer shape of the 9B model, quick
# to make), then for each decode mode runs glm-run under Nsight Compute twice, with 2 and 3 new tokens: the
# difference is exactly one decode step, so its kernels (count, names, durations: the GPU busy time) are read
# without telling prefill and load kernels apart. The steps' wall time comes from glm-bench on the same model.
# Output: $OUT/bench-*.json, $OUT/profile-decode.md (benches/profile_decode.py's summary, also printed) and
# $OUT/profile-raw.tar.xz (the ncu CSVs and glm-run's stderr). PACK names another pack than .gpu-pack/glm-gpu.tar.xz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.profile-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/profile-decode.log") 2>&1
LAYERS=${LAYERS:-4}
MODEL=/tmp/glm4-9b-${LAYERS}layers
QUANTS=${QUANTS:-"4bit none"}

work=$(mktemp -d)
raw=$(mktemp -d)
tar -C "$work" -xJf "${PACK:-.gpu-pack/glm-gpu.tar.xz}" || exit 2
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
[ -f "$MODEL/config.json" ] || python3 benches/peers.py make-synthetic --preset glm4-9b --layers "$LAYERS" --out "$MODEL" || exit 1

for quant in $QUANTS; do
    "$work/bin/glm-bench" run --model "$MODEL" --quant "$quant" --context 1024 --prompt-lengths 128 \
        --new-tokens 64 --warmup 1 --reps 3 --out "$OUT/bench-$quant.json" || exit 1
    # fused launches the graph's kernels one by one: the same list, so only graph and plain are profiled (MODES).
    for mode in ${MODES:-plain graph}; do
        for tokens in 2 3; do
            name=$quant-$mode-$tokens
            ncu --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
                --graph-profiling node --log-file "$raw/ncu-$name.csv" \
                "$work/bin/glm-run" --model "$MODEL" --device cuda --quant "$quant" --dtype bf16 --context 256 \
                --decode "$mode" --max-new-tokens "$tokens" --raw "hello there" >/dev/null 2>"$raw/glm-run-$name.err" ||
                { echo "ncu $name failed:"; tail -5 "$raw/glm-run-$name.err" "$raw/ncu-$name.csv"; }
            grep -q "finish: length" "$raw/glm-run-$name.err" || echo "glm-run $name did not make $tokens tokens"
        done
    done
done
python3 benches/profile_decode.py "$raw" --bench "$OUT" --layers "$LAYERS" --out "$OUT/profile-decode.md"
tar -C "$raw" -cJf "$OUT/profile-raw.tar.xz" .
