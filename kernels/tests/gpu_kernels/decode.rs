//! The decode-step kernels (norm.cu, rotary.cu, activation.cu, embedding.cu, argmax.cu, gemv_dense.cu and
//! attention.cu's position-reading variant, and the GEMVs that normalize their own input) against f64 references on the CPU, on awkward sizes and in every
//! dtype. They take raw device pointers; the tensors here own the memory.

use candle_core::{DType, Device, Tensor, D};
use glm_kernels::{
    argmax_scratch_bytes, attention_scratch_bytes, AttentionAt, CudaNf4Tensor, DecodeKernels,
    DenseGemv, GemvInput, NormedInput, RotaryKvWrite,
};

use crate::common::{
    cpu_product, cuda_device_or_skip, ptr, relative_error, to_f64, tolerance, weight,
};

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

/// What a NormedInput computes, in f64: (residual + added, x) with added = delta, RmsNorm(delta)·delta_weight or
/// nothing, and x the norm of the sum as `stored` (the sum the kernel wrote, rounded to the dtype).
fn normed_reference(
    residual: &Tensor,
    delta: Option<&Tensor>,
    delta_weight: Option<&Tensor>,
    weight: &Tensor,
    stored: &Tensor,
    eps: f64,
) -> (Tensor, Tensor) {
    let sum = match (delta, delta_weight) {
        (None, _) => f64_of(residual),
        (Some(d), None) => (f64_of(residual) + f64_of(d)).unwrap(),
        (Some(d), Some(dw)) => (f64_of(residual) + rms_norm_reference(d, dw, eps)).unwrap(),
    };
    (
        sum,
        rms_norm_reference(&stored.to_device(&Device::Cpu).unwrap(), weight, eps),
    )
}

/// The three kinds of NormedInput (nothing added, a delta, a normalized delta) for `rows` of `dim` in `dtype`.
struct NormedCase {
    residual: Tensor,
    delta: Option<Tensor>,
    delta_weight: Option<Tensor>,
    weight: Tensor,
}

fn normed_cases(rows: usize, dim: usize, dtype: DType) -> Vec<NormedCase> {
    [(false, false), (true, false), (true, true)]
        .into_iter()
        .map(|(delta, post_norm)| NormedCase {
            residual: randn(&[rows, dim], dtype),
            delta: delta.then(|| randn(&[rows, dim], dtype)),
            delta_weight: post_norm.then(|| randn(&[dim], dtype)),
            weight: randn(&[dim], dtype),
        })
        .collect()
}

impl NormedCase {
    fn what(&self) -> String {
        match (&self.delta, &self.delta_weight) {
            (None, _) => "no delta".into(),
            (Some(_), None) => "delta".into(),
            (Some(_), Some(_)) => "normalized delta".into(),
        }
    }

    /// The case on the GPU, kept alive with the NormedInput pointing into it (residual_out and normed_out zeroed
    /// buffers of their own).
    fn upload(&self, gpu: &Device, eps: f32) -> (Vec<Tensor>, NormedInput) {
        let g = |t: &Tensor| t.to_device(gpu).unwrap();
        let zeros = || self.residual.zeros_like().unwrap().to_device(gpu).unwrap();
        let kept = vec![
            g(&self.residual),
            self.delta.as_ref().map_or_else(zeros, g),
            self.delta_weight
                .as_ref()
                .map_or_else(|| g(&self.weight), g),
            g(&self.weight),
            zeros(),
            zeros(),
        ];
        let input = NormedInput {
            residual: ptr(&kept[0]),
            delta: self.delta.as_ref().map(|_| ptr(&kept[1])),
            delta_weight: self.delta_weight.as_ref().map(|_| ptr(&kept[2])),
            weight: ptr(&kept[3]),
            residual_out: Some(ptr(&kept[4])),
            normed_out: Some(ptr(&kept[5])),
            eps,
        };
        (kept, input)
    }

    /// Checks the sum and x a kernel wrote (kept[4], kept[5]).
    fn check(&self, kept: &[Tensor], eps: f64, tolerance: f64, what: &str) {
        let (sum, x) = normed_reference(
            &self.residual,
            self.delta.as_ref(),
            self.delta_weight.as_ref(),
            &self.weight,
            &kept[4],
            eps,
        );
        let error = relative_error(&to_f64(&kept[4]), &to_f64(&sum));
        assert!(error <= tolerance, "{what}: residual {error:.2e}");
        let error = relative_error(&to_f64(&kept[5]), &to_f64(&x));
        assert!(error <= tolerance, "{what}: x {error:.2e}");
    }
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
            for case in normed_cases(rows, dim, dtype) {
                let what = format!("residual_rms_norm {dtype:?} {rows}x{dim} {}", case.what());
                let (kept, input) = case.upload(&gpu, eps as f32);
                unsafe { k.residual_rms_norm(&input, rows, dim) }.unwrap();
                case.check(&kept, eps, tolerance, &what);
                // In place, as the op-by-op residual: the same sum.
                let in_place = NormedInput {
                    residual_out: Some(input.residual),
                    ..input
                };
                unsafe { k.residual_rms_norm(&in_place, rows, dim) }.unwrap();
                assert_eq!(to_f64(&kept[0]), to_f64(&kept[4]), "{what}: in place");
            }
        }
        let input = NormedInput {
            residual: 0,
            delta: None,
            delta_weight: None,
            weight: 0,
            residual_out: None,
            normed_out: Some(0),
            eps: 1e-5,
        };
        let too_wide = unsafe { k.residual_rms_norm(&input, 1, 8193) }.unwrap_err();
        assert!(too_wide.to_string().contains("1 to 8192"), "{too_wide}");
        let nowhere = NormedInput {
            normed_out: None,
            ..input
        };
        let refused = unsafe { k.residual_rms_norm(&nowhere, 1, 64) }.unwrap_err();
        assert!(refused.to_string().contains("normed_out"), "{refused}");
    }
}

