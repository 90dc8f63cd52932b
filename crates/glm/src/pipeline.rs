//! The library's front door: plan, load, and generate text with streaming, in three calls.
//!
//! ```no_run
//! use glm::pipeline::{Glm, GenerationSettings, Prompt, RunOptions};
//!
//! let options = RunOptions::default();
//! let plan = Glm::plan("models/demo", &options)?;
//! println!("{plan}");
//! let glm = Glm::load("models/demo", &options)?;
//! let prompt = Prompt::chat(None, "What say you to my love?");
//! let done = glm.generate(&prompt, &GenerationSettings::default(), |piece| print!("{piece}"))?;
//! println!("\n{} tokens, {}", done.tokens.len(), done.finish);
//! # Ok::<(), glm::GlmError>(())
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::{DType, Device};

use crate::config::Config;
use crate::error::{GlmError, Result};
use crate::generate::{generate_with, DecodeMode};
use crate::gpu::{self, MeasuredMemory};
use crate::loader::{LoadOptions, LoadProgress};
use crate::model::Model;
use crate::plan::{self, human_bytes, MemoryBudget, MemoryPlan, PlanRequest, Precision, QuantMode};
use crate::sampling::{FinishReason, Sampler, SamplingConfig, StopCondition};
use crate::tokenizer::GlmTokenizer;

/// Environment variable that caps the memory the planner may use (e.g. `12GiB`), like `--memory-limit`.
pub const MEMORY_LIMIT_ENV: &str = "GLM_RUN_MEMORY_LIMIT";

/// Context length planned when the caller does not say: the model's own limit, capped here so the
/// default KV cache of a 128k-context model does not dominate the plan.
pub const DEFAULT_CONTEXT: usize = 4096;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub quant: QuantMode,
    /// Compute dtype: f32, f16 or bf16.
    pub dtype: DType,
    pub device: Device,
    /// Tokens of context to plan the KV cache for; None: the model's limit, at most [`DEFAULT_CONTEXT`].
    pub context_len: Option<usize>,
    /// Cap on usable memory in bytes (also read from [`MEMORY_LIMIT_ENV`]).
    pub memory_limit: Option<u64>,
    /// How weights are quantized when the plan picks 4 bits for a dense checkpoint.
    pub nf4: nf4::QuantOptions,
    /// With 4-bit weights, quantize the lm_head too (`--quantize-lm-head`).
    pub quantize_lm_head: bool,
    /// On a CUDA device, keep the embedding table in host memory (`--embeddings-on-host`).
    pub embeddings_on_host: bool,
    /// Told `(bytes read, bytes to read)` as the load goes.
    pub progress: Option<LoadProgress>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            quant: QuantMode::Auto,
            dtype: DType::F32,
            device: Device::Cpu,
            context_len: None,
            memory_limit: None,
            nf4: nf4::QuantOptions::default(),
            quantize_lm_head: false,
            embeddings_on_host: false,
            progress: None,
        }
    }
}

/// What to continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prompt {
    /// A user message in the model's chat template, with an optional system message.
    Chat {
        system: Option<String>,
        user: String,
    },
    /// Text encoded as is, without the chat template.
    Raw(String),
}

impl Prompt {
    pub fn chat(system: Option<&str>, user: &str) -> Self {
        Prompt::Chat {
            system: system.map(str::to_string),
            user: user.to_string(),
        }
    }
}

/// How to generate.
#[derive(Debug, Clone)]
pub struct GenerationSettings {
    pub sampling: SamplingConfig,
    pub max_new_tokens: usize,
    /// How decode steps run on a GPU (ignored on the CPU).
    pub decode: DecodeMode,
}

impl Default for GenerationSettings {
    fn default() -> Self {
        Self {
            sampling: SamplingConfig::greedy(),
            max_new_tokens: 128,
            decode: DecodeMode::default(),
        }
    }
}

