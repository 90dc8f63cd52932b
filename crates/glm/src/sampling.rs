//! Picking the next token from logits, with the semantics of transformers' `generate()`.
//!
//! Greedy decoding (temperature 0) applies only the repetition penalty, then takes the first maximum.
//! Sampling applies, in transformers' order: repetition penalty, temperature, top-k, top-p; then draws
//! from the softmax of what is left with a seeded ChaCha8 generator, one draw per token, so a seed gives
//! the same tokens on every machine and every run.
//!
//! candle-transformers' `LogitsProcessor` is not used: its top-k keeps exactly k tokens where
//! transformers keeps every token tied with the k-th score, it has no repetition penalty over the whole
//! context, and its random stream is not ours to pin.
//!
//! ```
//! use glm::sampling::{Sampler, SamplingConfig};
//!
//! let config = SamplingConfig { temperature: 0.8, top_k: 40, top_p: 0.95, seed: 7, ..SamplingConfig::greedy() };
//! let mut sampler = Sampler::new(config)?;
//! let logits = [0.1_f32, 2.0, -1.0, 0.5];
//! let token = sampler.sample(&logits, &[1, 3])?;
//! assert!(token < 4);
//! # Ok::<(), glm::sampling::SamplingError>(())
//! ```

use std::fmt;

use candle_core::{DType, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Errors from a bad sampling configuration or bad logits.
#[derive(Debug, thiserror::Error)]
pub enum SamplingError {
    #[error("temperature must be a finite number ≥ 0 (0 = greedy), got {0}")]
    Temperature(f64),
    #[error("top-p must be between 0 and 1 (1 = off), got {0}")]
    TopP(f64),
    #[error("repetition penalty must be a finite number > 0 (1 = off), got {0}")]
    RepetitionPenalty(f64),
    #[error("max new tokens must be at least 1")]
    ZeroMaxNewTokens,
    #[error("logits are empty")]
    EmptyLogits,
    #[error("logits hold {what} at token {index}: the model output is broken")]
    NonFiniteLogit { what: &'static str, index: usize },
    #[error("every logit is -inf: no token can be sampled")]
    NoCandidate,
    #[error("context token id {id} is outside the vocabulary of {vocab} logits")]
    ContextTokenOutOfRange { id: u32, vocab: usize },
    #[error("logits of shape {0:?} are not one row: expected [vocab] or [1, .., 1, vocab]")]
    LogitsShape(Vec<usize>),
    #[error("reading logits: {0}")]
    Tensor(#[from] candle_core::Error),
}

type Result<T> = std::result::Result<T, SamplingError>;

/// How the next token is chosen. The defaults of each field switch it off, as in transformers.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingConfig {
    /// Divides the logits; 0 means greedy decoding (argmax), 1 leaves them as they are.
    pub temperature: f64,
    /// Keep only the tokens scoring at least the k-th highest score; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches top-p; 1 = off.
    pub top_p: f64,
    /// Over every token of prompt and output: positive logits divided by it, negative ones multiplied;
    /// 1 = off.
    pub repetition_penalty: f64,
    /// Seed of the random generator (unused by greedy decoding).
    pub seed: u64,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self::greedy()
    }
}

impl SamplingConfig {
    /// Greedy decoding, everything else off.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
        }
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks every field against the ranges transformers accepts.
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(SamplingError::Temperature(self.temperature));
        }
        if !(0.0..=1.0).contains(&self.top_p) {
            return Err(SamplingError::TopP(self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(SamplingError::RepetitionPenalty(self.repetition_penalty));
        }
        Ok(())
    }

    /// The scores transformers' logits processors produce for these settings: repetition penalty over
    /// `context` (prompt and generated ids), then for sampling temperature, top-k and top-p, each only
    /// when not off. Removed tokens are -inf.
    pub fn process_logits(&self, logits: &[f32], context: &[u32]) -> Result<Vec<f32>> {
        self.validate()?;
        check_logits(logits)?;
        let mut scores = logits.to_vec();
        if self.repetition_penalty != 1.0 {
            apply_repetition_penalty(&mut scores, context, self.repetition_penalty)?;
        }
        if self.is_greedy() {
            return Ok(scores);
        }
        if self.temperature != 1.0 {
            // torch divides a float32 tensor by the Python float as float32.
            let temperature = self.temperature as f32;
            scores.iter_mut().for_each(|s| *s /= temperature);
        }
        if self.top_k != 0 {
            apply_top_k(&mut scores, self.top_k);
        }
        if self.top_p < 1.0 {
            apply_top_p(&mut scores, self.top_p);
        }
        Ok(scores)
    }
}

