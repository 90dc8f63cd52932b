//! GLM language models on candle: plan the memory, load dense (f32/f16/bf16) or 4-bit NF4, generate
//! with streaming.
//!
//! Supported checkpoints, each from its own `config.json` and safetensors as published: GLM-4
//! (`GlmForCausalLM`, glm-4-9b-chat-hf), GLM-4-0414 (`Glm4ForCausalLM`), the text decoder of GLM-4.1V
//! (`Glm4vForConditionalGeneration`), and the older ChatGLM layout of glm-4-9b-chat.
//!
//! # Plan, load, generate
//!
//! [`pipeline::Glm`] is the front door (the `glm-run` CLI uses nothing else): [`pipeline::Glm::plan`]
//! reads `config.json` only and says how many bytes the model takes dense and in NF4, and which it will
//! use and why; [`pipeline::Glm::load`] loads at that precision (a dense checkpoint is quantized at
//! load, a saved 4-bit one is read as stored); [`pipeline::Glm::generate`] passes each piece of text to
//! a callback as soon as it is complete UTF-8.
//!
//! ```
//! use glm::pipeline::{GenerationSettings, Glm, Prompt, RunOptions};
//! use glm::plan::QuantMode;
//!
//! // The small demo model shipped with the repository.
//! let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/demo");
//! let options = RunOptions {
//!     quant: QuantMode::Nf4, // or QuantMode::Auto: dense when it fits with its KV cache
//!     ..RunOptions::default()
//! };
//! let plan = Glm::plan(dir, &options)?; // no weight is read
//! println!("{plan}");
//!
//! let glm = Glm::load(dir, &options)?;
//! assert_eq!(glm.model().weight_bytes() as u64, plan.chosen().weights());
//!
//! let settings = GenerationSettings {
//!     max_new_tokens: 16,
//!     ..GenerationSettings::default() // greedy
//! };
//! let prompt = Prompt::chat(None, "What say you to my love?");
//! let mut streamed = String::new();
//! let done = glm.generate(&prompt, &settings, |piece| {
//!     print!("{piece}");
//!     streamed.push_str(piece);
//! })?;
//! assert_eq!(streamed, done.text);
//! println!(
//!     "\n{} tokens ({}), {:.0} tok/s",
//!     done.tokens.len(),
//!     done.finish,
//!     done.timings.decode_tok_s
//! );
//! # Ok::<(), glm::GlmError>(())
//! ```
//!
//! # The parts
//!
//! - [`pipeline`]: [`pipeline::RunOptions`], [`pipeline::Glm`], [`pipeline::Prompt`],
//!   [`pipeline::GenerationSettings`], [`pipeline::Completion`].
//! - [`plan`]: the memory planner ([`plan::MemoryPlan`]: weights by kind, KV cache, activations,
//!   overhead; dense and NF4 side by side; the decision).
//! - [`gpu`]: CUDA device memory from the driver (the planner's budget, [`gpu::MeasuredMemory`]
//!   beside the plan) and allocation failures reported as [`GlmError::OutOfMemory`].
//! - [`hub`]: a local directory or a Hugging Face Hub id through the standard cache (`HF_HOME`,
//!   `HF_HUB_OFFLINE=1`).
//! - [`save`]: a dense checkpoint rewritten as the NF4 checkpoint transformers + bitsandbytes load.
//! - [`eval`]: held-out perplexity and top-1 agreement, as `models/demo/eval.py` computes them.
//! - Lower level: [`Model`] (decoder, [`KvCache`]), [`generate()`] with a [`sampling::Sampler`] and a
//!   [`sampling::StopCondition`], [`tokenizer::GlmTokenizer`] (chat template, streaming detokenizer),
//!   [`Config`], [`Checkpoint`], [`Linear`] (dense or packed 4-bit weights).
//!
//! Every error is a [`GlmError`] that names the file (and tensor) involved and, where there is one, the
//! fix.

pub mod config;
pub mod error;
pub mod eval;
pub mod generate;
pub mod gpu;
pub mod hub;
pub mod linear;
pub mod loader;
pub mod model;
pub mod pipeline;
pub mod plan;
pub mod sampling;
pub mod save;
pub mod tokenizer;

pub use config::{Architecture, Config};
pub use error::{GlmError, Result};
pub use generate::{generate, generate_with, DecodeMode, Generation};
pub use linear::{Linear, LinearWeight};
pub use loader::{Checkpoint, LoadOptions, LoadProgress};
#[cfg(feature = "cuda")]
pub use model::{CudaDecoder, StepLaunch};
pub use model::{KvCache, Model};
