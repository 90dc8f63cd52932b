//! Double quantization of the absmax values: `offset = absmax.mean()`, then `absmax - offset` quantized
//! blockwise (256) to bitsandbytes' signed 8-bit dynamic map. The arithmetic reproduces torch's f32 mean
//! and bitsandbytes' CPU `quantize_blockwise` bit for bit, so the stored bytes match.

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::codebook::dynamic_map_signed;

/// Block size bitsandbytes uses for the nested (absmax) quantization.
pub const NESTED_BLOCKSIZE: usize = 256;

/// Lanes of torch's `Vectorized<float>` in its sum kernel (matches torch 2.11 on x86-64, AVX2 and
/// AVX-512 builds alike, checked against `torch.mean` in the fixtures).
const TORCH_SUM_LANES: usize = 8;
/// torch sums four vectors side by side (instruction-level parallelism) before combining them.
const TORCH_SUM_ILP: usize = 4;

/// `torch.Tensor.mean()` of a contiguous f32 vector on the CPU: torch's cascade sum (SumKernel.cpp,
/// `vectorized_inner_sum`) followed by an f32 division by the count. Exact for tensors below torch's
/// parallel grain (32768 values) or a single torch thread; above it, torch splits the sum by thread
/// count and its last bit depends on the machine.
pub fn torch_mean(values: &[f32]) -> f32 {
    torch_sum(values) / values.len() as f32
}

fn torch_sum(values: &[f32]) -> f32 {
    let n = values.len();
    if n < TORCH_SUM_LANES {
        return row_sum::<1>(values.len(), |i| [values[i]])[0];
    }
    let vectors = n / TORCH_SUM_LANES;
    let lanes = row_sum::<TORCH_SUM_LANES>(vectors, |i| {
        let mut v = [0.0; TORCH_SUM_LANES];
        v.copy_from_slice(&values[i * TORCH_SUM_LANES..(i + 1) * TORCH_SUM_LANES]);
        v
    });
    // The scalar tail is summed first, then the lanes are added to it one by one.
    let mut acc = values[vectors * TORCH_SUM_LANES..]
        .iter()
        .fold(0.0f32, |a, &v| a + v);
    for lane in lanes {
        acc += lane;
    }
    acc
}

fn add<const L: usize>(a: &mut [f32; L], b: &[f32; L]) {
    for (x, y) in a.iter_mut().zip(b) {
        *x += *y;
    }
}

/// torch's `row_sum` over `size` items of `L` lanes: four interleaved `multi_row_sum` rows, then the
/// leftover items into row 0, then rows 1..4 into row 0.
fn row_sum<const L: usize>(size: usize, item: impl Fn(usize) -> [f32; L]) -> [f32; L] {
    let size_ilp = size / TORCH_SUM_ILP;
    let mut rows = multi_row_sum::<L>(size_ilp, |i, k| item(i * TORCH_SUM_ILP + k));
    for i in size_ilp * TORCH_SUM_ILP..size {
        add(&mut rows[0], &item(i));
    }
    let (first, rest) = rows.split_at_mut(1);
    for row in rest.iter() {
        add(&mut first[0], row);
    }
    first[0]
}

/// torch's `multi_row_sum`: a 4-level cascade where each level adds up `2^level_power` partial sums
/// of the level below, so only values of similar magnitude meet.
fn multi_row_sum<const L: usize>(
    size: usize,
    item: impl Fn(usize, usize) -> [f32; L],
) -> [[f32; L]; TORCH_SUM_ILP] {
    const LEVELS: usize = 4;
    let level_power = std::cmp::max(4, ceil_log2(size) / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0.0f32; L]; TORCH_SUM_ILP]; LEVELS];

    let mut i = 0;
    while i + level_step <= size {
        for _ in 0..level_step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                add(a, &item(i, k));
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (below, from_j) = acc.split_at_mut(j);
            for (upper, lower) in from_j[0].iter_mut().zip(below[j - 1].iter_mut()) {
                add(upper, lower);
                *lower = [0.0; L];
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    for i in i..size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            add(a, &item(i, k));
        }
    }
    let (first, higher) = acc.split_at_mut(1);
    for level in higher.iter() {
        for (sum, upper) in first[0].iter_mut().zip(level) {
            add(sum, upper);
        }
    }
    acc[0]
}

/// c10's `CeilLog2`: 1 for x <= 2, else floor(log2(x - 1)) + 1.
fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

/// Entries of bitsandbytes' CPU lookup table from a value in [-1, 1] to its nearest map index.
const LUT_SIZE: usize = 65536;

