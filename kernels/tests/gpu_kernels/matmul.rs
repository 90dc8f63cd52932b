//! `CudaNf4Tensor::matmul` against the CPU: x (rounded to its dtype) times the nf4 crate's f32 dequantized weight,
//! in f64. Decode rows 1..=8 through the tiled tensor-core GEMV (every split of a strip among warps) and the generic
//! kernel, 3-D inputs, prefill rows through dequantize + cuBLAS; awkward shapes,
//! blocksizes 32 to 256, double quant on and off, outliers, zeros.

use candle_core::{DType, Device, Tensor};
use glm_kernels::{CudaNf4Tensor, GemvInput, HostNf4};
use nf4::{Nf4Tensor, QuantOptions};

use crate::common::{
    assert_refused, cpu_product, cuda_device_or_skip, matmul_error, ptr, relative_error, to_f64,
    tolerance, weight, Weight, NAME,
};

fn check_all_rows(gpu: &Device, w: &Weight, case: &str) {
    for dtype in [DType::F16, DType::BF16, DType::F32] {
        for rows in 1..=9 {
            let err = matmul_error(gpu, w, &[rows, w.cols], dtype);
            assert!(
                err < tolerance(dtype),
                "{case} {dtype:?} x rows {rows}: relative error {err:.2e}"
            );
        }
    }
}

/// Weights the device keeps tiled (rows % 16 == 0, cols % 64 == 0, blocksize >= 64): the tensor-core GEMV, with
/// tile counts that do not divide evenly among warps, the largest GLM-4-9B row length, and enough strips for
/// the launch to give each strip fewer warps (down to one) and each block several rounds of strips.
#[test]
fn tiled_gemv_matches_the_cpu() {
    let Some(gpu) = cuda_device_or_skip("tiled_gemv_matches_the_cpu") else {
        return;
    };
    // Strips x tiles: 1 x 1, 3 x 5, 10 x 17, 4 x 214 (16 warps a strip), 700 x 10 (8), 1500 x 4 (4), 600 x 3 (2),
    // 4300 x 1 (1: each warp owns its strips).
    let small = [(16, 64), (48, 320), (160, 1088), (64, 13696)];
    let large = [
        (16 * 700, 640),
        (16 * 1500, 256),
        (16 * 600, 192),
        (16 * 4300, 64),
    ];
    for (rows, cols) in small.into_iter().chain(large) {
        // The large ones only in the default layout: their CPU reference is slow.
        let options: &[(usize, bool)] = if rows * cols > 1 << 20 {
            &[(64, true)]
        } else {
            &[
                (64, true),
                (64, false),
                (128, true),
                (128, false),
                (256, true),
                (256, false),
            ]
        };
        for &(blocksize, double_quant) in options {
            let w = weight(&gpu, rows, cols, blocksize, double_quant);
            let case =
                format!("[{rows}, {cols}] blocksize {blocksize} double quant {double_quant}");
            check_all_rows(&gpu, &w, &case);
        }
    }
}

/// Shapes and blocksizes the tiled kernel does not take: the generic kernel (and the prefill path).
#[test]
fn generic_gemv_matches_the_cpu() {
    let Some(gpu) = cuda_device_or_skip("generic_gemv_matches_the_cpu") else {
        return;
    };
    for (rows, cols, blocksize) in [
        (33, 65, 64),
        (7, 100, 128),
        (16, 96, 64),
        (20, 128, 64),
        (32, 256, 32),
        (1, 3, 64),
    ] {
        for double_quant in [true, false] {
            let w = weight(&gpu, rows, cols, blocksize, double_quant);
            let case =
                format!("[{rows}, {cols}] blocksize {blocksize} double quant {double_quant}");
            check_all_rows(&gpu, &w, &case);
        }
    }
}

