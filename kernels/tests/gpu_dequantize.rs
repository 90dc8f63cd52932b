//! kernels/dequantize.cu launched through candle against the nf4 crate's CPU dequantize: bit-identical f32,
//! f16 and bf16 on awkward shapes, blocksizes 64/128/256, with and without double quant.

mod common;

use candle_core::{DType, Device, Tensor};
use common::cuda_device_or_skip;
use glm_kernels::{CudaNf4Tensor, HostAbsmax, HostNf4, KernelError};
use half::{bf16, f16};
use nf4::{Nf4Tensor, QuantOptions};

const NAME: &str = "model.layers.0.mlp.down_proj.weight";

/// Fresh random values (normal, with a few large outliers and one all-zero stretch) for every call.
fn weights(numel: usize) -> Vec<f32> {
    let mut values: Vec<f32> = Tensor::randn(0f32, 1.0, numel, &Device::Cpu)
        .unwrap()
        .to_vec1()
        .unwrap();
    for i in (0..numel).step_by(997) {
        values[i] *= 100.0;
    }
    let zeros = numel / 3..(numel / 3 + 300).min(numel);
    values[zeros].fill(0.0);
    values
}

/// Odd counts, a partial last block, several nested (256-block) groups, rank 1 to 3.
const SHAPES: &[&[usize]] = &[&[1], &[7], &[33, 65], &[3, 1000], &[70001], &[2, 3, 129]];

fn bits_f16(values: &[f16]) -> Vec<u16> {
    values.iter().map(|v| v.to_bits()).collect()
}

fn bits_bf16(values: &[bf16]) -> Vec<u16> {
    values.iter().map(|v| v.to_bits()).collect()
}

fn check(gpu: &Device, shape: &[usize], blocksize: usize, double_quant: bool) {
    let numel: usize = shape.iter().product();
    let opts = QuantOptions {
        blocksize,
        double_quant,
        ..QuantOptions::default()
    };
    let quantized = Nf4Tensor::quantize_f32(&weights(numel), shape, &opts).unwrap();
    let host = HostNf4::from_nf4(NAME, &quantized).unwrap();
    assert_eq!(
        matches!(host.absmax, HostAbsmax::Nested { .. }),
        double_quant
    );
    let on_gpu = CudaNf4Tensor::upload(&host, gpu).unwrap();
    let case = format!("shape {shape:?} blocksize {blocksize} double quant {double_quant}");

    let dequantize = |dtype: DType| {
        let out = on_gpu.dequantize(dtype).unwrap();
        assert!(out.device().is_cuda(), "{case}: result left the GPU");
        assert_eq!((out.dims(), out.dtype()), (shape, dtype), "{case}");
        out.flatten_all().unwrap()
    };
    let got: Vec<f32> = dequantize(DType::F32).to_vec1().unwrap();
    let want = quantized.dequantize_f32();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(
        bits(&got),
        bits(&want),
        "{case}: f32 differs from the nf4 crate"
    );
    let got: Vec<f16> = dequantize(DType::F16).to_vec1().unwrap();
    assert_eq!(
        bits_f16(&got),
        bits_f16(&quantized.dequantize_f16()),
        "{case}: f16 differs"
    );
    let got: Vec<bf16> = dequantize(DType::BF16).to_vec1().unwrap();
    assert_eq!(
        bits_bf16(&got),
        bits_bf16(&quantized.dequantize_bf16()),
        "{case}: bf16 differs"
    );
}

#[test]
fn dequantize_matches_the_cpu_reference_bit_for_bit() {
    let Some(gpu) = cuda_device_or_skip("dequantize_matches_the_cpu_reference_bit_for_bit") else {
        return;
    };
    for shape in SHAPES {
        for blocksize in [64, 128, 256] {
            for double_quant in [true, false] {
                check(&gpu, shape, blocksize, double_quant);
            }
        }
    }
}

#[test]
fn dequantize_refuses_integer_outputs() {
    let Some(gpu) = cuda_device_or_skip("dequantize_refuses_integer_outputs") else {
        return;
    };
    let quantized =
        Nf4Tensor::quantize_f32(&weights(100), &[100], &QuantOptions::default()).unwrap();
    let on_gpu =
        CudaNf4Tensor::upload(&HostNf4::from_nf4(NAME, &quantized).unwrap(), &gpu).unwrap();
    let err = on_gpu
        .dequantize(DType::U8)
        .err()
        .expect("u8 output must be refused");
    assert!(matches!(err, KernelError::UnsupportedDtype { .. }), "{err}");
}

const NESTED_MAP: [f32; 256] = [0.0; 256];

fn nested<'a>(
    shape: &'a [usize],
    blocksize: usize,
    packed: &'a [u8],
    codes: &'a [u8],
    nested_absmax: &'a [f32],
) -> HostNf4<'a> {
    HostNf4 {
        name: NAME,
        shape,
        blocksize,
        packed,
        absmax: HostAbsmax::Nested {
            codes,
            nested_absmax,
            nested_blocksize: 256,
            nested_map: &NESTED_MAP,
            offset: 0.0,
        },
    }
}

/// Sizes are checked before anything touches a device, so this runs without a GPU.
#[test]
fn upload_rejects_a_state_that_does_not_fit_the_shape() {
    let cases = [
        (
            nested(&[3, 5], 64, &[0; 7], &[0; 1], &[1.0]),
            "packed codes has 7 entries",
        ),
        (
            nested(&[3, 5], 48, &[0; 8], &[0; 1], &[1.0]),
            "blocksize 48 is not a power of two",
        ),
        (
            nested(&[300, 64], 64, &[0; 9600], &[0; 299], &[1.0, 1.0]),
            "absmax codes has 299 entries",
        ),
        (
            nested(&[300, 64], 64, &[0; 9600], &[0; 300], &[1.0]),
            "nested absmax has 1 entries",
        ),
        (
            HostNf4 {
                absmax: HostAbsmax::Plain(&[1.0; 2]),
                ..nested(&[3, 5], 64, &[0; 8], &[], &[])
            },
            "absmax has 2 entries",
        ),
    ];
    for (host, want) in cases {
        match CudaNf4Tensor::upload(&host, &Device::Cpu) {
            Err(err @ KernelError::InvalidNf4 { .. }) => {
                let msg = err.to_string();
                assert!(
                    msg.contains(want) && msg.contains(NAME),
                    "unexpected message: {msg}"
                );
            }
            other => panic!(
                "expected InvalidNf4 containing {want:?}, got {:?}",
                other.err()
            ),
        }
    }
}

#[test]
fn upload_refuses_the_cpu_and_fp4() {
    let host = nested(&[3, 5], 64, &[0; 8], &[0; 1], &[1.0]);
    let err = CudaNf4Tensor::upload(&host, &Device::Cpu)
        .err()
        .expect("a CPU device must be refused");
    assert!(matches!(err, KernelError::NotCuda { .. }), "{err}");

    let opts = QuantOptions {
        quant_type: nf4::QuantType::Fp4,
        ..QuantOptions::default()
    };
    let fp4 = Nf4Tensor::quantize_f32(&weights(100), &[100], &opts).unwrap();
    let err = HostNf4::from_nf4(NAME, &fp4)
        .err()
        .expect("FP4 must be refused");
    assert!(err.to_string().contains("fp4"), "{err}");
}
