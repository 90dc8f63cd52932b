//! `CudaNf4Tensor::matmul`: `x · Wᵀ` with W in NF4. Up to [`GEMV_MAX_ROWS`] rows of x go through the fused GEMV
//! kernels of kernels/gemv_nf4.cu; more rows (prefill) take the fused NF4 GEMM of kernels/gemm_nf4.cu where it is
//! faster (short prompts: crate::gemm's rule), else expand W with kernels/dequantize.cu and multiply with cuBLAS
//! (candle's matmul). benches/gpu_kernels.rs measures all three against cuBLAS f16; benches/results/kernels.md has
//! the numbers.

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaDevice, DType, Shape, Tensor};
use half::{bf16, f16};

use crate::decode::{device_pointer, DevicePointer, GemvInput};
use crate::launch::{allow_dynamic_shared, resident_blocks, KernelArgs};
use crate::layout::{PackedLayout, TILE_COLS, TILE_ROWS};
use crate::tensor::{cuda_view, dtype_suffix, wrap, CudaNf4Tensor};
use crate::KernelError;

/// Rows of x the fused GEMV handles (GEMV_MAX_BATCH in gemv_nf4.cu: the n = 8 of mma.m16n8k16).
pub const GEMV_MAX_ROWS: usize = 8;
/// Weights one GEMV launch multiplies at most (GEMV_GROUP in kernels/common.cuh).
pub const GEMV_GROUP: usize = 3;
/// Warps per block of the generic kernel (one output row each).
const GENERIC_WARPS: u32 = 8;

