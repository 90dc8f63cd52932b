//! Sampling on the GPU (kernels/sampling.cu): the token crates/glm's `Sampler::sample` picks (repetition penalty,
//! temperature, top-k, top-p, then a draw in index order), for a batch of logits rows, with the uniform numbers
//! the host drew from its own random stream; only the tokens come back.
//!
//! Like the decode-step kernels it takes raw device pointers and reads everything that changes between steps
//! (logits, the uniforms, the seen mask, the position) from device memory: the arguments of a launch are the
//! same every step, it allocates nothing and never waits for the host, so it can replace
//! [`crate::DecodeKernels::argmax_rows`] at the end of a step captured in a CUDA graph. The host writes the row's
//! uniform before the step (`rng.random::<f64>()`, the draw `Sampler::sample` makes), so that the tokens and the
//! random stream stay those of the CPU sampler.
//!
//! Greedy decoding (temperature 0) is not this kernel's job: use `argmax_rows`.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaStream, LaunchConfig};
use candle_core::{CudaDevice, DType};

use crate::decode::DevicePointer;
use crate::launch::KernelArgs;
use crate::tensor::dtype_suffix;
use crate::{KernelError, SAMPLING};

/// kernels/sampling.cu: a cluster of SAMPLE_CLUSTER blocks of SAMPLE_THREADS per row.
const SAMPLE_CLUSTER: u32 = 8;
const SAMPLE_THREADS: u32 = 512;
/// kernels/sampling.cu's MASS_SCALE: top-p sums probabilities as integers, `p * 2^62` truncated.
const MASS_SCALE: f64 = (1u64 << 62) as f64;

/// Bytes of scratch [`SamplingKernels::sample_rows`] needs for `rows` rows of `vocab` logits: each row's scores
/// and their exponentials as f32. Nothing in it has to be initialized, nor survives a launch.
pub const fn sampling_scratch_bytes(rows: usize, vocab: usize) -> usize {
    rows * vocab * 8
}

/// The settings of a draw, as crates/glm's `SamplingConfig` holds them (the kernel rounds them as the host does).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleParams {
    /// Divides the scores; finite and above 0 (0 is greedy decoding: `argmax_rows`).
    pub temperature: f64,
    /// Keep the tokens scoring at least the k-th highest score; 0 (or the vocabulary size or more) = off.
    pub top_k: usize,
    /// Keep the most likely tokens whose probability reaches top-p, in [0, 1]; 1 = off.
    pub top_p: f64,
    /// Over the tokens of the seen mask: positive scores divided by it, negative ones multiplied; finite and
    /// above 0; 1 = off.
    pub repetition_penalty: f64,
}

/// One [`SamplingKernels::sample_rows`] launch: rows of logits and where the tokens go.
#[derive(Debug, Clone, Copy)]
pub struct SampleRows {
    /// `[rows, vocab]` logits of `dtype` (f32, f16 or bf16).
    pub logits: DevicePointer,
    pub dtype: DType,
    pub rows: usize,
    pub vocab: usize,
    /// u32 `[rows]`: the chosen tokens, 0xffffffff for a row whose logits hold NaN or +inf or are all -inf (the
    /// host's errors).
    pub tokens: DevicePointer,
    /// One u32 that the launch advances by one, as `argmax_rows` does at the end of a decode step.
    pub pos: DevicePointer,
    /// f64 `[rows]`: each row's uniform number in [0, 1), read when the kernel runs.
    pub uniforms: DevicePointer,
    /// u8 `[rows, vocab]`: 1 for each token of the row's context (prompt and output so far), which the
    /// repetition penalty applies to; the kernel sets the chosen token's entry, so that the mask follows the
    /// generated text. None: no penalty (and no mask to keep up).
    pub seen: Option<DevicePointer>,
    /// [`sampling_scratch_bytes`]`(rows, vocab)` bytes, used by one launch at a time.
    pub scratch: DevicePointer,
    pub params: SampleParams,
}

/// The sampling kernel for each logits dtype on one device, loaded once (a graph capture must not load modules).
pub struct SamplingKernels {
    stream: Arc<CudaStream>,
    f32: CudaFunction,
    f16: CudaFunction,
    bf16: CudaFunction,
}

impl SamplingKernels {
    pub fn new(dev: &CudaDevice) -> Result<Self, KernelError> {
        let load = |dtype| {
            let suffix = dtype_suffix(dtype).expect("a dtype the kernels take");
            SAMPLING.function(dev, &format!("sample_rows_{suffix}"))
        };
        Ok(Self {
            stream: dev.cuda_stream(),
            f32: load(DType::F32)?,
            f16: load(DType::F16)?,
            bf16: load(DType::BF16)?,
        })
    }

