//! Benchmark of the NF4 kernels on GLM-4-9B weight shapes (issue 7), printed as markdown for
//! benches/results/kernels.md. Not a test: it asserts nothing.
//!
//! - Device copy bandwidth (read + write) measured in the same run: the yardstick for GB/s.
//! - Decode: NF4 fused GEMV (f16 and bf16 x) at 1 and 8 rows against candle's f16 matmul (cuBLAS) of the same
//!   shape; GB/s counts the NF4 bytes the GEMV must read (codes + absmax codes + nested scales).
//! - Prefill at 16..2048 rows: the NF4 matmul (the path its rule picks) against the f16 cuBLAS GEMM, with both
//!   paths' own times: W expanded to f16 then cuBLAS (and the expansion alone), and the fused NF4 GEMM
//!   (kernels/gemm_nf4.cu) with each of its block shapes.
//! - GPU quantize time of each weight.
//!
//! Timing: a 1 GiB copy is queued first so that the host runs ahead of the GPU, then CUDA events around
//! `ITERS` back-to-back calls (each on a different copy of the weight when one copy would sit in the 50 MB L2);
//! the median of `REPEATS` such runs per call.

use std::time::Instant;

use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
use candle_core::{DType, Device, Tensor};
use glm_kernels::{CudaNf4Tensor, FUSED_GEMM_BLOCK_TOKENS};
use nf4::QuantOptions;

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const ITERS: usize = 20;
const REPEATS: usize = 7;
/// Weight copies are rotated until they total this many bytes (well above the H100's 50 MB L2).
const ROTATE_BYTES: usize = 256 << 20;
/// [out, in] weights of GLM-4-9B-chat: q, k and v (k/v 2 x 128 heads), fused qkv, o, fused gate/up, down, lm_head.
const SHAPES: &[(&str, usize, usize)] = &[
    ("q", 4096, 4096),
    ("k/v", 256, 4096),
    ("qkv", 4608, 4096),
    ("o", 4096, 4096),
    ("gate_up", 27392, 4096),
    ("down", 4096, 13696),
    ("lm_head", 151552, 4096),
];
const PREFILL_ROWS: &[usize] = &[16, 128, 512, 2048];
/// Shapes the prefill table covers (GEMMs at 2048 rows of lm_head take long and say nothing new).
const PREFILL_SHAPES: &[&str] = &["qkv", "o", "gate_up", "down"];

struct Timer {
    device: Device,
    busy: Tensor,
}

impl Timer {
    fn new(device: &Device) -> Result<Self> {
        Ok(Self {
            device: device.clone(),
            busy: Tensor::zeros(512 << 20, DType::F16, device)?,
        })
    }

    /// Median GPU seconds per call of `f(i)` (i counts calls, for rotating copies).
    fn seconds(&self, mut f: impl FnMut(usize) -> Result<Tensor>) -> Result<f64> {
        let stream = self.device.as_cuda_device()?.cuda_stream();
        for i in 0..3 {
            f(i)?;
        }
        let mut times = Vec::with_capacity(REPEATS);
        let mut call = 0;
        for _ in 0..REPEATS {
            self.device.synchronize()?;
            let busy = self.busy.copy()?;
            let start = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            for _ in 0..ITERS {
                f(call)?;
                call += 1;
            }
            let end = stream.record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
            times.push(f64::from(start.elapsed_ms(&end)?) * 1e-3 / ITERS as f64);
            drop(busy);
        }
        times.sort_by(f64::total_cmp);
        Ok(times[REPEATS / 2])
    }
}

fn random_weight(n: usize, k: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 0.02, (n, k), device)?.to_dtype(dtype)?)
}

fn copies(bytes: usize) -> usize {
    ROTATE_BYTES.div_ceil(bytes).max(1)
}