fn check_logits(logits: &[f32]) -> Result<()> {
    if logits.is_empty() {
        return Err(SamplingError::EmptyLogits);
    }
    for (index, &x) in logits.iter().enumerate() {
        if x.is_nan() {
            return Err(SamplingError::NonFiniteLogit { what: "NaN", index });
        }
        if x == f32::INFINITY {
            return Err(SamplingError::NonFiniteLogit {
                what: "+inf",
                index,
            });
        }
    }
    if logits.iter().all(|&x| x == f32::NEG_INFINITY) {
        return Err(SamplingError::NoCandidate);
    }
    Ok(())
}

/// transformers' RepetitionPenaltyLogitsProcessor: each distinct id of `context` once.
fn apply_repetition_penalty(scores: &mut [f32], context: &[u32], penalty: f64) -> Result<()> {
    let penalty = penalty as f32;
    let mut seen = vec![false; scores.len()];
    for &id in context {
        let slot = seen
            .get_mut(id as usize)
            .ok_or(SamplingError::ContextTokenOutOfRange {
                id,
                vocab: scores.len(),
            })?;
        if !std::mem::replace(slot, true) {
            let s = &mut scores[id as usize];
            *s = if *s < 0.0 { *s * penalty } else { *s / penalty };
        }
    }
    Ok(())
}

/// transformers' TopKLogitsWarper: removes scores below the k-th highest, so ties with it all stay.
fn apply_top_k(scores: &mut [f32], k: usize) {
    let k = k.min(scores.len());
    // The k-th highest by selection, not a full sort: the same value in O(vocab).
    let mut values = scores.to_vec();
    let (_, &mut kth, _) = values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    scores
        .iter_mut()
        .filter(|s| **s < kth)
        .for_each(|s| *s = f32::NEG_INFINITY);
}

/// transformers' TopPLogitsWarper: in ascending score order, removes tokens while the cumulative
/// probability stays ≤ 1 - top_p, always keeping the most likely token.
///
/// Only finite scores are sorted: a -inf score (removed by top-k, say) has probability 0 and sits below
/// every finite one, so it adds nothing to the sums and stays removed. Sorting by (score, index) gives
/// the order a stable sort by score gives, for a fraction of its cost.
fn apply_top_p(scores: &mut [f32], top_p: f64) {
    // One u64 per finite score: its f32 bits mapped to an unsigned order (the order of `total_cmp`) above the
    // index, so a plain integer sort orders by score, then index.
    let key = |s: f32, i: usize| {
        let bits = s.to_bits();
        let ordered = if bits >> 31 == 1 {
            !bits
        } else {
            bits | 1 << 31
        };
        (u64::from(ordered) << 32) | i as u64
    };
    let mut order: Vec<u64> = scores
        .iter()
        .enumerate()
        .filter(|(_, s)| s.is_finite())
        .map(|(i, &s)| key(s, i))
        .collect();
    order.sort_unstable();
    let index = |k: u64| (k & u64::from(u32::MAX)) as usize;
    let sorted: Vec<f32> = order.iter().map(|&k| scores[index(k)]).collect();
    let probs = softmax(&sorted);
    // torch compares the float32 cumsum (accumulated in double on the CPU) with 1 - top_p as float32.
    let threshold = (1.0 - top_p) as f32;
    let mut cumulative = 0.0f64;
    let last = order.len().saturating_sub(1);
    for (rank, (&k, &p)) in order.iter().zip(&probs).enumerate() {
        cumulative += f64::from(p);
        if rank < last && cumulative as f32 <= threshold {
            scores[index(k)] = f32::NEG_INFINITY;
        }
    }
}

/// Softmax of scores (-inf gives probability 0). At least one score must be finite.
pub fn softmax(scores: &[f32]) -> Vec<f32> {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = scores.iter().map(|&s| (s - max).exp()).collect();
    let sum: f64 = exps.iter().map(|&e| f64::from(e)).sum();
    exps.iter().map(|&e| (f64::from(e) / sum) as f32).collect()
}

/// Index of the first maximum (torch.argmax's choice among ties).
fn argmax(scores: &[f32]) -> usize {
    let mut best = 0;
    for (i, &s) in scores.iter().enumerate() {
        if s > scores[best] {
            best = i;
        }
    }
    best
}

/// Chooses tokens by a [`SamplingConfig`], with its own seeded random stream.
#[derive(Debug, Clone)]
pub struct Sampler {
    config: SamplingConfig,
    rng: ChaCha8Rng,
}

impl Sampler {
    pub fn new(config: SamplingConfig) -> Result<Self> {
        config.validate()?;
        let rng = ChaCha8Rng::seed_from_u64(config.seed);
        Ok(Self { config, rng })
    }

    pub fn config(&self) -> &SamplingConfig {
        &self.config
    }

