//! `Nf4Tensor`: a tensor quantized to 4 bits per element in bitsandbytes' layout, and the quantize and
//! dequantize paths (rayon over groups of blocks).

use std::fmt;
use std::str::FromStr;

use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::codebook::{dynamic_map_signed, QuantType};
use crate::double_quant::{dequantize_absmax, quantize_absmax, NESTED_BLOCKSIZE};
use crate::size::QuantizedSize;
use crate::Nf4Error;

/// Smallest and largest blocksize bitsandbytes accepts for 4-bit quantization.
pub const MIN_BLOCKSIZE: usize = 32;
pub const MAX_BLOCKSIZE: usize = 4096;

/// Elements handled by one rayon task: large enough to amortize scheduling, small enough to balance.
const TASK_ELEMENTS: usize = 16 * 1024;

/// bitsandbytes clamps absmax to this (`clamp(min=1e-38)`, as f32) before dividing by it.
const ABSMAX_FLOOR: f32 = 1e-38_f64 as f32;

/// The float type a tensor had before quantization (bitsandbytes' `dtype` in the quant state).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum FloatDtype {
    #[serde(rename = "float32")]
    F32,
    #[serde(rename = "float16")]
    F16,
    #[serde(rename = "bfloat16")]
    Bf16,
}

impl FloatDtype {
    /// torch's name, as bitsandbytes and transformers write it.
    pub fn as_str(self) -> &'static str {
        match self {
            FloatDtype::F32 => "float32",
            FloatDtype::F16 => "float16",
            FloatDtype::Bf16 => "bfloat16",
        }
    }

    pub fn size_in_bytes(self) -> usize {
        match self {
            FloatDtype::F32 => 4,
            FloatDtype::F16 | FloatDtype::Bf16 => 2,
        }
    }
}

impl fmt::Display for FloatDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for FloatDtype {
    type Err = Nf4Error;

    fn from_str(s: &str) -> Result<Self, Nf4Error> {
        match s {
            "float32" => Ok(FloatDtype::F32),
            "float16" => Ok(FloatDtype::F16),
            "bfloat16" => Ok(FloatDtype::Bf16),
            other => Err(Nf4Error::UnknownDtype(other.to_string())),
        }
    }
}

/// How to quantize: bitsandbytes' `quantize_4bit(quant_type, blocksize, compress_statistics)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QuantOptions {
    pub quant_type: QuantType,
    /// Elements per absmax block: a power of two from 32 to 4096.
    pub blocksize: usize,
    /// Quantize the absmax values too (bitsandbytes' `compress_statistics`, transformers'
    /// `bnb_4bit_use_double_quant`).
    pub double_quant: bool,
}

impl Default for QuantOptions {
    /// What transformers uses for `load_in_4bit` with NF4 and double quant.
    fn default() -> Self {
        QuantOptions {
            quant_type: QuantType::Nf4,
            blocksize: 64,
            double_quant: true,
        }
    }
}

/// Fails unless `blocksize` is a power of two from 32 to 4096.
pub fn check_blocksize(blocksize: usize) -> Result<(), Nf4Error> {
    if blocksize.is_power_of_two() && (MIN_BLOCKSIZE..=MAX_BLOCKSIZE).contains(&blocksize) {
        Ok(())
    } else {
        Err(Nf4Error::BadBlocksize(blocksize))
    }
}

/// The absmax values as stored: plain f32, or double-quantized.
#[derive(Clone, Debug, PartialEq)]
pub enum AbsmaxState {
    /// One f32 absmax per block (`W.absmax` is F32).
    Plain(Vec<f32>),
    /// `W.absmax` is U8 codes; see [`DoubleQuantAbsmax`].
    DoubleQuant(DoubleQuantAbsmax),
}

/// Double-quantized absmax: `absmax[i] = nested_map[codes[i]] * nested_absmax[i / nested_blocksize]
/// + offset`.
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuantAbsmax {
    pub(crate) codes: Vec<u8>,
    pub(crate) nested_absmax: Vec<f32>,
    pub(crate) offset: f32,
    pub(crate) nested_blocksize: usize,
    pub(crate) nested_map: Vec<f32>,
}

impl DoubleQuantAbsmax {
    /// One u8 code per 4-bit block (`W.absmax`).
    pub fn codes(&self) -> &[u8] {
        &self.codes
    }
    /// One f32 scale per `nested_blocksize` codes (`W.nested_absmax`).
    pub fn nested_absmax(&self) -> &[f32] {
        &self.nested_absmax
    }
    /// The mean that was subtracted before quantizing (`nested_offset`).
    pub fn offset(&self) -> f32 {
        self.offset
    }
    /// Codes per nested scale; 256 in everything bitsandbytes writes.
    pub fn nested_blocksize(&self) -> usize {
        self.nested_blocksize
    }
    /// The 256-entry code map (`W.nested_quant_map`), bitsandbytes' signed dynamic map.
    pub fn nested_map(&self) -> &[f32] {
        &self.nested_map
    }
}

