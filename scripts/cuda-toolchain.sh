#!/usr/bin/env bash
# Installs the CUDA 13.0 build toolchain (nvcc, headers, runtime/cuBLAS/cuRAND/NVRTC link libraries) from PyPI
# into a cache outside the repo, adds what the linker needs, and prints the environment to build with.
#
#   scripts/cuda-toolchain.sh            install if missing, then print the exports with a usage note
#   eval "$(scripts/cuda-toolchain.sh --env)"   install if missing (progress on stderr), export the variables
#
# Pinned to the CUDA 13.0 release: the GPU machine's driver is CUDA 13.0 and cannot load PTX from a newer nvcc.
# Cache folder: $GLM_CUDA_TOOLCHAIN_DIR, default ~/.cache/glm-run/cuda-13.0. A second run only checks a stamp.
set -euo pipefail

PACKAGES=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cublas==13.1.0.3
    nvidia-curand==10.4.0.35
)
# Bump when the post-install steps change, so existing caches are redone.
LAYOUT_VERSION=1

ENV_ONLY=0
case "${1:-}" in
    --env) ENV_ONLY=1 ;;
    "") ;;
    -h | --help)
        sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "cuda-toolchain.sh: unknown argument '$1' (use --env or nothing)" >&2
        exit 2
        ;;
esac

CACHE="${GLM_CUDA_TOOLCHAIN_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/glm-run/cuda-13.0}"
STAMP_WANT="layout=$LAYOUT_VERSION ${PACKAGES[*]}"
log() { echo "cuda-toolchain: $*" >&2; }

# Writes the libcuda.so link stub. The real libcuda.so.1 ships with the GPU driver, which this machine lacks;
# binaries only need the symbol names at link time and find the driver's library by soname at run time.
make_libcuda_stub() {
    local root=$1 work=$2
    local names="$work/cuda-driver-symbols.txt"
    {
        # Functions declared by the driver header (macros such as cuMemAlloc -> cuMemAlloc_v2 resolved by -E);
        # the wheels lack cudaProfiler.h, whose two functions cudarc's list below covers.
        printf '#include <cuda.h>\n' |
            gcc -E -I"$root/include" -x c - |
            grep -oE '\bcu[A-Z][A-Za-z0-9_]*[[:space:]]*\(' | tr -d ' \t('
        # Plus every driver function cudarc's bindings declare, if its source is in the cargo registry.
        local cudarc_sys
        for cudarc_sys in "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs; do
            [ -f "$cudarc_sys" ] || continue
            grep -oE '^[[:space:]]*(pub )?fn cu[A-Z][A-Za-z0-9_]*\(' "$cudarc_sys" |
                sed -E 's/.*fn (cu[A-Za-z0-9_]+)\(/\1/'
        done
    } | sort -u >"$names"
    local count
    count=$(wc -l <"$names")
    if [ "$count" -lt 300 ]; then
        log "found only $count driver function names in $root/include/cuda.h; is nvidia-cuda-runtime complete?"
        exit 1
    fi
    # 999 = CUDA_ERROR_UNKNOWN, should the stub ever be loaded instead of the driver's library.
    sed 's/.*/int &(void) { return 999; }/' "$names" >"$work/libcuda_stub.c"
    mkdir -p "$root/lib/stubs"
    gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$root/lib/stubs/libcuda.so" "$work/libcuda_stub.c"
    log "libcuda.so stub with $count driver symbols"
}

install_toolchain() {
    command -v gcc >/dev/null || {
        log "gcc is needed (nvcc's host compiler and the libcuda stub): apt-get install gcc g++"
        exit 1
    }
    local python=${PYTHON:-python3}
    "$python" -m pip --version >/dev/null 2>&1 || {
        log "$python -m pip is needed to fetch the toolchain from PyPI"
        exit 1
    }
    mkdir -p "$(dirname "$CACHE")"
    tmp="$CACHE.tmp.$$" # global: the EXIT trap reads it
    rm -rf "$tmp"
    trap 'rm -rf "$tmp"' EXIT
    log "installing ${#PACKAGES[@]} packages into $CACHE (about 1 GB, a minute or two)"
    # --no-deps: every package is pinned here, so the set is exactly the 13.0 release.
    "$python" -m pip install --quiet --disable-pip-version-check --no-deps --target "$tmp" "${PACKAGES[@]}" >&2
    local root="$tmp/nvidia/cu13"
    [ -x "$root/bin/nvcc" ] || {
        log "nvcc missing after install ($root/bin/nvcc)"
        exit 1
    }
    # The linker looks for the unversioned names (-lcudart, -lcublas, ...); the wheels ship only .so.N.
    local lib base
    for lib in "$root"/lib/lib*.so.*; do
        base=$(basename "$lib")
        base=${base%%.so.*}.so
        [ -e "$root/lib/$base" ] || ln -s "$(basename "$lib")" "$root/lib/$base"
    done
    make_libcuda_stub "$root" "$tmp"
    rm -f "$tmp"/cuda-driver-symbols.txt "$tmp"/libcuda_stub.c
    echo "$STAMP_WANT" >"$tmp/.glm-run-stamp"
    rm -rf "$CACHE"
    mv "$tmp" "$CACHE"
    trap - EXIT
    log "installed: $("$CACHE/nvidia/cu13/bin/nvcc" --version | grep -o 'release [0-9.]*')"
}

if [ "$(cat "$CACHE/.glm-run-stamp" 2>/dev/null)" != "$STAMP_WANT" ]; then
    install_toolchain
fi

ROOT="$CACHE/nvidia/cu13"
THREADS=$(nproc 2>/dev/null || echo 2)
if [ "$ENV_ONLY" = 0 ]; then
    echo "# CUDA 13.0 toolchain in $ROOT. Load it with: eval \"\$(scripts/cuda-toolchain.sh --env)\""
fi
cat <<EOF
export CUDA_HOME="$ROOT"
export CUDA_ROOT="$ROOT"
export CUDA_PATH="$ROOT"
export NVCC="$ROOT/bin/nvcc"
export PATH="$ROOT/bin:\$PATH"
export LIBRARY_PATH="$ROOT/lib:$ROOT/lib/stubs\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export CUDA_COMPUTE_CAP=90
export CUDAFORGE_THREADS=$THREADS
EOF
