//! `glm-bench run`: one model at one precision through the glm library, measured as the peers measure
//! transformers (benches/peers.py): load time, time to first token and prefill rate per prompt length,
//! decode rate at batch 1 (greedy, a fixed number of new tokens, eos ignored), device memory, and the
//! roofline (weight bytes read per token ÷ the device's copy bandwidth, measured in the same run).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use glm::pipeline::{Glm, RunOptions};
use glm::plan::QuantMode;
use glm::sampling::{Sampler, SamplingConfig, StopCondition};
use glm::{DecodeMode, Model};
use rand::{Rng, SeedableRng};
use serde::Deserialize;

use crate::device::{copy_bandwidth, device_name};
#[cfg(feature = "cuda")]
use crate::record::DecodeVariant;
use crate::record::{Decode, Memory, Prefill, Roofline, RunRecord, Stats, GLM_RUN};

/// File in a model directory with the prompt ids every runtime is given (`peers.py make-synthetic`).
pub const PROMPTS_FILE: &str = "bench-prompts.json";

/// Bytes of each buffer of the bandwidth copy: large enough that caches do not count.
const COPY_BYTES_CUDA: usize = 1 << 30;
const COPY_BYTES_CPU: usize = 1 << 28;
const COPY_REPS: usize = 10;
/// Batches decoded (the same prompt in every row) beside batch 1, on CUDA.
#[cfg(feature = "cuda")]
const BATCHES: [usize; 2] = [4, 8];

/// One `glm-bench run`.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub model: PathBuf,
    pub nf4: bool,
    /// NF4 with double-quantized absmax (bitsandbytes' default).
    pub double_quant: bool,
    /// The minimum-memory options: 4-bit lm_head, embedding table in host memory.
    pub min_memory: bool,
    pub dtype: DType,
    pub device: Device,
    /// Planned context (the KV cache the library allocates).
    pub context: usize,
    pub prompt_lengths: Vec<usize>,
    pub new_tokens: usize,
    pub warmup: usize,
    pub reps: usize,
    /// After the other measurements, one prefill that fills the planned context, for its peak memory.
    pub full_context: bool,
    /// Prompt ids; default: the model directory's [`PROMPTS_FILE`], else seeded random ids.
    pub prompts: Option<PathBuf>,
}

impl RunSpec {
    /// "bf16"/"f16"/"f32" dense, "nf4-dq" or "nf4", "-min" with the minimum-memory options.
    pub fn variant(&self) -> String {
        if !self.nf4 {
            return dtype_name(self.dtype).to_string();
        }
        let dq = if self.double_quant { "nf4-dq" } else { "nf4" };
        let min = if self.min_memory { "-min" } else { "" };
        format!("{dq}{min}")
    }

    fn check(&self) -> Result<()> {
        if self.prompt_lengths.is_empty() || self.prompt_lengths.contains(&0) {
            bail!("--prompt-lengths needs at least one length, each at least 1 token");
        }
        if self.new_tokens < 2 || self.reps == 0 {
            bail!("--new-tokens must be at least 2 (a decode rate needs two tokens) and --reps at least 1");
        }
        if self.min_memory && !self.nf4 {
            bail!("--min-memory applies to 4-bit weights: add --quant 4bit");
        }
        let longest = self.prompt_lengths.iter().max().copied().unwrap_or(0);
        let needed = longest.max(self.prompt_lengths[0] + self.new_tokens - 1);
        if needed + 1 > self.context {
            bail!(
                "--context {} is too short for a {needed}-token prompt and its new tokens: raise --context \
                 or shorten --prompt-lengths/--new-tokens",
                self.context
            );
        }
        Ok(())
    }
}

pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "f32",
    }
}

