#!/usr/bin/env bash
# Where the decode GEMVs wait (issue 7), on the GPU machine after scripts/gpu-pack.sh here:
#   run(command="bash benches/profile-gemv.sh", carry=[".gpu-pack"])
# Builds a one-layer GLM-4-9B-shaped checkpoint, runs one decode step of glm-run (fused mode: the graph's kernels
# launched one by one) under Nsight Compute with the full section set, and exports each NF4 GEMV's summary and its
# per-SASS-instruction samples (stall reasons, executed instructions) as CSV. KERNELS (an ncu name regex) and
# QUANT pick other kernels. Output in $OUT: gemv-details.csv, gemv-sass.csv, gemv.ncu-rep (open in Nsight Compute).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.profile-out}
mkdir -p "$OUT"
MODEL=/tmp/glm4-9b-1layer
KERNELS=${KERNELS:-gemv_nf4_tiled}
QUANT=${QUANT:-4bit}
PACK=${PACK:-.gpu-pack/glm-gpu.tar.xz}

work=$(mktemp -d)
tar -C "$work" -xJf "$PACK" || exit 2
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
[ -f "$MODEL/config.json" ] || python3 benches/peers.py make-synthetic --preset glm4-9b --layers 1 --out "$MODEL" || exit 1

# Two new tokens: the prompt's token comes from prefill (GEMM kernels), the second from one decode step, so each
# matching GEMV of the layer is profiled once.
ncu --clock-control none --set full --import-source yes --kernel-name "regex:$KERNELS" -f -o "$OUT/gemv" \
    "$work/bin/glm-run" --model "$MODEL" --device cuda --quant "$QUANT" --dtype bf16 --context 256 \
    --decode fused --max-new-tokens 2 --raw "hello there" >/dev/null 2>"$OUT/glm-run.err" ||
    { echo "ncu failed:"; tail -20 "$OUT/glm-run.err"; exit 1; }
ncu -i "$OUT/gemv.ncu-rep" --page details --csv >"$OUT/gemv-details.csv"
ncu -i "$OUT/gemv.ncu-rep" --page source --print-source sass --csv >"$OUT/gemv-sass.csv" ||
    echo "profile-gemv: no source page (this ncu may not export it)"
# The headline rows, printed for the log.
grep -E '"(Duration|DRAM Throughput|L1/TEX Cache Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per Thread|Grid Size|Issue Slots Busy|Warp Cycles Per Issued Instruction)"' \
    "$OUT/gemv-details.csv" | cut -d, -f5,12- | head -60
ls -la "$OUT"
