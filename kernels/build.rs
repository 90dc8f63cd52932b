//! Compiles every kernels/*.cu with nvcc into a fatbin holding SASS for sm_90 (loaded as is: no JIT at the first
//! launch) and PTX for compute_90 (JIT-compiled by the driver on newer GPUs); src/lib.rs embeds the results.
//! nvcc comes from $NVCC, else $CUDA_HOME/bin/nvcc, else PATH (scripts/cuda-toolchain.sh sets all three).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs};

/// Hopper (H100/H200). A kernel that needs wgmma/setmaxnreg would take compute_90a instead.
const ARCH: &str = "90";

fn nvcc() -> PathBuf {
    if let Some(nvcc) = env::var_os("NVCC") {
        return nvcc.into();
    }
    if let Some(home) = env::var_os("CUDA_HOME") {
        return Path::new(&home).join("bin/nvcc");
    }
    "nvcc".into()
}

fn main() {
    // Without the `cuda` feature the crate is empty: CPU builds must not need nvcc.
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    // The folder itself, so that a new .cu file is compiled too.
    println!("cargo:rerun-if-changed={}", dir.display());
    println!(
        "cargo:rerun-if-changed={}",
        dir.join("common.cuh").display()
    );

    let mut sources: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| entry.expect("readable kernels/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
        .collect();
    sources.sort();

    let nvcc = nvcc();
    for source in &sources {
        println!("cargo:rerun-if-changed={}", source.display());
        let stem = source
            .file_stem()
            .expect(".cu file has a stem")
            .to_string_lossy();
        let fatbin = out_dir.join(format!("{stem}.fatbin"));
        let status = Command::new(&nvcc)
            .args([
                "-fatbin",
                "-O3",
                "-std=c++17",
                "-gencode",
                &format!("arch=compute_{ARCH},code=sm_{ARCH}"),
                "-gencode",
                &format!("arch=compute_{ARCH},code=compute_{ARCH}"),
                "-o",
            ])
            .arg(&fatbin)
            .arg(source)
            .status()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run nvcc ({}): {e}. The `cuda` feature needs the CUDA 13.0 toolchain: \
                     run `eval \"$(scripts/cuda-toolchain.sh --env)\"` first.",
                    nvcc.display()
                )
            });
        if !status.success() {
            panic!("nvcc failed on {} ({status})", source.display());
        }
    }
}
