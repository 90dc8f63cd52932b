//! Order of the packed codes on the device: bitsandbytes' or the tiled order of kernels/common.cuh, which the
//! matmul kernels read with one 16-byte load per lane and tile. kernels/repack_nf4.cu converts between them.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::CudaDevice;

const THREADS_PER_BLOCK: u32 = 256;
/// Rows and columns of a tile (NF4_TILE_ROWS / NF4_TILE_COLS in common.cuh).
pub(crate) const TILE_ROWS: usize = 16;
pub(crate) const TILE_COLS: usize = 64;
/// Bytes of one reordered chunk (8 codes of one row).
const CHUNK_BYTES: usize = 8;

/// How the packed bytes of a `CudaNf4Tensor` are ordered on the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PackedLayout {
    /// bitsandbytes' order: byte `i` holds elements `2i` and `2i + 1` of the flattened tensor.
    Bnb,
    /// Tiles of 16 rows x 64 columns of a weight `[rows, cols]`.
    Tiled { rows: usize, cols: usize },
}

impl PackedLayout {
    /// The layout a weight of this shape and blocksize is kept in: tiled when the matmul kernels can read it that
    /// way (2-D, whole tiles, one absmax block per tile row), else bitsandbytes' order.
    pub(crate) fn for_weight(shape: &[usize], blocksize: usize) -> Self {
        match *shape {
            [rows, cols]
                if rows > 0
                    && cols > 0
                    && rows % TILE_ROWS == 0
                    && cols % TILE_COLS == 0
                    && blocksize >= TILE_COLS
                    && rows <= u32::MAX as usize
                    && cols <= u32::MAX as usize =>
            {
                PackedLayout::Tiled { rows, cols }
            }
            _ => PackedLayout::Bnb,
        }
    }

    /// The kernels' `tiled_row_chunks` argument: 8-byte chunks per row when tiled, 0 for bitsandbytes' order.
    pub(crate) fn kernel_arg(self) -> u32 {
        match self {
            PackedLayout::Bnb => 0,
            PackedLayout::Tiled { cols, .. } => (cols / 2 / CHUNK_BYTES) as u32,
        }
    }

    /// Reorders packed bytes in bitsandbytes' order into this layout.
    pub(crate) fn tile(
        self,
        dev: &CudaDevice,
        packed: CudaSlice<u8>,
    ) -> candle_core::Result<CudaSlice<u8>> {
        match self {
            PackedLayout::Bnb => Ok(packed),
            PackedLayout::Tiled { .. } => self.repack(dev, &packed, "tile_nf4"),
        }
    }

    /// Downloads packed bytes in this layout, in bitsandbytes' order.
    pub(crate) fn download_bnb(
        self,
        dev: &CudaDevice,
        packed: &CudaSlice<u8>,
    ) -> candle_core::Result<Vec<u8>> {
        match self {
            PackedLayout::Bnb => dev.clone_dtoh(packed),
            PackedLayout::Tiled { .. } => {
                dev.clone_dtoh(&self.repack(dev, packed, "untile_nf4")?)
            }
        }
    }

    fn repack(
        self,
        dev: &CudaDevice,
        packed: &CudaSlice<u8>,
        kernel: &str,
    ) -> candle_core::Result<CudaSlice<u8>> {
        let chunks = packed.len() / CHUNK_BYTES;
        let row_chunks = self.kernel_arg();
        // SAFETY: the kernel writes every chunk.
        let mut out = unsafe { dev.alloc::<u8>(chunks * CHUNK_BYTES)? };
        let func = crate::REPACK.function(dev, kernel)?;
        let stream = dev.cuda_stream();
        let grid = chunks.div_ceil(THREADS_PER_BLOCK as usize).min(1 << 20);
        let cfg = LaunchConfig {
            grid_dim: (grid as u32, 1, 1),
            block_dim: (THREADS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut args = stream.launch_builder(&func);
        args.arg(packed).arg(&mut out).arg(&chunks).arg(&row_chunks);
        // SAFETY: matches tile_nf4 / untile_nf4 in kernels/repack_nf4.cu, which move the bytes as `chunks` u64
        // (a tiled weight has rows * cols / 16 whole chunks; device allocations are 256-byte aligned).
        unsafe { args.launch(cfg) }.w()?;
        Ok(out)
    }
}
