//! glm-run's CUDA kernels for NF4 weights resident on the GPU.
//!
//! [`CudaNf4Tensor`] holds a weight's packed 4-bit codes and (double-quantized) scales on a CUDA device and
//! offers the operations a decoder needs: [`CudaNf4Tensor::matmul`] (fused GEMV for up to 8 rows, a fused GEMM or
//! dequantize + cuBLAS beyond), [`CudaNf4Tensor::dequantize`], [`CudaNf4Tensor::quantize`] (on the device, byte-identical to the nf4
//! crate) and [`CudaNf4Tensor::to_host`].
//!
//! Each `kernels/*.cu` is compiled by build.rs into a fatbin (SASS for sm_90, so nothing is JIT-compiled on a
//! Hopper GPU, and PTX for newer ones) and embedded here; the first launch on a device loads its module. Only built with glm's `cuda` feature: it
//! needs nvcc (scripts/cuda-toolchain.sh) at build time and a CUDA driver at run time. Without this crate's
//! `cuda` feature it is empty, so that `cargo build --workspace` on a machine without CUDA still works.
#![cfg(feature = "cuda")]

mod attention;
mod decode;
mod dequantize;
mod gemm;
mod launch;
mod layout;
mod matmul;
mod quantize;
mod sampling;
mod tensor;

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaModule};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::WrapErr;

pub use attention::decode_attention;
pub use decode::{
    argmax_scratch_bytes, attention_scratch_bytes, device_pointer, AttentionAt, DecodeKernels,
    DenseGemv, DevicePointer, GemvInput, NormedInput, RotaryKvWrite, DENSE_MAX_ROWS, NORM_MAX_DIM,
};
pub use gemm::FUSED_GEMM_BLOCK_TOKENS;
pub use matmul::{GEMV_GROUP, GEMV_MAX_ROWS};
pub use sampling::{sampling_scratch_bytes, SampleParams, SampleRows, SamplingKernels};
pub use tensor::{CudaNf4Tensor, HostAbsmax, HostNf4};

/// One kernels/*.cu as build.rs compiled it: a fatbin with SASS for sm_90 and PTX for newer GPUs.
pub(crate) struct Module {
    name: &'static str,
    image: &'static [u8],
}

macro_rules! module {
    ($stem:literal) => {
        Module {
            name: $stem,
            image: include_bytes!(concat!(env!("OUT_DIR"), "/", $stem, ".fatbin")),
        }
    };
}

pub(crate) const ACTIVATION: Module = module!("activation");
pub(crate) const ARGMAX: Module = module!("argmax");
pub(crate) const ATTENTION: Module = module!("attention");
pub(crate) const DEQUANTIZE: Module = module!("dequantize");
pub(crate) const EMBEDDING: Module = module!("embedding");
pub(crate) const GEMM_NF4: Module = module!("gemm_nf4");
pub(crate) const GEMV_DENSE: Module = module!("gemv_dense");
pub(crate) const GEMV_NF4: Module = module!("gemv_nf4");
pub(crate) const NORM: Module = module!("norm");
pub(crate) const QUANTIZE: Module = module!("quantize_nf4");
pub(crate) const REPACK: Module = module!("repack_nf4");
pub(crate) const ROTARY: Module = module!("rotary");
pub(crate) const SAMPLING: Module = module!("sampling");

impl Module {
    /// Kernel `function` of this module on `dev`'s CUDA context; the module is loaded once per context and
    /// kept for the process (the cache holds the context alive, so its address stays a valid key).
    pub(crate) fn function(
        &self,
        dev: &candle_core::CudaDevice,
        function: &str,
    ) -> candle_core::Result<CudaFunction> {
        type Loaded = HashMap<(usize, &'static str), Arc<CudaModule>>;
        static LOADED: OnceLock<Mutex<Loaded>> = OnceLock::new();
        let context = dev.cuda_stream().context().clone();
        let key = (Arc::as_ptr(&context) as usize, self.name);
        let module = {
            let mut loaded = LOADED
                .get_or_init(Default::default)
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            match loaded.get(&key) {
                Some(module) => module.clone(),
                None => {
                    let module = context
                        .load_module(Ptx::from_binary(self.image.to_vec()))
                        .w()?;
                    loaded.insert(key, module.clone());
                    module
                }
            }
        };
        module.load_function(function).w()
    }
}

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