/// Runs the measurements of `spec` and returns their record.
pub fn run(spec: &RunSpec) -> Result<RunRecord> {
    spec.check()?;
    let device = &spec.device;
    // Before the model exists, so the copy buffers are gone by the time memory is measured.
    let copy_bytes = if device.is_cuda() {
        COPY_BYTES_CUDA
    } else {
        COPY_BYTES_CPU
    };
    let bandwidth = copy_bandwidth(device, copy_bytes, COPY_REPS)?;
    eprintln!(
        "glm-bench: copy bandwidth {:.1} GB/s (read + write)",
        bandwidth.median / 1e9
    );
    #[cfg(feature = "cuda")]
    let poller = crate::device::DriverPoller::start(device)?;

    let options = RunOptions {
        quant: if spec.nf4 {
            QuantMode::Nf4
        } else {
            QuantMode::None
        },
        dtype: spec.dtype,
        device: device.clone(),
        context_len: Some(spec.context),
        nf4: nf4::QuantOptions {
            double_quant: spec.double_quant,
            ..nf4::QuantOptions::default()
        },
        quantize_lm_head: spec.min_memory,
        embeddings_on_host: spec.min_memory,
        ..RunOptions::default()
    };
    let glm = Glm::load(&spec.model, &options)
        .with_context(|| format!("loading {}", spec.model.display()))?;
    let load_s = glm.load_time().as_secs_f64();
    eprintln!("glm-bench: {} loaded in {load_s:.2} s", spec.variant());
    #[cfg(feature = "cuda")]
    let after_load = poller
        .as_ref()
        .map(|p| p.peak().map(|peak| (p.sample(), peak)));

    let model = glm.model();
    let prompts = PromptSource::open(spec.prompts.as_deref(), &spec.model)?;
    let vocab = model.config().vocab_size;
    let prompt = |length| prompts.ids(length, vocab, &model.config().eos_token_ids);

    let mut prefill = Vec::new();
    for &length in &spec.prompt_lengths {
        let ids = prompt(length)?;
        let runs = repeat(spec, || {
            timed_generate(model, &ids, 1, DecodeMode::default())
        })?;
        let ttft: Vec<f64> = runs.iter().map(|r| r.ttft_s).collect();
        eprintln!(
            "glm-bench: prefill {length} tokens: TTFT {:.1} ms",
            Stats::new(ttft.clone())?.median * 1e3
        );
        prefill.push(Prefill {
            prompt_tokens: length,
            tok_s: Stats::new(ttft.iter().map(|t| length as f64 / t).collect())?,
            ttft_s: Stats::new(ttft)?,
        });
    }
    let decode_ids = prompt(spec.prompt_lengths[0])?;
    let runs = repeat(spec, || {
        timed_generate(model, &decode_ids, spec.new_tokens, DecodeMode::default())
    })?;
    let decode = Decode {
        prompt_tokens: spec.prompt_lengths[0],
        new_tokens: spec.new_tokens,
        batch: 1,
        tok_s: Stats::new(runs.iter().filter_map(|r| r.decode_tok_s).collect())?,
        tokens: runs.last().map(|r| r.tokens.clone()).unwrap_or_default(),
    };
    eprintln!("glm-bench: decode {:.1} tokens/s", decode.tok_s.median);
    #[cfg_attr(not(feature = "cuda"), allow(unused_mut))]
    let mut decode_variants = Vec::new();
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        for mode in [DecodeMode::Plain, DecodeMode::Fused] {
            let runs = repeat(spec, || {
                timed_generate(model, &decode_ids, spec.new_tokens, mode)
            })?;
            let variant = DecodeVariant {
                mode: mode.as_str().into(),
                batch: 1,
                tok_s: Stats::new(runs.iter().filter_map(|r| r.decode_tok_s).collect())?,
                same_tokens: runs.iter().all(|r| r.tokens == decode.tokens),
            };
            eprintln!(
                "glm-bench: decode ({}) {:.1} tokens/s",
                variant.mode, variant.tok_s.median
            );
            decode_variants.push(variant);
        }
        for batch in BATCHES {
            let runs = repeat(spec, || {
                timed_batch_decode(model, &decode_ids, batch, spec.new_tokens)
            })?;
            let variant = DecodeVariant {
                mode: DecodeMode::default().as_str().into(),
                batch,
                tok_s: Stats::new(runs.iter().map(|r| r.0).collect())?,
                same_tokens: runs.iter().all(|r| r.1),
            };
            eprintln!(
                "glm-bench: decode batch {batch}: {:.1} tokens/s",
                variant.tok_s.median
            );
            decode_variants.push(variant);
        }
    }

    let mut memory = Memory {
        planned_bytes: Some(glm.plan_used().chosen().total()),
        library_measured_bytes: glm
            .measured_memory()
            .map(|m| [m.after_load, m.peak_load, m.peak]),
        ..Memory::default()
    };
    #[cfg(feature = "cuda")]
    if let (Some(p), Some(after_load)) = (&poller, after_load) {
        let (after, peak_load) = after_load?;
        memory.driver_after_load_bytes = Some(after?);
        memory.driver_peak_load_bytes = Some(peak_load);
        memory.driver_peak_bytes = Some(p.peak()?);
        memory.driver_baseline_bytes = Some(p.baseline());
        memory.method = Some(
            "driver used memory (cuMemGetInfo) polled every 1 ms on a thread minus the usage before the \
             load (CUDA context excluded); library: glm's own driver samples (after load, load peak, peak)"
                .into(),
        );
    }
    if spec.full_context {
        let length = spec.context - 1;
        timed_generate(model, &prompt(length)?, 1, DecodeMode::default())?;
        memory.full_context_tokens = Some(spec.context);
        #[cfg(feature = "cuda")]
        if let Some(p) = &poller {
            memory.driver_peak_full_context_bytes = Some(p.peak()?);
        }
    }

    let per_token = weight_bytes_per_token(model, spec.min_memory && device.is_cuda());
    let roofline = Roofline::new(per_token, bandwidth, decode.tok_s.median)?;
    let has_memory = memory != Memory::default();
    Ok(RunRecord {
        runtime: GLM_RUN.into(),
        variant: spec.variant(),
        dtype: dtype_name(spec.dtype).into(),
        device: device_name(device)?,
        model: spec.model.display().to_string(),
        versions: BTreeMap::from([("glm-bench".into(), env!("CARGO_PKG_VERSION").into())]),
        warmup: spec.warmup,
        reps: spec.reps,
        load_s,
        prefill,
        decode,
        decode_variants,
        memory: has_memory.then_some(memory),
        roofline: Some(roofline),
        context_len: Some(glm.plan_used().context_len),
        notes: model.load_notes().to_vec(),
    })
}

