//! Decode attention (kernels/attention.cu) against softmax(q·Kᵀ·scale)·V computed with candle ops in f64 on
//! the CPU, over the valid prefix of a preallocated cache.

use candle_core::{DType, Device, Tensor, D};
use glm_kernels::{decode_attention, KernelError};

use crate::common::{cuda_device_or_skip, relative_error, to_f64};

/// Cache contents beyond `len` are filled with huge values: reading past the valid tokens would show.
fn cache(dims: (usize, usize, usize, usize), len: usize) -> Tensor {
    let (b, kv, cap, d) = dims;
    let valid = Tensor::randn(0f32, 1.0, (b, kv, len, d), &Device::Cpu).unwrap();
    let junk = Tensor::full(1e4f32, (b, kv, cap - len, d), &Device::Cpu).unwrap();
    Tensor::cat(&[&valid, &junk], 2).unwrap()
}

fn reference(q: &Tensor, k: &Tensor, v: &Tensor, len: usize, scale: f64) -> Vec<f64> {
    let f64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    let k = f64(&k.narrow(2, 0, len).unwrap());
    let v = f64(&v.narrow(2, 0, len).unwrap());
    let scores = (f64(q).matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
    let max = scores.max_keepdim(D::Minus1).unwrap();
    let e = scores.broadcast_sub(&max).unwrap().exp().unwrap();
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap();
    to_f64(&p.matmul(&v).unwrap())
}

#[test]
fn decode_attention_matches_the_reference() {
    let Some(gpu) = cuda_device_or_skip("decode_attention_matches_the_reference") else {
        return;
    };
    // (batch, kv heads, rep, head_dim, capacity, len): GQA, head_dim not a multiple of 32, one token,
    // a full cache, more tokens than the block has warps.
    let cases = [
        (1, 2, 16, 128, 4096, 1000),
        (2, 2, 4, 64, 64, 64),
        (1, 1, 1, 32, 8, 1),
        (3, 2, 3, 40, 300, 257),
        (1, 4, 2, 256, 40, 17),
    ];
    for (b, kv, rep, d, cap, len) in cases {
        let q = Tensor::randn(0f32, 1.0, (b, kv, rep, d), &Device::Cpu).unwrap();
        let k = cache((b, kv, cap, d), len);
        let v = cache((b, kv, cap, d), len);
        let scale = (d as f64).powf(-0.5);
        for (dtype, tolerance) in [
            (DType::F32, 1e-5),
            (DType::F16, 2e-3),
            (DType::BF16, 1.5e-2),
        ] {
            // The reference sees the same rounded inputs.
            let [q, k, v] = [&q, &k, &v].map(|t| t.to_dtype(dtype).unwrap());
            let want = reference(&q, &k, &v, len, scale);
            let on_gpu = |t: &Tensor| t.to_device(&gpu).unwrap();
            let got =
                decode_attention(&on_gpu(&q), &on_gpu(&k), &on_gpu(&v), len, scale as f32).unwrap();
            assert_eq!(got.dims(), &[b, kv, rep, d]);
            assert_eq!(got.dtype(), dtype);
            let error = relative_error(&to_f64(&got), &want);
            println!("decode attention {b}x{kv}x{rep}x{d}, {len} of {cap} tokens, {dtype:?}: relative error {error:.1e}");
            assert!(
                error <= tolerance,
                "relative error {error:.2e} above {tolerance:.0e}"
            );
        }
    }
}

#[test]
fn decode_attention_refuses_bad_input() {
    let Some(gpu) = cuda_device_or_skip("decode_attention_refuses_bad_input") else {
        return;
    };
    let q = Tensor::zeros((1, 2, 2, 32), DType::F16, &gpu).unwrap();
    let k = Tensor::zeros((1, 2, 8, 32), DType::F16, &gpu).unwrap();
    let check = |result: Result<Tensor, KernelError>, needle: &str| {
        let err = result.expect_err("must be refused").to_string();
        assert!(err.contains(needle), "{err}");
    };
    check(decode_attention(&q, &k, &k, 9, 1.0), "9 cached tokens");
    check(decode_attention(&q, &k, &k, 0, 1.0), "0 cached tokens");
    let wide = Tensor::zeros((1, 2, 8, 16), DType::F16, &gpu).unwrap();
    check(decode_attention(&q, &wide, &wide, 4, 1.0), "does not match");
    let f32_cache = k.to_dtype(DType::F32).unwrap();
    check(
        decode_attention(&q, &f32_cache, &f32_cache, 4, 1.0),
        "dtypes",
    );
}
