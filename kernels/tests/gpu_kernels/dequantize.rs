//! kernels/dequantize.cu against the nf4 crate's CPU dequantize: bit-identical f32, f16 and bf16 on awkward
//! shapes, blocksizes 32 to 256, with and without double quant, in both device orders of the codes; upload then
//! `to_host` gives back the same bytes. Also the checks `upload` makes before touching a device.

use candle_core::{DType, Device};
use glm_kernels::{CudaNf4Tensor, HostAbsmax, HostNf4, KernelError};
use half::{bf16, f16};
use nf4::{FloatDtype, Nf4Tensor, QuantOptions};

use crate::common::{cuda_device_or_skip, weights, NAME};

/// Odd counts, a partial last block, several nested (256-block) groups, rank 1 to 3, and 2-D weights that are
/// kept tiled on the device (rows % 16 == 0, cols % 64 == 0) next to ones that are not.
const SHAPES: &[&[usize]] = &[
    &[1],
    &[7],
    &[33, 65],
    &[3, 1000],
    &[70001],
    &[2, 3, 129],
    &[16, 64],
    &[48, 320],
    &[272, 1088],
    &[16, 96],
];

fn bits<T: Copy, B: PartialEq + std::fmt::Debug>(values: &[T], to_bits: impl Fn(T) -> B) -> Vec<B> {
    values.iter().map(|&v| to_bits(v)).collect()
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
    assert_eq!(
        on_gpu.to_host().unwrap(),
        quantized,
        "{case}: upload + to_host changed the tensor"
    );
    assert_eq!(
        on_gpu.device_bytes(),
        quantized.size().total() - quantized.size().code_map,
        "{case}: device bytes are the stored parts less the 16-entry code map"
    );

    let dequantize = |dtype: DType| {
        let out = on_gpu.dequantize(dtype).unwrap();
        assert!(out.device().is_cuda(), "{case}: result left the GPU");
        assert_eq!((out.dims(), out.dtype()), (shape, dtype), "{case}");
        out.flatten_all().unwrap()
    };
    let got: Vec<f32> = dequantize(DType::F32).to_vec1().unwrap();
    assert_eq!(
        bits(&got, f32::to_bits),
        bits(&quantized.dequantize_f32(), f32::to_bits),
        "{case}: f32 differs from the nf4 crate"
    );
    let got: Vec<f16> = dequantize(DType::F16).to_vec1().unwrap();
    assert_eq!(
        bits(&got, f16::to_bits),
        bits(&quantized.dequantize_f16(), f16::to_bits),
        "{case}: f16 differs"
    );
    let got: Vec<bf16> = dequantize(DType::BF16).to_vec1().unwrap();
    assert_eq!(
        bits(&got, bf16::to_bits),
        bits(&quantized.dequantize_bf16(), bf16::to_bits),
        "{case}: bf16 differs"
    );
}

#[test]
fn dequantize_matches_the_cpu_reference_bit_for_bit() {
    let Some(gpu) = cuda_device_or_skip("dequantize_matches_the_cpu_reference_bit_for_bit") else {
        return;
    };
    for shape in SHAPES {
        for blocksize in [32, 64, 128, 256] {
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
    match on_gpu.dequantize(DType::U8) {
        Err(KernelError::UnsupportedDtype { .. }) => {}
        other => panic!(
            "u8 output must be refused, got {:?}",
            other.map(|t| t.dims().to_vec())
        ),
    }
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
        dtype: FloatDtype::F32,
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

fn upload_error(host: &HostNf4<'_>) -> KernelError {
    match CudaNf4Tensor::upload(host, &Device::Cpu) {
        Ok(_) => panic!("upload of {:?} must fail", host.shape),
        Err(err) => err,
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
        let err = upload_error(&host);
        let msg = err.to_string();
        assert!(
            matches!(err, KernelError::InvalidNf4 { .. })
                && msg.contains(want)
                && msg.contains(NAME),
            "expected InvalidNf4 containing {want:?}, got: {msg}"
        );
    }
}

#[test]
fn upload_refuses_the_cpu_and_fp4() {
    let err = upload_error(&nested(&[3, 5], 64, &[0; 8], &[0; 1], &[1.0]));
    assert!(matches!(err, KernelError::NotCuda { .. }), "{err}");

    let opts = QuantOptions {
        quant_type: nf4::QuantType::Fp4,
        ..QuantOptions::default()
    };
    let fp4 = Nf4Tensor::quantize_f32(&weights(100), &[100], &opts).unwrap();
    match HostNf4::from_nf4(NAME, &fp4) {
        Err(err) => assert!(err.to_string().contains("fp4"), "{err}"),
        Ok(_) => panic!("FP4 must be refused"),
    }
}