/// Seconds and rates of one generation. The prefill covers the prompt and the first new token.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timings {
    pub prefill_s: f64,
    pub decode_s: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
}

/// A finished generation.
#[derive(Debug, Clone)]
pub struct Completion {
    pub prompt_tokens: Vec<u32>,
    /// New tokens, the stop token included.
    pub tokens: Vec<u32>,
    /// The new text, special tokens left out.
    pub text: String,
    pub finish: FinishReason,
    pub timings: Timings,
}

/// A loaded model with its tokenizer and memory plan.
#[derive(Debug)]
pub struct Glm {
    dir: PathBuf,
    model: Model,
    tokenizer: GlmTokenizer,
    plan: MemoryPlan,
    load_time: Duration,
}

impl Glm {
    /// The memory plan for `dir` under `options`, from config.json alone (no weight is read).
    pub fn plan(dir: impl AsRef<Path>, options: &RunOptions) -> Result<MemoryPlan> {
        let config = Config::from_model_dir(dir.as_ref())?;
        plan_for(&config, options)
    }

    /// Plans, then loads the model at the precision the plan chose, and the tokenizer.
    pub fn load(dir: impl AsRef<Path>, options: &RunOptions) -> Result<Self> {
        let dir = dir.as_ref();
        let start = Instant::now();
        let config = Config::from_model_dir(dir)?;
        let plan = plan_for(&config, options)?;
        let tokenizer = GlmTokenizer::from_dir(dir)?;
        let cuda = options.device.is_cuda();
        let load = LoadOptions {
            dtype: options.dtype,
            device: options.device.clone(),
            // A pre-quantized checkpoint is read as stored; a dense one is quantized at load.
            quantize: (plan.choice == Precision::Nf4 && config.quantization.is_none())
                .then_some(options.nf4),
            quantize_lm_head: options.quantize_lm_head,
            embeddings_on_host: options.embeddings_on_host,
            // On the GPU the cache is allocated once for the planned context.
            kv_capacity: cuda.then_some(plan.context_len),
            progress: options.progress.clone(),
        };
        let model = Model::load(dir, &load)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            model,
            tokenizer,
            plan,
            load_time: start.elapsed(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn tokenizer(&self) -> &GlmTokenizer {
        &self.tokenizer
    }

    pub fn plan_used(&self) -> &MemoryPlan {
        &self.plan
    }

    pub fn load_time(&self) -> Duration {
        self.load_time
    }

    /// Device memory measured with the driver beside the plan (CUDA only): after the load, the load's
    /// peak, and the peak so far.
    pub fn measured_memory(&self) -> Option<MeasuredMemory> {
        self.model.measured_memory()
    }

    /// The prompt's token ids as the model sees them.
    pub fn encode(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        let ids = match prompt {
            Prompt::Chat { system, user } => {
                self.tokenizer.encode_prompt(system.as_deref(), user)?
            }
            Prompt::Raw(text) => self.tokenizer.encode_raw(text)?,
        };
        Ok(ids)
    }

    /// Generates a continuation of `prompt`, passing each new piece of text to `on_text` as soon as it
    /// is complete UTF-8.
    pub fn generate(
        &self,
        prompt: &Prompt,
        settings: &GenerationSettings,
        mut on_text: impl FnMut(&str),
    ) -> Result<Completion> {
        let prompt_tokens = self.encode(prompt)?;
        let context = prompt_tokens.len() + settings.max_new_tokens;
        if context > self.plan.context_len {
            return Err(GlmError::Input(format!(
                "{} prompt tokens + {} new tokens exceed the planned context of {} tokens: raise \
                 --context or lower --max-new-tokens",
                prompt_tokens.len(),
                settings.max_new_tokens,
                self.plan.context_len
            )));
        }
        let mut sampler = Sampler::new(settings.sampling.clone())?;
        let stop = StopCondition::new(
            self.model.config().eos_token_ids.clone(),
            settings.max_new_tokens,
        )?;
        let mut stream = self.tokenizer.stream();
        let mut text = String::new();
        let mut stream_error = None;
        let start = Instant::now();
        let mut first_token_at = None;
        let generation = generate_with(
            &self.model,
            &prompt_tokens,
            &mut sampler,
            &stop,
            settings.decode,
            |token| {
                first_token_at.get_or_insert_with(|| start.elapsed());
                match stream.push(token) {
                    Ok(Some(piece)) => {
                        on_text(&piece);
                        text.push_str(&piece);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        stream_error.get_or_insert(e);
                    }
                }
            },
        )?;
        let total = start.elapsed().as_secs_f64();
        if let Some(e) = stream_error {
            return Err(e.into());
        }
        if let Some(piece) = stream.finish()? {
            on_text(&piece);
            text.push_str(&piece);
        }
        let prefill_s = first_token_at.map_or(total, |d| d.as_secs_f64());
        let decode_s = total - prefill_s;
        let decoded = generation.tokens.len().saturating_sub(1);
        let rate = |n: usize, s: f64| if s > 0.0 { n as f64 / s } else { 0.0 };
        Ok(Completion {
            timings: Timings {
                prefill_s,
                decode_s,
                prefill_tok_s: rate(prompt_tokens.len(), prefill_s),
                decode_tok_s: rate(decoded, decode_s),
            },
            prompt_tokens,
            tokens: generation.tokens,
            text,
            finish: generation.finish,
        })
    }
}

/// The plan for `config` under `options`, with the usable memory of the target device.
fn plan_for(config: &Config, options: &RunOptions) -> Result<MemoryPlan> {
    let context_len = options
        .context_len
        .unwrap_or_else(|| config.max_position_embeddings.min(DEFAULT_CONTEXT));
    let nf4 = match &config.quantization {
        Some(q) => q
            .quant_options()
            .map_err(|e| GlmError::Input(format!("quantization_config of config.json: {e}")))?,
        None => options.nf4,
    };
    let cuda = options.device.is_cuda();
    let request = PlanRequest {
        dtype: options.dtype,
        context_len,
        batch: 1,
        nf4,
        runtime_overhead: if cuda { plan::CUDA_RUNTIME_OVERHEAD } else { 0 },
        quantize_lm_head: options.quantize_lm_head,
        embeddings_on_host: options.embeddings_on_host && cuda,
        separate_device_memory: cuda,
    };
    MemoryPlan::new(config, &request, options.quant, memory_budget(options)?)
}

/// The usable memory: the device's available memory, capped by the option or the environment.
fn memory_budget(options: &RunOptions) -> Result<Option<MemoryBudget>> {
    let device = match &options.device {
        Device::Cpu => plan::host_memory_budget(),
        device => gpu::device_memory(device)?.map(|m| MemoryBudget {
            usable: m.free,
            source: format!(
                "free memory of CUDA device {} (driver; {} in all)",
                device_ordinal(device),
                human_bytes(m.total)
            ),
        }),
    };
    let limit = match (options.memory_limit, std::env::var(MEMORY_LIMIT_ENV)) {
        (Some(bytes), _) => Some((bytes, "--memory-limit".to_string())),
        (None, Ok(text)) => Some((plan::parse_bytes(&text)?, MEMORY_LIMIT_ENV.to_string())),
        (None, Err(_)) => None,
    };
    Ok(match (device, limit) {
        (Some(d), Some((bytes, source))) if bytes < d.usable => Some(MemoryBudget {
            usable: bytes,
            source,
        }),
        (Some(d), _) => Some(d),
        (None, Some((bytes, source))) => Some(MemoryBudget {
            usable: bytes,
            source,
        }),
        (None, None) => None,
    })
}

/// The ordinal of a CUDA device, for messages.
fn device_ordinal(device: &Device) -> usize {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
        _ => 0,
    }
}