/// A tensor quantized to 4-bit NF4 or FP4, stored as bitsandbytes stores it: two codes per byte over
/// the flattened row-major tensor (the first element in the high nibble), one absmax per block.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Tensor {
    pub(crate) quant_type: QuantType,
    pub(crate) blocksize: usize,
    pub(crate) shape: Vec<usize>,
    pub(crate) dtype: FloatDtype,
    pub(crate) packed: Vec<u8>,
    pub(crate) absmax: AbsmaxState,
}

/// Float element types quantization reads and dequantization writes.
pub(crate) trait Element: Copy + Send + Sync {
    const DTYPE: FloatDtype;
    const ZERO: Self;
    fn to_f32_slice(src: &[Self], dst: &mut [f32]);
    fn from_f32_slice(src: &[f32], dst: &mut [Self]);
}

impl Element for f32 {
    const DTYPE: FloatDtype = FloatDtype::F32;
    const ZERO: Self = 0.0;
    fn to_f32_slice(src: &[Self], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        dst.copy_from_slice(src);
    }
}

// half's slice conversions use F16C when the CPU has it; both directions are exact / round to
// nearest even, as torch and bitsandbytes convert.
impl Element for f16 {
    const DTYPE: FloatDtype = FloatDtype::F16;
    const ZERO: Self = f16::ZERO;
    fn to_f32_slice(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
}

impl Element for bf16 {
    const DTYPE: FloatDtype = FloatDtype::Bf16;
    const ZERO: Self = bf16::ZERO;
    fn to_f32_slice(src: &[Self], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    fn from_f32_slice(src: &[f32], dst: &mut [Self]) {
        dst.convert_from_f32_slice(src);
    }
}

impl Nf4Tensor {
    /// Quantize f32 values of the given shape (row-major) as bitsandbytes' `quantize_4bit` does.
    pub fn quantize_f32(
        data: &[f32],
        shape: &[usize],
        opts: &QuantOptions,
    ) -> Result<Self, Nf4Error> {
        Self::quantize(data, shape, opts)
    }

    /// Quantize f16 values; they quantize as their exact f32 values.
    pub fn quantize_f16(
        data: &[f16],
        shape: &[usize],
        opts: &QuantOptions,
    ) -> Result<Self, Nf4Error> {
        Self::quantize(data, shape, opts)
    }

    /// Quantize bf16 values; they quantize as their exact f32 values.
    pub fn quantize_bf16(
        data: &[bf16],
        shape: &[usize],
        opts: &QuantOptions,
    ) -> Result<Self, Nf4Error> {
        Self::quantize(data, shape, opts)
    }

    fn quantize<T: Element>(
        data: &[T],
        shape: &[usize],
        opts: &QuantOptions,
    ) -> Result<Self, Nf4Error> {
        check_blocksize(opts.blocksize)?;
        let numel: usize = shape.iter().product();
        if numel == 0 {
            return Err(Nf4Error::Empty(shape.to_vec()));
        }
        if data.len() != numel {
            return Err(Nf4Error::ShapeMismatch {
                shape: shape.to_vec(),
                expected: numel,
                got: data.len(),
            });
        }
        let bs = opts.blocksize;
        let blocks_per_task = (TASK_ELEMENTS / bs).max(1);
        let mut packed = vec![0u8; numel.div_ceil(2)];
        let mut absmax = vec![0.0f32; numel.div_ceil(bs)];
        let all_finite: Result<(), NonFiniteBlock> = packed
            .par_chunks_mut(blocks_per_task * bs / 2)
            .zip(data.par_chunks(blocks_per_task * bs))
            .zip(absmax.par_chunks_mut(blocks_per_task))
            .try_for_each(|((packed, data), absmax)| {
                let mut scratch = BlockScratch::new();
                for ((packed, block), absmax) in
                    packed.chunks_mut(bs / 2).zip(data.chunks(bs)).zip(absmax)
                {
                    *absmax = scratch.quantize(block, bs, opts.quant_type, packed)?;
                }
                Ok(())
            });
        if all_finite.is_err() {
            // Report the first bad element whichever task stopped first.
            let mut values = vec![0.0f32; numel];
            T::to_f32_slice(data, &mut values);
            let index = values
                .iter()
                .position(|v| !v.is_finite())
                .unwrap_or_default();
            return Err(Nf4Error::NonFinite {
                index,
                value: values[index],
            });
        }

        let absmax = if opts.double_quant {
            let nested = quantize_absmax(&absmax);
            if !nested.offset.is_finite() {
                return Err(Nf4Error::OffsetOverflow);
            }
            AbsmaxState::DoubleQuant(DoubleQuantAbsmax {
                codes: nested.codes,
                nested_absmax: nested.nested_absmax,
                offset: nested.offset,
                nested_blocksize: NESTED_BLOCKSIZE,
                nested_map: dynamic_map_signed().to_vec(),
            })
        } else {
            AbsmaxState::Plain(absmax)
        };
        Ok(Nf4Tensor {
            quant_type: opts.quant_type,
            blocksize: bs,
            shape: shape.to_vec(),
            dtype: T::DTYPE,
            packed,
            absmax,
        })
    }

