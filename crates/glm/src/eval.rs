//! Held-out perplexity and top-1 agreement: how much a precision (f16, NF4) costs in quality.
//!
//! The method is the one of `models/demo/eval.py`, so that the numbers compare with transformers': the
//! text is encoded without special tokens, the ids are cut into `n = (len - 1) / window` non-overlapping
//! windows of `window` inputs, each predicting its next `window` ids (no prefix, no KV cache across
//! windows), and the loss is the mean next-token cross-entropy over all `n * window` predictions.
//!
//! ```no_run
//! use glm::eval::{perplexity, PerplexityOptions};
//! use glm::pipeline::{Glm, RunOptions};
//!
//! let glm = Glm::load("models/demo", &RunOptions::default())?;
//! let text = std::fs::read_to_string("models/demo/heldout.txt").unwrap();
//! let result = perplexity(glm.model(), glm.tokenizer(), &text, &PerplexityOptions::default())?;
//! println!("loss {:.4}, perplexity {:.3}", result.loss(), result.perplexity());
//! # Ok::<(), glm::GlmError>(())
//! ```

use candle_core::{Device, Tensor};

use crate::error::{GlmError, Result};
use crate::model::Model;
use crate::tokenizer::GlmTokenizer;

/// How to cut the ids into windows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerplexityOptions {
    /// Inputs per window (each predicts the next id).
    pub window: usize,
    /// Score only the first this many windows (a fixed subset for quick checks); None: all of them.
    pub max_windows: Option<usize>,
    /// Windows run through the model together.
    pub batch: usize,
}

impl Default for PerplexityOptions {
    fn default() -> Self {
        Self {
            window: 512,
            max_windows: None,
            batch: 8,
        }
    }
}

/// The cross-entropy of every scored window and the model's top-1 prediction at every position.
#[derive(Debug, Clone, PartialEq)]
pub struct Perplexity {
    /// Predictions per window.
    pub window: usize,
    /// Mean next-token cross-entropy (nats) of each window, in order.
    pub window_losses: Vec<f64>,
    /// The arg-max id at each scored position, windows in order (`window` per window).
    pub top1: Vec<u32>,
}

impl Perplexity {
    /// Mean cross-entropy over all predictions (every window has the same number of them).
    pub fn loss(&self) -> f64 {
        self.window_losses.iter().sum::<f64>() / self.window_losses.len() as f64
    }

    pub fn perplexity(&self) -> f64 {
        self.loss().exp()
    }

    /// Ids predicted and scored.
    pub fn predictions(&self) -> usize {
        self.window * self.window_losses.len()
    }
}

/// Perplexity of `model` on `text`, encoded by `tokenizer` without special tokens.
pub fn perplexity(
    model: &Model,
    tokenizer: &GlmTokenizer,
    text: &str,
    options: &PerplexityOptions,
) -> Result<Perplexity> {
    let ids = tokenizer
        .inner()
        .encode(text, false)
        .map_err(|e| crate::tokenizer::TokenizerError::Encode(e.to_string()))?
        .get_ids()
        .to_vec();
    perplexity_of_ids(model, &ids, options)
}

/// Perplexity of `model` on token ids, windowed as the module documentation says.
pub fn perplexity_of_ids(
    model: &Model,
    ids: &[u32],
    options: &PerplexityOptions,
) -> Result<Perplexity> {
    let window = options.window;
    if window == 0 || options.batch == 0 || options.max_windows == Some(0) {
        return Err(GlmError::Input(
            "perplexity needs a window, a batch and a window count of at least 1".into(),
        ));
    }
    let context = model.config().max_position_embeddings;
    if window > context {
        return Err(GlmError::Input(format!(
            "a window of {window} tokens is longer than the model's context of {context}: use a \
             smaller window"
        )));
    }
    let available = ids.len().saturating_sub(1) / window;
    if available == 0 {
        return Err(GlmError::Input(format!(
            "{} tokens are too few for one window of {window} inputs and their targets: give a \
             longer text or a smaller window",
            ids.len()
        )));
    }
    let n = options.max_windows.map_or(available, |m| m.min(available));
    let mut result = Perplexity {
        window,
        window_losses: Vec::with_capacity(n),
        top1: Vec::with_capacity(n * window),
    };
    for first in (0..n).step_by(options.batch) {
        let count = options.batch.min(n - first);
        let inputs: Vec<u32> = (first..first + count)
            .flat_map(|w| &ids[w * window..(w + 1) * window])
            .copied()
            .collect();
        let inputs = Tensor::from_vec(inputs, (count, window), &Device::Cpu)?;
        let mut cache = model.new_cache();
        let logits = model.forward_all(&inputs, &mut cache)?.to_vec3::<f32>()?;
        for (w, rows) in (first..).zip(&logits) {
            let targets = &ids[w * window + 1..(w + 1) * window + 1];
            let mut total = 0.0;
            for (row, &target) in rows.iter().zip(targets) {
                let (nll, top) = cross_entropy(row, target)?;
                total += nll;
                result.top1.push(top);
            }
            result.window_losses.push(total / window as f64);
        }
    }
    Ok(result)
}

/// -log softmax(logits)[target] (log-sum-exp in f64) and the arg-max of `logits`.
fn cross_entropy(logits: &[f32], target: u32) -> Result<(f64, u32)> {
    let Some(&target_logit) = logits.get(target as usize) else {
        return Err(GlmError::Input(format!(
            "target id {target} is outside the vocabulary of {} logits",
            logits.len()
        )));
    };
    if let Some(bad) = logits.iter().find(|x| !x.is_finite()) {
        return Err(GlmError::Input(format!(
            "the model produced a non-finite logit ({bad}): its weights or the dtype overflow"
        )));
    }
    // The first maximum, as torch's argmax picks it.
    let (top, max) =
        logits.iter().enumerate().fold(
            (0, f32::NEG_INFINITY),
            |(i, m), (j, &x)| {
                if x > m {
                    (j, x)
                } else {
                    (i, m)
                }
            },
        );
    let max = f64::from(max);
    let sum: f64 = logits.iter().map(|&x| (f64::from(x) - max).exp()).sum();
    Ok((max + sum.ln() - f64::from(target_logit), top as u32))
}

/// Fraction of positions where two top-1 sequences (ours and a reference's) name the same id.
pub fn top1_agreement(ours: &[u32], reference: &[u32]) -> Result<f64> {
    if ours.len() != reference.len() || ours.is_empty() {
        return Err(GlmError::Input(format!(
            "top-1 agreement needs two non-empty sequences of one length, got {} and {}",
            ours.len(),
            reference.len()
        )));
    }
    let same = ours.iter().zip(reference).filter(|(a, b)| a == b).count();
    Ok(same as f64 / ours.len() as f64)
}
