//! The `glm` library's public front door end to end: plan → load → generate with a streaming callback,
//! against transformers' references for the demo model, the plan against the bytes loaded, and the
//! NF4 checkpoint writer round trip.

mod common;

use candle_core::DType;
use common::*;
use glm::pipeline::{GenerationSettings, Glm, Prompt, RunOptions};
use glm::plan::{Precision, QuantMode};
use glm::sampling::{FinishReason, SamplingConfig};
use glm::GlmError;

fn options(dtype: DType, quant: QuantMode, double_quant: bool) -> RunOptions {
    let mut options = RunOptions {
        dtype,
        quant,
        ..RunOptions::default()
    };
    options.nf4.double_quant = double_quant;
    options
}

fn prompt_of(reference: &GreedyReference) -> Prompt {
    match reference.mode.as_str() {
        "raw" => Prompt::Raw(reference.prompt.clone()),
        _ => Prompt::chat(None, &reference.prompt),
    }
}

fn greedy(max_new_tokens: usize) -> GenerationSettings {
    GenerationSettings {
        sampling: SamplingConfig::greedy(),
        max_new_tokens,
        ..GenerationSettings::default()
    }
}

/// Every greedy continuation of eval.json for `variant`, as the library generates it, token for token
/// up to transformers' first near-tie; the streamed pieces add up to the returned text.
fn check_demo_greedy(variant: &str, options: &RunOptions) {
    let glm = Glm::load(demo(), options).unwrap();
    for reference in demo_greedy(variant) {
        let prompt = prompt_of(&reference);
        assert_eq!(glm.encode(&prompt).unwrap(), reference.prompt_ids);
        let mut streamed = String::new();
        let done = glm
            .generate(&prompt, &greedy(48), |piece| streamed.push_str(piece))
            .unwrap();
        assert_eq!(streamed, done.text);
        assert_eq!(done.prompt_tokens, reference.prompt_ids);
        assert_eq!(done.text, glm.tokenizer().decode(&done.tokens).unwrap());
        let trusted = reference.trusted_tokens();
        assert_eq!(
            &done.tokens[..trusted.len()],
            trusted,
            "{variant} {:?}: ours {:?}",
            reference.prompt,
            done.text
        );
        let finish = if done.tokens.len() < 48 {
            FinishReason::Stop
        } else {
            FinishReason::Length
        };
        assert_eq!(done.finish, finish);
    }
}

#[test]
fn f32_greedy_matches_transformers() {
    check_demo_greedy("f32", &options(DType::F32, QuantMode::None, true));
}

#[test]
fn nf4_greedy_matches_transformers_bitsandbytes() {
    check_demo_greedy("nf4", &options(DType::F32, QuantMode::Nf4, false));
    check_demo_greedy(
        "nf4_double_quant",
        &options(DType::F32, QuantMode::Nf4, true),
    );
}

#[test]
fn generation_is_deterministic_and_seeded_sampling_repeats() {
    let glm = Glm::load(demo(), &RunOptions::default()).unwrap();
    let prompt = Prompt::chat(Some("Answer as a king."), "Who is there?");
    let sampled = |seed| GenerationSettings {
        sampling: SamplingConfig {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            repetition_penalty: 1.1,
            seed,
        },
        max_new_tokens: 32,
        ..GenerationSettings::default()
    };
    let run =
        |settings: &GenerationSettings| glm.generate(&prompt, settings, |_| {}).unwrap().tokens;
    assert_eq!(run(&greedy(32)), run(&greedy(32)));
    assert_eq!(run(&sampled(7)), run(&sampled(7)));
    let other_seeds: Vec<_> = (8..12).map(|s| run(&sampled(s))).collect();
    assert!(other_seeds.iter().any(|t| *t != run(&sampled(7))));
}

