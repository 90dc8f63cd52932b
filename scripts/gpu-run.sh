#!/usr/bin/env bash
# Runs on the GPU machine, in the repo copy that a device call gets, after scripts/gpu-pack.sh here:
#   run(command="bash scripts/gpu-run.sh", carry=[".gpu-pack"])
# Unpacks .gpu-pack/glm-gpu.tar.xz, prints the GPU and driver, runs every packed gpu_* test binary (a missing
# GPU fails them: GLM_REQUIRE_GPU=1), then the gpu_* benchmarks, and checks that glm-run finds its libraries. Everything goes to
# stdout and $OUT/gpu-run.log, nvidia-smi's full report to $OUT/nvidia-smi.txt; the last line is the summary.
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:-$PWD/.gpu-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-run.log") 2>&1

# PACK names another pack than the default (e.g. one of two builds kept for benches/decode-rates.sh PACKS).
PACK=${PACK:-.gpu-pack/glm-gpu.tar.xz}
if [ ! -f "$PACK" ]; then
    echo "gpu-run: no $PACK; run scripts/gpu-pack.sh first and name .gpu-pack in the call's carry"
    exit 2
fi
work=$(mktemp -d)
tar -C "$work" -xJf "$PACK" || exit 2
cat "$work/build-info.txt"
echo "run $(date -u +%Y-%m-%dT%H:%MZ) on $(hostname)"

nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm --format=csv ||
    echo "gpu-run: nvidia-smi failed (see nvidia-smi.txt)"
grep -m1 -o 'CUDA Version: [0-9.]*' "$OUT/nvidia-smi.txt"

export GLM_REQUIRE_GPU=1
passed=0
failed=0
while IFS=$'\t' read -r kind name package_dir; do
    [ "$kind" = test ] || continue
    echo "=== test $name ($package_dir)"
    log="$work/$name.log"
    # cargo runs a test binary in its package folder; do the same.
    (cd "$package_dir" && "$work/bin/test-$name" --test-threads=1 --nocapture) 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    result=$(grep -E '^test result: ' "$log" | tail -1)
    ok=$(sed -nE 's/.* ([0-9]+) passed.*/\1/p' <<<"$result")
    bad=$(sed -nE 's/.* ([0-9]+) failed.*/\1/p' <<<"$result")
    passed=$((passed + ${ok:-0}))
    failed=$((failed + ${bad:-0}))
    # A crash (no result line) or a failing exit with no failed test counted still counts as one failure.
    if [ "$rc" -ne 0 ] && [ "${bad:-0}" -eq 0 ]; then
        echo "gpu-run: $name exited with $rc"
        failed=$((failed + 1))
    fi
done <"$work/manifest.tsv"

while IFS=$'\t' read -r kind name package_dir; do
    [ "$kind" = bench ] || continue
    echo "=== bench $name ($package_dir)"
    (cd "$package_dir" && "$work/bin/bench-$name" --bench) || echo "gpu-run: bench $name exited with $?"
done <"$work/manifest.tsv"

if [ -x "$work/bin/glm-run" ]; then
    echo "=== glm-run"
    # The binary must find every shared library (the driver's libcuda.so.1, cuBLAS, ...) on this machine.
    if ldd "$work/bin/glm-run" | grep 'not found'; then
        echo "gpu-run: glm-run is missing shared libraries here"
        failed=$((failed + 1))
    fi
    "$work/bin/glm-run" --help | head -20 || true
    # Smoke: the shipped demo model, greedy, on the CPU and on the GPU (the GPU end-to-end tests compare tokens).
    for device in cpu cuda; do
        echo "--- glm-run --device $device"
        "$work/bin/glm-run" --model models/demo --device "$device" --dtype f32 --quant none --max-new-tokens 24 "What say you to my love?" ||
            { echo "gpu-run: glm-run --device $device failed"; failed=$((failed + 1)); }
    done
else
    echo "=== no glm-run in this pack (scripts/gpu-pack.sh BINS): its smoke run skipped"
fi

echo "gpu-run: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