impl CudaNf4Tensor {
    /// `x · Wᵀ` for this weight `W` of shape `[N, K]`: `x` is `[.., K]` (f16, bf16 or f32, on the same CUDA
    /// device), the result `[.., N]` in `x`'s dtype, accumulated in f32.
    ///
    /// Up to 8 rows of x (decode) take the fused GEMV: codes are expanded in registers and multiplied on tensor
    /// cores (f16/bf16 x on a tiled weight, see [`CudaNf4Tensor`]), or by a plain CUDA-core kernel (f32 x, other
    /// shapes). More rows (prefill) take the fused tensor-core GEMM where it is faster (up to 32-256 rows,
    /// depending on the weight's size), else dequantize W to x's dtype and multiply with cuBLAS.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor, KernelError> {
        let (n, k) = self.matmul_dims(x)?;
        let mut out_dims = x.dims().to_vec();
        *out_dims.last_mut().expect("x has a last dimension") = n;
        let rows = x.elem_count() / k.max(1);
        if rows == 0 || n == 0 || k == 0 {
            return Ok(Tensor::zeros(out_dims, x.dtype(), x.device())?);
        }
        let x = x.contiguous()?;
        if rows > GEMV_MAX_ROWS {
            // The fused GEMM (kernels/gemm_nf4.cu) where it applies and is faster (crate::gemm's rule).
            if let Some(y) = self.try_fused_gemm(&x, rows)? {
                return Ok(y.reshape(out_dims)?);
            }
            // Measured against expanding and multiplying 16 MiB slices through L2: expanding all of W once and
            // one cuBLAS GEMM is faster at every size (benches/results/kernels.md).
            let w = self.dequantize(x.dtype())?;
            return Ok(x.reshape((rows, k))?.matmul(&w.t()?)?.reshape(out_dims)?);
        }
        let y = match x.dtype() {
            DType::F16 => self.gemv::<f16>(&x, rows, n)?,
            DType::BF16 => self.gemv::<bf16>(&x, rows, n)?,
            _ => self.gemv::<f32>(&x, rows, n)?,
        };
        Ok(y.reshape(out_dims)?)
    }

    /// `[N, K]` after checking that `x` can multiply this weight.
    pub(crate) fn matmul_dims(&self, x: &Tensor) -> Result<(usize, usize), KernelError> {
        let bad = |problem: String| KernelError::BadInput {
            name: self.name.clone(),
            problem,
        };
        let &[n, k] = self.shape.dims() else {
            return Err(bad(format!(
                "matmul needs a 2-D weight [out, in], this one is {:?}",
                self.shape.dims()
            )));
        };
        if dtype_suffix(x.dtype()).is_none() {
            return Err(KernelError::UnsupportedDtype {
                name: self.name.clone(),
                dtype: x.dtype(),
            });
        }
        if x.dims().last() != Some(&k) {
            return Err(bad(format!(
                "input of shape {:?} cannot multiply weight [{n}, {k}]: its last dimension must be {k}",
                x.dims()
            )));
        }
        if !x.device().same_device(self.device()) {
            return Err(bad(format!(
                "input is on {:?}, the weight on {:?}; move the input first",
                x.device().location(),
                self.device().location()
            )));
        }
        Ok((n, k))
    }

    /// `rows` (1..=8) rows of contiguous `x` times Wᵀ, as a `[rows, n]` tensor.
    fn gemv<T: CudaDType + DeviceRepr>(
        &self,
        x: &Tensor,
        rows: usize,
        n: usize,
    ) -> Result<Tensor, KernelError> {
        let dev = self.cuda_device();
        let (x_storage, x_layout) = x.storage_and_layout();
        let x_view = cuda_view::<T>(&x_storage, x_layout)?;
        // SAFETY: the kernels write all rows * n outputs.
        let y = unsafe { dev.alloc::<T>(rows * n)? };
        // SAFETY: x holds rows * k elements of x's dtype (contiguous, checked by matmul_dims), y rows * n; both
        // stay alive (borrowed here) until the launch is queued, and the stream orders their later use.
        unsafe {
            self.gemv_into(
                x.dtype(),
                device_pointer(&x_view, dev),
                device_pointer(&y, dev),
                rows,
            )?
        };
        Ok(wrap(y, dev, Shape::from_dims(&[rows, n])))
    }

    /// `y [rows, N] = x [rows, K] · Wᵀ` for 1 to [`GEMV_MAX_ROWS`] rows, into a caller's buffer: the fused GEMV
    /// without allocating, for a decode step built from raw buffers (and captured as a CUDA graph).
    ///
    /// # Safety
    /// `x` holds `rows * K` and `y` `rows * N` elements of `dtype` (f32, f16 or bf16) on this tensor's device,
    /// alive until the kernel has run.
    pub unsafe fn gemv_into(
        &self,
        dtype: DType,
        x: DevicePointer,
        y: DevicePointer,
        rows: usize,
    ) -> Result<(), KernelError> {
        if unsafe { Self::gemv_group_into(&[(self, y)], dtype, GemvInput::Rows(x), rows) }? {
            return Ok(());
        }
        let (n, k, suffix) = self.gemv_dims(dtype, rows)?;
        let dev = self.cuda_device();
        let func = crate::GEMV_NF4.function(
            dev,
            &format!("gemv_nf4_generic_{}{suffix}", self.absmax.kernel_infix()),
        )?;
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(GENERIC_WARPS as usize).min(1 << 20) as u32, 1, 1),
            block_dim: (32 * GENERIC_WARPS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = KernelArgs::new();
        args.arg(device_pointer(&self.packed, dev))
            .arg(self.layout.kernel_arg());
        self.absmax.push_args(&mut args, dev);
        args.arg(x)
            .arg(y)
            .arg(n)
            .arg(k)
            .arg(rows as u32)
            .arg(self.blocksize.trailing_zeros());
        // SAFETY: the argument list matches gemv_nf4_generic_[nested_]<suffix> in kernels/gemv_nf4.cu (which waits
        // for the previous kernel before reading x); it takes any layout, shape and blocksize.
        unsafe { args.launch(&func, &dev.cuda_stream(), cfg, true) }
    }

    /// `y_i [rows, N_i] = x [rows, K] · W_iᵀ` for each `(W_i, y_i)` of `outputs` (1 to [`GEMV_GROUP`] weights of
    /// one width K: GLM's q, k and v), in one launch of the tiled tensor-core GEMV, into callers' buffers. x is a
    /// buffer of rows or the rows a [`NormedInput`](crate::NormedInput) describes, which every block then
    /// computes into its shared memory, so that no norm kernel runs between two projections of a decode step.
    /// Returns false, launching nothing, where that kernel cannot: a weight or dtype it does not take, weights
    /// that differ in width, blocksize or kind of scales, unaligned x, or a normalized x larger than a block's
    /// shared memory; the caller then normalizes first (`DecodeKernels::residual_rms_norm`) and calls
    /// [`Self::gemv_into`] per weight.
    ///
    /// # Safety
    /// As [`Self::gemv_into`] for each weight and output; the pointers of a [`NormedInput`](crate::NormedInput)
    /// hold `rows * K` elements of `dtype` (its weights `K`), and its `residual_out` is not its `residual`.
    pub unsafe fn gemv_group_into(
        outputs: &[(&CudaNf4Tensor, DevicePointer)],
        dtype: DType,
        input: GemvInput,
        rows: usize,
    ) -> Result<bool, KernelError> {
        let Some(&(first, _)) = outputs.first() else {
            return Ok(true);
        };
        let (_, k, suffix) = first.gemv_dims(dtype, rows)?;
        let groupable = outputs.len() <= GEMV_GROUP
            && outputs.iter().all(|&(w, _)| {
                w.takes_tiled_gemv(dtype)
                    && w.shape.dims().get(1) == Some(&k)
                    && w.blocksize == first.blocksize
                    && w.absmax.kernel_infix() == first.absmax.kernel_infix()
                    && w.device.same_device(&first.device)
            });
        // K % 64 == 0 (tiled) keeps every row of x as aligned as the first.
        if !groupable || !input.aligned() {
            return Ok(false);
        }
        let normed = matches!(input, GemvInput::Normed(_));
        let dev = first.cuda_device();
        let func = crate::GEMV_NF4.function(
            dev,
            &format!(
                "gemv_nf4_tiled_{}{}{suffix}",
                first.absmax.kernel_infix(),
                if normed { "normed_" } else { "" }
            ),
        )?;
        let shared = if normed {
            rows * k * dtype.size_in_bytes()
        } else {
            0
        };
        if shared > 0 && !allow_dynamic_shared(&func, &dev.cuda_stream(), shared)? {
            return Ok(false);
        }
        let strips = outputs
            .iter()
            .map(|(w, _)| w.shape.dims()[0] / TILE_ROWS)
            .sum();
        let (cfg, split) = tiled_launch(dev, &func, strips, k / TILE_COLS, shared)?;
        let mut args = KernelArgs::new();
        for slot in 0..GEMV_GROUP {
            match outputs.get(slot) {
                Some(&(w, y)) => {
                    args.arg(device_pointer(&w.packed, dev));
                    w.absmax.push_args(&mut args, dev);
                    args.arg(y).arg(w.shape.dims()[0] as u32);
                }
                None => {
                    // An unused slot: null pointers and zero rows, with as many scale arguments as the kernel's.
                    args.arg(0u64);
                    first.absmax.push_null_args(&mut args);
                    args.arg(0u64).arg(0u32);
                }
            }
        }
        match input {
            GemvInput::Rows(x) => {
                args.arg(x);
            }
            GemvInput::Normed(normed) => normed.push_args(&mut args),
        }
        args.arg(k as u32)
            .arg(rows as u32)
            .arg(split)
            .arg(first.blocksize.trailing_zeros());
        // SAFETY: the argument list matches gemv_nf4_tiled_[nested_][normed_]<suffix> in kernels/gemv_nf4.cu (three
        // weight slots, then x or the normed input), which waits for the previous kernel before reading x; every
        // weight is tiled with one width, blocksize and kind of scales (checked above) and x's rows are 16-byte
        // aligned.
        unsafe { args.launch(&func, &dev.cuda_stream(), cfg, true) }?;
        Ok(true)
    }

    /// Whether the tiled tensor-core GEMV takes this weight with x of `dtype` (f16/bf16 on a tiled weight).
    fn takes_tiled_gemv(&self, dtype: DType) -> bool {
        matches!(self.layout, PackedLayout::Tiled { .. }) && dtype != DType::F32
    }

    /// `(N, K, kernel dtype suffix)` after checking that this weight can take a GEMV of `rows` rows of `dtype`.
    fn gemv_dims(
        &self,
        dtype: DType,
        rows: usize,
    ) -> Result<(usize, usize, &'static str), KernelError> {
        let &[n, k] = self.shape.dims() else {
            return Err(KernelError::BadInput {
                name: self.name.clone(),
                problem: format!(
                    "a GEMV needs a 2-D weight, this one is {:?}",
                    self.shape.dims()
                ),
            });
        };
        let Some(suffix) = dtype_suffix(dtype) else {
            return Err(KernelError::UnsupportedDtype {
                name: self.name.clone(),
                dtype,
            });
        };
        if rows == 0 || rows > GEMV_MAX_ROWS {
            return Err(KernelError::BadInput {
                name: self.name.clone(),
                problem: format!("{rows} rows of x: the GEMV takes 1 to {GEMV_MAX_ROWS}"),
            });
        }
        Ok((n, k, suffix))
    }
}

