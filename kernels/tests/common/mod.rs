//! Shared by the GPU tests (each tests/gpu_*.rs is its own binary and uses what it needs).
#![allow(dead_code)]

use std::io::Write;

use candle_core::{DType, Device, Tensor};

/// The CUDA device for a GPU test, or `None` after saying the test was skipped. The message goes straight to
/// stderr so that `cargo test` shows it even for a passing test. GLM_REQUIRE_GPU=1 (scripts/gpu-run.sh sets it)
/// makes a missing device a failure, so that a broken GPU run cannot pass by skipping.
pub fn cuda_device_or_skip(test: &str) -> Option<Device> {
    match Device::new_cuda(0) {
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

/// ‖got − want‖ / ‖want‖ over all elements, in f64 on the CPU.
pub fn relative_error(got: &Tensor, want: &Tensor) -> f64 {
    let flat = |t: &Tensor| -> Vec<f64> {
        t.to_device(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F64))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .expect("tensor readable on the CPU")
    };
    let (got, want) = (flat(got), flat(want));
    assert_eq!(got.len(), want.len(), "element counts differ");
    assert!(got.iter().all(|x| x.is_finite()), "non-finite output");
    let diff: f64 = got.iter().zip(&want).map(|(g, w)| (g - w) * (g - w)).sum();
    let norm: f64 = want.iter().map(|w| w * w).sum();
    (diff / norm).sqrt()
}