/// The GEMVs that normalize their own input (NF4 tiled and dense) against the f64 reference of the norm followed
/// by the product, and against the norm kernel + plain GEMV they replace: the sum they write is the same bits.
#[test]
fn normed_gemvs_match_the_reference() {
    let Some(gpu) = cuda_device_or_skip("normed_gemvs_match_the_reference") else {
        return;
    };
    let Device::Cuda(dev) = &gpu else {
        unreachable!()
    };
    let eps = 1e-5;
    for (dtype, _) in DTYPES {
        let k = DecodeKernels::new(dev, dtype).unwrap();
        let tolerance = tolerance(dtype);
        // GLM-4-9B's hidden size, a small one, and one whose rows of x need two chunk rounds per thread at batch 8.
        for (n, dim, blocksize) in [(272, 4096, 64), (48, 64, 128), (160, 2112, 256)] {
            // With a second weight in the launch, as k beside q.
            let nf4 = weight(&gpu, n, dim, blocksize, true);
            let nf4_small = weight(&gpu, 16, dim, blocksize, true);
            let dense = randn(&[n, dim], dtype);
            let dense_gpu = dense.to_device(&gpu).unwrap();
            for rows in [1, 3, 8] {
                for case in normed_cases(rows, dim, dtype) {
                    let what = format!("{dtype:?} [{n}, {dim}] rows {rows} {}", case.what());
                    let (kept, input) = case.upload(&gpu, eps as f32);
                    let y = Tensor::zeros((rows, n), dtype, &gpu).unwrap();
                    let y_small = Tensor::zeros((rows, 16), dtype, &gpu).unwrap();
                    let took = unsafe {
                        CudaNf4Tensor::gemv_group_into(
                            &[(&nf4.gpu, ptr(&y)), (&nf4_small.gpu, ptr(&y_small))],
                            dtype,
                            GemvInput::Normed(input),
                            rows,
                        )
                    }
                    .unwrap();
                    // f32 goes to the generic kernel, which does not normalize.
                    assert_eq!(took, dtype != DType::F32, "NF4 {what}: launched");
                    if took {
                        case.check(&kept, eps, tolerance, &format!("NF4 {what}"));
                        let x = kept[5].to_device(&Device::Cpu).unwrap();
                        for (w, y, which) in [(&nf4, &y, "first"), (&nf4_small, &y_small, "second")]
                        {
                            let error = relative_error(&to_f64(y), &cpu_product(w, &x));
                            assert!(error <= tolerance, "NF4 {what}: {which} y {error:.2e}");
                        }
                        // The norm kernel gives the same sum (no reduction in it, unless the delta is normalized
                        // first: then a rounding of its norm may differ) and nearly the same x.
                        let norm_out = Tensor::zeros((rows, dim), dtype, &gpu).unwrap();
                        let norm_x = norm_out.zeros_like().unwrap();
                        let separate = NormedInput {
                            residual_out: Some(ptr(&norm_out)),
                            normed_out: Some(ptr(&norm_x)),
                            ..input
                        };
                        unsafe { k.residual_rms_norm(&separate, rows, dim) }.unwrap();
                        let (sum, want) = (to_f64(&kept[4]), to_f64(&norm_out));
                        if input.delta_weight.is_none() {
                            assert_eq!(sum, want, "NF4 {what}: sum");
                        } else {
                            let error = relative_error(&sum, &want);
                            assert!(error <= tolerance, "NF4 {what}: sum {error:.2e}");
                        }
                    }

                    let (kept, input) = case.upload(&gpu, eps as f32);
                    let y = Tensor::zeros((rows, n), dtype, &gpu).unwrap();
                    let dense_y = DenseGemv {
                        weight: ptr(&dense_gpu),
                        y: ptr(&y),
                        n,
                    };
                    let took =
                        unsafe { k.gemv_dense(&[dense_y], GemvInput::Normed(input), rows, dim) }
                            .unwrap();
                    assert!(took, "dense {what}: launched");
                    case.check(&kept, eps, tolerance, &format!("dense {what}"));
                    let x = f64_of(&kept[5]);
                    let want = x.matmul(&f64_of(&dense).t().unwrap()).unwrap();
                    let error = relative_error(&to_f64(&y), &to_f64(&want));
                    assert!(error <= tolerance, "dense {what}: y {error:.2e}");
                }
            }
        }
        // Rows of x not 16-byte aligned: the dense kernel declines and launches nothing.
        let case = &normed_cases(1, 37, dtype)[1];
        let (_kept, input) = case.upload(&gpu, eps as f32);
        let w = randn(&[8, 37], dtype).to_device(&gpu).unwrap();
        let y = Tensor::zeros((1, 8), dtype, &gpu).unwrap();
        let unaligned = DenseGemv {
            weight: ptr(&w),
            y: ptr(&y),
            n: 8,
        };
        let took = unsafe { k.gemv_dense(&[unaligned], GemvInput::Normed(input), 1, 37) }.unwrap();
        assert!(
            !took && to_f64(&y).iter().all(|&v| v == 0.0),
            "{dtype:?}: unaligned"
        );
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
                unsafe { dense_gemv(&k, &[(&wg, &y)], &xg, rows) };
                let want = f64_of(&x).matmul(&f64_of(&w).t().unwrap()).unwrap();
                let error = relative_error(&to_f64(&y), &to_f64(&want));
                assert!(
                    error <= tolerance.max(1e-5),
                    "gemv_dense {dtype:?} {rows}x{kk} · {n}: {error:.2e}"
                );
            }
        }
        // Three weights of one width and different heights (q, k and v) in one launch: each output as its own
        // launch gives it, bit for bit (one warp sums a row either way).
        let kk = 1000;
        let weights: Vec<Tensor> = [256, 13, 300]
            .iter()
            .map(|&n| randn(&[n, kk], dtype).to_device(&gpu).unwrap())
            .collect();
        let x = randn(&[3, kk], dtype).to_device(&gpu).unwrap();
        let zeros = |w: &Tensor| Tensor::zeros((3, w.dims()[0]), dtype, &gpu).unwrap();
        let grouped: Vec<Tensor> = weights.iter().map(zeros).collect();
        let pairs: Vec<_> = weights.iter().zip(&grouped).collect();
        unsafe { dense_gemv(&k, &pairs, &x, 3) };
        for (i, (w, y)) in pairs.into_iter().enumerate() {
            let alone = zeros(w);
            unsafe { dense_gemv(&k, &[(w, &alone)], &x, 3) };
            assert_eq!(
                to_f64(y),
                to_f64(&alone),
                "gemv_dense {dtype:?}: weight {i} of 3"
            );
        }
        let slot = DenseGemv {
            weight: 0,
            y: 0,
            n: 8,
        };
        let too_many = unsafe { k.gemv_dense(&[slot], GemvInput::Rows(0), 9, 8) }.unwrap_err();
        assert!(too_many.to_string().contains("1 to 8"), "{too_many}");
        let four = unsafe { k.gemv_dense(&[slot; 4], GemvInput::Rows(0), 1, 8) }.unwrap_err();
        assert!(four.to_string().contains("1 to 3"), "{four}");
    }
}

