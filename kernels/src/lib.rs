//! glm-run's CUDA kernels as candle custom ops.
//!
//! Each `kernels/*.cu` is compiled to PTX for sm_90 by build.rs and embedded here; the first launch on a device
//! loads the module through `CudaDevice::get_or_load_custom_func`. Only built with glm's `cuda` feature: it
//! needs nvcc (scripts/cuda-toolchain.sh) at build time and a CUDA driver at run time. Without this crate's
//! `cuda` feature it is empty, so that `cargo build --workspace` on a machine without CUDA still works.
#![cfg(feature = "cuda")]

mod dequantize;

pub use dequantize::{CudaNf4Tensor, HostAbsmax, HostNf4};

/// PTX of kernels/dequantize.cu.
pub const DEQUANTIZE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dequantize.ptx"));

/// What can go wrong preparing or launching a kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("NF4 tensor `{name}`: {problem}")]
    InvalidNf4 { name: String, problem: String },
    #[error("NF4 tensor `{name}`: {device:?} is not a CUDA device; dequantize on the CPU with the nf4 crate")]
    NotCuda {
        name: String,
        device: candle_core::DeviceLocation,
    },
    #[error("NF4 tensor `{name}`: cannot dequantize to {dtype:?}; use f32, f16 or bf16")]
    UnsupportedDtype {
        name: String,
        dtype: candle_core::DType,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
