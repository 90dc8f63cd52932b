//! Shared by the GPU test modules.

pub use glm_kernels::cuda_device_or_skip;

use candle_core::{DType, Device, Storage, Tensor};
use glm_kernels::{device_pointer, DevicePointer};

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
