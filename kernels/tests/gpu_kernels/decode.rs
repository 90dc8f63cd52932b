//! The decode-step kernels (norm.cu, rotary.cu, activation.cu, embedding.cu, argmax.cu, gemv_dense.cu and
//! attention.cu's position-reading variant) against f64 references on the CPU, on awkward sizes and in every
//! dtype. They take raw device pointers; the tensors here own the memory.

use candle_core::{DType, Device, Tensor, D};
use glm_kernels::{argmax_scratch_bytes, attention_scratch_bytes, DecodeKernels, RotaryKvWrite};

use crate::common::{cuda_device_or_skip, ptr, relative_error, to_f64};

const DTYPES: [(DType, f64); 3] = [
    (DType::F32, 1e-6),
    (DType::F16, 2e-3),
    (DType::BF16, 1.6e-2),
];

fn randn(shape: &[usize], dtype: DType) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn f64_of(t: &Tensor) -> Tensor {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
}

/// RmsNorm(x)·w in f64, rows of the last dimension.
fn rms_norm_reference(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let x = f64_of(x);
    let inv = ((x.sqr().unwrap().mean_keepdim(D::Minus1).unwrap() + eps).unwrap())
        .sqrt()
        .unwrap()
        .recip()
        .unwrap();
    x.broadcast_mul(&inv)
        .unwrap()
        .broadcast_mul(&f64_of(w))
        .unwrap()
}

#[test]
fn norms_match_the_reference() {
    let Some(gpu) = cuda_device_or_skip("norms_match_the_reference") else {
        return;
    };
    let Device::Cuda(dev) = &gpu else {
        unreachable!()
    };
    let eps = 1e-5;
    for (dtype, tolerance) in DTYPES {
        let k = DecodeKernels::new(dev, dtype).unwrap();
        for (rows, dim) in [(1, 4096), (3, 1000), (8, 64), (2, 5), (1, 8192)] {
            let x = randn(&[rows, dim], dtype);
            let delta = randn(&[rows, dim], dtype);
            let (w, wd) = (randn(&[dim], dtype), randn(&[dim], dtype));
            let g = |t: &Tensor| t.to_device(&gpu).unwrap();
            let out = Tensor::zeros((rows, dim), dtype, &gpu).unwrap();
            unsafe { k.rms_norm(ptr(&g(&x)), ptr(&g(&w)), ptr(&out), rows, dim, eps as f32) }
                .unwrap();
            let error = relative_error(&to_f64(&out), &to_f64(&rms_norm_reference(&x, &w, eps)));
            assert!(
                error <= tolerance,
                "rms_norm {dtype:?} {rows}x{dim}: {error:.2e}"
            );

            for post_norm in [false, true] {
                let residual = g(&x);
                let (delta_gpu, w_gpu, wd_gpu) = (g(&delta), g(&w), g(&wd));
                let out = Tensor::zeros((rows, dim), dtype, &gpu).unwrap();
                unsafe {
                    k.residual_rms_norm(
                        ptr(&residual),
                        ptr(&delta_gpu),
                        post_norm.then(|| ptr(&wd_gpu)),
                        ptr(&w_gpu),
                        ptr(&out),
                        rows,
                        dim,
                        eps as f32,
                    )
                }
                .unwrap();
                let added = if post_norm {
                    rms_norm_reference(&delta, &wd, eps)
                } else {
                    f64_of(&delta)
                };
                let want_residual = (f64_of(&x) + added).unwrap();
                let what =
                    format!("residual_rms_norm {dtype:?} {rows}x{dim} post_norm={post_norm}");
                let error = relative_error(&to_f64(&residual), &to_f64(&want_residual));
                assert!(error <= tolerance, "{what}: residual {error:.2e}");
                // The norm of what the kernel stored (the rounded residual).
                let want = rms_norm_reference(&residual.to_device(&Device::Cpu).unwrap(), &w, eps);
                let error = relative_error(&to_f64(&out), &to_f64(&want));
                assert!(error <= tolerance, "{what}: out {error:.2e}");
            }
        }
        let too_wide = unsafe { k.rms_norm(0, 0, 0, 1, 8193, 1e-5) }.unwrap_err();
        assert!(too_wide.to_string().contains("1 to 8192"), "{too_wide}");
    }
}

