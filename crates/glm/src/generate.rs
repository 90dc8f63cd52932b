//! Token generation: prefill the prompt once, then decode one token at a time through the KV cache.

use candle_core::{Device, Tensor};

use crate::error::{GlmError, Result};
use crate::model::Model;
use crate::sampling::{FinishReason, Sampler, StopCondition};

/// The tokens a [`generate`] call produced, and why it stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    /// New tokens only (the eos token that stopped generation included, as transformers returns it).
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

/// Continues `prompt` with tokens chosen by `sampler` until `stop` says so, passing each new token
/// to `on_token` as soon as it is chosen.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    sampler: &mut Sampler,
    stop: &StopCondition,
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
    let mut input = prompt;
    let mut next = [0u32; 1];
    loop {
        let ids = Tensor::new(input, &Device::Cpu)?.unsqueeze(0)?;
        let logits = model.forward(&ids, &mut cache)?;
        let token = sampler.sample_tensor(&logits, &context)?;
        context.push(token);
        tokens.push(token);
        on_token(token);
        if let Some(finish) = stop.check(token, tokens.len()) {
            return Ok(Generation { tokens, finish });
        }
        next[0] = token;
        input = &next;
    }
}