    /// Dequantize to f32 (bitsandbytes' `dequantize_4bit` with dtype float32).
    pub fn dequantize_f32(&self) -> Vec<f32> {
        self.dequantize_vec()
    }

    /// Dequantize to f16: the f32 result rounded to nearest even, as bitsandbytes does.
    pub fn dequantize_f16(&self) -> Vec<f16> {
        self.dequantize_vec()
    }

    /// Dequantize to bf16: the f32 result rounded to nearest even, as bitsandbytes does.
    pub fn dequantize_bf16(&self) -> Vec<bf16> {
        self.dequantize_vec()
    }

    /// [`Self::dequantize_f32`] into a caller's buffer of `numel()` values (reusing a buffer saves
    /// the page faults of fresh memory, most of the cost of a fresh output).
    pub fn dequantize_f32_into(&self, out: &mut [f32]) -> Result<(), Nf4Error> {
        self.dequantize_into(out)
    }

    /// [`Self::dequantize_f16`] into a caller's buffer of `numel()` values.
    pub fn dequantize_f16_into(&self, out: &mut [f16]) -> Result<(), Nf4Error> {
        self.dequantize_into(out)
    }

    /// [`Self::dequantize_bf16`] into a caller's buffer of `numel()` values.
    pub fn dequantize_bf16_into(&self, out: &mut [bf16]) -> Result<(), Nf4Error> {
        self.dequantize_into(out)
    }

    fn dequantize_vec<T: Element>(&self) -> Vec<T> {
        let mut out = vec![T::ZERO; self.numel()];
        self.fill(&mut out);
        out
    }

    fn dequantize_into<T: Element>(&self, out: &mut [T]) -> Result<(), Nf4Error> {
        if out.len() != self.numel() {
            return Err(Nf4Error::ShapeMismatch {
                shape: self.shape.clone(),
                expected: self.numel(),
                got: out.len(),
            });
        }
        self.fill(out);
        Ok(())
    }

    /// Dequantize into `out`, which holds exactly `numel()` values.
    fn fill<T: Element>(&self, out: &mut [T]) {
        let absmax = self.absmax_f32();
        let codebook = self.quant_type.codebook();
        let bs = self.blocksize;
        let blocks_per_task = (TASK_ELEMENTS / bs).max(1);
        out.par_chunks_mut(blocks_per_task * bs)
            .zip(self.packed.par_chunks(blocks_per_task * bs / 2))
            .zip(absmax.par_chunks(blocks_per_task))
            .for_each(|((out, packed), absmax)| {
                for ((out, packed), &scale) in
                    out.chunks_mut(bs).zip(packed.chunks(bs / 2)).zip(absmax)
                {
                    // Each element is round(codebook[code] * scale): a function of the code alone
                    // within a block, so convert the 16 products once and look them up.
                    let mut table = [T::ZERO; 16];
                    T::from_f32_slice(&codebook.map(|c| c * scale), &mut table);
                    let mut pairs = out.chunks_exact_mut(2);
                    for (pair, &byte) in (&mut pairs).zip(packed) {
                        pair[0] = table[(byte >> 4) as usize];
                        pair[1] = table[(byte & 0x0f) as usize];
                    }
                    if let ([last], Some(&byte)) = (pairs.into_remainder(), packed.last()) {
                        *last = table[(byte >> 4) as usize];
                    }
                }
            });
    }

    /// The first-level absmax of every block as f32 (decoded when double-quantized).
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            AbsmaxState::Plain(a) => a.clone(),
            AbsmaxState::DoubleQuant(dq) => dequantize_absmax(
                &dq.codes,
                &dq.nested_absmax,
                dq.nested_blocksize,
                &dq.nested_map,
                dq.offset,
            ),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn blocksize(&self) -> usize {
        self.blocksize
    }

    pub fn quant_type(&self) -> QuantType {
        self.quant_type
    }

