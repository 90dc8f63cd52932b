//! Cutting a 4-bit tensor into row ranges and joining them again, without dequantizing: what splitting a
//! fused weight (ChatGLM's `query_key_value`) into its parts needs.
//!
//! Blocks run along the flattened row-major tensor, so rows `[r0, r1)` are whole blocks of their own when
//! `r0 × row_len` and `r1 × row_len` are multiples of the blocksize; with double quant the absmax codes
//! are grouped 256 to a nested scale, so the cuts must also fall on those groups (`blocksize × 256`
//! elements). A piece cut there keeps the stored codes, absmax (codes), nested scales and the per-tensor
//! offset, and dequantizes to exactly the values of the same rows of the whole tensor.

use std::ops::Range;

use crate::tensor::{AbsmaxState, DoubleQuantAbsmax, Nf4Tensor};
use crate::Nf4Error;

impl Nf4Tensor {
    /// Elements a piece must start (and, but for the last, end) at a multiple of to be a 4-bit tensor
    /// of its own: the blocksize, times the nested blocksize when double-quantized.
    pub fn cut_alignment(&self) -> usize {
        match &self.absmax {
            AbsmaxState::Plain(_) => self.blocksize,
            AbsmaxState::DoubleQuant(dq) => self.blocksize * dq.nested_blocksize,
        }
    }

    /// Why a cut after `elements` elements would split a block or a nested group; None when it is exact.
    fn misaligned_cut(&self, elements: usize) -> Option<String> {
        let align = self.cut_alignment();
        if elements.is_multiple_of(align) {
            return None;
        }
        let unit = match &self.absmax {
            AbsmaxState::Plain(_) => format!("blocksize {}: one absmax per block", self.blocksize),
            AbsmaxState::DoubleQuant(dq) => format!(
                "blocksize {} × {} absmax codes per nested scale",
                self.blocksize, dq.nested_blocksize
            ),
        };
        Some(format!(
            "element {elements} is not a multiple of {align} ({unit}), so a block or nested scale \
             spans the cut"
        ))
    }

    /// Rows `rows` (along the first dimension) as a 4-bit tensor of their own, holding this tensor's
    /// stored codes, absmax (codes), nested scales and offset: it dequantizes to exactly the same rows
    /// of [`Self::dequantize_f32`]. Fails unless both ends are exact cuts (see [`Self::cut_alignment`];
    /// the end of the tensor always is).
    pub fn slice_rows(&self, rows: Range<usize>) -> Result<Nf4Tensor, Nf4Error> {
        let err = |reason: String| Nf4Error::RowSlice {
            start: rows.start,
            end: rows.end,
            shape: self.shape.clone(),
            reason,
        };
        let Some((&total, rest)) = self.shape.split_first() else {
            return Err(err("a 0-d tensor has no rows".into()));
        };
        if rows.start >= rows.end || rows.end > total {
            return Err(err(format!("are empty or out of range ({total} rows)")));
        }
        let row_len: usize = rest.iter().product();
        let (first, last) = (rows.start * row_len, rows.end * row_len);
        for cut in [first, last] {
            if cut < self.numel() {
                if let Some(why) = self.misaligned_cut(cut) {
                    return Err(err(format!("cannot be cut out exactly: {why}")));
                }
            }
        }
        let blocks = first / self.blocksize..last.div_ceil(self.blocksize);
        let absmax = match &self.absmax {
            AbsmaxState::Plain(a) => AbsmaxState::Plain(a[blocks].to_vec()),
            AbsmaxState::DoubleQuant(dq) => {
                let nb = dq.nested_blocksize;
                AbsmaxState::DoubleQuant(DoubleQuantAbsmax {
                    nested_absmax: dq.nested_absmax[blocks.start / nb..blocks.end.div_ceil(nb)]
                        .to_vec(),
                    codes: dq.codes[blocks].to_vec(),
                    nested_map: dq.nested_map.clone(),
                    ..*dq
                })
            }
        };
        let mut shape = self.shape.clone();
        shape[0] = rows.len();
        Ok(Nf4Tensor {
            shape,
            // `first` is even (a multiple of the blocksize): whole bytes.
            packed: self.packed[first / 2..last.div_ceil(2)].to_vec(),
            absmax,
            ..*self
        })
    }

