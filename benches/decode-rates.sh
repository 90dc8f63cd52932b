#!/usr/bin/env bash
# Decode rates of the 40-layer GLM-4-9B-shaped checkpoint, NF4 and BF16, under several environment settings side
# by side in one device call (issue 10's A/B comparisons, e.g. programmatic dependent launch on and off). Here:
# scripts/gpu-pack.sh; then
#   run(command="bash benches/decode-rates.sh", carry=[".gpu-pack"])
# SETTINGS lists space-separated environment assignments, one setting per word ("-" = none); each runs glm-bench
# (a prompt of each length in PROMPTS, NEW_TOKENS new, 1 warm-up + 3 runs, median) for every precision in
# QUANTS. PACKS lists packs of binaries (default .gpu-pack/glm-gpu.tar.xz), so that two builds can be compared in
# one call (keep an earlier pack beside the new one in .gpu-pack/); each pack's runs are labelled by its file name,
# and the table gives each run's rate against the first pack's run with the first setting (same precision and
# prompt).
# Run records go to $OUT/decode-<pack>-<quant>-<prompt>-<setting>.json, the table to stdout and $OUT/decode-rates.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/.decode-out}
mkdir -p "$OUT"
exec > >(tee "$OUT/decode-rates.log") 2>&1
SETTINGS=${SETTINGS:-"GLM_RUN_PDL=1 GLM_RUN_PDL=0"}
QUANTS=${QUANTS:-"4bit none"}
NEW_TOKENS=${NEW_TOKENS:-64}
PROMPTS=${PROMPTS:-128}
MODEL=${MODEL:-/tmp/glm4-9b-synthetic}

PACKS=${PACKS:-.gpu-pack/glm-gpu.tar.xz}

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
[ -f "$MODEL/config.json" ] || python3 benches/peers.py make-synthetic --preset glm4-9b --out "$MODEL" || exit 1

for pack in $PACKS; do
    label=$(basename "$pack" .tar.xz)
    work=$(mktemp -d)
    tar -C "$work" -xJf "$pack" || exit 2
    echo "=== pack $label: $(tr '\n' ' ' <"$work/build-info.txt")"
    for quant in $QUANTS; do
        for prompt in $PROMPTS; do
            for setting in $SETTINGS; do
                name=$label-$quant-$prompt-${setting//[^A-Za-z0-9]/_}
                env_args=()
                [ "$setting" = - ] || env_args=("$setting")
                echo "=== $label, $quant, prompt $prompt, $setting"
                env "${env_args[@]}" "$work/bin/glm-bench" run --model "$MODEL" --quant "$quant" \
                    --context $((prompt + NEW_TOKENS + 64)) --prompt-lengths "$prompt" --new-tokens "$NEW_TOKENS" \
                    --warmup 1 --reps 3 --out "$OUT/decode-$name.json" || echo "decode-rates: $name failed"
            done
        done
    done
done
FIRST_SETTING=${SETTINGS%% *} python3 - "$OUT" $PACKS <<'PY' | tee "$OUT/decode-rates.md"
import glob, json, os, re, sys
out, packs = sys.argv[1], [os.path.basename(p)[: -len(".tar.xz")] for p in sys.argv[2:]]
first_setting = re.sub("[^A-Za-z0-9]", "_", os.environ["FIRST_SETTING"])
# Each run against the first pack's run with the first setting, of the same precision and prompt (same call).
runs = {}
for path in glob.glob(os.path.join(out, "decode-*.json")):
    name = os.path.basename(path)[len("decode-"):-len(".json")]
    pack = next((p for p in packs if name.startswith(p + "-")), None)
    if pack is not None:
        runs[name] = (pack, name[len(pack) + 1:], json.load(open(path)))
print("| run | decode tok/s (batch 1, graph) | vs the first | fused | plain | graph batch 4 | graph batch 8 |")
print("|---|---|---|---|---|---|---|")
for name in sorted(runs, key=lambda n: (runs[n][1], packs.index(runs[n][0]))):
    pack, rest, run = runs[name]
    rates = {(v["mode"], v["batch"]): v["tok_s"]["median"] for v in run.get("decode_variants", [])}
    cell = lambda key: f"{rates[key]:.1f}" if key in rates else "-"
    tok_s = run["decode"]["tok_s"]["median"]
    quant_prompt = rest.rsplit("-", 1)[0]
    base = runs.get(f"{packs[0]}-{quant_prompt}-{first_setting}")
    ratio = f"{tok_s / base[2]['decode']['tok_s']['median']:.3f}x" if base else "-"
    print(f"| {name} | {tok_s:.1f} | {ratio} | {cell(('fused', 1))} | {cell(('plain', 1))} "
          f"| {cell(('graph', 4))} | {cell(('graph', 8))} |")
PY
