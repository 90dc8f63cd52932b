//! `CudaNf4Tensor::dequantize`: kernels/dequantize.cu launched on the tensor's device.

use candle_core::cuda_backend::cudarc::driver::{DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::CudaDType;
use candle_core::{DType, Tensor};
use half::{bf16, f16};

use crate::decode::device_pointer;
use crate::launch::KernelArgs;
use crate::tensor::{dtype_suffix, wrap, CudaNf4Tensor};
use crate::KernelError;

/// Name under which the PTX module is cached per device.
const THREADS_PER_BLOCK: u32 = 256;
/// Elements per thread (two DEQUANTIZE_CHUNKs in kernels/dequantize.cu).
const UNIT: usize = 32;
/// The kernel loops grid-stride past this many thread blocks.
const MAX_GRID: usize = 1 << 20;

impl CudaNf4Tensor {
    /// Expands the tensor to `dtype` (f32, f16 or bf16) on its device, bit-identical to the nf4 crate's
    /// `dequantize_*` on the CPU.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor, KernelError> {
        let Some(suffix) = dtype_suffix(dtype) else {
            return Err(KernelError::UnsupportedDtype {
                name: self.name.clone(),
                dtype,
            });
        };
        if self.shape.elem_count() == 0 {
            return Ok(Tensor::zeros(&self.shape, dtype, &self.device)?);
        }
        Ok(match dtype {
            DType::F32 => self.launch_dequantize::<f32>(suffix)?,
            DType::F16 => self.launch_dequantize::<f16>(suffix)?,
            _ => self.launch_dequantize::<bf16>(suffix)?,
        })
    }

    fn launch_dequantize<T: CudaDType + DeviceRepr>(
        &self,
        suffix: &str,
    ) -> candle_core::Result<Tensor> {
        let dev = self.cuda_device();
        let numel = self.shape.elem_count();
        // SAFETY: the kernel writes all `numel` outputs.
        let out = unsafe { dev.alloc::<T>(numel)? };
        let blocksize_log2 = self.blocksize.trailing_zeros();
        let layout = self.layout.kernel_arg();
        // Enough threads for the whole units, and for the tail when there are none.
        let threads = (numel / UNIT).max(UNIT);
        let grid = threads.div_ceil(THREADS_PER_BLOCK as usize).min(MAX_GRID);
        let cfg = LaunchConfig {
            grid_dim: (grid as u32, 1, 1),
            block_dim: (THREADS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let func = crate::DEQUANTIZE.function(
            dev,
            &format!("dequantize_nf4_{}{suffix}", self.absmax.kernel_infix()),
        )?;
        let mut args = KernelArgs::new();
        args.arg(device_pointer(&self.packed, dev)).arg(layout);
        self.absmax.push_args(&mut args, dev);
        args.arg(device_pointer(&out, dev))
            .arg(numel)
            .arg(blocksize_log2);
        // SAFETY: argument list matches dequantize_nf4_[nested_]<suffix> in kernels/dequantize.cu; the tensor's
        // sizes were checked when it was built; `out` and the tensor's buffers outlive the queued launch. A plain
        // launch: this kernel does not wait for a previous one.
        unsafe { args.launch(&func, &dev.cuda_stream(), cfg, false) }
            .map_err(candle_core::Error::wrap)?;
        Ok(wrap(out, dev, self.shape.clone()))
    }
}
