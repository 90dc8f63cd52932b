//! The GPU tests of glm-kernels, one binary (each CUDA test binary is ~39 MB, and the pack carried to the GPU
//! machine is limited): every kernel against its CPU reference in crates/nf4, and candle's cuBLAS matmul against
//! the CPU. Without a CUDA device each test prints that it was skipped (GLM_REQUIRE_GPU=1 makes that a failure).

mod common;

mod attention;
mod cublas;
mod decode;
mod dequantize;
mod gemm;
mod matmul;
mod quantize;
