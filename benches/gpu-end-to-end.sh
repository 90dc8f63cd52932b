#!/usr/bin/env bash
# Issue 8 on the GPU machine (after scripts/gpu-pack.sh; run(command="bash benches/gpu-end-to-end.sh", carry=[".gpu-pack"])):
# the gpu_end_to_end tests, the demo model on cpu and cuda, then the GLM-4-9B-shaped random checkpoint: read time, dense and
# NF4 loads (load time, measured memory, host RSS, decode rate). Results under $OUT.
set -uo pipefail
OUT=${OUT:-$PWD/.gpu-out}; mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-end-to-end.log") 2>&1
work=$(mktemp -d); tar -C "$work" -xJf .gpu-pack/glm-gpu.tar.xz || exit 2
cat "$work/build-info.txt"; date -u
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
export GLM_REQUIRE_GPU=1
(cd crates/glm && timeout 200 "$work/bin/test-gpu_end_to_end" --test-threads=1 --nocapture) 2>&1 | grep -E "^test |test result|same|demo|peak|context|MiB"
R="$work/bin/glm-run"; P="What say you to my love?"
for dev in cpu cuda; do $R --model models/demo --device $dev --dtype f16 --quant 4bit --max-new-tokens 48 "$P" >"$OUT/demo-$dev.txt" 2>/dev/null; done
cmp -s "$OUT/demo-cpu.txt" "$OUT/demo-cuda.txt" && echo "demo f16 4bit: SAME TEXT" || echo "demo f16 4bit: DIFFERENT TEXT"
M=/tmp/glm4-9b-random
timeout 150 python3 benches/make_glm4_9b_random.py $M >/dev/null 2>&1 || { echo "no synthetic model"; exit 0; }
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null && echo "page cache dropped" || echo "page cache kept"
s=$(date +%s%N); cat $M/*.safetensors >/dev/null; e=$(date +%s%N); echo "cat of the shards: $(( (e - s) / 1000000 )) ms"
s=$(date +%s%N); cat $M/*.safetensors >/dev/null; e=$(date +%s%N); echo "cat again (page cache): $(( (e - s) / 1000000 )) ms"
run() { local tag=$1; shift
  timeout 150 $R --model $M --device cuda --dtype bf16 --raw --max-new-tokens 64 --json "$@" "hello there" >"$OUT/9b-$tag.json" 2>"$OUT/9b-$tag.err"
  echo "rc $? 9b $tag: $(python3 -c "import json;d=json.load(open('$OUT/9b-$tag.json'));t=d['timings'];m=d['memory'];print(d['quant'], 'load_s %.2f'%t['load_s'], 'decode_tok_s %.1f'%t['decode_tok_s'], 'prefill_s %.3f'%t['prefill_s'], 'planned', m['planned_bytes'], m['planned_weight_bytes'], 'weights', m['measured_weight_bytes'], 'measured', m['measured'], 'rss', m['peak_rss_bytes'])" 2>&1)"; }
run dense --quant none
run nf4 --quant 4bit
run nf4-lean --quant 4bit --quantize-lm-head --embeddings-on-host
GLM_RUN_MEMORY_LIMIT=12GB run auto12 --quant auto