    /// `parts` stacked along the first dimension, without dequantizing: exact when they share the quant
    /// type, blocksize, dtype, trailing dimensions and, double-quantized, the offset and code map (as
    /// the pieces of one tensor do), and every part but the last holds a multiple of
    /// [`Self::cut_alignment`] elements.
    pub fn concat_rows(parts: &[Nf4Tensor]) -> Result<Nf4Tensor, Nf4Error> {
        let (head, tail) = parts
            .split_first()
            .ok_or_else(|| Nf4Error::Concat("there are no tensors to concatenate".into()))?;
        let Some((_, row_shape)) = head.shape.split_first() else {
            return Err(Nf4Error::Concat("a 0-d tensor has no rows".into()));
        };
        let mut out = head.clone();
        for (i, part) in tail.iter().enumerate() {
            let i = i + 1;
            let mismatch = |what: String| {
                Nf4Error::Concat(format!(
                    "part {i} {what}; only pieces of one 4-bit tensor concatenate exactly"
                ))
            };
            if (part.quant_type, part.blocksize, part.dtype)
                != (head.quant_type, head.blocksize, head.dtype)
            {
                return Err(mismatch(format!(
                    "is {} with blocksize {} from {}, part 0 {} with blocksize {} from {}",
                    part.quant_type,
                    part.blocksize,
                    part.dtype,
                    head.quant_type,
                    head.blocksize,
                    head.dtype
                )));
            }
            if part.shape.get(1..) != Some(row_shape) {
                return Err(mismatch(format!(
                    "has shape {:?}, part 0 {:?}: rows of another length",
                    part.shape, head.shape
                )));
            }
            // The tensor so far must end on a cut for the next part's blocks to start one.
            if let Some(why) = out.misaligned_cut(out.numel()) {
                return Err(Nf4Error::Concat(format!("parts 0..{i} end at {why}")));
            }
            match (&mut out.absmax, &part.absmax) {
                (AbsmaxState::Plain(a), AbsmaxState::Plain(b)) => a.extend_from_slice(b),
                (AbsmaxState::DoubleQuant(a), AbsmaxState::DoubleQuant(b)) => {
                    if a.offset.to_bits() != b.offset.to_bits()
                        || a.nested_blocksize != b.nested_blocksize
                        || a.nested_map != b.nested_map
                    {
                        return Err(mismatch(format!(
                            "has double-quant offset {} (nested blocksize {}), part 0 {} ({}), or \
                             another code map",
                            b.offset, b.nested_blocksize, a.offset, a.nested_blocksize
                        )));
                    }
                    a.codes.extend_from_slice(&b.codes);
                    a.nested_absmax.extend_from_slice(&b.nested_absmax);
                }
                _ => {
                    return Err(mismatch(
                        "is double-quantized and part 0 is not, or the other way round".into(),
                    ))
                }
            }
            out.packed.extend_from_slice(&part.packed);
            out.shape[0] += part.shape[0];
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{QuantOptions, QuantType};

    /// Deterministic values with a spread of magnitudes, so the absmax differ from block to block.
    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| {
                let x = i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                (x % 2001) as f32 / 1000.0 - 1.0 + (i % 97) as f32 * 0.01
            })
            .collect()
    }

    fn quantized(shape: &[usize], blocksize: usize, double_quant: bool) -> Nf4Tensor {
        let opts = QuantOptions {
            quant_type: QuantType::Nf4,
            blocksize,
            double_quant,
        };
        Nf4Tensor::quantize_f32(&values(shape.iter().product(), 7), shape, &opts).unwrap()
    }

