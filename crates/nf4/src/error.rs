use std::path::PathBuf;

use safetensors::Dtype;

/// Everything that can go wrong quantizing, dequantizing, reading or writing NF4/FP4 tensors.
#[derive(Debug, thiserror::Error)]
pub enum Nf4Error {
    #[error(
        "blocksize {0} is not supported: use a power of two from 32 to 4096, as bitsandbytes does"
    )]
    BadBlocksize(usize),

    #[error("shape {shape:?} holds {expected} elements but {got} values were given")]
    ShapeMismatch {
        shape: Vec<usize>,
        expected: usize,
        got: usize,
    },

    #[error("cannot quantize an empty tensor (shape {0:?})")]
    Empty(Vec<usize>),

    #[error(
        "element {index} is {value}: 4-bit quantization scales by the block's absmax and needs finite \
         values; fix the weights before quantizing"
    )]
    NonFinite { index: usize, value: f32 },

    #[error(
        "the absmax values overflow f32 when averaged for double quantization; quantize this tensor \
         with double_quant = false"
    )]
    OffsetOverflow,

    #[error("unknown 4-bit quant type `{0}`: bitsandbytes writes \"nf4\" or \"fp4\"")]
    UnknownQuantType(String),

    #[error("unknown float dtype `{0}`: expected \"float32\", \"float16\" or \"bfloat16\"")]
    UnknownDtype(String),

    #[error(
        "tensor `{key}` is missing: the 4-bit weight `{weight}` needs it (incomplete checkpoint?)"
    )]
    MissingTensor { key: String, weight: String },

    #[error("tensor `{key}` has dtype {found:?}, expected {expected}")]
    WrongDtype {
        key: String,
        found: Dtype,
        expected: &'static str,
    },

    #[error("tensor `{key}` holds {found} bytes, expected {expected}: {why}")]
    WrongSize {
        key: String,
        found: usize,
        expected: usize,
        why: String,
    },

    #[error("rows {start}..{end} of the 4-bit tensor of shape {shape:?} {reason}")]
    RowSlice {
        start: usize,
        end: usize,
        shape: Vec<usize>,
        reason: String,
    },

    #[error("cannot concatenate the 4-bit tensors exactly: {0}")]
    Concat(String),

    #[error("quant state `{key}`: {reason}")]
    BadQuantState { key: String, reason: String },

    #[error("quantization_config: {0}")]
    Config(String),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{path}: {source}")]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },

    #[error("{path}: cannot write safetensors: {source}")]
    Write {
        path: PathBuf,
        source: safetensors::SafeTensorError,
    },
}
