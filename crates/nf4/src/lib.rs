//! bitsandbytes-compatible 4-bit quantization (NF4 and FP4) on the CPU.
//!
//! Bit-compatible with bitsandbytes 0.50 (`quantize_4bit` / `dequantize_4bit` on the CPU) and with the
//! safetensors layout transformers writes for `BitsAndBytesConfig(load_in_4bit=True)`:
//!
//! - codes: two per byte over the flattened row-major tensor, first element in the high nibble; an odd
//!   count pads the last low nibble with the code of 0.0 (NF4: 7, FP4: 0);
//! - one absmax per block of `blocksize` elements (the last block may be partial); each element takes
//!   the codebook entry nearest to `x / absmax`, ties to the lower entry;
//! - double quantization: `offset = mean(absmax)`, `absmax - offset` in 8 bits (blocks of 256) with
//!   bitsandbytes' signed dynamic map.
//!
//! ```
//! use nf4::{Nf4Tensor, QuantOptions};
//! let w: Vec<f32> = (0..4096).map(|i| ((i * 37 % 101) as f32 - 50.0) / 500.0).collect();
//! let q = Nf4Tensor::quantize_f32(&w, &[64, 64], &QuantOptions::default())?;
//! assert_eq!(q.packed().len(), 2048);
//! let back = q.dequantize_f32();
//! assert!(w.iter().zip(&back).all(|(a, b)| (a - b).abs() < 0.02));
//! # Ok::<(), nf4::Nf4Error>(())
//! ```

mod codebook;
mod config;
mod double_quant;
mod error;
mod rows;
mod size;
mod state;
mod tensor;

pub use codebook::{dynamic_map_signed, QuantType, FP4_CODEBOOK, NF4_CODEBOOK};
pub use config::{QuantizationConfig, TRANSFORMERS_BLOCKSIZE};
pub use double_quant::{torch_mean, NESTED_BLOCKSIZE};
pub use error::Nf4Error;
pub use size::{packed_bytes, QuantizedSize};
pub use state::{is_quantized, quantized_weight_names, save_file, StoredTensor};
pub use tensor::{
    check_blocksize, AbsmaxState, DoubleQuantAbsmax, FloatDtype, Nf4Tensor, QuantOptions,
    MAX_BLOCKSIZE, MIN_BLOCKSIZE,
};

/// Re-exported so callers can build the views [`Nf4Tensor::read`] takes.
pub use safetensors::tensor::{Dtype, TensorView};
