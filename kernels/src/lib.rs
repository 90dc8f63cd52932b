//! glm-run's CUDA kernels for NF4 weights resident on the GPU.
//!
//! [`CudaNf4Tensor`] holds a weight's packed 4-bit codes and (double-quantized) scales on a CUDA device and
//! offers the operations a decoder needs: [`CudaNf4Tensor::matmul`] (fused GEMV for up to 8 rows, a prefill path
//! beyond), [`CudaNf4Tensor::dequantize`], [`CudaNf4Tensor::quantize`] (on the device, byte-identical to the nf4
//! crate) and [`CudaNf4Tensor::to_host`].
//!
//! Each `kernels/*.cu` is compiled to PTX for sm_90 by build.rs and embedded here; the first launch on a device
//! loads the module through `CudaDevice::get_or_load_custom_func`. Only built with glm's `cuda` feature: it
//! needs nvcc (scripts/cuda-toolchain.sh) at build time and a CUDA driver at run time. Without this crate's
//! `cuda` feature it is empty, so that `cargo build --workspace` on a machine without CUDA still works.
#![cfg(feature = "cuda")]

mod attention;
mod decode;
mod dequantize;
mod layout;
mod matmul;
mod quantize;
mod tensor;

use std::io::Write;

pub use attention::decode_attention;
pub use decode::{
    argmax_scratch_bytes, device_pointer, DecodeKernels, DevicePointer, RotaryKvWrite,
    DENSE_MAX_ROWS, NORM_MAX_DIM,
};
pub use matmul::GEMV_MAX_ROWS;
pub use tensor::{CudaNf4Tensor, HostAbsmax, HostNf4};

/// PTX of kernels/activation.cu.
const ACTIVATION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/activation.ptx"));
/// PTX of kernels/argmax.cu.
const ARGMAX_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/argmax.ptx"));
/// PTX of kernels/attention.cu.
const ATTENTION_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
/// PTX of kernels/dequantize.cu.
pub const DEQUANTIZE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/dequantize.ptx"));
/// PTX of kernels/embedding.cu.
const EMBEDDING_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/embedding.ptx"));
/// PTX of kernels/gemv_dense.cu.
const GEMV_DENSE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/gemv_dense.ptx"));
/// PTX of kernels/gemv_nf4.cu.
const GEMV_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/gemv_nf4.ptx"));
/// PTX of kernels/norm.cu.
const NORM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/norm.ptx"));
/// PTX of kernels/quantize_nf4.cu.
const QUANTIZE_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/quantize_nf4.ptx"));
/// PTX of kernels/rotary.cu.
const ROTARY_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/rotary.ptx"));
/// PTX of kernels/repack_nf4.cu.
const REPACK_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/repack_nf4.ptx"));

/// What can go wrong preparing or launching a kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("NF4 tensor `{name}`: {problem}")]
    InvalidNf4 { name: String, problem: String },
    #[error("NF4 tensor `{name}`: {device:?} is not a CUDA device; use the nf4 crate on the CPU")]
    NotCuda {
        name: String,
        device: candle_core::DeviceLocation,
    },
    #[error("NF4 tensor `{name}`: {dtype:?} is not supported here; use f32, f16 or bf16")]
    UnsupportedDtype {
        name: String,
        dtype: candle_core::DType,
    },
    #[error("NF4 tensor `{name}`: {problem}")]
    BadInput { name: String, problem: String },
    #[error("decode attention: {0}")]
    Attention(String),
    #[error("cannot quantize `{name}`: {source}")]
    Quantize {
        name: String,
        #[source]
        source: nf4::Nf4Error,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The CUDA device for a GPU test, or `None` after saying the test was skipped. The message goes straight to
/// stderr so that `cargo test` shows it even for a passing test. GLM_REQUIRE_GPU=1 (scripts/gpu-run.sh sets it)
/// makes a missing device a failure, so that a broken GPU run cannot pass by skipping.
pub fn cuda_device_or_skip(test: &str) -> Option<candle_core::Device> {
    match candle_core::Device::new_cuda(0) {
        Ok(device) => Some(device),
        Err(err) if std::env::var_os("GLM_REQUIRE_GPU").is_some() => {
            panic!("{test}: GLM_REQUIRE_GPU is set but CUDA device 0 failed to start: {err}")
        }
        Err(err) => {
            // candle appends a backtrace to the message when RUST_BACKTRACE is set: keep the first line.
            let err = err.to_string();
            let reason = err.lines().next().unwrap_or_default();
            let _ = writeln!(
                std::io::stderr(),
                "{test}: skipped: no CUDA device ({reason})"
            );
            None
        }
    }
}
