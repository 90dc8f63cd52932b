//! candle's f16/bf16 matmul on CUDA (cuBLAS, the prefill path's second half) against an f32 CPU matmul of the same
//! rounded inputs.

use candle_core::{DType, Device, Tensor};

use crate::common::{cuda_device_or_skip, relative_error, to_f64};

/// Runs `lhs · rhs` (rhs given transposed, as a linear layer stores its weight) in `dtype` on the GPU and checks
/// it against the CPU in f32.
fn check_matmul(
    gpu: &Device,
    dtype: DType,
    lhs_dims: &[usize],
    weight_dims: &[usize],
    tolerance: f64,
) {
    let lhs = Tensor::randn(0f32, 1.0, lhs_dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let weight = Tensor::randn(0f32, 1.0, weight_dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    // Reference from the same rounded inputs, so only the product's own rounding is measured.
    let want = lhs
        .to_dtype(DType::F32)
        .unwrap()
        .broadcast_matmul(&weight.to_dtype(DType::F32).unwrap().t().unwrap())
        .unwrap();
    let got = lhs
        .to_device(gpu)
        .unwrap()
        .broadcast_matmul(&weight.to_device(gpu).unwrap().t().unwrap())
        .unwrap();
    assert_eq!(got.dtype(), dtype);
    assert_eq!(got.dims(), want.dims());
    let err = relative_error(&to_f64(&got), &to_f64(&want));
    println!("{dtype:?} {lhs_dims:?} x {weight_dims:?}^T: relative error {err:.2e}");
    assert!(
        err < tolerance,
        "{dtype:?} {lhs_dims:?} x {weight_dims:?}^T: relative error {err:.2e} ≥ {tolerance:.0e}"
    );
}

/// Decode (1 row), a small odd batch, a 3-D batch, and sizes that fit no tile evenly.
const SHAPES: &[(&[usize], &[usize])] = &[
    (&[1, 4096], &[4096, 4096]),
    (&[7, 333], &[129, 333]),
    (&[2, 5, 64], &[96, 64]),
    (&[37, 1000], &[513, 1000]),
];

#[test]
fn cublas_matmul_f16_matches_cpu() {
    let Some(gpu) = cuda_device_or_skip("cublas_matmul_f16_matches_cpu") else {
        return;
    };
    for (lhs, weight) in SHAPES {
        // f16 keeps 11 significant bits: output rounding alone is ~3e-4.
        check_matmul(&gpu, DType::F16, lhs, weight, 2e-3);
    }
}

#[test]
fn cublas_matmul_bf16_matches_cpu() {
    let Some(gpu) = cuda_device_or_skip("cublas_matmul_bf16_matches_cpu") else {
        return;
    };
    for (lhs, weight) in SHAPES {
        // bf16 keeps 8 significant bits: output rounding alone is ~2e-3.
        check_matmul(&gpu, DType::BF16, lhs, weight, 1e-2);
    }
}