#[test]
fn silu_mul_and_embedding_match_the_reference() {
    let Some(gpu) = cuda_device_or_skip("silu_mul_and_embedding_match_the_reference") else {
        return;
    };
    let Device::Cuda(dev) = &gpu else {
        unreachable!()
    };
    for (dtype, tolerance) in DTYPES {
        let k = DecodeKernels::new(dev, dtype).unwrap();
        for (rows, inter) in [(1, 13696), (3, 37), (8, 1)] {
            let gate_up = (randn(&[rows, 2 * inter], dtype)
                .to_dtype(DType::F32)
                .unwrap()
                * 4.0)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let out = Tensor::zeros((rows, inter), dtype, &gpu).unwrap();
            let gu = gate_up.to_device(&gpu).unwrap();
            unsafe { k.silu_mul(ptr(&gu), ptr(&out), rows, inter) }.unwrap();
            let f = f64_of(&gate_up);
            let gate = f.narrow(1, 0, inter).unwrap();
            let up = f.narrow(1, inter, inter).unwrap();
            let silu = (&gate / (gate.neg().unwrap().exp().unwrap() + 1.0).unwrap()).unwrap();
            let want = (silu * up).unwrap();
            let error = relative_error(&to_f64(&out), &to_f64(&want));
            assert!(
                error <= 2.0 * tolerance,
                "silu_mul {dtype:?} {rows}x{inter}: {error:.2e}"
            );
        }

        let (vocab, hidden) = (301, 72);
        let table = randn(&[vocab, hidden], dtype);
        let ids = [300u32, 0, 17, 17];
        let tokens = Tensor::new(&ids, &gpu).unwrap();
        let out = Tensor::zeros((ids.len(), hidden), dtype, &gpu).unwrap();
        let table_gpu = table.to_device(&gpu).unwrap();
        unsafe { k.embed_rows(ptr(&table_gpu), ptr(&tokens), ptr(&out), ids.len(), hidden) }
            .unwrap();
        let want = table
            .index_select(&Tensor::new(&ids, &Device::Cpu).unwrap(), 0)
            .unwrap();
        assert_eq!(to_f64(&out), to_f64(&want), "embed_rows {dtype:?}");
    }
}

