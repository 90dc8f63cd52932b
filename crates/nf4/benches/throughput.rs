//! CPU quantize / dequantize throughput in GB/s of f16 weights (a 4096 x 4096 matrix), on all rayon
//! threads and on one, side by side.
//!
//!     cargo bench -p nf4 --bench throughput -- --measurement-time 3

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use nf4::{Nf4Tensor, QuantOptions};

const ROWS: usize = 4096;
const COLS: usize = 4096;

/// Deterministic weights of a plausible spread (sum of uniforms ~ normal, std ~0.02).
fn weights() -> Vec<f16> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    (0..ROWS * COLS)
        .map(|_| {
            let mut sum = 0.0f32;
            for _ in 0..4 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                sum += (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
            }
            f16::from_f32(sum * 0.035)
        })
        .collect()
}

fn bench(c: &mut Criterion) {
    let w = weights();
    let opts = QuantOptions::default();
    let q = Nf4Tensor::quantize_f16(&w, &[ROWS, COLS], &opts).unwrap();
    let all = rayon::current_num_threads();
    let one = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap();

    let mut group = c.benchmark_group("nf4_f16_4096x4096");
    group.throughput(Throughput::Bytes(
        (w.len() * std::mem::size_of::<f16>()) as u64,
    ));
    group.sample_size(10);
    group.bench_function(
        BenchmarkId::new("quantize", format!("{all}_threads")),
        |b| b.iter(|| Nf4Tensor::quantize_f16(&w, &[ROWS, COLS], &opts).unwrap()),
    );
    group.bench_function(BenchmarkId::new("quantize", "1_thread"), |b| {
        b.iter(|| one.install(|| Nf4Tensor::quantize_f16(&w, &[ROWS, COLS], &opts).unwrap()))
    });
    group.bench_function(
        BenchmarkId::new("dequantize", format!("{all}_threads")),
        |b| b.iter(|| q.dequantize_f16()),
    );
    group.bench_function(BenchmarkId::new("dequantize", "1_thread"), |b| {
        b.iter(|| one.install(|| q.dequantize_f16()))
    });
    // Into a reused buffer: no page faults of fresh memory.
    let mut out = vec![f16::ZERO; w.len()];
    group.bench_function(
        BenchmarkId::new("dequantize_into", format!("{all}_threads")),
        |b| b.iter(|| q.dequantize_f16_into(&mut out).unwrap()),
    );
    group.bench_function(BenchmarkId::new("dequantize_into", "1_thread"), |b| {
        b.iter(|| one.install(|| q.dequantize_f16_into(&mut out).unwrap()))
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