    /// The next token for one row of logits; `context` is every token id so far (prompt and output),
    /// used by the repetition penalty.
    pub fn sample(&mut self, logits: &[f32], context: &[u32]) -> Result<u32> {
        let scores = self.config.process_logits(logits, context)?;
        if self.config.is_greedy() {
            return Ok(argmax(&scores) as u32);
        }
        let probs = softmax(&scores);
        let total: f64 = probs.iter().map(|&p| f64::from(p)).sum();
        let target = self.rng.random::<f64>() * total;
        let mut cumulative = 0.0f64;
        let mut chosen = argmax(&scores);
        for (i, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                chosen = i;
                cumulative += f64::from(p);
                if cumulative > target {
                    break;
                }
            }
        }
        Ok(chosen as u32)
    }

    /// The next number of the random stream that [`Sampler::sample`] draws from, for a draw made elsewhere (the
    /// GPU's, `CudaDecoder::set_uniforms`): one per sampled token keeps the two choosing the same tokens.
    pub fn draw_uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    /// As [`Sampler::sample`], for logits in a tensor of shape `[vocab]` or `[1, .., 1, vocab]`, any
    /// float dtype, on any device.
    pub fn sample_tensor(&mut self, logits: &Tensor, context: &[u32]) -> Result<u32> {
        let dims = logits.dims();
        if dims.is_empty() || dims[..dims.len() - 1].iter().any(|&d| d != 1) {
            return Err(SamplingError::LogitsShape(dims.to_vec()));
        }
        let row = logits
            .flatten_all()?
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?;
        self.sample(&row, context)
    }
}

/// Why generation ended, as OpenAI-style APIs and `--json` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// The model produced an end-of-sequence token.
    Stop,
    /// The max-new-tokens budget ran out.
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// When generation stops: on any of the eos ids, or after `max_new_tokens` new tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopCondition {
    eos_ids: Vec<u32>,
    max_new_tokens: usize,
}

impl StopCondition {
    pub fn new(eos_ids: impl Into<Vec<u32>>, max_new_tokens: usize) -> Result<Self> {
        if max_new_tokens == 0 {
            return Err(SamplingError::ZeroMaxNewTokens);
        }
        Ok(Self {
            eos_ids: eos_ids.into(),
            max_new_tokens,
        })
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    pub fn max_new_tokens(&self) -> usize {
        self.max_new_tokens
    }

    pub fn is_eos(&self, token: u32) -> bool {
        self.eos_ids.contains(&token)
    }

    /// Call after each new token: `token` is the one just produced and `generated` how many new tokens
    /// there are now, it included. An eos token wins over the budget, as in transformers.
    pub fn check(&self, token: u32, generated: usize) -> Option<FinishReason> {
        if self.is_eos(token) {
            Some(FinishReason::Stop)
        } else if generated >= self.max_new_tokens {
            Some(FinishReason::Length)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// transformers' top-p as written: a stable sort of every score by value, cumsum from the smallest.
    fn top_p_by_full_stable_sort(scores: &mut [f32], top_p: f64) {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
        let sorted: Vec<f32> = order.iter().map(|&i| scores[i]).collect();
        let probs = softmax(&sorted);
        let threshold = (1.0 - top_p) as f32;
        let mut cumulative = 0.0f64;
        for (rank, (&index, &p)) in order.iter().zip(&probs).enumerate() {
            cumulative += f64::from(p);
            if rank < order.len() - 1 && cumulative as f32 <= threshold {
                scores[index] = f32::NEG_INFINITY;
            }
        }
    }

    /// The sort by integer keys over finite scores keeps exactly what the full stable sort keeps: ties
    /// (many equal scores), negative and positive zeros, -inf from top-k, one finite score.
    #[test]
    fn top_p_matches_the_full_stable_sort() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for case in 0..300 {
            let n = rng.random_range(1..2000);
            let levels = rng.random_range(1..40);
            let mut scores: Vec<f32> = (0..n)
                .map(|_| match rng.random_range(0..10) {
                    0 => f32::NEG_INFINITY,
                    1 => -0.0,
                    2 => 0.0,
                    _ => rng.random_range(0..levels) as f32 * 0.37 - 5.0,
                })
                .collect();
            if scores.iter().all(|s| *s == f32::NEG_INFINITY) {
                scores[0] = 1.0;
            }
            for top_p in [0.1, 0.5, 0.8, 0.95, 0.999] {
                let (mut ours, mut want) = (scores.clone(), scores.clone());
                apply_top_p(&mut ours, top_p);
                top_p_by_full_stable_sort(&mut want, top_p);
                assert_eq!(
                    ours.iter().map(|s| s.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|s| s.to_bits()).collect::<Vec<_>>(),
                    "case {case}, top_p {top_p}"
                );
            }
        }
    }
}
