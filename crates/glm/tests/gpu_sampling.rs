//! Sampling on the GPU (glm_kernels::SamplingKernels, kernels/sampling.cu) against the CPU sampler it stands in
//! for (glm::sampling): the same token for the same uniform number, on random rows of f32, f16 and bf16 logits (the
//! host gets the same values widened to f32) of awkward vocabulary sizes, batches of 1 to 8 rows, every setting of
//! temperature, top-k, top-p and repetition penalty, ties and -inf scores; the seen mask and the position as the
//! decode step needs them; rows the host refuses.
//!
//! The kernel adds its f64 sums in another order than the host: where the draw's target or top-p's threshold falls
//! within rounding of a cumulative sum, it may go the other way. Every difference must be such a case, and they
//! must be rare.
//!
//! Without a CUDA device each test prints that it was skipped, unless GLM_REQUIRE_GPU=1 makes that a failure.

use std::f64::consts::TAU;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaStream};
use candle_core::{CudaDevice, DType, Device};
use glm::sampling::{softmax, Sampler, SamplingConfig};
use glm_kernels::{
    cuda_device_or_skip, device_pointer, sampling_scratch_bytes, SampleParams, SampleRows,
    SamplingKernels,
};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// The kernel's token for a row the host refuses (NaN, +inf, all -inf).
const REFUSED: u32 = u32::MAX;
/// The largest uniform below 1.
const ALMOST_ONE: f64 = 1.0 - f64::EPSILON / 2.0;
const DTYPES: [DType; 3] = [DType::F32, DType::F16, DType::BF16];

/// A row as the host sees it: logits (already rounded to the launch's dtype), context, the draw's uniform.
#[derive(Clone)]
struct Row {
    logits: Vec<f32>,
    context: Vec<u32>,
    u: f64,
}

/// What a launch gave back.
struct Sampled {
    tokens: Vec<u32>,
    /// The seen masks after the launch, `[rows, vocab]` (empty without masks).
    seen: Vec<u8>,
    pos: u32,
}

/// The kernels and the stream the launches and copies share.
struct Gpu {
    dev: CudaDevice,
    stream: Arc<CudaStream>,
    kernels: SamplingKernels,
}

impl Gpu {
    fn new(test: &str) -> Option<Self> {
        let Device::Cuda(dev) = cuda_device_or_skip(test)? else {
            unreachable!("cuda_device_or_skip gives a CUDA device")
        };
        let kernels = SamplingKernels::new(&dev).unwrap();
        Some(Self {
            stream: dev.cuda_stream(),
            dev,
            kernels,
        })
    }

    fn upload<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        &self,
        host: &[T],
    ) -> CudaSlice<T> {
        self.stream.clone_htod(host).unwrap()
    }

    /// Samples `rows` (logits stored as `dtype`) with `config`'s settings, their contexts as seen masks when
    /// `masks` (none otherwise), from position `pos`.
    fn sample(
        &self,
        rows: &[Row],
        dtype: DType,
        config: &SamplingConfig,
        masks: bool,
        pos: u32,
    ) -> Sampled {
        let vocab = rows[0].logits.len();
        let values: Vec<f32> = rows.iter().flat_map(|r| r.logits.iter().copied()).collect();
        // Keeps the logits alive until the tokens are back.
        let (_f32s, _halves, logits) = if dtype == DType::F32 {
            let buf = self.upload(&values);
            let ptr = device_pointer(&buf, &self.dev);
            (Some(buf), None, ptr)
        } else {
            let buf = self.upload(
                &values
                    .iter()
                    .map(|&x| half_bits(dtype, x))
                    .collect::<Vec<_>>(),
            );
            let ptr = device_pointer(&buf, &self.dev);
            (None, Some(buf), ptr)
        };
        let mut mask = vec![0u8; if masks { rows.len() * vocab } else { 0 }];
        if masks {
            for (r, row) in rows.iter().enumerate() {
                for &id in &row.context {
                    mask[r * vocab + id as usize] = 1;
                }
            }
        }
        let seen = masks.then(|| self.upload(&mask));
        let tokens = self.stream.alloc_zeros::<u32>(rows.len()).unwrap();
        let pos_buf = self.upload(&[pos]);
        let uniforms = self.upload(&rows.iter().map(|r| r.u).collect::<Vec<f64>>());
        let scratch = self
            .stream
            .alloc_zeros::<u8>(sampling_scratch_bytes(rows.len(), vocab))
            .unwrap();
        let launch = SampleRows {
            logits,
            dtype,
            rows: rows.len(),
            vocab,
            tokens: device_pointer(&tokens, &self.dev),
            pos: device_pointer(&pos_buf, &self.dev),
            uniforms: device_pointer(&uniforms, &self.dev),
            seen: seen.as_ref().map(|s| device_pointer(s, &self.dev)),
            scratch: device_pointer(&scratch, &self.dev),
            params: params(config),
        };
        // SAFETY: every buffer above holds what SampleRows says and outlives the copies back, which wait for it.
        unsafe { self.kernels.sample_rows(&launch) }.unwrap();
        Sampled {
            tokens: self.stream.clone_dtoh(&tokens).unwrap(),
            seen: seen.map_or_else(Vec::new, |s| self.stream.clone_dtoh(&s).unwrap()),
            pos: self.stream.clone_dtoh(&pos_buf).unwrap()[0],
        }
    }
}