    /// The dtype the tensor had before quantization.
    pub fn dtype(&self) -> FloatDtype {
        self.dtype
    }

    /// Packed codes: `(numel + 1) / 2` bytes, element `2i` in the high nibble of byte `i`.
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    pub fn absmax_state(&self) -> &AbsmaxState {
        &self.absmax
    }

    /// Whether the absmax values are double-quantized.
    pub fn is_double_quant(&self) -> bool {
        matches!(self.absmax, AbsmaxState::DoubleQuant(_))
    }

    /// The options that reproduce this tensor's layout.
    pub fn options(&self) -> QuantOptions {
        QuantOptions {
            quant_type: self.quant_type,
            blocksize: self.blocksize,
            double_quant: self.is_double_quant(),
        }
    }

    /// Bytes of every stored part (see [`QuantizedSize`]).
    pub fn size(&self) -> QuantizedSize {
        let f32_bytes = std::mem::size_of::<f32>();
        let (absmax, nested_absmax, nested_map) = match &self.absmax {
            AbsmaxState::Plain(a) => (a.len() * f32_bytes, 0, 0),
            AbsmaxState::DoubleQuant(dq) => (
                dq.codes.len(),
                dq.nested_absmax.len() * f32_bytes,
                dq.nested_map.len() * f32_bytes,
            ),
        };
        QuantizedSize {
            packed_codes: self.packed.len(),
            absmax,
            nested_absmax,
            nested_code_map: nested_map,
            code_map: 16 * f32_bytes,
        }
    }
}

/// Per-task buffers for one block, reused across the task's blocks.
struct BlockScratch {
    values: [f32; MAX_BLOCKSIZE],
    // 32-bit ranks: compare masks add up in place, with no narrowing per threshold.
    ranks: [u32; MAX_BLOCKSIZE],
}

/// A block held a NaN or an infinity.
struct NonFiniteBlock;

impl BlockScratch {
    fn new() -> Self {
        BlockScratch {
            values: [0.0; MAX_BLOCKSIZE],
            ranks: [0; MAX_BLOCKSIZE],
        }
    }

    /// Quantize one block (the last may be partial) into `packed`; returns the absmax to store.
    ///
    /// bitsandbytes' CPU path (`backends/default/ops.py`): full blocks multiply by
    /// `1 / max(absmax, 1e-38)` and store the unclamped absmax; the partial last block divides by
    /// `max(absmax, 1e-38)` and stores that. Scaled values are clamped to [-1, 1] and bucketized
    /// against the midpoints; an odd element count pads the last byte with the code of 0.0.
    fn quantize<T: Element>(
        &mut self,
        block: &[T],
        blocksize: usize,
        quant_type: QuantType,
        packed: &mut [u8],
    ) -> Result<f32, NonFiniteBlock> {
        let n = block.len();
        // Pad to whole bytes with 0.0 (scaled), which encodes as the codebook's zero.
        let padded = n + n % 2;
        let values = &mut self.values[..padded];
        values[n..].fill(0.0);
        T::to_f32_slice(block, &mut values[..n]);
        // A fold rather than `all`: no early exit, so it vectorizes.
        if !values.iter().fold(true, |ok, v| ok & v.is_finite()) {
            return Err(NonFiniteBlock);
        }
        let absmax = values.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let stored = if n == blocksize {
            let inv = 1.0 / absmax.max(ABSMAX_FLOOR);
            for v in values.iter_mut() {
                *v = (*v * inv).clamp(-1.0, 1.0);
            }
            absmax
        } else {
            let floor = absmax.max(ABSMAX_FLOOR);
            for v in values.iter_mut() {
                *v = (*v / floor).clamp(-1.0, 1.0);
            }
            floor
        };

        // rank = number of thresholds strictly below the value. Thresholds in the inner loop (unrolled),
        // elements in the outer one (vectorized).
        let thresholds = quant_type.thresholds();
        let ranks = &mut self.ranks[..padded];
        for (r, &v) in ranks.iter_mut().zip(values.iter()) {
            *r = thresholds.iter().map(|&t| u32::from(v > t)).sum();
        }
        let pairs = packed.iter_mut().zip(ranks.chunks_exact(2));
        match quant_type {
            // NF4's codes are its ranks.
            QuantType::Nf4 => {
                pairs.for_each(|(byte, pair)| *byte = ((pair[0] << 4) | pair[1]) as u8)
            }
            QuantType::Fp4 => {
                let code_by_rank = quant_type.code_by_rank();
                pairs.for_each(|(byte, pair)| {
                    *byte = (code_by_rank[pair[0] as usize] << 4) | code_by_rank[pair[1] as usize]
                })
            }
        }
        Ok(stored)
    }
}