/// `y = x · wᵀ` for each (w, y) of `outputs` in one dense GEMV launch.
///
/// # Safety
/// x holds `rows` rows of the weights' width and each y `rows` rows of its weight's height.
unsafe fn dense_gemv(k: &DecodeKernels, outputs: &[(&Tensor, &Tensor)], x: &Tensor, rows: usize) {
    let weights: Vec<DenseGemv> = outputs
        .iter()
        .map(|&(w, y)| DenseGemv {
            weight: ptr(w),
            y: ptr(y),
            n: w.dims()[0],
        })
        .collect();
    let width = outputs[0].0.dims()[1];
    let launched = unsafe { k.gemv_dense(&weights, GemvInput::Rows(ptr(x)), rows, width) }.unwrap();
    assert!(launched, "a dense GEMV of rows always launches");
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
                    k.attention_at(&AttentionAt {
                        q: ptr(&q),
                        out: ptr(&out),
                        k_cache: ptr(&kc),
                        v_cache: ptr(&vc),
                        heads_total: b * kv * rep,
                        rep,
                        capacity,
                        head_dim: d,
                        pos: ptr(&pos),
                        scale: 0.125,
                        scratch: ptr(&scratch),
                    })
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
    let bad = AttentionAt {
        q: 0,
        out: 0,
        k_cache: 0,
        v_cache: 0,
        heads_total: 10,
        rep: 3,
        capacity: 8,
        head_dim: 64,
        pos: 0,
        scale: 1.0,
        scratch: 0,
    };
    let bad = unsafe { k.attention_at(&bad) }.unwrap_err();
    assert!(bad.to_string().contains("groups of 3"), "{bad}");
}