#[test]
fn argmax_picks_the_first_maximum_and_advances_the_position() {
    let Some(gpu) = cuda_device_or_skip("argmax_picks_the_first_maximum_and_advances_the_position")
    else {
        return;
    };
    let Device::Cuda(dev) = &gpu else {
        unreachable!()
    };
    let vocab = 151_552 + 3;
    for (dtype, _) in DTYPES {
        let k = DecodeKernels::new(dev, dtype).unwrap();
        let mut rows = vec![vec![-1.0f32; vocab]; 4];
        // Ties: the first index wins, across threads and warps.
        rows[0][vocab - 1] = 5.0;
        rows[0][70_001] = 5.0;
        rows[0][3] = 5.0;
        // The maximum in the last element only.
        rows[1][vocab - 1] = 2.0;
        // -inf everywhere but one, and NaN.
        rows[2].fill(f32::NEG_INFINITY);
        rows[2][1234] = -1e4;
        rows[3][10] = f32::NAN;
        let logits = Tensor::new(rows, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .to_device(&gpu)
            .unwrap();
        let tokens = Tensor::zeros(4, DType::U32, &gpu).unwrap();
        let pos = Tensor::new(&[41u32], &gpu).unwrap();
        let scratch = Tensor::zeros(argmax_scratch_bytes(4), DType::U8, &gpu).unwrap();
        // Twice: the first call must leave the scratch ready for the next.
        for call in 1..=2u32 {
            unsafe {
                k.argmax_rows(
                    ptr(&logits),
                    vocab,
                    ptr(&tokens),
                    ptr(&pos),
                    4,
                    ptr(&scratch),
                )
            }
            .unwrap();
            let got: Vec<u32> = tokens.to_vec1().unwrap();
            assert_eq!(
                got,
                [3, vocab as u32 - 1, 1234, u32::MAX],
                "{dtype:?} call {call}"
            );
            assert_eq!(
                pos.to_vec1::<u32>().unwrap(),
                [41 + call],
                "{dtype:?}: position"
            );
        }
        // A vocabulary smaller than the blocks × threads (the fixtures' 320).
        let small = Tensor::new(&[[0.5f32, 2.0, -1.0, 2.0, 0.0]], &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
            .to_device(&gpu)
            .unwrap();
        unsafe { k.argmax_rows(ptr(&small), 5, ptr(&tokens), ptr(&pos), 1, ptr(&scratch)) }
            .unwrap();
        assert_eq!(
            tokens.to_vec1::<u32>().unwrap()[0],
            1,
            "{dtype:?}: small vocabulary"
        );
    }
}

#[test]
fn rotary_kv_write_matches_the_reference() {
    let Some(gpu) = cuda_device_or_skip("rotary_kv_write_matches_the_reference") else {
        return;
    };
    let Device::Cuda(dev) = &gpu else {
        unreachable!()
    };
    // (batch, heads, kv_heads, head_dim, rotary_dim, capacity, position, bias)
    let cases = [
        (1, 32, 2, 128, 64, 4096, 4000, true),
        (2, 4, 2, 48, 48, 20, 19, false),
        (3, 6, 3, 256, 128, 8, 0, true),
    ];
    for (dtype, tolerance) in DTYPES {
        let k = DecodeKernels::new(dev, dtype).unwrap();
        for (b, heads, kv_heads, d, rotary_dim, capacity, position, bias) in cases {
            let g = |t: &Tensor| t.to_device(&gpu).unwrap();
            let q_raw = randn(&[b, heads * d], dtype);
            let k_raw = randn(&[b, kv_heads * d], dtype);
            let v_raw = randn(&[b, kv_heads * d], dtype);
            let biases = [heads * d, kv_heads * d, kv_heads * d].map(|n| randn(&[n], dtype));
            let inv_freq: Vec<f32> = (0..rotary_dim / 2)
                .map(|i| 1.0 / 10000f32.powf((2 * i) as f32 / rotary_dim as f32))
                .collect();
            let sentinel = 7.0f64;
            let cache = || {
                Tensor::full(sentinel as f32, (b, kv_heads, capacity, d), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap()
                    .to_device(&gpu)
                    .unwrap()
            };
            let (k_cache, v_cache) = (cache(), cache());
            let q_out = Tensor::zeros((b, heads, d), dtype, &gpu).unwrap();
            let (qg, kg, vg) = (g(&q_raw), g(&k_raw), g(&v_raw));
            let bias_gpu = biases.clone().map(|t| g(&t));
            let inv_freq_gpu = Tensor::new(inv_freq.as_slice(), &gpu).unwrap();
            let pos = Tensor::new(&[position as u32], &gpu).unwrap();
            let args = RotaryKvWrite {
                batch: b,
                heads,
                kv_heads,
                head_dim: d,
                rotary_dim,
                capacity,
                q_raw: ptr(&qg),
                k_raw: ptr(&kg),
                v_raw: ptr(&vg),
                biases: bias.then(|| bias_gpu.each_ref().map(ptr)),
                inv_freq: ptr(&inv_freq_gpu),
                pos: ptr(&pos),
                q_out: ptr(&q_out),
                k_cache: ptr(&k_cache),
                v_cache: ptr(&v_cache),
            };
            unsafe { k.rotary_kv_write(&args) }.unwrap();

            // The reference: bias, then interleaved rotation of the first rotary_dim dims, in f64.
            let rotate = |raw: &Tensor, bias: &Tensor, n: usize, apply: bool| -> Vec<f64> {
                let mut x = to_f64(raw);
                let bias = to_f64(bias);
                for row in x.chunks_mut(n * d) {
                    for (i, v) in row.iter_mut().enumerate() {
                        if args.biases.is_some() {
                            *v += bias[i];
                        }
                    }
                    for head in row.chunks_mut(d) {
                        for pair in 0..rotary_dim / 2 {
                            if !apply {
                                break;
                            }
                            // The kernel's angle is an f32 product, as candle's tables compute it.
                            let angle = f64::from(position as f32 * inv_freq[pair]);
                            let (c, s) = (angle.cos(), angle.sin());
                            let (x0, x1) = (head[2 * pair], head[2 * pair + 1]);
                            head[2 * pair] = x0 * c - x1 * s;
                            head[2 * pair + 1] = x0 * s + x1 * c;
                        }
                    }
                }
                x
            };
            let what = format!("rotary {dtype:?} b={b} heads={heads}/{kv_heads} d={d}");
            let error = relative_error(&to_f64(&q_out), &rotate(&q_raw, &biases[0], heads, true));
            assert!(error <= 2.0 * tolerance, "{what}: q {error:.2e}");
            for (cache, raw, bias, rotated) in [
                (&k_cache, &k_raw, &biases[1], true),
                (&v_cache, &v_raw, &biases[2], false),
            ] {
                let all = to_f64(cache);
                let mut written = Vec::new();
                for (row_index, row) in all.chunks(d).enumerate() {
                    if row_index % capacity == position {
                        written.extend_from_slice(row);
                    } else {
                        assert!(
                            row.iter().all(|&v| v == sentinel),
                            "{what}: wrote row {row_index}"
                        );
                    }
                }
                let error = relative_error(&written, &rotate(raw, bias, kv_heads, rotated));
                assert!(error <= 2.0 * tolerance, "{what}: cache {error:.2e}");
            }
        }
    }
}

#[test]
fn gemv_dense_matches_the_reference() {
    let Some(gpu) = cuda_device_or_skip("gemv_dense_matches_the_reference") else {
        return;
    };
    let Device::Cuda(dev) = &gpu else {
        unreachable!()
    };
    for (dtype, tolerance) in DTYPES {
        let k = DecodeKernels::new(dev, dtype).unwrap();
        // K a multiple of the 16-byte vector and not; N not a multiple of the block's 8 rows.
        for (n, kk) in [(256, 4096), (13, 37), (300, 1000), (4099, 128)] {
            let w = randn(&[n, kk], dtype);
            let wg = w.to_device(&gpu).unwrap();
            for rows in [1, 2, 5, 8] {
                let x = randn(&[rows, kk], dtype);
                let xg = x.to_device(&gpu).unwrap();
                let y = Tensor::zeros((rows, n), dtype, &gpu).unwrap();
                unsafe { k.gemv_dense(ptr(&wg), ptr(&xg), ptr(&y), rows, n, kk) }.unwrap();
                let want = f64_of(&x).matmul(&f64_of(&w).t().unwrap()).unwrap();
                let error = relative_error(&to_f64(&y), &to_f64(&want));
                assert!(
                    error <= tolerance.max(1e-5),
                    "gemv_dense {dtype:?} {rows}x{kk} · {n}: {error:.2e}"
                );
            }
        }
        // Two weights of one shape in one launch: each output as its own launch gives it.
        let (n, kk) = (256, 4096);
        let (w0, w1) = (
            randn(&[n, kk], dtype).to_device(&gpu).unwrap(),
            randn(&[n, kk], dtype).to_device(&gpu).unwrap(),
        );
        let x = randn(&[3, kk], dtype).to_device(&gpu).unwrap();
        let zeros = || Tensor::zeros((3, n), dtype, &gpu).unwrap();
        let (y0, y1, want0, want1) = (zeros(), zeros(), zeros(), zeros());
        unsafe {
            k.gemv_dense_pair(
                [(ptr(&w0), ptr(&y0)), (ptr(&w1), ptr(&y1))],
                ptr(&x),
                3,
                n,
                kk,
            )
            .unwrap();
            k.gemv_dense(ptr(&w0), ptr(&x), ptr(&want0), 3, n, kk)
                .unwrap();
            k.gemv_dense(ptr(&w1), ptr(&x), ptr(&want1), 3, n, kk)
                .unwrap();
        }
        assert_eq!(
            to_f64(&y0),
            to_f64(&want0),
            "gemv_dense_pair {dtype:?}: first"
        );
        assert_eq!(
            to_f64(&y1),
            to_f64(&want1),
            "gemv_dense_pair {dtype:?}: second"
        );
        let too_many = unsafe { k.gemv_dense(0, 0, 0, 9, 8, 8) }.unwrap_err();
        assert!(too_many.to_string().contains("1 to 8"), "{too_many}");
    }
}

/// softmax(q·Kᵀ·scale)·V in f64 over the first `len` tokens: q `[b, kv, rep, d]`, caches `[b, kv, cap, d]`.
fn attention_reference(q: &Tensor, kc: &Tensor, vc: &Tensor, len: usize, scale: f64) -> Tensor {
    let (q, kc, vc) = (f64_of(q), f64_of(kc), f64_of(vc));
    let k = kc.narrow(2, 0, len).unwrap();
    let v = vc.narrow(2, 0, len).unwrap();
    let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
    let max = scores.max_keepdim(D::Minus1).unwrap();
    let weights = scores.broadcast_sub(&max).unwrap().exp().unwrap();
    let weights = weights
        .broadcast_div(&weights.sum_keepdim(D::Minus1).unwrap())
        .unwrap();
    weights.matmul(&v).unwrap()
}

#[test]
fn attention_at_reads_the_position_from_the_device() {
    let Some(gpu) = cuda_device_or_skip("attention_at_reads_the_position_from_the_device") else {
        return;
    };
    let Device::Cuda(dev) = &gpu else {
        unreachable!()
    };
    // GLM-4-9B's grouping (16 query heads a kv head), more heads a group than warps a block, multi-query, and
    // head_dim below a warp: lengths from one token to more spans than the kernel has (each span then longer).
    for (b, kv, rep, d, capacity) in [
        (2, 2, 16, 128, 1100),
        (1, 1, 20, 64, 300),
        (3, 4, 1, 24, 40),
    ] {
        for (dtype, tolerance) in DTYPES {
            let k = DecodeKernels::new(dev, dtype).unwrap();
            let g = |shape: &[usize]| randn(shape, dtype).to_device(&gpu).unwrap();
            let (q, kc, vc) = (
                g(&[b, kv, rep, d]),
                g(&[b, kv, capacity, d]),
                g(&[b, kv, capacity, d]),
            );
            let scratch =
                Tensor::zeros(attention_scratch_bytes(b * kv * rep, d), DType::U8, &gpu).unwrap();
            for len in [1, 5, 16, 17, 37, capacity / 2 + 3, capacity] {
                let out = Tensor::zeros((b, kv, rep, d), dtype, &gpu).unwrap();
                let pos = Tensor::new(&[len as u32 - 1], &gpu).unwrap();
                unsafe {
                    k.attention_at(
                        ptr(&q),
                        ptr(&kc),
                        ptr(&vc),
                        ptr(&out),
                        b * kv * rep,
                        rep,
                        capacity,
                        ptr(&pos),
                        d,
                        0.125,
                        ptr(&scratch),
                    )
                }
                .unwrap();
                let want = attention_reference(&q, &kc, &vc, len, 0.125);
                let error = relative_error(&to_f64(&out), &to_f64(&want));
                assert!(
                    error < tolerance,
                    "{dtype:?} b{b} kv{kv} rep{rep} d{d} len {len}: relative error {error}"
                );
            }
            // Every call leaves the counters at zero for the next.
            let counters = scratch.narrow(0, 0, b * kv * 4).unwrap();
            assert!(
                to_f64(&counters).iter().all(|&c| c == 0.0),
                "{dtype:?}: counters reset"
            );
        }
    }
    let k = DecodeKernels::new(dev, DType::F32).unwrap();
    let bad = unsafe { k.attention_at(0, 0, 0, 0, 10, 3, 8, 0, 64, 1.0, 0) }.unwrap_err();
    assert!(bad.to_string().contains("groups of 3"), "{bad}");
}