/// Warps per block of the tiled GEMV (GEMV_WARPS in gemv_nf4.cu).
const TILED_WARPS: usize = 16;

/// Launch shape and `split` argument of the tiled GEMV for `strips` 16-row strips of `tiles` 64-column tiles,
/// with `shared` bytes of dynamic shared memory a block.
///
/// Blocks (no more than fit on the device at once, so each builds its code table once) loop over rounds of
/// 16 / split strips. A round costs a warp its run of tiles, plus about two tiles' time of reduction and ramp when
/// warps share strips; the split (1 to 16 warps a strip) with the fewest tile-times over all rounds wins. The rule
/// picks the fastest split of each GLM-4-9B shape in the tuning sweep recorded in benches/results/kernels.md: many
/// strips want few rounds with no mostly empty last one (lm_head: 4), few strips want short runs (o, down: 16).
fn tiled_launch(
    dev: &CudaDevice,
    func: &CudaFunction,
    strips: usize,
    tiles: usize,
    shared: usize,
) -> Result<(LaunchConfig, u32), KernelError> {
    let threads = 32 * TILED_WARPS as u32;
    let resident = resident_blocks(func, &dev.cuda_stream(), threads, shared)?;
    let (split, blocks) = tiled_split(strips, tiles, resident);
    let cfg = LaunchConfig {
        grid_dim: (blocks as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: shared as u32,
    };
    Ok((cfg, split as u32))
}

/// `(split, blocks)` for [`tiled_launch`], given how many blocks fit on the device at once.
fn tiled_split(strips: usize, tiles: usize, resident_blocks: usize) -> (usize, usize) {
    const ROUND_OVERHEAD_TILES: usize = 2;
    [1, 2, 4, 8, 16]
        .into_iter()
        .map(|split| {
            let strips_per_block = TILED_WARPS / split;
            let blocks = strips.div_ceil(strips_per_block).min(resident_blocks);
            let rounds = strips.div_ceil(blocks * strips_per_block);
            let cost = rounds * (tiles.div_ceil(split) + ROUND_OVERHEAD_TILES);
            (cost, split, blocks)
        })
        .min()
        .map(|(_, split, blocks)| (split, blocks))
        .expect("five candidates")
}

#[cfg(test)]
mod tests {
    use super::tiled_split;

    /// The splits the H100 sweep (132 SMs x 2 blocks) found fastest for GLM-4-9B's weights.
    #[test]
    fn split_rule_picks_the_measured_best() {
        let resident = 264;
        for (name, n, k, want) in [
            ("q/o", 4096, 4096, 16),
            ("k/v", 256, 4096, 16),
            ("qkv", 4608, 4096, 8),
            ("gate_up", 27392, 4096, 2),
            ("down", 4096, 13696, 16),
            ("lm_head", 151552, 4096, 4),
        ] {
            assert_eq!(tiled_split(n / 16, k / 64, resident).0, want, "{name}");
        }
    }
}
