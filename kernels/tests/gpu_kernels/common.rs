//! Shared by the GPU test modules.

pub use glm_kernels::cuda_device_or_skip;

use candle_core::{DType, Device, Storage, Tensor};
use glm_kernels::{device_pointer, CudaNf4Tensor, DevicePointer, HostNf4, KernelError};
use nf4::{Nf4Tensor, QuantOptions};

/// Weight name used in the tests' NF4 tensors (error messages must name it).
pub const NAME: &str = "model.layers.0.mlp.down_proj.weight";

/// Fresh random values (normal, every 997th one a large outlier, one all-zero stretch) for every call.
pub fn weights(numel: usize) -> Vec<f32> {
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

/// All elements of a tensor as f64 on the CPU.
pub fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F64))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("tensor readable on the CPU")
}

/// ‖got − want‖ / ‖want‖, in f64 (the absolute ‖got − want‖ when want is all zeros).
pub fn relative_error(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len(), "element counts differ");
    assert!(got.iter().all(|x| x.is_finite()), "non-finite output");
    let diff: f64 = got.iter().zip(want).map(|(g, w)| (g - w) * (g - w)).sum();
    let norm: f64 = want.iter().map(|w| w * w).sum();
    (diff / if norm > 0.0 { norm } else { 1.0 }).sqrt()
}

/// The device address of a contiguous CUDA tensor.
pub fn ptr(t: &Tensor) -> DevicePointer {
    assert!(t.is_contiguous());
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*storage else {
        panic!("not on the GPU")
    };
    let base = match t.dtype() {
        DType::F32 => device_pointer(s.as_cuda_slice::<f32>().unwrap(), &s.device),
        DType::F16 => device_pointer(s.as_cuda_slice::<half::f16>().unwrap(), &s.device),
        DType::BF16 => device_pointer(s.as_cuda_slice::<half::bf16>().unwrap(), &s.device),
        DType::U32 => device_pointer(s.as_cuda_slice::<u32>().unwrap(), &s.device),
        DType::U8 => device_pointer(s.as_cuda_slice::<u8>().unwrap(), &s.device),
        other => panic!("{other:?}"),
    };
    base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64
}

/// A weight quantized on the CPU and uploaded, with its f32 dequantized values for the reference.
pub struct Weight {
    pub gpu: CudaNf4Tensor,
    pub dequantized: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

pub fn weight(
    gpu: &Device,
    rows: usize,
    cols: usize,
    blocksize: usize,
    double_quant: bool,
) -> Weight {
    let opts = QuantOptions {
        blocksize,
        double_quant,
        ..QuantOptions::default()
    };
    let quantized = Nf4Tensor::quantize_f32(&weights(rows * cols), &[rows, cols], &opts).unwrap();
    Weight {
        gpu: CudaNf4Tensor::upload(&HostNf4::from_nf4(NAME, &quantized).unwrap(), gpu).unwrap(),
        dequantized: quantized.dequantize_f32(),
        rows,
        cols,
    }
}

/// Relative error of `w.gpu.matmul(x)` for an x of `dims` (last = cols) in `dtype`, after checking the output's
/// shape, dtype and device.
pub fn matmul_error(gpu: &Device, w: &Weight, dims: &[usize], dtype: DType) -> f64 {
    let x = Tensor::randn(0f32, 1.0, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let got = w.gpu.matmul(&x.to_device(gpu).unwrap()).unwrap();
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().unwrap() = w.rows;
    assert_eq!((got.dims(), got.dtype()), (&out_dims[..], dtype));
    assert!(got.device().is_cuda());
    relative_error(&to_f64(&got), &cpu_product(w, &x))
}

/// `x · Wᵀ` in f64 on the CPU, from x's values (as rounded to its dtype) and the CPU-dequantized weight.
pub fn cpu_product(w: &Weight, x: &Tensor) -> Vec<f64> {
    to_f64(x)
        .chunks(w.cols)
        .flat_map(|row| {
            w.dequantized.chunks(w.cols).map(move |wrow| {
                row.iter()
                    .zip(wrow)
                    .map(|(a, &b)| a * f64::from(b))
                    .sum::<f64>()
            })
        })
        .collect()
}

/// Asserts that `result` is a refusal (bad input or unsupported dtype) whose message names the test weight and
/// contains `want`.
pub fn assert_refused(result: Result<Tensor, KernelError>, want: &str) {
    match result {
        Err(err @ (KernelError::BadInput { .. } | KernelError::UnsupportedDtype { .. })) => {
            let msg = err.to_string();
            assert!(
                msg.contains(want) && msg.contains(NAME),
                "unexpected message: {msg}"
            );
        }
        other => panic!(
            "expected a refusal containing {want:?}, got {:?}",
            other.map(|t| t.dims().to_vec())
        ),
    }
}

/// f16 keeps 11 significant bits (the tensor-core path rounds the codebook to the input type too), bf16 8;
/// f32 goes through the CUDA-core kernel in f32.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 2e-3,
        DType::BF16 => 1.5e-2,
        _ => 1e-5,
    }
}