fn main() -> Result<()> {
    let device = match Device::new_cuda(0) {
        Ok(device) => device,
        Err(err) => {
            println!("gpu_kernels bench: skipped: no CUDA device ({err})");
            return Ok(());
        }
    };
    let timer = Timer::new(&device)?;
    let source = Tensor::zeros(512 << 20, DType::F16, &device)?;
    let copy_s = timer.seconds(|_| Ok(source.copy()?))?;
    // A copy reads and writes every byte.
    let copy_bw = 2.0 * (1u64 << 30) as f64 / copy_s;
    drop(source);
    println!(
        "device copy of 1 GiB: {:.0} GB/s (read + write)\n",
        copy_bw / 1e9
    );

    println!("### Decode: fused NF4 GEMV vs cuBLAS f16 (candle matmul)\n");
    println!(
        "| weight | N x K | NF4 MB | NF4 f16 b1 µs | GB/s | of copy | bf16 b1 µs | cuBLAS f16 b1 µs | speed-up | \
         NF4 b8 µs | b8 / b1 | cuBLAS f16 b8 µs | GPU quantize ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    let mut prefill_weights = Vec::new();
    for &(name, n, k) in SHAPES {
        let opts = QuantOptions::default();
        let source = random_weight(n, k, DType::BF16, &device)?;
        device.synchronize()?;
        let start = Instant::now();
        let first = CudaNf4Tensor::quantize(name, &source, &opts)?;
        device.synchronize()?;
        let quantize_ms = start.elapsed().as_secs_f64() * 1e3;
        drop(source);
        let nf4_bytes = first.device_bytes();
        let mut nf4 = vec![first];
        while nf4.len() < copies(nf4_bytes) {
            nf4.push(CudaNf4Tensor::quantize(
                name,
                &random_weight(n, k, DType::BF16, &device)?,
                &opts,
            )?);
        }
        let f16_weights = (0..copies(2 * n * k))
            .map(|_| random_weight(n, k, DType::F16, &device))
            .collect::<Result<Vec<_>>>()?;
        let x = |rows: usize, dtype: DType| -> Result<Tensor> {
            Ok(Tensor::randn(0f32, 1.0, (rows, k), &device)?.to_dtype(dtype)?)
        };
        let gemv = |rows: usize, dtype: DType| -> Result<f64> {
            let x = x(rows, dtype)?;
            timer.seconds(|i| Ok(nf4[i % nf4.len()].matmul(&x)?))
        };
        let cublas = |rows: usize| -> Result<f64> {
            let x = x(rows, DType::F16)?;
            timer.seconds(|i| Ok(x.matmul(&f16_weights[i % f16_weights.len()].t()?)?))
        };
        let (b1, b1_bf16, b8) = (
            gemv(1, DType::F16)?,
            gemv(1, DType::BF16)?,
            gemv(8, DType::F16)?,
        );
        let (cublas1, cublas8) = (cublas(1)?, cublas(8)?);
        let gbs = nf4_bytes as f64 / b1;
        println!(
            "| {name} | {n} x {k} | {:.1} | {:.1} | {:.0} | {:.0}% | {:.1} | {:.1} | {:.2}x | {:.1} | {:.2} | {:.1} | {quantize_ms:.1} |",
            nf4_bytes as f64 / 1e6,
            b1 * 1e6,
            gbs / 1e9,
            100.0 * gbs / copy_bw,
            b1_bf16 * 1e6,
            cublas1 * 1e6,
            cublas1 / b1,
            b8 * 1e6,
            b8 / b1,
            cublas8 * 1e6,
        );
        if PREFILL_SHAPES.contains(&name) {
            prefill_weights.push((
                name,
                n,
                k,
                nf4.swap_remove(0),
                f16_weights.into_iter().next(),
            ));
        }
    }

    println!("\n### Prefill: NF4 fused GEMM and dequantize + cuBLAS vs cuBLAS f16 GEMM\n");
    let fused_columns: String = FUSED_GEMM_BLOCK_TOKENS
        .iter()
        .map(|b| format!(" fused {b}-token blocks µs |"))
        .collect();
    println!(
        "| weight | rows | dequantize µs | dequantize + cuBLAS µs |{fused_columns} matmul µs | cuBLAS f16 µs | \
         matmul throughput of f16 |"
    );
    println!(
        "|---|---|---|---|{}---|---|---|",
        "---|".repeat(FUSED_GEMM_BLOCK_TOKENS.len())
    );
    for (name, n, k, nf4, f16_weight) in &prefill_weights {
        let f16_weight = f16_weight.as_ref().expect("one f16 copy at least");
        let dequantize = timer.seconds(|_| Ok(nf4.dequantize(DType::F16)?))?;
        for &rows in PREFILL_ROWS {
            let x = Tensor::randn(0f32, 1.0, (rows, *k), &device)?.to_dtype(DType::F16)?;
            let expanded = timer.seconds(|_| Ok(x.matmul(&nf4.dequantize(DType::F16)?.t()?)?))?;
            let mut fused = String::new();
            for &block_tokens in FUSED_GEMM_BLOCK_TOKENS {
                let t = timer.seconds(|_| Ok(nf4.fused_gemm(&x, block_tokens)?))?;
                fused += &format!(" {:.1} |", t * 1e6);
            }
            let ours = timer.seconds(|_| Ok(nf4.matmul(&x)?))?;
            let theirs = timer.seconds(|_| Ok(x.matmul(&f16_weight.t()?)?))?;
            println!(
                "| {name} ({n} x {k}) | {rows} | {:.1} | {:.1} |{fused} {:.1} | {:.1} | {:.0}% |",
                dequantize * 1e6,
                expanded * 1e6,
                ours * 1e6,
                theirs * 1e6,
                100.0 * theirs / ours
            );
        }
    }
    Ok(())
}