/// bitsandbytes 0.50's CPU `quantize_blockwise` does not search the map: it snaps the scaled value to
/// one of 65536 evenly spaced points and reads that point's code from this table (`build_quantize_lut`).
fn dynamic_lut() -> &'static [u8; LUT_SIZE] {
    static LUT: OnceLock<Box<[u8; LUT_SIZE]>> = OnceLock::new();
    LUT.get_or_init(|| {
        let map = dynamic_map_signed();
        let mut midpoints = [0.0f32; 255];
        for (i, m) in midpoints.iter_mut().enumerate() {
            *m = 0.5 * (map[i] + map[i + 1]);
        }
        let mut lut = Box::new([0u8; LUT_SIZE]);
        let mut code = 0usize;
        for (i, entry) in lut.iter_mut().enumerate() {
            let value = (2.0 * i as f32) / (LUT_SIZE - 1) as f32 - 1.0;
            while code < 255 && midpoints[code] < value {
                code += 1;
            }
            *entry = code as u8;
        }
        lut
    })
}

/// `norm_to_lut_index`: the compiled library evaluates `(v + 1) * 0.5 * 65535 + 0.5` with one fused
/// multiply-add and truncates.
fn lut_index(scaled: f32) -> usize {
    let v = scaled.clamp(-1.0, 1.0);
    ((v + 1.0) * 0.5).mul_add((LUT_SIZE - 1) as f32, 0.5) as usize
}

/// The double-quantized absmax: one u8 code per 4-bit block, one f32 scale per 256 codes, one offset.
pub(crate) struct NestedAbsmax {
    pub codes: Vec<u8>,
    pub nested_absmax: Vec<f32>,
    pub offset: f32,
}

/// Quantize first-level absmax values the way `quantize_4bit(..., compress_statistics=True)` does.
pub(crate) fn quantize_absmax(absmax: &[f32]) -> NestedAbsmax {
    let offset = torch_mean(absmax);
    let lut = dynamic_lut();
    let mut codes = vec![0u8; absmax.len()];
    let mut nested_absmax = vec![0.0f32; absmax.len().div_ceil(NESTED_BLOCKSIZE)];
    codes
        .par_chunks_mut(NESTED_BLOCKSIZE)
        .zip(absmax.par_chunks(NESTED_BLOCKSIZE))
        .zip(nested_absmax.par_iter_mut())
        .for_each(|((codes, block), scale)| {
            let centered = block.iter().map(|&a| a - offset);
            let max = centered.clone().fold(0.0f32, |m, c| m.max(c.abs()));
            *scale = max;
            if max == 0.0 {
                codes.fill(0);
                return;
            }
            let inv = 1.0 / max;
            for (code, c) in codes.iter_mut().zip(centered) {
                *code = lut[lut_index(c * inv)];
            }
        });
    NestedAbsmax {
        codes,
        nested_absmax,
        offset,
    }
}

/// Decode double-quantized absmax: `map[code] * nested_absmax[i / blocksize] + offset`, rounded after
/// each operation as bitsandbytes does (no fused multiply-add).
pub(crate) fn dequantize_absmax(
    codes: &[u8],
    nested_absmax: &[f32],
    nested_blocksize: usize,
    map: &[f32],
    offset: f32,
) -> Vec<f32> {
    codes
        .iter()
        .enumerate()
        .map(|(i, &c)| map[c as usize] * nested_absmax[i / nested_blocksize] + offset)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceil_log2_matches_c10() {
        let expect = [
            (1, 1),
            (2, 1),
            (3, 2),
            (4, 2),
            (5, 3),
            (16, 4),
            (17, 5),
            (1024, 10),
        ];
        for (x, want) in expect {
            assert_eq!(ceil_log2(x), want, "CeilLog2({x})");
        }
    }

    #[test]
    fn lut_maps_the_ends_and_snaps_zero_to_the_grid() {
        let lut = dynamic_lut();
        assert_eq!(lut[lut_index(-1.0)], 0);
        assert_eq!(lut[lut_index(1.0)], 255);
        // 0.0 snaps to grid point 32768 (2 * 32768 / 65535 - 1 = 1.5e-5), not to the map's 0.0.
        let zero = dynamic_map_signed()[lut[lut_index(0.0)] as usize];
        assert!(zero > 0.0 && zero < 2.0 / 65535.0, "{zero}");
    }

    #[test]
    fn zero_absmax_block_gives_zero_scale_without_nan() {
        let q = quantize_absmax(&[0.5; 300]);
        assert_eq!(q.offset, 0.5);
        assert!(q.nested_absmax.iter().all(|&s| s == 0.0));
        let back = dequantize_absmax(
            &q.codes,
            &q.nested_absmax,
            256,
            &dynamic_map_signed(),
            q.offset,
        );
        assert!(back.iter().all(|&a| a == 0.5));
    }
}
