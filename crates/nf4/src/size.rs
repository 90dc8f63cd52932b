//! Sizes of a quantized tensor, known before quantizing (the memory planner's input).

use crate::double_quant::NESTED_BLOCKSIZE;
use crate::tensor::{check_blocksize, QuantOptions};
use crate::Nf4Error;

/// Bytes of each stored part of a 4-bit tensor, as bitsandbytes stores them. The small JSON quant
/// state (`W.quant_state.bitsandbytes__nf4`, ~170 bytes of metadata) is not included.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct QuantizedSize {
    /// `W`: two 4-bit codes per byte.
    pub packed_codes: usize,
    /// `W.absmax`: f32 per block, or one u8 code per block with double quant.
    pub absmax: usize,
    /// `W.nested_absmax`: f32 per 256 blocks (double quant only).
    pub nested_absmax: usize,
    /// `W.nested_quant_map`: 256 f32 (double quant only).
    pub nested_code_map: usize,
    /// `W.quant_map`: 16 f32.
    pub code_map: usize,
}

impl QuantizedSize {
    /// Sizes for a tensor of `numel` elements quantized with `opts`.
    pub fn new(numel: usize, opts: &QuantOptions) -> Result<Self, Nf4Error> {
        check_blocksize(opts.blocksize)?;
        let f32_bytes = std::mem::size_of::<f32>();
        let blocks = numel.div_ceil(opts.blocksize);
        let (absmax, nested_absmax, nested_code_map) = if opts.double_quant {
            (
                blocks,
                blocks.div_ceil(NESTED_BLOCKSIZE) * f32_bytes,
                256 * f32_bytes,
            )
        } else {
            (blocks * f32_bytes, 0, 0)
        };
        Ok(QuantizedSize {
            packed_codes: numel.div_ceil(2),
            absmax,
            nested_absmax,
            nested_code_map,
            code_map: 16 * f32_bytes,
        })
    }

    /// All parts together.
    pub fn total(&self) -> usize {
        self.packed_codes + self.absmax + self.nested_absmax + self.nested_code_map + self.code_map
    }
}

/// Total bytes a tensor of `numel` elements takes once quantized with `opts` (all stored parts
/// except the JSON quant state), without quantizing it.
pub fn packed_bytes(numel: usize, opts: &QuantOptions) -> Result<usize, Nf4Error> {
    Ok(QuantizedSize::new(numel, opts)?.total())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_4096_square_weight_takes_about_half_a_byte_per_element() {
        let size = QuantizedSize::new(4096 * 4096, &QuantOptions::default()).unwrap();
        assert_eq!(size.packed_codes, 8 * 1024 * 1024);
        assert_eq!(size.absmax, 4096 * 4096 / 64);
        assert_eq!(size.nested_absmax, 4096 * 4096 / 64 / 256 * 4);
        assert!(size.total() < 4096 * 4096 / 2 + 300_000);
    }

    #[test]
    fn bad_blocksize_is_refused() {
        let opts = QuantOptions {
            blocksize: 48,
            ..QuantOptions::default()
        };
        assert!(matches!(
            packed_bytes(100, &opts),
            Err(Nf4Error::BadBlocksize(48))
        ));
    }
}
