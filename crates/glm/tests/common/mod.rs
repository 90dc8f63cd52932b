//! Helpers shared by the decoder's test binaries (model_reference on the CPU, gpu_end_to_end on CUDA).
// Each test binary compiles this module and uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use glm::sampling::{FinishReason, Sampler, SamplingConfig, StopCondition};
use glm::{generate, Model};

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn row(tokens: &[u32]) -> Tensor {
    Tensor::new(tokens, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

/// Our logits for a prompt and then each of `forced` fed one at a time through the KV cache:
/// ([prompt_len, vocab], [forced.len(), vocab]).
pub fn teacher_forced(model: &Model, prompt: &[u32], forced: &[u32]) -> (Tensor, Tensor) {
    let mut cache = model.new_cache();
    let prefill = model
        .forward_all(&row(prompt), &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let steps: Vec<Tensor> = forced
        .iter()
        .map(|&t| {
            model
                .forward(&row(&[t]), &mut cache)
                .unwrap()
                .squeeze(0)
                .unwrap()
        })
        .collect();
    (prefill, Tensor::stack(&steps, 0).unwrap())
}

pub fn greedy(model: &Model, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut sampler = Sampler::new(SamplingConfig::greedy()).unwrap();
    // No eos: the references are fixed-length greedy runs.
    let stop = StopCondition::new(Vec::<u32>::new(), steps).unwrap();
    let mut streamed = Vec::new();
    let out = generate(model, prompt, &mut sampler, &stop, |t| streamed.push(t)).unwrap();
    assert_eq!(out.finish, FinishReason::Length);
    assert_eq!(
        streamed, out.tokens,
        "streamed tokens differ from the returned ones"
    );
    out.tokens
}