#[test]
fn plan_weights_equal_the_bytes_loaded() {
    let fixtures: Vec<_> = FIXTURES
        .iter()
        .map(|n| (n, fixture_with_tokenizer(n)))
        .collect();
    let mut dirs = vec![("demo".to_string(), demo())];
    dirs.extend(
        fixtures
            .iter()
            .map(|(n, d)| (n.to_string(), d.path().to_path_buf())),
    );
    for (name, dir) in &dirs {
        for dtype in [DType::F32, DType::F16, DType::BF16] {
            for quant in [QuantMode::None, QuantMode::Nf4] {
                let options = options(dtype, quant, true);
                if name.ends_with("-nf4") && quant == QuantMode::None {
                    assert!(matches!(Glm::plan(dir, &options), Err(GlmError::Input(_))));
                    continue;
                }
                let plan = Glm::plan(dir, &options).unwrap();
                let glm = Glm::load(dir, &options).unwrap();
                let what = format!("{name} {dtype:?} {quant:?}");
                assert_eq!(
                    plan.choice == Precision::Nf4,
                    quant == QuantMode::Nf4,
                    "{what}"
                );
                assert_eq!(glm.plan_used().chosen(), plan.chosen(), "{what}");
                assert_eq!(
                    glm.model().weight_bytes() as u64,
                    plan.chosen().weights(),
                    "{what}"
                );
            }
        }
    }
}

#[test]
fn auto_follows_the_memory_limit() {
    let dense = Glm::plan(demo(), &RunOptions::default()).unwrap();
    assert_eq!(dense.choice, Precision::Dense);
    // Room for NF4 but not for dense weights.
    let limit = (dense.nf4.total() + dense.dense.total()) / 2 * 10 / 9;
    let options = RunOptions {
        memory_limit: Some(limit),
        ..RunOptions::default()
    };
    let glm = Glm::load(demo(), &options).unwrap();
    assert_eq!(glm.plan_used().choice, Precision::Nf4);
    assert!(glm.model().weight_bytes() < dense.dense.weights() as usize / 2);
    let too_small = RunOptions {
        memory_limit: Some(dense.nf4.total() / 2),
        ..RunOptions::default()
    };
    let err = Glm::load(demo(), &too_small).unwrap_err();
    assert!(matches!(err, GlmError::OutOfMemory(_)), "{err}");
    assert!(err.to_string().contains("--memory-limit"), "{err}");
}

#[test]
fn saved_checkpoint_reloads_with_the_same_tokens() {
    let out_root = tempfile::tempdir().unwrap();
    let out = out_root.path().join("demo-nf4");
    let nf4 = options(DType::F32, QuantMode::Nf4, true);
    let written = glm::save::save_quantized(&demo(), &out, &nf4.nf4).unwrap();
    assert_eq!(
        written,
        std::fs::metadata(out.join("model.safetensors"))
            .unwrap()
            .len()
    );
    let plan = Glm::plan(&out, &RunOptions::default()).unwrap();
    assert_eq!(plan.choice, Precision::Nf4, "{}", plan.reason);
    let saved = Glm::load(&out, &RunOptions::default()).unwrap();
    let at_load = Glm::load(demo(), &nf4).unwrap();
    assert_eq!(saved.model().weight_bytes(), at_load.model().weight_bytes());
    let prompt = Prompt::chat(None, "What say you to my love?");
    let a = saved.generate(&prompt, &greedy(32), |_| {}).unwrap();
    let b = at_load.generate(&prompt, &greedy(32), |_| {}).unwrap();
    assert_eq!(a.tokens, b.tokens);
    // The writer never overwrites: a second save into the now non-empty directory is refused.
    let again = glm::save::save_quantized(&demo(), &out, &nf4.nf4).unwrap_err();
    assert!(again.to_string().contains("not empty"), "{again}");
    assert_eq!(entries(out_root.path()), ["demo-nf4"]);
}

#[test]
fn bad_requests_are_typed_errors() {
    let glm = Glm::load(demo(), &RunOptions::default()).unwrap();
    let empty = glm.generate(&Prompt::Raw("  ".into()), &greedy(4), |_| {});
    assert!(matches!(empty, Err(GlmError::Tokenizer(_))));
    let too_long = glm.generate(&Prompt::chat(None, "Hi"), &greedy(100_000), |_| {});
    assert!(matches!(&too_long, Err(GlmError::Input(m)) if m.contains("--context")));
    let zero = glm.generate(&Prompt::chat(None, "Hi"), &greedy(0), |_| {});
    assert!(matches!(zero, Err(GlmError::Sampling(_))));
    let missing = Glm::load(demo().join("nope"), &RunOptions::default()).unwrap_err();
    assert!(missing.to_string().contains("nope"), "{missing}");
}
