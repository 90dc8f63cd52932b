//! `CudaNf4Tensor::quantize` (kernels/quantize_nf4.cu) against the nf4 crate's CPU quantize: byte-equal codes,
//! absmax, nested codes, scales and offset for f32/f16/bf16, blocksizes 32 to 4096, partial last blocks, zeros,
//! outliers, tiny and huge values; the same errors for bad input.

use candle_core::{DType, Device, Tensor};
use glm_kernels::{CudaNf4Tensor, KernelError};
use half::{bf16, f16};
use nf4::{Nf4Error, Nf4Tensor, QuantOptions};

use crate::common::{cuda_device_or_skip, weights, NAME};

fn options(blocksize: usize, double_quant: bool) -> QuantOptions {
    QuantOptions {
        blocksize,
        double_quant,
        ..QuantOptions::default()
    }
}

/// Quantizes `values` of `shape` as `dtype` on the GPU and on the CPU and requires the same tensor.
fn check(gpu: &Device, values: &[f32], shape: &[usize], dtype: DType, opts: &QuantOptions) {
    let on_cpu = Tensor::from_slice(values, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let flat = on_cpu.flatten_all().unwrap();
    let want = match dtype {
        DType::F32 => Nf4Tensor::quantize_f32(&flat.to_vec1::<f32>().unwrap(), shape, opts),
        DType::F16 => Nf4Tensor::quantize_f16(&flat.to_vec1::<f16>().unwrap(), shape, opts),
        _ => Nf4Tensor::quantize_bf16(&flat.to_vec1::<bf16>().unwrap(), shape, opts),
    }
    .unwrap();
    let got = CudaNf4Tensor::quantize(NAME, &on_cpu.to_device(gpu).unwrap(), opts)
        .unwrap()
        .to_host()
        .unwrap();
    let case = format!("{dtype:?} {shape:?} {opts:?}");
    assert_eq!(got.packed(), want.packed(), "{case}: codes differ");
    assert_eq!(
        got.absmax_state(),
        want.absmax_state(),
        "{case}: absmax differs"
    );
    assert_eq!(got, want, "{case}: tensors differ");
}

#[test]
fn gpu_quantize_matches_the_cpu_byte_for_byte() {
    let Some(gpu) = cuda_device_or_skip("gpu_quantize_matches_the_cpu_byte_for_byte") else {
        return;
    };
    // Odd counts (a padded last byte), partial last blocks, tiled 2-D weights, several nested blocks.
    let shapes: &[&[usize]] = &[
        &[1],
        &[7],
        &[33, 65],
        &[2, 3, 129],
        &[48, 320],
        &[160, 1088],
        &[70001],
    ];
    for shape in shapes {
        let values = weights(shape.iter().product());
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for blocksize in [32, 64, 128, 256, 4096] {
                for double_quant in [true, false] {
                    check(
                        &gpu,
                        &values,
                        shape,
                        dtype,
                        &options(blocksize, double_quant),
                    );
                }
            }
        }
    }
    // More absmax values than torch's parallel grain (32768), as in real layers.
    let values = weights(2048 * 1088);
    check(
        &gpu,
        &values,
        &[2048, 1088],
        DType::BF16,
        &options(64, true),
    );
}

#[test]
fn gpu_quantize_handles_zeros_and_extreme_magnitudes() {
    let Some(gpu) = cuda_device_or_skip("gpu_quantize_handles_zeros_and_extreme_magnitudes") else {
        return;
    };
    let n = 64 * 40 + 5;
    let zeros = vec![0.0f32; n];
    let tiny: Vec<f32> = weights(n).iter().map(|v| v * 1e-40).collect();
    let huge: Vec<f32> = weights(n).iter().map(|v| v * 1e35).collect();
    let mixed: Vec<f32> = weights(n)
        .iter()
        .enumerate()
        .map(|(i, v)| if (i / 64) % 2 == 0 { v * 1e-30 } else { *v })
        .collect();
    for values in [&zeros, &tiny, &huge, &mixed] {
        for double_quant in [true, false] {
            check(&gpu, values, &[n], DType::F32, &options(64, double_quant));
        }
    }
}

/// The quantized tensor is directly usable: its matmul agrees with that of the CPU-quantized upload.
#[test]
fn gpu_quantized_weight_multiplies() {
    let Some(gpu) = cuda_device_or_skip("gpu_quantized_weight_multiplies") else {
        return;
    };
    let w = Tensor::from_slice(&weights(64 * 256), (64, 256), &gpu)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    let q = CudaNf4Tensor::quantize(NAME, &w, &QuantOptions::default()).unwrap();
    let x = Tensor::randn(0f32, 1.0, (3, 256), &gpu)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    let got = q.matmul(&x).unwrap().to_dtype(DType::F32).unwrap();
    let want = x
        .matmul(&q.dequantize(DType::F16).unwrap().t().unwrap())
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let max_abs = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let (diff, scale) = (max_abs(&(got - &want).unwrap()), max_abs(&want));
    assert!(
        diff <= 2e-3 * scale,
        "GEMV of a GPU-quantized weight off by {diff} (scale {scale})"
    );
    assert_eq!(q.dtype(), nf4::FloatDtype::F16);
    assert_eq!(q.device_bytes(), 64 * 256 / 2 + 64 * 256 / 64 + 4 + 256 * 4);
}

#[test]
fn gpu_quantize_refuses_what_the_cpu_refuses() {
    let Some(gpu) = cuda_device_or_skip("gpu_quantize_refuses_what_the_cpu_refuses") else {
        return;
    };
    let mut values = weights(1000);
    values[777] = f32::NAN;
    values[901] = f32::INFINITY;
    let bad = Tensor::from_slice(&values, 1000, &gpu).unwrap();
    match CudaNf4Tensor::quantize(NAME, &bad, &QuantOptions::default()) {
        Err(KernelError::Quantize {
            source: Nf4Error::NonFinite { index: 777, value },
            ..
        }) if value.is_nan() => {}
        other => panic!("NaN at 777 must be reported, got {:?}", other.err()),
    }
    // The mean of the absmax values overflows f32: bitsandbytes' double quant cannot store it.
    let huge = Tensor::from_slice(&[3e38f32; 64 * 4], 64 * 4, &gpu).unwrap();
    assert!(matches!(
        CudaNf4Tensor::quantize(NAME, &huge, &QuantOptions::default()),
        Err(KernelError::Quantize {
            source: Nf4Error::OffsetOverflow,
            ..
        })
    ));
    let empty = Tensor::zeros((0, 64), DType::F32, &gpu).unwrap();
    let odd_blocksize = Tensor::zeros(64, DType::F32, &gpu).unwrap();
    let integer = Tensor::zeros(64, DType::U8, &gpu).unwrap();
    let on_cpu = Tensor::zeros(64, DType::F32, &Device::Cpu).unwrap();
    let cases = [
        (empty, options(64, true), "empty"),
        (odd_blocksize, options(48, true), "blocksize 48"),
        (integer, options(64, true), "U8"),
        (on_cpu, options(64, true), "not a CUDA device"),
    ];
    for (tensor, opts, want) in cases {
        match CudaNf4Tensor::quantize(NAME, &tensor, &opts) {
            Err(err) => {
                let msg = err.to_string();
                assert!(
                    msg.contains(want) && msg.contains(NAME),
                    "unexpected message: {msg}"
                );
            }
            Ok(_) => panic!("expected a refusal containing {want:?}"),
        }
    }
}