fn params(config: &SamplingConfig) -> SampleParams {
    SampleParams {
        temperature: config.temperature,
        top_k: config.top_k,
        top_p: config.top_p,
        repetition_penalty: config.repetition_penalty,
    }
}

/// The f16/bf16 bits of `x` (exact for values already rounded to `dtype`).
fn half_bits(dtype: DType, x: f32) -> u16 {
    match dtype {
        DType::F16 => f16::from_f32(x).to_bits(),
        DType::BF16 => bf16::from_f32(x).to_bits(),
        other => panic!("{other:?} is not a half type"),
    }
}

/// `x` stored as `dtype` and read back as f32: what the host gets.
fn as_stored(dtype: DType, x: f32) -> f32 {
    match dtype {
        DType::F16 => f16::from_f32(x).to_f32(),
        DType::BF16 => bf16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// The host's draw for a uniform `u`: the token, the probabilities it drew from, the target u · total.
struct Draw {
    token: u32,
    probs: Vec<f32>,
    target: f64,
}

/// What `Sampler::sample` picks when its random number is `u`; None where it reports an error. The draw is the
/// sampler's, written with a running sum (checked against the sampler itself where u comes from its stream).
fn host_draw(config: &SamplingConfig, logits: &[f32], context: &[u32], u: f64) -> Option<Draw> {
    let scores = config.process_logits(logits, context).ok()?;
    let probs = softmax(&scores);
    let running: Vec<f64> = probs
        .iter()
        .scan(0.0f64, |sum, &p| {
            *sum += f64::from(p);
            Some(*sum)
        })
        .collect();
    let target = u * running.last().copied().unwrap_or(0.0);
    let positive = |&i: &usize| probs[i] > 0.0;
    // No positive probability (NaN ones, from scores made +inf): the first maximum.
    let first_max =
        (0..scores.len()).fold(0, |best, i| if scores[i] > scores[best] { i } else { best });
    let token = (0..probs.len())
        .filter(positive)
        .find(|&i| running[i] > target)
        .or_else(|| (0..probs.len()).rev().find(positive))
        .unwrap_or(first_max);
    Some(Draw {
        token: token as u32,
        probs,
        target,
    })
}

/// Whether `got` is what the host picks once the draw's target, or top-p's threshold, moves by rounding: the
/// target within 1e-9 of the total from `got`'s span of the cumulative sum, or the threshold one f32 step away.
fn rounding_boundary(config: &SamplingConfig, row: &Row, draw: &Draw, got: u32) -> bool {
    let got = got as usize;
    if got < draw.probs.len() && draw.probs[got] > 0.0 {
        let before: f64 = draw.probs[..got].iter().map(|&p| f64::from(p)).sum();
        let after = before + f64::from(draw.probs[got]);
        let total: f64 = draw.probs.iter().map(|&p| f64::from(p)).sum();
        let slack = 1e-9 * total;
        if before - slack <= draw.target && draw.target < after + slack {
            return true;
        }
    }
    if config.top_p < 1.0 {
        let threshold = (1.0 - config.top_p) as f32;
        for step in [1i32, -1] {
            let nudged = f32::from_bits(threshold.to_bits().wrapping_add_signed(step));
            let top_p = 1.0 - f64::from(nudged);
            if !(0.0..1.0).contains(&top_p) {
                continue;
            }
            let nudged = SamplingConfig {
                top_p,
                ..config.clone()
            };
            if host_draw(&nudged, &row.logits, &row.context, row.u)
                .is_some_and(|d| d.token as usize == got)
            {
                return true;
            }
        }
    }
    false
}

/// A standard normal number (Box-Muller).
fn normal(rng: &mut ChaCha8Rng) -> f32 {
    let (a, b): (f64, f64) = (rng.random(), rng.random());
    ((-2.0 * (1.0 - a).ln()).sqrt() * (TAU * b).cos()) as f32
}

/// Random logits of one of several shapes: spread normal values, ties, -inf entries, a few dominant tokens, all
/// equal, a few levels; rounded to `dtype`.
fn random_logits(rng: &mut ChaCha8Rng, vocab: usize, dtype: DType) -> Vec<f32> {
    let scale = [0.5f32, 2.0, 8.0][rng.random_range(0..3)];
    let mut x: Vec<f32> = (0..vocab).map(|_| normal(rng) * scale).collect();
    match rng.random_range(0..6) {
        1 => x.iter_mut().for_each(|v| *v = (*v * 2.0).round() / 2.0),
        2 => {
            for v in x.iter_mut() {
                if rng.random_bool(0.3) {
                    *v = f32::NEG_INFINITY;
                }
            }
            x[rng.random_range(0..vocab)] = 1.0;
        }
        3 => {
            for _ in 0..3 {
                x[rng.random_range(0..vocab)] += 15.0;
            }
        }
        4 => x.fill([0.0, -3.0, 2.5][rng.random_range(0..3)]),
        5 => x
            .iter_mut()
            .for_each(|v| *v = rng.random_range(0..4) as f32 * 0.75),
        _ => {}
    }
    x.into_iter().map(|v| as_stored(dtype, v)).collect()
}

/// A uniform for a row: 0, the largest below 1, or the next number of a sampler's stream seeded with `seed`.
fn random_u(rng: &mut ChaCha8Rng, seed: u64) -> f64 {
    match rng.random_range(0..6) {
        0 => 0.0,
        1 => ALMOST_ONE,
        _ => ChaCha8Rng::seed_from_u64(seed).random(),
    }
}

fn random_config(rng: &mut ChaCha8Rng, vocab: usize) -> SamplingConfig {
    SamplingConfig {
        temperature: [0.05, 0.7, 1.0, 1.3][rng.random_range(0..4)],
        top_k: [0, 1, 5, 50, vocab][rng.random_range(0..5)],
        top_p: [1.0, 0.95, 0.8, 0.1, 0.0][rng.random_range(0..5)],
        repetition_penalty: [1.0, 1.3, 0.8][rng.random_range(0..3)],
        seed: rng.random(),
    }
}

#[test]
fn the_gpu_draws_the_cpu_samplers_tokens() {
    let Some(gpu) = Gpu::new("the_gpu_draws_the_cpu_samplers_tokens") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(10);
    let (mut rows_checked, mut boundaries) = (0usize, 0usize);
    for launch in 0..360 {
        let dtype = DTYPES[launch % 3];
        let vocab = [1, 7, 1000, 4099, 65_537, 151_552][rng.random_range(0..6)];
        let config = random_config(&mut rng, vocab);
        let batch: Vec<Row> = (0..rng.random_range(1..=8))
            .map(|_| {
                let context_len = rng.random_range(0..20);
                Row {
                    logits: random_logits(&mut rng, vocab, dtype),
                    context: (0..context_len)
                        .map(|_| rng.random_range(0..vocab as u32))
                        .collect(),
                    u: random_u(&mut rng, config.seed),
                }
            })
            .collect();
        let masks = config.repetition_penalty != 1.0 || rng.random_bool(0.5);
        let got = gpu.sample(&batch, dtype, &config, masks, 0);
        for (r, (row, &token)) in batch.iter().zip(&got.tokens).enumerate() {
            let what = format!(
                "launch {launch} row {r}: {dtype:?} vocab {vocab} {config:?} u {:?}",
                row.u
            );
            // Without a mask the kernel applies no penalty: neither does the host without a context.
            let context: &[u32] = if masks { &row.context } else { &[] };
            let host_row = Row {
                context: context.to_vec(),
                ..row.clone()
            };
            let draw = host_draw(&config, &row.logits, context, row.u).expect("valid logits");
            if row.u == ChaCha8Rng::seed_from_u64(config.seed).random::<f64>() {
                let mut sampler = Sampler::new(config.clone()).unwrap();
                assert_eq!(
                    draw.token,
                    sampler.sample(&row.logits, context).unwrap(),
                    "{what}: the test's draw"
                );
            }
            rows_checked += 1;
            if token != draw.token {
                assert!(
                    rounding_boundary(&config, &host_row, &draw, token),
                    "{what}: the GPU picked {token}, the host {} (not a rounding boundary)",
                    draw.token
                );
                eprintln!(
                    "{what}: rounding boundary, GPU {token}, host {}",
                    draw.token
                );
                boundaries += 1;
            }
        }
    }
    eprintln!("{rows_checked} rows, {boundaries} decided differently at a rounding boundary");
    assert!(
        boundaries * 100 <= rows_checked,
        "{boundaries} boundary cases in {rows_checked} rows"
    );
}

/// Decode steps with the penalty: the seen mask the kernel keeps must be the context the host sampler sees, the
/// uniforms the next numbers of each row's sampler stream, the position one more per step.
#[test]
fn steps_follow_the_cpu_sampler_with_the_seen_mask() {
    let Some(gpu) = Gpu::new("steps_follow_the_cpu_sampler_with_the_seen_mask") else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for (vocab, dtype) in [
        (1000, DType::F32),
        (151_552, DType::BF16),
        (65_537, DType::F16),
    ] {
        let config = SamplingConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            repetition_penalty: 1.3,
            seed: 0,
        };
        let rows = 3u64;
        let mut samplers: Vec<Sampler> = (0..rows)
            .map(|r| {
                Sampler::new(SamplingConfig {
                    seed: r,
                    ..config.clone()
                })
                .unwrap()
            })
            .collect();
        let mut streams: Vec<ChaCha8Rng> = (0..rows).map(ChaCha8Rng::seed_from_u64).collect();
        let mut contexts: Vec<Vec<u32>> = (0..rows)
            .map(|_| (0..5).map(|_| rng.random_range(0..vocab as u32)).collect())
            .collect();
        let mut mask = Vec::new();
        for step in 0..12u32 {
            // Logits that favour the tokens already seen, so that the penalty matters.
            let batch: Vec<Row> = contexts
                .iter()
                .zip(&mut streams)
                .map(|(context, stream)| {
                    let mut logits = random_logits(&mut rng, vocab, dtype);
                    for &id in context {
                        logits[id as usize] = as_stored(dtype, 6.0 + normal(&mut rng));
                    }
                    Row {
                        logits,
                        context: context.clone(),
                        u: stream.random(),
                    }
                })
                .collect();
            let got = gpu.sample(&batch, dtype, &config, true, 100 + step);
            assert_eq!(
                got.pos,
                101 + step,
                "vocab {vocab}: position after step {step}"
            );
            for (r, row) in batch.iter().enumerate() {
                let host = samplers[r].sample(&row.logits, &row.context).unwrap();
                let token = got.tokens[r];
                if token != host {
                    let draw = host_draw(&config, &row.logits, &row.context, row.u).unwrap();
                    assert_eq!(draw.token, host, "the test's draw");
                    assert!(
                        rounding_boundary(&config, row, &draw, token),
                        "vocab {vocab} step {step} row {r}: GPU {token}, host {host}"
                    );
                }
                contexts[r].push(token);
            }
            mask = got.seen;
        }
        // The mask the last launch left: the prompt and every generated token.
        for (r, context) in contexts.iter().enumerate() {
            let marked: Vec<u32> = (0..vocab as u32)
                .filter(|&i| mask[r * vocab + i as usize] == 1)
                .collect();
            let mut want = context.clone();
            want.sort_unstable();
            want.dedup();
            // The launch marks what it chose on top of the context it was given.
            assert_eq!(marked, want, "vocab {vocab} row {r}: seen mask");
        }
    }
}

/// Rows the host refuses give u32::MAX and leave the mask alone; u = 0 takes the first token with a probability;
/// scores made +inf by the temperature take the first of them (the host's NaN probabilities); one token; the
/// same launch twice gives the same tokens; the position advances once per launch whatever the rows.
#[test]
fn edge_rows() {
    let Some(gpu) = Gpu::new("edge_rows") else {
        return;
    };
    let vocab = 4099;
    let config = SamplingConfig {
        temperature: 1.0,
        top_k: 0,
        top_p: 0.95,
        repetition_penalty: 1.1,
        seed: 0,
    };
    for dtype in DTYPES {
        let finite = Row {
            logits: (0..vocab)
                .map(|i| as_stored(dtype, (i % 13) as f32 * 0.25))
                .collect(),
            context: vec![5, 17],
            u: 0.0,
        };
        let mut nan = finite.clone();
        nan.logits[4000] = f32::NAN;
        let mut inf = finite.clone();
        inf.logits[7] = f32::INFINITY;
        let minus_inf = Row {
            logits: vec![f32::NEG_INFINITY; vocab],
            ..finite.clone()
        };
        let mut late = finite.clone();
        late.u = ALMOST_ONE;
        let rows = [finite.clone(), nan, inf, minus_inf, late.clone()];
        let got = gpu.sample(&rows, dtype, &config, true, 7);
        assert_eq!(got.pos, 8, "{dtype:?}: position");
        let want_first = host_draw(&config, &finite.logits, &finite.context, 0.0)
            .unwrap()
            .token;
        let want_late = host_draw(&config, &late.logits, &late.context, ALMOST_ONE)
            .unwrap()
            .token;
        assert_eq!(
            got.tokens,
            [want_first, REFUSED, REFUSED, REFUSED, want_late],
            "{dtype:?}"
        );
        for (r, row) in rows.iter().enumerate() {
            let marked: Vec<usize> = (0..vocab)
                .filter(|&i| got.seen[r * vocab + i] == 1)
                .collect();
            let mut want: Vec<usize> = row.context.iter().map(|&i| i as usize).collect();
            if got.tokens[r] != REFUSED {
                want.push(got.tokens[r] as usize);
            }
            want.sort_unstable();
            want.dedup();
            assert_eq!(marked, want, "{dtype:?} row {r}: seen mask");
        }
        let again = gpu.sample(&rows, dtype, &config, true, 7);
        assert_eq!(again.tokens, got.tokens, "{dtype:?}: a second launch");
        // One token.
        let one = Row {
            logits: vec![as_stored(dtype, -2.0)],
            context: vec![],
            u: 0.5,
        };
        assert_eq!(
            gpu.sample(&[one], dtype, &config, false, 0).tokens,
            [0],
            "{dtype:?}: one token"
        );
    }
    // f32 scores beyond f32 once divided by a small temperature.
    let hot = SamplingConfig {
        temperature: 0.05,
        ..config.clone()
    };
    let mut logits = vec![1.0f32; vocab];
    logits[3000] = 3e38;
    logits[200] = 3e38;
    let row = Row {
        logits,
        context: vec![],
        u: 0.3,
    };
    let host = host_draw(&hot, &row.logits, &row.context, row.u)
        .unwrap()
        .token;
    assert_eq!(host, 200);
    assert_eq!(
        gpu.sample(&[row], DType::F32, &hot, false, 0).tokens,
        [host],
        "scores made +inf"
    );
}

#[test]
fn refuses_greedy_and_bad_settings() {
    let Some(gpu) = Gpu::new("refuses_greedy_and_bad_settings") else {
        return;
    };
    let good = SampleParams {
        temperature: 0.7,
        top_k: 0,
        top_p: 0.9,
        repetition_penalty: 1.0,
    };
    for params in [
        SampleParams {
            temperature: 0.0,
            ..good
        },
        SampleParams { top_p: 1.5, ..good },
        SampleParams {
            repetition_penalty: f64::NAN,
            ..good
        },
    ] {
        let launch = SampleRows {
            logits: 0,
            dtype: DType::F32,
            rows: 1,
            vocab: 10,
            tokens: 0,
            pos: 0,
            uniforms: 0,
            seen: None,
            scratch: 0,
            params,
        };
        // SAFETY: refused before anything is launched.
        assert!(
            unsafe { gpu.kernels.sample_rows(&launch) }.is_err(),
            "{params:?}"
        );
    }
}
