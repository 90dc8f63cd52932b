//! Sampling against transformers' logits processors (tests/fixtures/make_tokenizer_fixtures.py).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use glm::sampling::{softmax, FinishReason, Sampler, SamplingConfig, SamplingError, StopCondition};
use serde::Deserialize;

#[derive(Deserialize)]
struct ReferenceConfig {
    repetition_penalty: f64,
    temperature: f64,
    top_k: usize,
    top_p: f64,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    config: ReferenceConfig,
    logits: Vec<f32>,
    context: Vec<u32>,
    kept: Vec<usize>,
    probs: Vec<f32>,
    greedy: u32,
}

#[derive(Deserialize)]
struct References {
    vocab_size: usize,
    cases: Vec<Case>,
}

fn references() -> References {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/tokenizer/references/sampling.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn sampling_config(c: &ReferenceConfig, seed: u64) -> SamplingConfig {
    SamplingConfig {
        temperature: c.temperature,
        top_k: c.top_k,
        top_p: c.top_p,
        repetition_penalty: c.repetition_penalty,
        seed,
    }
}

/// Logits from a fixed linear congruential stream, spread like a model's.
fn pseudo_random_logits(n: usize, mut state: u64) -> Vec<f32> {
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 8.0
        })
        .collect()
}

fn argmax(xs: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn filters_keep_the_tokens_transformers_keeps_with_the_same_probabilities() {
    let refs = references();
    assert!(refs.cases.len() >= 40);
    for case in &refs.cases {
        assert_eq!(case.logits.len(), refs.vocab_size);
        let config = sampling_config(&case.config, 0);
        let scores = config.process_logits(&case.logits, &case.context).unwrap();
        let kept: Vec<usize> = (0..scores.len())
            .filter(|&i| scores[i] != f32::NEG_INFINITY)
            .collect();
        assert_eq!(kept, case.kept, "{}: surviving tokens", case.name);
        let probs = softmax(&scores);
        for (i, (&ours, &theirs)) in probs.iter().zip(&case.probs).enumerate() {
            assert!(
                (ours - theirs).abs() <= 1e-6,
                "{}: p[{i}] = {ours}, transformers {theirs}",
                case.name
            );
        }
    }
}

#[test]
fn greedy_applies_the_repetition_penalty_then_argmax_like_transformers() {
    let refs = references();
    for case in &refs.cases {
        let config = SamplingConfig {
            repetition_penalty: case.config.repetition_penalty,
            ..SamplingConfig::greedy()
        };
        let mut sampler = Sampler::new(config).unwrap();
        assert_eq!(
            sampler.sample(&case.logits, &case.context).unwrap(),
            case.greedy,
            "{}",
            case.name
        );
    }
}

#[test]
fn greedy_is_argmax() {
    let mut sampler = Sampler::new(SamplingConfig::greedy()).unwrap();
    for seed in 0..50 {
        let logits = pseudo_random_logits(1000, seed);
        assert_eq!(sampler.sample(&logits, &[]).unwrap(), argmax(&logits));
    }
    // Ties go to the first maximum, as torch.argmax.
    assert_eq!(sampler.sample(&[1.0, 3.0, 3.0, -1.0], &[]).unwrap(), 1);
}

#[test]
fn samples_stay_within_the_kept_tokens() {
    let refs = references();
    for case in &refs.cases {
        let mut sampler = Sampler::new(sampling_config(&case.config, 11)).unwrap();
        for _ in 0..50 {
            let token = sampler.sample(&case.logits, &case.context).unwrap() as usize;
            assert!(case.kept.contains(&token), "{}: sampled {token}", case.name);
        }
    }
}

#[test]
fn sample_frequencies_follow_the_probabilities() {
    let logits = [1.0f32, 0.0, 2.0, -1.0, 0.5];
    let config = SamplingConfig {
        temperature: 1.0,
        seed: 3,
        ..SamplingConfig::greedy()
    };
    let probs = softmax(&logits);
    let mut sampler = Sampler::new(config).unwrap();
    let draws = 40_000;
    let mut counts = [0usize; 5];
    for _ in 0..draws {
        counts[sampler.sample(&logits, &[]).unwrap() as usize] += 1;
    }
    for (i, (&count, &p)) in counts.iter().zip(&probs).enumerate() {
        let freq = count as f32 / draws as f32;
        // Five standard deviations of a binomial frequency at 40k draws is below 0.012.
        assert!(
            (freq - p).abs() < 0.012,
            "token {i}: frequency {freq}, probability {p}"
        );
    }
}

fn draw(config: &SamplingConfig, steps: usize) -> Vec<u32> {
    let mut sampler = Sampler::new(config.clone()).unwrap();
    let mut context = vec![1u32, 2, 3];
    (0..steps)
        .map(|step| {
            let logits = pseudo_random_logits(256, step as u64 % 7);
            let token = sampler.sample(&logits, &context).unwrap();
            context.push(token);
            token
        })
        .collect()
}

#[test]
fn the_same_seed_gives_the_same_tokens_and_other_seeds_differ() {
    let config = SamplingConfig {
        temperature: 1.3,
        top_k: 50,
        top_p: 0.95,
        repetition_penalty: 1.1,
        seed: 42,
    };
    let first = draw(&config, 200);
    assert_eq!(first, draw(&config, 200));
    for seed in [0, 1, 43, u64::MAX] {
        let other = draw(
            &SamplingConfig {
                seed,
                ..config.clone()
            },
            200,
        );
        assert_ne!(
            first, other,
            "seed {seed} gave the same 200 tokens as seed 42"
        );
    }
}

#[test]
fn top_k_one_is_greedy() {
    for seed in 0..30 {
        let logits = pseudo_random_logits(500, seed + 100);
        let config = SamplingConfig {
            temperature: 1.7,
            top_k: 1,
            seed,
            ..SamplingConfig::greedy()
        };
        let mut sampler = Sampler::new(config).unwrap();
        assert_eq!(sampler.sample(&logits, &[]).unwrap(), argmax(&logits));
    }
}

#[test]
fn tensor_logits_sample_like_the_slice() {
    let logits = pseudo_random_logits(300, 9);
    let expected = argmax(&logits);
    let row = Tensor::new(logits.as_slice(), &Device::Cpu).unwrap();
    let mut sampler = Sampler::new(SamplingConfig::greedy()).unwrap();
    assert_eq!(sampler.sample_tensor(&row, &[]).unwrap(), expected);
    let batch_of_one = row.reshape((1, 1, 300)).unwrap();
    assert_eq!(sampler.sample_tensor(&batch_of_one, &[]).unwrap(), expected);
    for dtype in [DType::F16, DType::BF16, DType::F64] {
        let converted = row.to_dtype(dtype).unwrap();
        let rounded = converted
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(
            sampler.sample_tensor(&converted, &[]).unwrap(),
            argmax(&rounded)
        );
    }
    let two_rows = Tensor::zeros((2, 300), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        sampler.sample_tensor(&two_rows, &[]),
        Err(SamplingError::LogitsShape(dims)) if dims == vec![2, 300]
    ));
    let scalar = Tensor::new(1.0f32, &Device::Cpu).unwrap();
    assert!(matches!(
        sampler.sample_tensor(&scalar, &[]),
        Err(SamplingError::LogitsShape(_))
    ));
}

