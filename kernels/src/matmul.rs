//! `CudaNf4Tensor::matmul`: `x · Wᵀ` with W in NF4. Up to [`GEMV_MAX_ROWS`] rows of x go through the fused GEMV
//! kernels of kernels/gemv_nf4.cu; more rows (prefill) take the fused NF4 GEMM of kernels/gemm_nf4.cu where it is
//! faster (short prompts: crate::gemm's rule), else expand W with kernels/dequantize.cu and multiply with cuBLAS
//! (candle's matmul). benches/gpu_kernels.rs measures all three against cuBLAS f16; benches/results/kernels.md has
//! the numbers.

use candle_core::cuda_backend::cudarc::driver::{CudaFunction, DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::CudaDType;
use candle_core::{CudaDevice, DType, Shape, Tensor};
use half::{bf16, f16};

use crate::decode::{device_pointer, DevicePointer, NormedInput};
use crate::launch::{allow_dynamic_shared, resident_blocks, KernelArgs};
use crate::layout::{PackedLayout, TILE_COLS, TILE_ROWS};
use crate::tensor::{cuda_view, dtype_suffix, wrap, CudaNf4Tensor};
use crate::KernelError;

/// Rows of x the fused GEMV handles (GEMV_MAX_BATCH in gemv_nf4.cu: the n = 8 of mma.m16n8k16).
pub const GEMV_MAX_ROWS: usize = 8;
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
        let (n, k, suffix) = self.gemv_dims(dtype, rows)?;
        let dev = self.cuda_device();
        // The tiled kernel loads x 16 bytes at a time.
        let tiled = self.takes_tiled_gemv(dtype) && x.is_multiple_of(16);
        let kind = if tiled { "tiled" } else { "generic" };
        let func = crate::GEMV_NF4.function(
            dev,
            &format!("gemv_nf4_{kind}_{}{suffix}", self.absmax.kernel_infix()),
        )?;
        let (cfg, split) = if tiled {
            tiled_launch(dev, &func, n / TILE_ROWS, k / TILE_COLS, 0)?
        } else {
            let cfg = LaunchConfig {
                grid_dim: (n.div_ceil(GENERIC_WARPS as usize).min(1 << 20) as u32, 1, 1),
                block_dim: (32 * GENERIC_WARPS, 1, 1),
                shared_mem_bytes: 0,
            };
            (cfg, 1)
        };
        let (rows_arg, blocksize_log2) = (rows as u32, self.blocksize.trailing_zeros());
        let (n32, k32, layout) = (n as u32, k as u32, self.layout.kernel_arg());
        let mut args = KernelArgs::new();
        args.arg(device_pointer(&self.packed, dev));
        if !tiled {
            args.arg(layout);
        }
        self.absmax.push_args(&mut args, dev);
        args.arg(x).arg(y);
        if tiled {
            args.arg(n32).arg(k32).arg(rows_arg).arg(split);
        } else {
            args.arg(n).arg(k).arg(rows_arg);
        }
        args.arg(blocksize_log2);
        // SAFETY: argument lists match gemv_nf4_{tiled,generic}_[nested_]<suffix> in kernels/gemv_nf4.cu (which
        // wait for the previous kernel before reading x); the tiled kernel needs a tiled weight (N % 16 == 0,
        // K % 64 == 0, blocksize >= 64) and 16-byte aligned rows of x (K % 64 == 0 keeps every row as aligned
        // as the first), both checked above.
        unsafe { args.launch(&func, &dev.cuda_stream(), cfg, true) }
    }

    /// `y [rows, N] = x · Wᵀ` with x the rows `input` describes (RmsNorm of the residual plus a sublayer's output,
    /// see [`NormedInput`]), which every block of the tiled GEMV computes into its shared memory, so that no norm
    /// kernel runs between two projections of a decode step. Returns false, launching nothing, where that kernel
    /// cannot: a weight or dtype the tiled kernel does not take, or x larger than a block's shared memory; the
    /// caller then normalizes first (`DecodeKernels::residual_rms_norm`) and calls [`Self::gemv_into`].
    ///
    /// # Safety
    /// As [`Self::gemv_into`] for `y`; the pointers of `input` hold `rows * K` elements of `dtype` (the weights
    /// `K`), and `input.residual_out` is not `input.residual`.
    pub unsafe fn gemv_normed_into(
        &self,
        dtype: DType,
        input: &NormedInput,
        y: DevicePointer,
        rows: usize,
    ) -> Result<bool, KernelError> {
        let (n, k, suffix) = self.gemv_dims(dtype, rows)?;
        if !self.takes_tiled_gemv(dtype) || !input.aligned() {
            return Ok(false);
        }
        let dev = self.cuda_device();
        let func = crate::GEMV_NF4.function(
            dev,
            &format!(
                "gemv_nf4_tiled_{}normed_{suffix}",
                self.absmax.kernel_infix()
            ),
        )?;
        let shared = rows * k * dtype.size_in_bytes();
        if !allow_dynamic_shared(&func, &dev.cuda_stream(), shared)? {
            return Ok(false);
        }
        let (cfg, split) = tiled_launch(dev, &func, n / TILE_ROWS, k / TILE_COLS, shared)?;
        let mut args = KernelArgs::new();
        args.arg(device_pointer(&self.packed, dev));
        self.absmax.push_args(&mut args, dev);
        input.push_args(&mut args);
        args.arg(y)
            .arg(n as u32)
            .arg(k as u32)
            .arg(rows as u32)
            .arg(split)
            .arg(self.blocksize.trailing_zeros());
        // SAFETY: the argument list matches gemv_nf4_tiled_[nested_]normed_<suffix> in kernels/gemv_nf4.cu, which
        // waits for the previous kernel before reading input's rows; the weight is tiled (checked above) and the
        // rows 16-byte aligned (K % 64 == 0 and aligned starts).
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

    /// `y = x · Wᵀ` and `y_other = x · W_otherᵀ` for two weights of one shape and kind (GLM's k and v), in one
    /// launch of the tiled kernel when both are tiled (the two small GEMVs then overlap), else as two
    /// [`Self::gemv_into`] launches.
    ///
    /// # Safety
    /// As [`Self::gemv_into`], for both weights and outputs.
    pub unsafe fn gemv_pair_into(
        &self,
        other: &CudaNf4Tensor,
        dtype: DType,
        x: DevicePointer,
        y: DevicePointer,
        y_other: DevicePointer,
        rows: usize,
    ) -> Result<(), KernelError> {
        let pairable = self.takes_tiled_gemv(dtype)
            && self.layout == other.layout
            && self.shape == other.shape
            && self.blocksize == other.blocksize
            && self.absmax.kernel_infix() == other.absmax.kernel_infix()
            && self.device.same_device(&other.device)
            && x.is_multiple_of(16)
            && (1..=GEMV_MAX_ROWS).contains(&rows);
        if !pairable {
            return unsafe {
                self.gemv_into(dtype, x, y, rows)?;
                other.gemv_into(dtype, x, y_other, rows)
            };
        }
        let (n, k) = (self.shape.dims()[0], self.shape.dims()[1]);
        let suffix = dtype_suffix(dtype).expect("f16 or bf16, checked above");
        let dev = self.cuda_device();
        let func = crate::GEMV_NF4.function(
            dev,
            &format!("gemv_nf4_tiled_{}pair_{suffix}", self.absmax.kernel_infix()),
        )?;
        let (mut cfg, split) = tiled_launch(dev, &func, n / TILE_ROWS, k / TILE_COLS, 0)?;
        cfg.grid_dim.1 = 2;
        let (rows_arg, blocksize_log2) = (rows as u32, self.blocksize.trailing_zeros());
        let (n32, k32) = (n as u32, k as u32);
        let mut args = KernelArgs::new();
        args.arg(device_pointer(&self.packed, dev));
        self.absmax.push_args(&mut args, dev);
        args.arg(y).arg(device_pointer(&other.packed, dev));
        other.absmax.push_args(&mut args, dev);
        args.arg(y_other)
            .arg(x)
            .arg(n32)
            .arg(k32)
            .arg(rows_arg)
            .arg(split)
            .arg(blocksize_log2);
        // SAFETY: the argument list matches gemv_nf4_tiled_[nested_]pair_<suffix> in kernels/gemv_nf4.cu; both
        // weights are tiled with one shape and blocksize (checked above), x is aligned as gemv_into requires.
        unsafe { args.launch(&func, &dev.cuda_stream(), cfg, true) }
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