    /// `rows` of `t` sliced, checked against dequantize-then-slice bit for bit.
    fn check_slice(t: &Nf4Tensor, rows: Range<usize>) -> Nf4Tensor {
        let row_len = t.numel() / t.shape()[0];
        let piece = t.slice_rows(rows.clone()).unwrap();
        assert_eq!(piece.shape()[0], rows.len());
        assert_eq!(piece.shape()[1..], t.shape()[1..]);
        let whole = t.dequantize_f32();
        let want = &whole[rows.start * row_len..rows.end * row_len];
        let got = piece.dequantize_f32();
        assert!(
            got.iter()
                .zip(want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "rows {rows:?} of {:?}",
            t.shape()
        );
        piece
    }

    #[test]
    fn double_quant_pieces_equal_the_same_rows_dequantized() {
        // 300 × 128: cuts every 128 rows (128 × 128 = 64 × 256); 600 blocks, so the last nested group
        // holds 88 absmax codes.
        let t = quantized(&[300, 128], 64, true);
        assert_eq!(t.cut_alignment(), 16384);
        let pieces: Vec<Nf4Tensor> = [0..128, 128..256, 256..300]
            .into_iter()
            .map(|rows| check_slice(&t, rows))
            .collect();
        let AbsmaxState::DoubleQuant(last) = pieces[2].absmax_state() else {
            panic!("double quant kept")
        };
        let AbsmaxState::DoubleQuant(whole) = t.absmax_state() else {
            unreachable!()
        };
        assert_eq!((last.codes().len(), last.nested_absmax().len()), (88, 1));
        assert_eq!(last.offset().to_bits(), whole.offset().to_bits());
        // Joined again, the pieces are the stored tensor itself.
        assert_eq!(Nf4Tensor::concat_rows(&pieces).unwrap(), t);
        check_slice(&t, 128..300);
    }

    #[test]
    fn plain_absmax_pieces_of_odd_rows_and_a_partial_last_block() {
        // 65 × 3 × 37: rows of 111 elements cut every 32 rows (blocksize 32); 7215 elements in all, so
        // the last byte holds one code and the last block 15 elements.
        let t = quantized(&[65, 3, 37], 32, false);
        assert_eq!(t.cut_alignment(), 32);
        let pieces: Vec<Nf4Tensor> = [0..32, 32..64, 64..65]
            .into_iter()
            .map(|rows| check_slice(&t, rows))
            .collect();
        assert_eq!(pieces[2].packed().len(), 56);
        assert_eq!(Nf4Tensor::concat_rows(&pieces).unwrap(), t);
        check_slice(&t, 32..65);
    }

    #[test]
    fn interleaved_pieces_regroup_exactly() {
        // ChatGLM without multi_query_attention: rows [q_h | k_h | v_h] per head; regroup all the q parts,
        // then the k parts, then the v parts. Each part is 64 rows × 256 = one nested group.
        let (heads, head_dim, width) = (3, 64, 256);
        let t = quantized(&[heads * 3 * head_dim, width], 64, true);
        let whole = t.dequantize_f32();
        for part in 0..3 {
            let rows = |h: usize| (h * 3 + part) * head_dim..(h * 3 + part + 1) * head_dim;
            let pieces: Vec<Nf4Tensor> = (0..heads).map(|h| check_slice(&t, rows(h))).collect();
            let joined = Nf4Tensor::concat_rows(&pieces).unwrap();
            assert_eq!(joined.shape(), [heads * head_dim, width]);
            let want: Vec<f32> = (0..heads)
                .flat_map(|h| &whole[rows(h).start * width..rows(h).end * width])
                .copied()
                .collect();
            assert_eq!(joined.dequantize_f32(), want);
        }
    }

    #[test]
    fn misaligned_cuts_are_refused_with_the_reason() {
        let t = quantized(&[300, 128], 64, true);
        // 64 rows × 128 = 8192 elements: half a nested group.
        let err = t.slice_rows(64..128).unwrap_err().to_string();
        assert!(
            err.contains("rows 64..128") && err.contains("element 8192") && err.contains("16384"),
            "{err}"
        );
        // The end cut is checked too; the tensor's own end always fits.
        assert!(t.slice_rows(0..64).is_err());
        assert!(t.slice_rows(256..300).is_ok());
        let err = t.slice_rows(200..400).unwrap_err().to_string();
        assert!(err.contains("out of range (300 rows)"), "{err}");
        assert!(t.slice_rows(5..5).is_err());
        // Plain absmax: only the blocksize matters (3 rows × 37 = 111 elements is not a block).
        let plain = quantized(&[65, 37], 32, false);
        let err = plain.slice_rows(3..32).unwrap_err().to_string();
        assert!(
            err.contains("element 111") && err.contains("blocksize 32"),
            "{err}"
        );
    }

    #[test]
    fn concat_refuses_what_it_cannot_join_exactly() {
        // Two tensors quantized on their own have offsets of their own.
        let a = quantized(&[128, 128], 64, true);
        let other = Nf4Tensor::quantize_f32(
            &values(128 * 128, 99),
            &[128, 128],
            &QuantOptions::default(),
        )
        .unwrap();
        let err = Nf4Tensor::concat_rows(&[a.clone(), other]).unwrap_err();
        assert!(err.to_string().contains("double-quant offset"), "{err}");
        // A first part that ends inside a nested group.
        let short = quantized(&[64, 128], 64, true);
        let err = Nf4Tensor::concat_rows(&[short, a.clone()]).unwrap_err();
        assert!(err.to_string().contains("element 8192"), "{err}");
        let wide = quantized(&[128, 256], 64, true);
        let err = Nf4Tensor::concat_rows(&[a.clone(), wide]).unwrap_err();
        assert!(err.to_string().contains("rows of another length"), "{err}");
        let plain = quantized(&[128, 128], 64, false);
        assert!(Nf4Tensor::concat_rows(&[a, plain]).is_err());
        assert!(Nf4Tensor::concat_rows(&[]).is_err());
    }
}
