//! Token generation: prefill the prompt once, then decode one token at a time through the KV cache.

use candle_core::{Device, Tensor};

use crate::error::{GlmError, Result};
use crate::model::{KvCache, Model};
use crate::sampling::{FinishReason, Sampler, StopCondition};

/// The tokens a [`generate`] call produced, and why it stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// New tokens only (the eos token that stopped generation included, as transformers returns it).
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

/// How decode steps run on a CUDA device (on the CPU every mode is [`DecodeMode::Plain`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DecodeMode {
    /// Op by op through candle ([`Model::forward`]): the reference, for debugging.
    Plain,
    /// The fused decode step (`CudaDecoder`), launched kernel by kernel.
    Fused,
    /// The fused decode step captured once as a CUDA graph and replayed (the default). Falls back to
    /// [`DecodeMode::Plain`] where the fused step does not apply (see `CudaDecoder::new`).
    #[default]
    Graph,
}

impl DecodeMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DecodeMode::Plain => "plain",
            DecodeMode::Fused => "fused",
            DecodeMode::Graph => "graph",
        }
    }
}

/// Continues `prompt` with tokens chosen by `sampler` until `stop` says so, passing each new token
/// to `on_token` as soon as it is chosen. Decodes in the default [`DecodeMode`].
pub fn generate(
    model: &Model,
    prompt: &[u32],
    sampler: &mut Sampler,
    stop: &StopCondition,
    on_token: impl FnMut(u32),
) -> Result<Generation> {
    generate_with(
        model,
        prompt,
        sampler,
        stop,
        DecodeMode::default(),
        on_token,
    )
}

/// As [`generate`], decoding in `mode`.
pub fn generate_with(
    model: &Model,
    prompt: &[u32],
    sampler: &mut Sampler,
    stop: &StopCondition,
    mode: DecodeMode,
    mut on_token: impl FnMut(u32),
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(GlmError::Input(
            "the prompt has no tokens: there is nothing to continue".into(),
        ));
    }
    let mut cache = model.new_cache();
    let mut context = prompt.to_vec();
    let mut tokens = Vec::new();
    let mut choose = |token: u32, context: &mut Vec<u32>| {
        context.push(token);
        tokens.push(token);
        on_token(token);
        stop.check(token, tokens.len())
    };

    let logits = model.forward(
        &Tensor::new(prompt, &Device::Cpu)?.unsqueeze(0)?,
        &mut cache,
    )?;
    let mut token = sampler.sample_tensor(&logits, &context)?;
    if let Some(finish) = choose(token, &mut context) {
        return Ok(Generation { tokens, finish });
    }
    let mut decoder = Decoder::new(model, mode, sampler, &context)?;
    loop {
        token = decoder.next(&mut cache, token, sampler, &context)?;
        if let Some(finish) = choose(token, &mut context) {
            return Ok(Generation { tokens, finish });
        }
    }
}

/// The decode loop's step in the chosen mode (one per generation: the size difference costs nothing).
#[allow(clippy::large_enum_variant)]
enum Decoder<'m> {
    Plain(&'m Model),
    #[cfg(feature = "cuda")]
    Fused {
        step: crate::model::CudaDecoder<'m>,
        /// Whether the device chooses as the sampler would (all but greedy decoding with a repetition penalty):
        /// then the chosen token stays on the device as the next step's input, and only the first step is given
        /// one; else the host samples from the copied logits.
        on_device: bool,
    },
}

impl<'m> Decoder<'m> {
    fn new(model: &'m Model, mode: DecodeMode, sampler: &Sampler, context: &[u32]) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if mode != DecodeMode::Plain && model.device().is_cuda() {
            let launch = match mode {
                DecodeMode::Graph => crate::model::StepLaunch::Graph,
                _ => crate::model::StepLaunch::Direct,
            };
            match crate::model::CudaDecoder::new(model, 1, launch) {
                Ok(mut step) => {
                    let on_device = step.choose_on_device(sampler.config(), &[context])?;
                    return Ok(Decoder::Fused { step, on_device });
                }
                // Models the fused step does not cover decode op by op.
                Err(GlmError::Unsupported(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let _ = (mode, sampler, context);
        Ok(Decoder::Plain(model))
    }

    /// Runs `token` through the model and chooses the next one.
    fn next(
        &mut self,
        cache: &mut KvCache,
        token: u32,
        sampler: &mut Sampler,
        context: &[u32],
    ) -> Result<u32> {
        match self {
            Decoder::Plain(model) => {
                let logits =
                    model.forward(&Tensor::new(&[token], &Device::Cpu)?.unsqueeze(0)?, cache)?;
                Ok(sampler.sample_tensor(&logits, context)?)
            }
            #[cfg(feature = "cuda")]
            Decoder::Fused { step, on_device } => {
                if !*on_device || step.steps() == 0 {
                    step.set_tokens(cache, &[token])?;
                }
                if step.samples_on_device() {
                    step.set_uniforms(&[sampler.draw_uniform()])?;
                }
                step.step(cache)?;
                if *on_device {
                    return Ok(step.chosen_tokens()?[0]);
                }
                Ok(sampler.sample_tensor(&step.logits()?, context)?)
            }
        }
    }
}