/// `spec.warmup` unrecorded runs of `f`, then `spec.reps` recorded ones.
fn repeat<T>(spec: &RunSpec, mut f: impl FnMut() -> Result<T>) -> Result<Vec<T>> {
    for _ in 0..spec.warmup {
        f()?;
    }
    (0..spec.reps).map(|_| f()).collect()
}

/// What one greedy generation took.
#[derive(Debug, Clone)]
pub struct TimedGeneration {
    /// From the call to the first new token known on the host.
    pub ttft_s: f64,
    /// New tokens after the first per second from the first to the last; None for one token.
    pub decode_tok_s: Option<f64>,
    pub tokens: Vec<u32>,
}

/// Greedy generation of exactly `new_tokens` tokens after `ids` (no eos stops it), timed per token. Each
/// token is known on the host when the callback sees it (sampling reads the logits back), so the times
/// include the device's work.
pub fn timed_generate(
    model: &Model,
    ids: &[u32],
    new_tokens: usize,
    mode: DecodeMode,
) -> Result<TimedGeneration> {
    let mut sampler = Sampler::new(SamplingConfig::greedy())?;
    let stop = StopCondition::new(Vec::new(), new_tokens)?;
    let mut times = Vec::with_capacity(new_tokens);
    let start = Instant::now();
    let generation = glm::generate_with(model, ids, &mut sampler, &stop, mode, |_| {
        times.push(start.elapsed().as_secs_f64());
    })?;
    if generation.tokens.len() != new_tokens || times.len() != new_tokens {
        bail!(
            "asked for {new_tokens} new tokens, got {}",
            generation.tokens.len()
        );
    }
    let decode_tok_s = match (times.first(), times.last()) {
        (Some(first), Some(last)) if new_tokens > 1 && last > first => {
            Some((new_tokens - 1) as f64 / (last - first))
        }
        _ => None,
    };
    Ok(TimedGeneration {
        ttft_s: times[0],
        decode_tok_s,
        tokens: generation.tokens,
    })
}

