//! The fused NF4 prefill GEMM (kernels/gemm_nf4.cu) against the CPU: x (rounded to its dtype) times the nf4 crate's
//! f32 dequantized weight, in f64. Every block shape, token counts that leave partial blocks (9, 17, 100, 513),
//! K = 64 to 13696 (one tile to 214), N from one strip to more than a block, blocksizes 64/128/256, double quant
//! on and off, f16 and bf16, outliers and zeros (common::weights); and `matmul` itself, whichever path it picks.

use candle_core::{DType, Device, Tensor};
use glm_kernels::FUSED_GEMM_BLOCK_TOKENS;

use crate::common::{
    assert_refused, cpu_product, cuda_device_or_skip, relative_error, to_f64, tolerance, weight,
    Weight,
};

/// Random x of `tokens` rows for `w` in `dtype` and its product with the CPU-dequantized weight, in f64.
fn input_and_product(w: &Weight, tokens: usize, dtype: DType) -> (Tensor, Vec<f64>) {
    let x = Tensor::randn(0f32, 1.0, (tokens, w.cols), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let want = cpu_product(w, &x);
    (x, want)
}

#[test]
fn fused_gemm_matches_the_cpu() {
    let Some(gpu) = cuda_device_or_skip("fused_gemm_matches_the_cpu") else {
        return;
    };
    // [N, K] x token counts: the large weights only with fewer tokens (the CPU reference is slow).
    let cases: [(usize, usize, &[usize]); 4] = [
        (16, 64, &[9, 17, 100, 513]),
        (48, 4160, &[9, 17, 100, 513]),
        (272, 13696, &[17, 100]),
        (4608, 4096, &[9, 17]),
    ];
    for (rows, cols, token_counts) in cases {
        for blocksize in [64, 128, 256] {
            for double_quant in [true, false] {
                let w = weight(&gpu, rows, cols, blocksize, double_quant);
                for &tokens in token_counts {
                    for dtype in [DType::F16, DType::BF16] {
                        let case = format!(
                            "[{rows}, {cols}] blocksize {blocksize} double quant {double_quant}, \
                             {tokens} tokens {dtype:?}"
                        );
                        let (x, want) = input_and_product(&w, tokens, dtype);
                        let x = x.to_device(&gpu).unwrap();
                        for &block_tokens in FUSED_GEMM_BLOCK_TOKENS {
                            let got = w.gpu.fused_gemm(&x, block_tokens).unwrap();
                            assert_eq!((got.dims(), got.dtype()), (&[tokens, rows][..], dtype));
                            let err = relative_error(&to_f64(&got), &want);
                            assert!(
                                err < tolerance(dtype),
                                "{case}, {block_tokens} a block: relative error {err:.2e}"
                            );
                        }
                        // And through matmul, on whichever path its rule picks.
                        let err = relative_error(&to_f64(&w.gpu.matmul(&x).unwrap()), &want);
                        assert!(
                            err < tolerance(dtype),
                            "{case}, matmul: relative error {err:.2e}"
                        );
                    }
                }
            }
        }
    }
}

/// Inputs the fused GEMM does not take are refused with the weight's name and the reason.
#[test]
fn fused_gemm_refuses_what_it_cannot_do() {
    let Some(gpu) = cuda_device_or_skip("fused_gemm_refuses_what_it_cannot_do") else {
        return;
    };
    let tiled = weight(&gpu, 16, 64, 64, true);
    let untiled = weight(&gpu, 20, 64, 64, true);
    let x = |dtype: DType| Tensor::zeros((32, 64), dtype, &gpu).unwrap();
    // Contiguous, but one element past an allocation's (aligned) start.
    let misaligned = Tensor::zeros(32 * 64 + 1, DType::F16, &gpu)
        .unwrap()
        .narrow(0, 1, 32 * 64)
        .unwrap()
        .reshape((32, 64))
        .unwrap();
    for (w, x, block_tokens, want) in [
        (&untiled, x(DType::F16), 64, "tiled"),
        (&tiled, x(DType::F32), 64, "f16 or bf16"),
        (&tiled, x(DType::F16), 24, "tokens a block"),
        (
            &tiled,
            x(DType::F16).narrow(1, 1, 63).unwrap(),
            64,
            "last dimension",
        ),
        (&tiled, misaligned, 64, "aligned"),
    ] {
        assert_refused(w.gpu.fused_gemm(&x, block_tokens), want);
    }
}