/// 3-D inputs (a batch of sequences), decode-sized and prefill-sized, and an all-zero weight.
#[test]
fn matmul_takes_batches_and_prefill_rows() {
    let Some(gpu) = cuda_device_or_skip("matmul_takes_batches_and_prefill_rows") else {
        return;
    };
    let w = weight(&gpu, 96, 512, 64, true);
    for dims in [[2, 3, 512], [1, 8, 512], [2, 20, 512], [3, 100, 512]] {
        for dtype in [DType::F16, DType::BF16, DType::F32] {
            let err = matmul_error(&gpu, &w, &dims, dtype);
            assert!(
                err < tolerance(dtype),
                "x {dims:?} {dtype:?}: relative error {err:.2e}"
            );
        }
    }
    let zeros =
        Nf4Tensor::quantize_f32(&[0.0; 32 * 128], &[32, 128], &QuantOptions::default()).unwrap();
    let zeros = CudaNf4Tensor::upload(&HostNf4::from_nf4(NAME, &zeros).unwrap(), &gpu).unwrap();
    for rows in [1, 8, 40] {
        let x = Tensor::randn(0f32, 1.0, (rows, 128), &gpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let y = to_f64(&zeros.matmul(&x).unwrap());
        assert!(
            y.iter().all(|&v| v == 0.0),
            "zero weight, {rows} rows: nonzero output"
        );
    }
}

#[test]
fn matmul_rejects_bad_inputs() {
    let Some(gpu) = cuda_device_or_skip("matmul_rejects_bad_inputs") else {
        return;
    };
    let w = weight(&gpu, 16, 64, 64, true);
    let bad_width = Tensor::zeros((1, 65), DType::F16, &gpu).unwrap();
    let integer = Tensor::zeros((1, 64), DType::U32, &gpu).unwrap();
    let on_cpu = Tensor::zeros((1, 64), DType::F16, &Device::Cpu).unwrap();
    for (x, want) in [
        (bad_width, "last dimension must be 64"),
        (integer, "U32"),
        (on_cpu, "move the input first"),
    ] {
        assert_refused(w.gpu.matmul(&x), want);
    }
}

/// A group GEMV (q, k and v of one input in one launch) gives each weight's product with x: 1 to 3 weights of
/// different heights (strips of one weight shared out with another's among a block's warps), plain and
/// double-quantized scales, batches 1..8. Groups the tiled kernel cannot take (a weight it does not take, widths or
/// blocksizes that differ, more than three weights) are refused without a launch.
#[test]
fn group_gemv_matches_the_cpu() {
    let Some(gpu) = cuda_device_or_skip("group_gemv_matches_the_cpu") else {
        return;
    };
    for (heights, cols, blocksize, double_quant) in [
        (&[4096, 256, 256][..], 4096, 64, true),
        (&[48, 16][..], 128, 128, false),
        (&[16, 800, 32][..], 320, 64, true),
        (&[160][..], 1088, 256, false),
    ] {
        let weights: Vec<Weight> = heights
            .iter()
            .map(|&rows| weight(&gpu, rows, cols, blocksize, double_quant))
            .collect();
        for dtype in [DType::F16, DType::BF16] {
            for batch in [1, 3, 8] {
                let x = Tensor::randn(0f32, 1.0, (batch, cols), &gpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let ys: Vec<Tensor> = heights
                    .iter()
                    .map(|&n| Tensor::zeros((batch, n), dtype, &gpu).unwrap())
                    .collect();
                let outputs: Vec<_> = weights
                    .iter()
                    .zip(&ys)
                    .map(|(w, y)| (&w.gpu, ptr(y)))
                    .collect();
                let launched = unsafe {
                    CudaNf4Tensor::gemv_group_into(&outputs, dtype, GemvInput::Rows(ptr(&x)), batch)
                }
                .unwrap();
                let case = format!("{heights:?} x {cols}, {dtype:?}, batch {batch}");
                assert!(launched, "{case}: not launched");
                for (i, (w, y)) in weights.iter().zip(&ys).enumerate() {
                    let err = relative_error(&to_f64(y), &cpu_product(w, &x));
                    assert!(
                        err < tolerance(dtype),
                        "{case}: weight {i}: relative error {err:.2e}"
                    );
                }
            }
        }
    }
    let tiled = weight(&gpu, 32, 128, 64, true);
    let untiled = weight(&gpu, 33, 128, 64, true);
    let wider = weight(&gpu, 32, 192, 64, true);
    let other_blocksize = weight(&gpu, 32, 128, 128, true);
    let x = Tensor::zeros((1, 128), DType::F16, &gpu).unwrap();
    let y = Tensor::zeros((1, 64), DType::F16, &gpu).unwrap();
    for (group, why) in [
        (
            vec![&tiled, &untiled],
            "a weight the tiled kernel does not take",
        ),
        (vec![&tiled, &wider], "widths that differ"),
        (vec![&tiled, &other_blocksize], "blocksizes that differ"),
        (vec![&tiled; 4], "four weights"),
    ] {
        let outputs: Vec<_> = group.iter().map(|w| (&w.gpu, ptr(&y))).collect();
        let launched = unsafe {
            CudaNf4Tensor::gemv_group_into(&outputs, DType::F16, GemvInput::Rows(ptr(&x)), 1)
        }
        .unwrap();
        assert!(!launched, "{why}: launched");
    }
}
