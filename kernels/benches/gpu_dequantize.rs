//! Smoke benchmark, run by scripts/gpu-run.sh: NF4 (double quant) dequantize to f16/bf16 on GLM-4-9B weight
//! shapes, as bandwidth next to a device-to-device copy measured in the same run. Not a test: it asserts
//! nothing; the numbers go to benches/results/. Times are host wall times around a synchronized call, so they
//! include the output allocation and the launch (a few µs): small weights look slower than the kernel is.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use glm_kernels::{CudaNf4Tensor, HostAbsmax, HostNf4};

const BLOCKSIZE: usize = 64;
const REPEATS: usize = 20;
/// [out, in] weights of GLM-4-9B: attention output, fused gate/up, down.
const SHAPES: &[(&str, [usize; 2])] = &[
    ("o", [4096, 4096]),
    ("gate_up", [27392, 4096]),
    ("down", [4096, 13696]),
];

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

/// Median wall time of `f` in seconds, the device synchronized around each call (after warm-up).
fn median_seconds(device: &Device, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let mut times = Vec::with_capacity(REPEATS);
    for _ in 0..REPEATS {
        device.synchronize()?;
        let start = Instant::now();
        f()?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[REPEATS / 2])
}

/// Random bytes (any byte is a valid NF4 code pair and a valid absmax code), made on the device.
fn random_bytes(len: usize, device: &Device) -> Result<Vec<u8>> {
    Ok(Tensor::rand(0f32, 256.0, len, device)?
        .to_dtype(DType::U8)?
        .to_vec1()?)
}

fn main() -> Result<()> {
    let device = match Device::new_cuda(0) {
        Ok(device) => device,
        Err(err) => {
            println!("gpu_dequantize bench: skipped: no CUDA device ({err})");
            return Ok(());
        }
    };

    let copy_elems = 256usize << 20;
    let source = Tensor::rand(0f32, 1.0, copy_elems, &device)?.to_dtype(DType::F16)?;
    let copy_s = median_seconds(&device, || Ok(drop(source.copy()?)))?;
    // A copy reads and writes every byte.
    let copy_bw = (4 * copy_elems) as f64 / copy_s;
    println!(
        "device copy of {} MiB: {:.0} GB/s (read + write)",
        2 * copy_elems >> 20,
        copy_bw / 1e9
    );

    println!(
        "{:<8} {:>13} {:>5} {:>9} {:>8} {:>8}",
        "weight", "shape", "dtype", "µs", "GB/s", "of copy"
    );
    for (name, shape) in SHAPES {
        let numel = shape[0] * shape[1];
        let blocks = numel.div_ceil(BLOCKSIZE);
        let packed = random_bytes(numel.div_ceil(2), &device)?;
        let codes = random_bytes(blocks, &device)?;
        let nested_absmax: Vec<f32> =
            Tensor::rand(0.5f32, 2.0, blocks.div_ceil(256), &device)?.to_vec1()?;
        let nested_map: Vec<f32> = Tensor::rand(-1f32, 1.0, 256, &device)?.to_vec1()?;
        let weight = CudaNf4Tensor::upload(
            &HostNf4 {
                name,
                shape,
                blocksize: BLOCKSIZE,
                packed: &packed,
                absmax: HostAbsmax::Nested {
                    codes: &codes,
                    nested_absmax: &nested_absmax,
                    nested_blocksize: 256,
                    nested_map: &nested_map,
                    offset: 0.01,
                },
            },
            &device,
        )?;
        for dtype in [DType::F16, DType::BF16] {
            let seconds = median_seconds(&device, || Ok(drop(weight.dequantize(dtype)?)))?;
            // Bytes that must move: packed codes and absmax codes read, 2-byte outputs written.
            let bytes = (packed.len() + codes.len() + 2 * numel) as f64;
            println!(
                "{name:<8} {:>13} {:>5} {:>9.1} {:>8.0} {:>7.0}%",
                format!("{}x{}", shape[0], shape[1]),
                format!("{dtype:?}"),
                seconds * 1e6,
                bytes / seconds / 1e9,
                100.0 * bytes / seconds / copy_bw
            );
        }
    }
    Ok(())
}
