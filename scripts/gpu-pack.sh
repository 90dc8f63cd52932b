#!/usr/bin/env bash
# Builds the CUDA release binary and the GPU test and benchmark binaries (every test/bench target named gpu_*),
# strips them and packs them xz-compressed into .gpu-pack/ (git-ignored) for a device call:
#
#   scripts/gpu-pack.sh                       # here, ~6 min cold, ~1-2 min after a change to our crates
#   run(command="bash scripts/gpu-run.sh", carry=[".gpu-pack"])   # on the GPU machine
#
# Builds in target/cuda (override: GLM_CUDA_TARGET_DIR) so CPU builds in target/ are not invalidated.
# NAME names the pack (.gpu-pack/NAME.tar.xz, default glm-gpu), so that builds can be kept side by side for
# benches/decode-rates.sh PACKS. BINS keeps only the named binaries (glm-run, glm-bench, test-<name>, bench-<name>):
# e.g. BINS="glm-bench test-gpu_kernels bench-gpu_kernels" makes a ~8 MiB pack, so that four or five kernel variants
# fit in one device call's carry where full packs (~15 MiB) fit two.
set -euo pipefail
cd "$(dirname "$0")/.."

# A device call carries at most 64 MiB in all (working tree included).
LIMIT_BYTES=$((56 * 1024 * 1024))
TARGET_DIR=${GLM_CUDA_TARGET_DIR:-target/cuda}
PACK=.gpu-pack
NAME=${NAME:-glm-gpu}
BINS=${BINS:-}
eval "$(scripts/cuda-toolchain.sh --env)"

log() { echo "gpu-pack: $*" >&2; }

log "building glm-run (release, cuda) in $TARGET_DIR"
cargo build --release --features cuda --target-dir "$TARGET_DIR" --bin glm-run
# The end-to-end benchmark (benches/run-gpu.sh runs it).
log "building glm-bench (release, cuda) in $TARGET_DIR"
cargo build --release --features cuda --target-dir "$TARGET_DIR" -p glm-bench --bin glm-bench

# The GPU test and bench binaries' paths come from cargo's JSON messages ("executable" of each artifact),
# along with the package folder that cargo would run them in.
log "building gpu_* test and bench binaries"
messages=$(mktemp)
trap 'rm -f "$messages"' EXIT
cargo test --release --features cuda --target-dir "$TARGET_DIR" --workspace --no-run \
    --test 'gpu_*' --bench 'gpu_*' --message-format=json >"$messages"

staging="$PACK/staging"
rm -rf "$staging"
mkdir -p "$staging/bin"
cp "$TARGET_DIR/release/glm-run" "$staging/bin/glm-run"
cp "$TARGET_DIR/release/glm-bench" "$staging/bin/glm-bench"
root=$PWD
# manifest: one line per binary: kind (test/bench), binary name, package folder relative to the repo root.
python3 - "$messages" "$staging" "$root" <<'EOF'
import json, os, shutil, sys
messages, staging, root = sys.argv[1:]
lines = []
for line in open(messages):
    msg = json.loads(line)
    if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
        continue
    kind = msg["target"]["kind"][0]
    if kind not in ("test", "bench") or not msg["target"]["name"].startswith("gpu_"):
        continue
    name = msg["target"]["name"]
    package_dir = os.path.relpath(os.path.dirname(msg["manifest_path"]), root)
    # A test and a bench may share a name: keep both.
    shutil.copy(msg["executable"], os.path.join(staging, "bin", f"{kind}-{name}"))
    lines.append(f"{kind}\t{name}\t{package_dir}\n")
if not lines:
    sys.exit("gpu-pack: cargo built no gpu_* test or bench binary")
with open(os.path.join(staging, "manifest.tsv"), "w") as f:
    f.writelines(sorted(lines))
EOF
if [ -n "$BINS" ]; then
    for bin in "$staging"/bin/*; do
        name=$(basename "$bin")
        [[ " $BINS " == *" $name "* ]] || rm "$bin"
    done
    # The manifest lists a test or bench binary as "kind<TAB>name<TAB>folder": keep the lines of the binaries kept.
    while IFS=$'\t' read -r kind name package_dir; do
        [ -f "$staging/bin/$kind-$name" ] && printf '%s\t%s\t%s\n' "$kind" "$name" "$package_dir"
    done <"$staging/manifest.tsv" >"$staging/manifest.kept"
    mv "$staging/manifest.kept" "$staging/manifest.tsv"
    [ -n "$(ls "$staging/bin")" ] || { log "BINS ($BINS) names none of the built binaries"; exit 1; }
fi
strip "$staging"/bin/*
{
    echo "commit $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . 2>/dev/null || echo ' + uncommitted changes')"
    echo "built $(date -u +%Y-%m-%dT%H:%MZ) with $(nvcc --version | grep -o 'release [0-9.]*'), $(rustc --version)"
} >"$staging/build-info.txt"

log "compressing $(du -sh "$staging" | cut -f1) with xz"
tmp="$PACK/$NAME.tar.xz.tmp"
tar -C "$staging" -cf - . | xz -9 -T0 >"$tmp"
size=$(stat -c %s "$tmp")
if [ "$size" -gt "$LIMIT_BYTES" ]; then
    rm -f "$tmp"
    log "pack is $((size / 1048576)) MiB, over the $((LIMIT_BYTES / 1048576)) MiB left for it in a device call;" \
        "pack fewer binaries (one test binary with several modules holds more tests)"
    exit 1
fi
mv "$tmp" "$PACK/$NAME.tar.xz"
rm -rf "$staging"
log "$PACK/$NAME.tar.xz: $((size / 1048576)) MiB"
tar -tvJf "$PACK/$NAME.tar.xz" >&2