/// Greedy decode of `batch` copies of `ids` through the fused step as a CUDA graph: tokens per second over
/// all rows (new tokens after the first, from the first to the last), and whether every row chose the same
/// tokens (they must: the rows are identical).
#[cfg(feature = "cuda")]
fn timed_batch_decode(
    model: &Model,
    ids: &[u32],
    batch: usize,
    new_tokens: usize,
) -> Result<(f64, bool)> {
    use candle_core::{Tensor, D};
    use glm::{CudaDecoder, StepLaunch};

    let prompts = Tensor::new(vec![ids.to_vec(); batch], &Device::Cpu)?;
    let mut cache = model.new_cache();
    let first: Vec<u32> = model
        .forward(&prompts, &mut cache)?
        .argmax(D::Minus1)?
        .to_vec1()?;
    let mut step = CudaDecoder::new(model, batch, StepLaunch::Graph)?;
    step.set_tokens(&cache, &first)?;
    let mut rows = vec![first];
    let start = Instant::now();
    for _ in 1..new_tokens {
        step.step(&mut cache)?;
        rows.push(step.chosen_tokens()?);
    }
    let secs = start.elapsed().as_secs_f64();
    let same = rows.iter().all(|r| r.iter().all(|&t| t == r[0]));
    Ok((((new_tokens - 1) * batch) as f64 / secs, same))
}

/// Bytes of weights one decode step reads: every weight on the device except the embedding table, of
/// which one row is read (a tied lm_head reads the whole table, so then it counts whole).
fn weight_bytes_per_token(model: &Model, embeddings_on_host: bool) -> u64 {
    let config = model.config();
    let row = (config.hidden_size * model.dtype().size_in_bytes()) as u64;
    let table = if embeddings_on_host || config.tie_word_embeddings {
        0
    } else {
        config.vocab_size as u64 * row
    };
    model.weight_bytes() as u64 - table + row
}

/// Where prompt ids come from: a [`PROMPTS_FILE`] (`{"prompts": {"128": [ids...], ...}}`) or, for a
/// model without one, seeded random ids.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptSource {
    File {
        path: PathBuf,
        prompts: BTreeMap<usize, Vec<u32>>,
    },
    Random {
        seed: u64,
    },
}

#[derive(Deserialize)]
struct PromptsFile {
    prompts: BTreeMap<String, Vec<u32>>,
}

