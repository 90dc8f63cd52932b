//! The 4-bit codebooks (NF4, FP4) and bitsandbytes' signed 8-bit dynamic map, with the exact f32 values
//! and the exact encoding rules of bitsandbytes 0.50 on the CPU.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::Nf4Error;

/// Which 4-bit data type a tensor is quantized to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QuantType {
    /// NormalFloat4: 16 quantiles of N(0, 1), scaled to [-1, 1] (QLoRA).
    Nf4,
    /// bitsandbytes' FP4: 1 sign, 2 exponent, 1 mantissa bit, scaled to [-1, 1].
    Fp4,
}

/// bitsandbytes' NF4 table (`get_4bit_type("nf4")`), indexed by code.
pub const NF4_CODEBOOK: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' FP4 table (`get_4bit_type("fp4")`), indexed by code: bit 3 is the sign; the values
/// are `[0, 0.0625, 8, 12, 4, 6, 2, 3]` divided by 12 in f32.
pub const FP4_CODEBOOK: [f32; 16] = [
    0.0,
    0.0625 / 12.0,
    8.0 / 12.0,
    1.0,
    4.0 / 12.0,
    6.0 / 12.0,
    2.0 / 12.0,
    3.0 / 12.0,
    0.0,
    -0.0625 / 12.0,
    -8.0 / 12.0,
    -1.0,
    -4.0 / 12.0,
    -6.0 / 12.0,
    -2.0 / 12.0,
    -3.0 / 12.0,
];

/// FP4 codes in ascending value order, as torch.argsort orders bitsandbytes' table (the two zeros,
/// codes 0 and 8, come out in index order). Quantization picks a rank, then maps it through this.
const FP4_CODE_BY_RANK: [u8; 16] = [11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3];
const NF4_CODE_BY_RANK: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];

/// Decision thresholds: midpoints of neighbouring sorted codebook values, `(a + b) / 2` in f32.
const fn thresholds(codebook: &[f32; 16], code_by_rank: &[u8; 16]) -> [f32; 15] {
    let mut out = [0.0f32; 15];
    let mut i = 0;
    while i < 15 {
        out[i] =
            (codebook[code_by_rank[i] as usize] + codebook[code_by_rank[i + 1] as usize]) / 2.0;
        i += 1;
    }
    out
}

const NF4_THRESHOLDS: [f32; 15] = thresholds(&NF4_CODEBOOK, &NF4_CODE_BY_RANK);
const FP4_THRESHOLDS: [f32; 15] = thresholds(&FP4_CODEBOOK, &FP4_CODE_BY_RANK);

impl QuantType {
    /// The name bitsandbytes and transformers use ("nf4", "fp4").
    pub fn as_str(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// The 16 values, indexed by 4-bit code.
    pub fn codebook(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &NF4_CODEBOOK,
            QuantType::Fp4 => &FP4_CODEBOOK,
        }
    }

    /// Half the widest gap between neighbouring codebook values: the worst-case error of one
    /// element, relative to its block's absmax.
    pub fn max_half_gap(self) -> f32 {
        let (codebook, ranks) = self.ranked();
        (0..15)
            .map(|r| (codebook[ranks[r + 1] as usize] - codebook[ranks[r] as usize]) / 2.0)
            .fold(0.0, f32::max)
    }

    fn ranked(self) -> (&'static [f32; 16], &'static [u8; 16]) {
        match self {
            QuantType::Nf4 => (&NF4_CODEBOOK, &NF4_CODE_BY_RANK),
            QuantType::Fp4 => (&FP4_CODEBOOK, &FP4_CODE_BY_RANK),
        }
    }

    pub(crate) fn thresholds(self) -> &'static [f32; 15] {
        match self {
            QuantType::Nf4 => &NF4_THRESHOLDS,
            QuantType::Fp4 => &FP4_THRESHOLDS,
        }
    }

    pub(crate) fn code_by_rank(self) -> &'static [u8; 16] {
        self.ranked().1
    }

    /// Code of a value already scaled to [-1, 1]: `torch.bucketize(x, thresholds)`, i.e. the number
    /// of thresholds strictly below `x` (a value exactly on a threshold takes the lower rank).
    pub fn encode(self, scaled: f32) -> u8 {
        let rank = self.thresholds().iter().filter(|&&t| t < scaled).count();
        self.code_by_rank()[rank]
    }
}

impl fmt::Display for QuantType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for QuantType {
    type Err = Nf4Error;

    fn from_str(s: &str) -> Result<Self, Nf4Error> {
        match s {
            "nf4" => Ok(QuantType::Nf4),
            "fp4" => Ok(QuantType::Fp4),
            other => Err(Nf4Error::UnknownQuantType(other.to_string())),
        }
    }
}

/// The positive half of `bitsandbytes.functional.create_dynamic_map(signed=True)` as f32 bits.
/// The full map is `-reverse(this), 0, this, 1.0`; the values come from torch's f32 linspace, so
/// they are stored rather than recomputed. Tests compare them with bitsandbytes' `nested_quant_map`.
const DYNAMIC_MAP_POSITIVE_BITS: [u32; 127] = [
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333,
];

/// bitsandbytes' signed 8-bit dynamic map (256 sorted values in [-1, 1]), used for the absmax of
/// double quantization (`nested_quant_map`).
pub fn dynamic_map_signed() -> [f32; 256] {
    let mut map = [0.0f32; 256];
    for (i, bits) in DYNAMIC_MAP_POSITIVE_BITS.iter().enumerate() {
        let v = f32::from_bits(*bits);
        map[128 + i] = v;
        map[126 - i] = -v;
    }
    map[255] = 1.0;
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_by_rank_sorts_the_codebooks() {
        for qt in [QuantType::Nf4, QuantType::Fp4] {
            let (codebook, ranks) = qt.ranked();
            let mut seen = [false; 16];
            for w in ranks.windows(2) {
                assert!(
                    codebook[w[0] as usize] <= codebook[w[1] as usize],
                    "{qt}: {w:?}"
                );
            }
            for &r in ranks {
                seen[r as usize] = true;
            }
            assert!(seen.iter().all(|&s| s), "{qt}: not a permutation");
        }
    }

    #[test]
    fn encode_ties_go_to_the_lower_rank() {
        let t = QuantType::Nf4.thresholds();
        assert_eq!(QuantType::Nf4.encode(t[6]), 6);
        assert_eq!(QuantType::Nf4.encode(f32::from_bits(t[6].to_bits() - 1)), 7);
        assert_eq!(QuantType::Nf4.encode(0.0), 7);
        assert_eq!(QuantType::Fp4.encode(0.0), 0);
        assert_eq!(QuantType::Fp4.encode(1e-6), 8);
        assert_eq!(QuantType::Fp4.encode(-1.0), 11);
    }

    #[test]
    fn dynamic_map_is_sorted_and_spans_minus_one_to_one() {
        let map = dynamic_map_signed();
        assert!(map.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(map[127], 0.0);
        assert_eq!(map[255], 1.0);
        assert!(map[0] > -1.0 && map[0] < -0.99);
    }
}