#[test]
fn bad_settings_are_refused() {
    let with = |f: fn(&mut SamplingConfig)| {
        let mut config = SamplingConfig::greedy();
        f(&mut config);
        Sampler::new(config).map(|_| ())
    };
    assert!(matches!(
        with(|c| c.temperature = -0.5),
        Err(SamplingError::Temperature(_))
    ));
    assert!(matches!(
        with(|c| c.temperature = f64::NAN),
        Err(SamplingError::Temperature(_))
    ));
    assert!(matches!(
        with(|c| c.top_p = 1.5),
        Err(SamplingError::TopP(_))
    ));
    assert!(matches!(
        with(|c| c.top_p = -0.1),
        Err(SamplingError::TopP(_))
    ));
    assert!(matches!(
        with(|c| c.top_p = f64::NAN),
        Err(SamplingError::TopP(_))
    ));
    assert!(matches!(
        with(|c| c.repetition_penalty = 0.0),
        Err(SamplingError::RepetitionPenalty(_))
    ));
    assert!(with(|c| c.top_k = 0).is_ok());
    let err = with(|c| c.temperature = -1.0).unwrap_err();
    assert!(err.to_string().contains("temperature"), "{err}");
}

#[test]
fn bad_logits_are_refused() {
    let mut greedy = Sampler::new(SamplingConfig::greedy()).unwrap();
    let mut sampling = Sampler::new(SamplingConfig {
        temperature: 1.0,
        top_k: 3,
        top_p: 0.9,
        ..SamplingConfig::greedy()
    })
    .unwrap();
    for sampler in [&mut greedy, &mut sampling] {
        assert!(matches!(
            sampler.sample(&[], &[]),
            Err(SamplingError::EmptyLogits)
        ));
        assert!(matches!(
            sampler.sample(&[0.0, f32::NAN], &[]),
            Err(SamplingError::NonFiniteLogit { index: 1, .. })
        ));
        assert!(matches!(
            sampler.sample(&[f32::INFINITY, 0.0], &[]),
            Err(SamplingError::NonFiniteLogit { index: 0, .. })
        ));
        assert!(matches!(
            sampler.sample(&[f32::NEG_INFINITY; 4], &[]),
            Err(SamplingError::NoCandidate)
        ));
    }
    // Masked (-inf) tokens are fine and never chosen.
    for _ in 0..100 {
        let token = sampling
            .sample(&[f32::NEG_INFINITY, 0.5, f32::NEG_INFINITY, 0.4], &[])
            .unwrap();
        assert!(token == 1 || token == 3);
    }
    let mut penalised = Sampler::new(SamplingConfig {
        repetition_penalty: 1.2,
        ..SamplingConfig::greedy()
    })
    .unwrap();
    assert!(matches!(
        penalised.sample(&[0.0; 4], &[1, 4]),
        Err(SamplingError::ContextTokenOutOfRange { id: 4, vocab: 4 })
    ));
}