impl PromptSource {
    /// `explicit` if given, else the model directory's [`PROMPTS_FILE`] if it has one, else random ids.
    pub fn open(explicit: Option<&Path>, model_dir: &Path) -> Result<Self> {
        let default = model_dir.join(PROMPTS_FILE);
        let path = match explicit {
            Some(p) => p.to_path_buf(),
            None if default.is_file() => default,
            None => return Ok(PromptSource::Random { seed: 0 }),
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read the prompts", path.display()))?;
        let file: PromptsFile = serde_json::from_str(&text).with_context(|| {
            format!(
                "{}: expected {{\"prompts\": {{\"128\": [token ids], ...}}}} as benches/peers.py \
                 make-synthetic writes it",
                path.display()
            )
        })?;
        let mut prompts = BTreeMap::new();
        for (length, ids) in file.prompts {
            let n: usize = length.parse().with_context(|| {
                format!("{}: prompt key `{length}` is not a length", path.display())
            })?;
            if ids.len() != n {
                bail!(
                    "{}: prompt `{length}` has {} ids; remake the file",
                    path.display(),
                    ids.len()
                );
            }
            prompts.insert(n, ids);
        }
        if prompts.values().all(Vec::is_empty) {
            bail!("{}: no prompt in the file", path.display());
        }
        Ok(PromptSource::File { path, prompts })
    }

    /// `length` prompt ids below `vocab`: the file's prompt of that length, else the file's longest
    /// prompt repeated to that length; random ids (no eos among them) without a file.
    pub fn ids(&self, length: usize, vocab: usize, eos: &[u32]) -> Result<Vec<u32>> {
        let ids = match self {
            PromptSource::File { prompts, .. } => match prompts.get(&length) {
                Some(ids) => ids.clone(),
                None => {
                    let longest = prompts.values().max_by_key(|v| v.len()).expect("checked");
                    longest.iter().copied().cycle().take(length).collect()
                }
            },
            PromptSource::Random { seed } => {
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(*seed ^ length as u64);
                let mut ids = Vec::with_capacity(length);
                while ids.len() < length {
                    let id = rng.random_range(0..vocab as u32);
                    if !eos.contains(&id) {
                        ids.push(id);
                    }
                }
                ids
            }
        };
        if let (PromptSource::File { path, .. }, Some(bad)) =
            (self, ids.iter().find(|&&id| id as usize >= vocab))
        {
            bail!(
                "{}: token id {bad} is outside the model's vocabulary of {vocab}: the prompts belong to \
                 another model",
                path.display()
            );
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RunSpec {
        RunSpec {
            model: PathBuf::from("m"),
            nf4: true,
            double_quant: true,
            min_memory: false,
            dtype: DType::BF16,
            device: Device::Cpu,
            context: 4096,
            prompt_lengths: vec![128, 512, 2048],
            new_tokens: 32,
            warmup: 1,
            reps: 3,
            full_context: false,
            prompts: None,
        }
    }

    #[test]
    fn variants_name_precision_and_options() {
        let mut s = spec();
        assert_eq!(s.variant(), "nf4-dq");
        s.min_memory = true;
        assert_eq!(s.variant(), "nf4-dq-min");
        s.double_quant = false;
        assert_eq!(s.variant(), "nf4-min");
        s.nf4 = false;
        assert_eq!(s.variant(), "bf16");
    }

    #[test]
    fn specs_that_cannot_run_are_refused_before_loading() {
        assert!(spec().check().is_ok());
        let short = RunSpec {
            context: 2048,
            ..spec()
        };
        assert!(short
            .check()
            .unwrap_err()
            .to_string()
            .contains("--context 2048"));
        let one_token = RunSpec {
            new_tokens: 1,
            ..spec()
        };
        assert!(one_token.check().is_err());
        let dense_min = RunSpec {
            nf4: false,
            min_memory: true,
            ..spec()
        };
        assert!(dense_min
            .check()
            .unwrap_err()
            .to_string()
            .contains("--quant 4bit"));
    }

    #[test]
    fn prompts_come_from_the_file_or_its_longest_prompt_repeated() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(PROMPTS_FILE),
            r#"{"seed": 0, "prompts": {"2": [5, 6], "4": [1, 2, 3, 4]}}"#,
        )
        .unwrap();
        let source = PromptSource::open(None, dir.path()).unwrap();
        assert_eq!(source.ids(2, 10, &[]).unwrap(), vec![5, 6]);
        assert_eq!(source.ids(6, 10, &[]).unwrap(), vec![1, 2, 3, 4, 1, 2]);
        let err = source.ids(4, 3, &[]).unwrap_err().to_string();
        assert!(err.contains("outside the model's vocabulary"), "{err}");

        std::fs::write(dir.path().join("bad.json"), r#"{"prompts": {"3": [1]}}"#).unwrap();
        let err = PromptSource::open(Some(&dir.path().join("bad.json")), dir.path()).unwrap_err();
        assert!(err.to_string().contains("has 1 ids"), "{err}");
    }

    #[test]
    fn random_prompts_are_reproducible_in_range_and_avoid_eos() {
        let dir = tempfile::tempdir().unwrap();
        let source = PromptSource::open(None, dir.path()).unwrap();
        assert_eq!(source, PromptSource::Random { seed: 0 });
        let a = source.ids(500, 16, &[0, 7]).unwrap();
        assert_eq!(a, source.ids(500, 16, &[0, 7]).unwrap());
        assert_eq!(a.len(), 500);
        assert!(a.iter().all(|&id| id < 16 && id != 0 && id != 7));
    }
}
