//! What the benchmark measures about the device itself: its name, its copy bandwidth (the roofline's
//! denominator) and, on CUDA, the driver's used memory polled on a thread (the peak between two samples
//! of the library would miss short-lived buffers).

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;

use crate::record::Stats;

/// `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(text: &str) -> Result<Device> {
    let cuda = |ordinal: usize| -> Result<Device> {
        if !candle_core::utils::cuda_is_available() {
            bail!("--device {text}: this glm-bench was built without CUDA; rebuild with --features cuda");
        }
        Device::new_cuda(ordinal)
            .with_context(|| format!("--device {text}: no CUDA device {ordinal}"))
    };
    match text {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        _ => match text.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => cuda(n),
            _ => bail!("--device {text}: expected cpu, cuda or cuda:N"),
        },
    }
}

/// The device's name as its driver gives it ("NVIDIA H100 80GB HBM3"), or the CPU's model name.
pub fn device_name(device: &Device) -> Result<String> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => Ok(cuda.cuda_stream().context().name()?),
        _ => Ok(cpu_name()),
    }
}

fn cpu_name() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("CPU {model} ({cores} threads)")
}

/// Bandwidth of copying a `bytes`-long buffer into another on `device`, counting bytes read plus bytes
/// written, once per repetition after one warm-up copy. The contents are a non-zero pattern (zeros can
/// move faster than data).
pub fn copy_bandwidth(device: &Device, bytes: usize, reps: usize) -> Result<Stats> {
    if bytes == 0 || reps == 0 {
        bail!("a copy bandwidth needs a buffer and at least one repetition");
    }
    let pattern: Vec<u8> = (0..bytes)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let seconds = match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda_copy_seconds(cuda, &pattern, reps)?,
        _ => {
            let mut dst = vec![1u8; bytes];
            let mut times = Vec::with_capacity(reps + 1);
            for _ in 0..=reps {
                let start = Instant::now();
                dst.copy_from_slice(std::hint::black_box(&pattern));
                std::hint::black_box(&mut dst);
                times.push(start.elapsed().as_secs_f64());
            }
            times.split_off(1)
        }
    };
    Stats::new(seconds.iter().map(|s| 2.0 * bytes as f64 / s).collect())
}

/// Seconds of each of `reps` device-to-device copies of `pattern`, timed with a synchronize on each side.
#[cfg(feature = "cuda")]
fn cuda_copy_seconds(
    cuda: &candle_core::CudaDevice,
    pattern: &[u8],
    reps: usize,
) -> Result<Vec<f64>> {
    let stream = cuda.cuda_stream();
    let src = stream.clone_htod(pattern)?;
    let mut dst = stream.alloc_zeros::<u8>(pattern.len())?;
    stream.memcpy_dtod(&src, &mut dst)?;
    stream.synchronize()?;
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps {
        let start = Instant::now();
        stream.memcpy_dtod(&src, &mut dst)?;
        stream.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok(times)
}

/// The driver's used device memory, polled every millisecond on a thread from [`DriverPoller::start`]
/// on; figures are bytes above the usage at the start.
#[cfg(feature = "cuda")]
pub struct DriverPoller {
    baseline: u64,
    peak: std::sync::Arc<std::sync::atomic::AtomicU64>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    context: std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaContext>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[cfg(feature = "cuda")]
impl DriverPoller {
    /// Starts polling on a CUDA device; None on the CPU.
    pub fn start(device: &Device) -> Result<Option<Self>> {
        use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
        use std::sync::Arc;
        let Device::Cuda(cuda) = device else {
            return Ok(None);
        };
        device.synchronize()?;
        let context = cuda.cuda_stream().context().clone();
        let used = |c: &candle_core::cuda_backend::cudarc::driver::CudaContext| {
            c.mem_get_info().map(|(free, total)| (total - free) as u64)
        };
        let baseline = used(&context)?;
        let peak = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (context, peak, stop) = (context.clone(), peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(u) = used(&context) {
                        peak.fetch_max(u.saturating_sub(baseline), Ordering::Relaxed);
                    }
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            })
        };
        Ok(Some(Self {
            baseline,
            peak,
            stop,
            context,
            thread: Some(thread),
        }))
    }

    pub fn baseline(&self) -> u64 {
        self.baseline
    }

    /// Bytes in use above the baseline now (also raising the peak).
    pub fn sample(&self) -> Result<u64> {
        let (free, total) = self.context.mem_get_info()?;
        let used = ((total - free) as u64).saturating_sub(self.baseline);
        self.peak
            .fetch_max(used, std::sync::atomic::Ordering::Relaxed);
        Ok(used)
    }

    /// The most seen so far (after a sample, so the present counts).
    pub fn peak(&self) -> Result<u64> {
        self.sample()?;
        Ok(self.peak.load(std::sync::atomic::Ordering::Relaxed))
    }
}

#[cfg(feature = "cuda")]
impl Drop for DriverPoller {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_copy_bandwidth_is_positive_and_counts_both_directions() {
        let stats = copy_bandwidth(&Device::Cpu, 1 << 20, 3).unwrap();
        assert_eq!(stats.samples.len(), 3);
        assert!(stats.min > 0.0 && stats.median >= stats.min && stats.max >= stats.median);
        assert!(copy_bandwidth(&Device::Cpu, 0, 3).is_err());
    }

    #[test]
    fn devices_parse_or_say_what_is_expected() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        let err = parse_device("gpu").unwrap_err().to_string();
        assert!(err.contains("expected cpu, cuda or cuda:N"), "{err}");
        if !candle_core::utils::cuda_is_available() {
            let err = parse_device("cuda").unwrap_err().to_string();
            assert!(err.contains("--features cuda"), "{err}");
        }
        assert!(device_name(&Device::Cpu).unwrap().starts_with("CPU "));
    }
}
