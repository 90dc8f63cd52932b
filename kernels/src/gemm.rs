//! The fused NF4 prefill GEMM of kernels/gemm_nf4.cu: `x · Wᵀ` for many rows of x on tensor cores, the codes
//! expanded in registers, without writing W out in f16/bf16. `CudaNf4Tensor::matmul` takes it where
//! [`fused_gemm_config`] says it beats dequantize + cuBLAS (benches/results/kernels.md has the measurements).

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{DType, Shape, Tensor};
use half::{bf16, f16};

use crate::decode::device_pointer;
use crate::launch::KernelArgs;
use crate::layout::{PackedLayout, TILE_ROWS};
use crate::tensor::{cuda_view, dtype_suffix, wrap, CudaNf4Tensor};
use crate::KernelError;

/// Warps per block (GEMM_WARPS in gemm_nf4.cu), all along W's rows.
const WARPS: usize = 8;
/// Shared-memory pipeline depth (GEMM_STAGES) and the replicated code table's bytes (GEMM_TABLE_WORDS x 4).
const STAGES: usize = 4;
const TABLE_BYTES: usize = 256 * 32 * 4;

/// A compiled block shape: `strips` 16-row strips of W per warp, `groups` groups of 8 tokens per block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GemmConfig {
    pub(crate) strips: usize,
    pub(crate) groups: usize,
}

impl GemmConfig {
    const fn new(strips: usize, groups: usize) -> Self {
        Self { strips, groups }
    }

    fn block_rows(self) -> usize {
        WARPS * self.strips * TILE_ROWS
    }

    fn block_tokens(self) -> usize {
        8 * self.groups
    }

    /// Dynamic shared memory (gemm_shared_bytes in gemm_nf4.cu): the table, then per stage the block's W tiles
    /// (512 bytes each) and its tokens' 64 columns of x (128 bytes each).
    fn shared_bytes(self) -> usize {
        TABLE_BYTES + STAGES * (WARPS * self.strips * 512 + self.block_tokens() * 128)
    }
}

/// The block shapes gemm_nf4.cu instantiates, by tokens a block: 16 (one strip a warp, two token groups: many
/// small blocks, for few tokens) and 64 (two strips, eight groups: W decoded once per 64 tokens).
const SMALL: GemmConfig = GemmConfig::new(1, 2);
const LARGE: GemmConfig = GemmConfig::new(2, 8);
const CONFIGS: [GemmConfig; 2] = [SMALL, LARGE];

/// Tokens (rows of x) per block of each block shape of the fused GEMM, for [`CudaNf4Tensor::fused_gemm`].
pub const FUSED_GEMM_BLOCK_TOKENS: &[usize] = &[16, 64];

/// Weights (N x K) from which expanding W to f16/bf16 costs more than the fused GEMM's product up to 256 tokens.
const LARGE_WEIGHT: usize = 64 << 20;

/// The block shape of the fused GEMM for `tokens` rows of x times a tiled `[n, k]` weight, or `None` where
/// dequantize + cuBLAS is faster. From the H100 sweep in benches/results/kernels.md ("Prefill: fused NF4 GEMM"):
/// at 16 tokens the fused GEMM wins on every GLM-4-9B shape (1.2x on down to 5.5x on gate_up), at 128 only on
/// gate_up (112 M weights, whose expansion alone takes 186 µs), at 512 and beyond on none. Between the measured
/// counts the crossovers are interpolated linearly: about 76 (qkv), 99 (down), 112 (o) and 280 tokens (gate_up).
pub(crate) fn fused_gemm_config(n: usize, k: usize, tokens: usize) -> Option<GemmConfig> {
    match tokens {
        0..=32 => Some(SMALL),
        33..=256 if n * k >= LARGE_WEIGHT => Some(LARGE),
        33..=64 => Some(SMALL),
        _ => None,
    }
}

impl CudaNf4Tensor {
    /// `x · Wᵀ` through the fused prefill GEMM with `block_tokens` (one of [`FUSED_GEMM_BLOCK_TOKENS`]) rows of x
    /// a block, whatever [`Self::matmul`]'s rule would pick: for tests and benchmarks. Needs a tiled weight (see
    /// [`CudaNf4Tensor`]) and 16-byte aligned f16/bf16 x of shape `[.., K]`; the result is `[.., N]`.
    pub fn fused_gemm(&self, x: &Tensor, block_tokens: usize) -> Result<Tensor, KernelError> {
        let bad = |problem: String| KernelError::BadInput {
            name: self.name.clone(),
            problem,
        };
        let (n, k) = self.matmul_dims(x)?;
        if !matches!(self.layout, PackedLayout::Tiled { .. }) {
            return Err(bad(format!(
                "the fused GEMM needs a tiled weight (rows % 16 == 0, columns % 64 == 0, blocksize >= 64),                  this one is {:?} with blocksize {}; use matmul",
                self.shape.dims(),
                self.blocksize
            )));
        }
        if !matches!(x.dtype(), DType::F16 | DType::BF16) {
            return Err(bad(format!(
                "x is {:?}: the fused GEMM takes f16 or bf16",
                x.dtype()
            )));
        }
        let Some(position) = FUSED_GEMM_BLOCK_TOKENS
            .iter()
            .position(|&b| b == block_tokens)
        else {
            return Err(bad(format!(
                "{block_tokens} tokens a block: the fused GEMM has {FUSED_GEMM_BLOCK_TOKENS:?}"
            )));
        };
        let mut out_dims = x.dims().to_vec();
        *out_dims.last_mut().expect("x has a last dimension") = n;
        let rows = x.elem_count() / k;
        if rows == 0 {
            return Ok(Tensor::zeros(out_dims, x.dtype(), x.device())?);
        }
        let x = x.contiguous()?;
        match self.launch_fused_gemm(&x, rows, CONFIGS[position])? {
            Some(y) => Ok(y.reshape(out_dims)?),
            None => Err(bad(
                "x must start 16-byte aligned for the fused GEMM; copy it first".into(),
            )),
        }
    }

