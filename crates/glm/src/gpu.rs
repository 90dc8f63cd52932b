//! CUDA device memory as the driver reports it: the planner's budget, the usage measured while a model
//! loads and runs, and allocation failures turned into [`GlmError::OutOfMemory`] with numbers.
//!
//! Without the `cuda` feature there is no CUDA device: every query answers `None`.

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::Device;

use crate::error::{GlmError, Result};
use crate::plan::human_bytes;

/// Free and total memory of a CUDA device, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceMemory {
    pub free: u64,
    pub total: u64,
}

impl DeviceMemory {
    /// Bytes in use on the device, by every process.
    pub fn used(&self) -> u64 {
        self.total.saturating_sub(self.free)
    }
}

/// The driver's free and total memory of `device` once its queued work is done; None on the CPU.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
pub fn device_memory(device: &Device) -> Result<Option<DeviceMemory>> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cuda) = device {
        // Freed buffers return to the driver at a synchronization point (the stream-ordered pool
        // keeps nothing past one), so synchronize first to count only what is still held.
        device.synchronize()?;
        let (free, total) = cuda
            .cuda_stream()
            .context()
            .mem_get_info()
            .map_err(|e| candle_core::Error::Cuda(Box::new(e)))?;
        return Ok(Some(DeviceMemory {
            free: free as u64,
            total: total as u64,
        }));
    }
    Ok(None)
}

/// Device memory a model used, measured with the driver (used memory minus what was used when its
/// load began), in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MeasuredMemory {
    /// Held once the load finished: weights and what the runtime keeps.
    pub after_load: u64,
    /// The most seen while loading, sampled after each tensor.
    pub peak_load: u64,
    /// The most seen so far, KV cache and prefill included (sampled after each prefill).
    pub peak: u64,
}

/// Follows the device memory of one model from the start of its load.
#[derive(Debug)]
pub(crate) struct MemoryTracker {
    device: Device,
    baseline: u64,
    after_load: AtomicU64,
    peak_load: AtomicU64,
    peak: AtomicU64,
}

impl MemoryTracker {
    /// Starts measuring on `device`; None where the driver has no figures (the CPU).
    pub(crate) fn start(device: &Device) -> Result<Option<Self>> {
        Ok(device_memory(device)?.map(|m| Self {
            device: device.clone(),
            baseline: m.used(),
            after_load: AtomicU64::new(0),
            peak_load: AtomicU64::new(0),
            peak: AtomicU64::new(0),
        }))
    }

    /// Reads the usage now and raises the peak; returns the bytes used beyond the baseline.
    pub(crate) fn sample(&self) -> Result<u64> {
        let used =
            device_memory(&self.device)?.map_or(0, |m| m.used().saturating_sub(self.baseline));
        self.peak.fetch_max(used, Ordering::Relaxed);
        Ok(used)
    }

    /// Marks the end of the load: what is held now, and the peak so far as the load's peak.
    pub(crate) fn finish_load(&self) -> Result<()> {
        let used = self.sample()?;
        self.after_load.store(used, Ordering::Relaxed);
        self.peak_load
            .store(self.peak.load(Ordering::Relaxed), Ordering::Relaxed);
        Ok(())
    }

    pub(crate) fn measured(&self) -> MeasuredMemory {
        MeasuredMemory {
            after_load: self.after_load.load(Ordering::Relaxed),
            peak_load: self.peak_load.load(Ordering::Relaxed),
            peak: self.peak.load(Ordering::Relaxed),
        }
    }
}

/// True when `error` is a failed device allocation (the driver's or cuBLAS's).
fn is_out_of_memory(error: &candle_core::Error) -> bool {
    let text = error.to_string();
    text.contains("CUDA_ERROR_OUT_OF_MEMORY") || text.contains("CUBLAS_STATUS_ALLOC_FAILED")
}

/// `error` as [`GlmError::OutOfMemory`] when a device allocation failed while `doing`, with the device's
/// numbers and the options that need less; any other error unchanged.
pub(crate) fn explain_out_of_memory(
    error: GlmError,
    device: &Device,
    doing: impl FnOnce() -> String,
) -> GlmError {
    match &error {
        GlmError::Candle(e) if is_out_of_memory(e) => {
            let numbers = match device_memory(device) {
                Ok(Some(m)) => format!(
                    "{} free of {} after the failed allocation",
                    human_bytes(m.free),
                    human_bytes(m.total)
                ),
                _ => "the driver reports no figures".into(),
            };
            GlmError::OutOfMemory(format!(
                "{} failed: the CUDA device ran out of memory ({numbers}); try --quant 4bit, a \
                 shorter --context, --quantize-lm-head or --embeddings-on-host, or free the device",
                doing()
            ))
        }
        _ => error,
    }
}

/// A kernel's error in the crate's terms: candle errors (allocation failures among them) stay candle
/// errors so that [`explain_out_of_memory`] sees them.
#[cfg(feature = "cuda")]
pub(crate) fn kernel_error(error: glm_kernels::KernelError) -> GlmError {
    match error {
        glm_kernels::KernelError::Candle(e) => GlmError::Candle(e),
        other => GlmError::Unsupported(other.to_string()),
    }
}