    /// `tokens[r]` = the token `Sampler::sample` draws from row r of `s.logits` with `s.params` and the uniform
    /// `uniforms[r]` (the seen mask standing for its context); then `seen[r][tokens[r]] = 1` and `*pos += 1`.
    /// The choice can differ from the host's only where u · total, or top-p's threshold, falls within rounding
    /// of a cumulative sum (the kernel adds in another order).
    ///
    /// # Safety
    /// Every pointer of `s` holds what its field's documentation says, on this device.
    pub unsafe fn sample_rows(&self, s: &SampleRows) -> Result<(), KernelError> {
        let bad = |problem: String| KernelError::BadInput {
            name: "GPU sampling".into(),
            problem,
        };
        let func = match s.dtype {
            DType::F32 => &self.f32,
            DType::F16 => &self.f16,
            DType::BF16 => &self.bf16,
            _ => {
                return Err(KernelError::UnsupportedDtype {
                    name: "GPU sampling".into(),
                    dtype: s.dtype,
                })
            }
        };
        let p = &s.params;
        if !(p.temperature.is_finite() && p.temperature as f32 > 0.0) {
            return Err(bad(format!(
                "temperature {} is not above 0 as an f32 (0 is greedy decoding: use argmax_rows)",
                p.temperature
            )));
        }
        if !(0.0..=1.0).contains(&p.top_p) {
            return Err(bad(format!("top-p {} is not in [0, 1]", p.top_p)));
        }
        if !(p.repetition_penalty.is_finite() && p.repetition_penalty > 0.0) {
            return Err(bad(format!(
                "repetition penalty {} is not a finite number > 0",
                p.repetition_penalty
            )));
        }
        let vocab = u32::try_from(s.vocab)
            .ok()
            .filter(|&v| v > 0)
            .ok_or_else(|| bad(format!("vocabulary of {} tokens", s.vocab)))?;
        let rows = u32::try_from(s.rows)
            .ok()
            .filter(|&r| (1..=65_535).contains(&r))
            .ok_or_else(|| bad(format!("{} rows: a launch takes 1 to 65535", s.rows)))?;
        // top-k of the whole vocabulary or more removes nothing.
        let top_k = if p.top_k < s.vocab { p.top_k as u32 } else { 0 };
        let mut args = KernelArgs::new();
        args.arg(s.logits)
            .arg(vocab)
            .arg(s.tokens)
            .arg(s.pos)
            .arg(s.uniforms)
            .arg(s.seen.unwrap_or(0))
            .arg(s.scratch)
            // torch divides and multiplies float32 scores by the Python floats as float32.
            .arg(p.temperature as f32)
            .arg(p.repetition_penalty as f32)
            .arg(top_k)
            .arg(top_p_need(p.top_p));
        let cfg = LaunchConfig {
            grid_dim: (SAMPLE_CLUSTER, rows, 1),
            block_dim: (SAMPLE_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the argument list matches sample_rows_* in kernels/sampling.cu (whose cluster size, fixed at
        // compile time, divides the grid); the caller vouches for the pointers.
        unsafe { args.launch(func, &self.stream, cfg, true) }
    }
}

/// Top-p as the kernel applies it: the host removes tokens (in ascending order) while their cumulative
/// probability, rounded to f32, is ≤ `(1 - top_p) as f32`; the kernel sums probabilities as integers m = p · 2^62
/// and compares m ≥ need, the least m whose `((m as f64) · 2^-62) as f32` exceeds that threshold (the same
/// roundings as the host's, and monotonic in m, so a binary search finds it). 0 (every sum passes) when top-p is
/// off.
fn top_p_need(top_p: f64) -> u64 {
    if top_p >= 1.0 {
        return 0;
    }
    let threshold = (1.0 - top_p) as f32;
    let passes = |m: u64| ((m as f64) / MASS_SCALE) as f32 > threshold;
    // threshold is in (0, 1]: 0 never passes, 2^63 (a mass of 2) always does.
    let (mut low, mut high) = (0u64, 1u64 << 63);
    while high - low > 1 {
        let mid = low + (high - low) / 2;
        if passes(mid) {
            high = mid;
        } else {
            low = mid;
        }
    }
    high
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The threshold in fixed point: masses from `need` on pass the host's f32 comparison, those below do not.
    #[test]
    fn top_p_need_is_the_host_comparison() {
        assert_eq!(top_p_need(1.0), 0);
        for top_p in [0.0, 0.1, 0.5, 0.8, 0.9, 0.95, 0.999, 1.0 - 1e-12] {
            let threshold = (1.0 - top_p) as f32;
            let need = top_p_need(top_p);
            let host = |m: u64| ((m as f64) / MASS_SCALE) as f32 > threshold;
            assert!(host(need) && !host(need - 1), "top-p {top_p}");
        }
        // top-p 0 keeps one token: a mass of exactly 1 does not pass 1.0.
        assert!(top_p_need(0.0) > 1 << 62);
    }
}
