//! Errors of the model side: config, checkpoint loading, forward and generation.
//!
//! Each variant names the file (and tensor) involved and, where there is one, the fix.

use std::path::PathBuf;

/// Everything that can go wrong while reading a model directory or running the decoder.
#[derive(Debug, thiserror::Error)]
pub enum GlmError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not valid JSON: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error(
        "{path}: unknown architecture {found}; glm-run supports GlmForCausalLM, Glm4ForCausalLM, \
         Glm4vForConditionalGeneration and ChatGLMModel/ChatGLMForConditionalGeneration"
    )]
    UnknownArchitecture { path: PathBuf, found: String },
    #[error(
        "{dir} has no model.safetensors and no model.safetensors.index.json: \
         point at a directory holding a safetensors checkpoint"
    )]
    NoCheckpoint { dir: PathBuf },
    #[error(
        "{path} is missing: {index} lists it as a shard of the checkpoint (incomplete download?)"
    )]
    MissingShard { path: PathBuf, index: PathBuf },
    #[error("{path} is not a valid safetensors file ({reason}); re-download or re-export it")]
    Safetensors { path: PathBuf, reason: String },
    #[error("tensor {name} is missing from {location}: the checkpoint is incomplete or does not match config.json")]
    MissingTensor { name: String, location: String },
    #[error("tensor {name} in {path} has shape {found:?}, but config.json implies {expected:?}")]
    ShapeMismatch {
        name: String,
        path: PathBuf,
        found: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error("tensor {name} in {path} has dtype {found}; expected {expected}")]
    UnsupportedDtype {
        name: String,
        path: PathBuf,
        found: String,
        expected: &'static str,
    },
    #[error("NF4 weight {name} in {path}: {source}")]
    Nf4 {
        name: String,
        path: PathBuf,
        // Boxed so that every `Result<_, GlmError>` stays small.
        source: Box<nf4::Nf4Error>,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    #[error("invalid input: {0}")]
    Input(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Sampling(#[from] crate::sampling::SamplingError),
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
}

pub type Result<T> = std::result::Result<T, GlmError>;