#[test]
fn stop_condition_reports_stop_or_length() {
    let stop = StopCondition::new(vec![7, 9], 3).unwrap();
    assert_eq!(stop.check(1, 1), None);
    assert_eq!(stop.check(9, 2), Some(FinishReason::Stop));
    assert_eq!(stop.check(1, 3), Some(FinishReason::Length));
    // An eos token on the last allowed step is a stop, as in transformers.
    assert_eq!(stop.check(7, 3), Some(FinishReason::Stop));
    assert!(stop.is_eos(7) && !stop.is_eos(8));
    assert_eq!(stop.eos_ids(), &[7, 9]);
    assert_eq!(stop.max_new_tokens(), 3);
    let no_eos = StopCondition::new(Vec::new(), 2).unwrap();
    assert_eq!(no_eos.check(7, 1), None);
    assert_eq!(no_eos.check(7, 2), Some(FinishReason::Length));
    assert!(matches!(
        StopCondition::new(vec![1], 0),
        Err(SamplingError::ZeroMaxNewTokens)
    ));
    assert_eq!(FinishReason::Stop.to_string(), "stop");
    assert_eq!(FinishReason::Length.as_str(), "length");
    assert_eq!(
        serde_json::to_string(&FinishReason::Length).unwrap(),
        "\"length\""
    );
}