    /// `rows` rows of contiguous `x` times Wᵀ through the fused GEMM, as a `[rows, N]` tensor, or `None` where it
    /// does not apply (a weight kept in bitsandbytes' order, f32 x, x not 16-byte aligned) or dequantize + cuBLAS
    /// is faster ([`fused_gemm_config`]).
    pub(crate) fn try_fused_gemm(
        &self,
        x: &Tensor,
        rows: usize,
    ) -> Result<Option<Tensor>, KernelError> {
        let PackedLayout::Tiled { rows: n, cols: k } = self.layout else {
            return Ok(None);
        };
        match fused_gemm_config(n, k, rows) {
            Some(config) if matches!(x.dtype(), DType::F16 | DType::BF16) => {
                self.launch_fused_gemm(x, rows, config)
            }
            _ => Ok(None),
        }
    }

    /// Launches the fused GEMM on a tiled weight for `rows` rows of contiguous f16/bf16 `x`; `None` if x is not
    /// 16-byte aligned.
    fn launch_fused_gemm(
        &self,
        x: &Tensor,
        rows: usize,
        config: GemmConfig,
    ) -> Result<Option<Tensor>, KernelError> {
        match x.dtype() {
            DType::F16 => self.launch_fused_gemm_typed::<f16>(x, rows, config),
            _ => self.launch_fused_gemm_typed::<bf16>(x, rows, config),
        }
    }

    fn launch_fused_gemm_typed<T: CudaDType + DeviceRepr>(
        &self,
        x: &Tensor,
        rows: usize,
        config: GemmConfig,
    ) -> Result<Option<Tensor>, KernelError> {
        let PackedLayout::Tiled { rows: n, cols: k } = self.layout else {
            unreachable!("callers check that the weight is tiled");
        };
        let dev = self.cuda_device();
        let (x_storage, x_layout) = x.storage_and_layout();
        let x_view = cuda_view::<T>(&x_storage, x_layout)?;
        // The kernel copies x in 16-byte pieces (K % 64 == 0 keeps every row as aligned as the first).
        if !device_pointer(&x_view, dev).is_multiple_of(16) {
            return Ok(None);
        }
        let suffix = dtype_suffix(x.dtype()).expect("f16 or bf16");
        let func = crate::GEMM_NF4.function(
            dev,
            &format!(
                "gemm_nf4_{}{suffix}_{}x{}",
                self.absmax.kernel_infix(),
                config.strips,
                config.groups
            ),
        )?;
        let shared = config.shared_bytes();
        func.set_attribute(
            CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            shared as i32,
        )
        .w()?;
        // SAFETY: the kernel writes all rows * n outputs.
        let y = unsafe { dev.alloc::<T>(rows * n)? };
        let cfg = LaunchConfig {
            grid_dim: (
                rows.div_ceil(config.block_tokens()) as u32,
                n.div_ceil(config.block_rows()) as u32,
                1,
            ),
            block_dim: (32 * WARPS as u32, 1, 1),
            shared_mem_bytes: shared as u32,
        };
        let (tokens, n32, k32) = (rows as u32, n as u32, k as u32);
        let blocksize_log2 = self.blocksize.trailing_zeros();
        let mut args = KernelArgs::new();
        args.arg(device_pointer(&self.packed, dev));
        self.absmax.push_args(&mut args, dev);
        args.arg(device_pointer(&x_view, dev))
            .arg(device_pointer(&y, dev))
            .arg(tokens)
            .arg(n32)
            .arg(k32)
            .arg(blocksize_log2);
        // SAFETY: the argument list matches gemm_nf4_[nested_]<suffix>_<strips>x<groups> in kernels/gemm_nf4.cu;
        // the weight is tiled (N % 16 == 0, K % 64 == 0, blocksize >= 64, checked on upload), x holds rows * k
        // contiguous elements (checked by matmul_dims) and is 16-byte aligned (checked above), y holds rows * n.
        // A plain launch: this kernel does not wait for a previous one (kernels/src/launch.rs).
        unsafe { args.launch(&func, &dev.cuda_stream(), cfg, false) }?;
        Ok(Some(wrap(y, dev, Shape::from_dims(&[rows, n]))))
    }
}

#[cfg(test)]
mod tests {
    use super::{fused_gemm_config, LARGE, SMALL};

    /// The faster path of each GLM-4-9B shape at the token counts the H100 bench measured.
    #[test]
    fn rule_picks_the_measured_faster_path() {
        for (name, n, k, want) in [
            ("qkv", 4608, 4096, [Some(SMALL), None, None, None]),
            ("o", 4096, 4096, [Some(SMALL), None, None, None]),
            (
                "gate_up",
                27392,
                4096,
                [Some(SMALL), Some(LARGE), None, None],
            ),
            ("down", 4096, 13696, [Some(SMALL), None, None, None]),
        ] {
            for (tokens, want) in [16, 128, 512, 2048].into_iter().zip(want) {
                assert_eq!(
                    fused_gemm_config(n, k, tokens),
                    want,
                    "{name} at {tokens} tokens"
                );
            }
        }
    }
}
