//! GLM decoder on candle.
//!
//! Load a model directory as published (GLM-4, GLM-4-0414, the text decoder of GLM-4.1V, or the older
//! ChatGLM layout of glm-4-9b-chat), dense or 4-bit, and generate tokens:
//!
//! ```no_run
//! use glm::sampling::{Sampler, SamplingConfig, StopCondition};
//! use glm::{generate, LoadOptions, Model};
//!
//! let model = Model::load("path/to/glm-4-9b-chat-hf", &LoadOptions::default())?;
//! let mut sampler = Sampler::new(SamplingConfig::greedy())?;
//! let stop = StopCondition::new(model.config().eos_token_ids.clone(), 32)?;
//! let out = generate(&model, &[151331, 151333, 9703], &mut sampler, &stop, |_token| {})?;
//! println!("{:?} ({})", out.tokens, out.finish);
//! # Ok::<(), glm::GlmError>(())
//! ```

pub mod config;
pub mod error;
pub mod generate;
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
pub use generate::{generate, Generation};
pub use linear::{Linear, LinearWeight};
pub use loader::{Checkpoint, LoadOptions};
pub use model::{KvCache, Model};
