//! `CudaNf4Tensor::quantize`: a float tensor on the device to NF4 with bitsandbytes' rules, by
//! kernels/quantize_nf4.cu.

use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{CudaDevice, DType, Device, Tensor};
use half::{bf16, f16};
use nf4::{dynamic_map_signed, FloatDtype, Nf4Error, QuantOptions, QuantType};

use crate::layout::PackedLayout;
use crate::tensor::{cuda_view, CudaNf4Tensor, DeviceAbsmax, NESTED_BLOCKSIZE};
use crate::KernelError;

/// Warps per thread block of the first pass (one absmax block per warp).
const BLOCKS_PASS_WARPS: usize = 8;
const MAX_GRID: usize = 1 << 20;

impl CudaNf4Tensor {
    /// Quantizes `weight` (f16, bf16 or f32, on a CUDA device) to NF4 with `opts`, on the device, byte-identical
    /// to the nf4 crate's `Nf4Tensor::quantize_*` on the same values (and so to bitsandbytes): codes, absmax
    /// and, with `opts.double_quant`, the nested codes, scales and offset. Only the absmax values (one per block)
    /// visit the host, for the mean that double quantization subtracts.
    ///
    /// Fails as the nf4 crate does on an empty tensor, a bad blocksize, a non-finite element (naming its index)
    /// or an absmax mean that overflows.
    pub fn quantize(
        name: &str,
        weight: &Tensor,
        opts: &QuantOptions,
    ) -> Result<CudaNf4Tensor, KernelError> {
        let quantize_error = |source: Nf4Error| KernelError::Quantize {
            name: name.to_string(),
            source,
        };
        if opts.quant_type != QuantType::Nf4 {
            return Err(KernelError::InvalidNf4 {
                name: name.to_string(),
                problem: format!(
                    "quant type {} has no CUDA kernel; quantize it as nf4",
                    opts.quant_type
                ),
            });
        }
        nf4::check_blocksize(opts.blocksize).map_err(quantize_error)?;
        let Device::Cuda(dev) = weight.device() else {
            return Err(KernelError::NotCuda {
                name: name.to_string(),
                device: weight.device().location(),
            });
        };
        let (dtype, suffix) = match weight.dtype() {
            DType::F32 => (FloatDtype::F32, "f32"),
            DType::F16 => (FloatDtype::F16, "f16"),
            DType::BF16 => (FloatDtype::Bf16, "bf16"),
            dtype => {
                return Err(KernelError::UnsupportedDtype {
                    name: name.to_string(),
                    dtype,
                })
            }
        };
        let numel = weight.elem_count();
        if numel == 0 {
            return Err(quantize_error(Nf4Error::Empty(weight.dims().to_vec())));
        }
        let weight = weight.contiguous()?;
        let layout = PackedLayout::for_weight(weight.dims(), opts.blocksize);
        let passes = FirstPass {
            dev,
            numel,
            blocksize: opts.blocksize,
            layout,
        };
        let (packed, absmax, first_bad) = match weight.dtype() {
            DType::F32 => passes.run::<f32>(&weight, suffix)?,
            DType::F16 => passes.run::<f16>(&weight, suffix)?,
            _ => passes.run::<bf16>(&weight, suffix)?,
        };
        if first_bad != u64::MAX {
            let index = first_bad as usize;
            let value = weight
                .flatten_all()?
                .narrow(0, index, 1)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?[0];
            return Err(quantize_error(Nf4Error::NonFinite { index, value }));
        }
        let absmax = if opts.double_quant {
            double_quantize(dev, &absmax).map_err(|e| match e {
                DoubleQuantError::Overflow => quantize_error(Nf4Error::OffsetOverflow),
                DoubleQuantError::Candle(e) => e.into(),
            })?
        } else {
            DeviceAbsmax::Plain(absmax)
        };
        Ok(CudaNf4Tensor {
            name: name.to_string(),
            shape: weight.shape().clone(),
            dtype,
            blocksize: opts.blocksize,
            layout,
            device: weight.device().clone(),
            packed,
            absmax,
        })
    }
}

/// The first kernel: codes (in the layout the tensor will keep) and one absmax per block.
struct FirstPass<'a> {
    dev: &'a CudaDevice,
    numel: usize,
    blocksize: usize,
    layout: PackedLayout,
}

impl FirstPass<'_> {
    /// Returns the codes, the absmax values and the index of the first non-finite element (u64::MAX if none).
    fn run<T: CudaDType + DeviceRepr>(
        &self,
        weight: &Tensor,
        suffix: &str,
    ) -> candle_core::Result<(CudaSlice<u8>, CudaSlice<f32>, u64)> {
        let dev = self.dev;
        let blocks = self.numel.div_ceil(self.blocksize);
        let (storage, storage_layout) = weight.storage_and_layout();
        let values = cuda_view::<T>(&storage, storage_layout)?;
        // SAFETY: without a non-finite element every code byte and absmax is written; with one the tensor is
        // dropped unread.
        let mut packed = unsafe { dev.alloc::<u8>(self.numel.div_ceil(2))? };
        let mut absmax = unsafe { dev.alloc::<f32>(blocks)? };
        let mut first_bad = dev.clone_htod(&[u64::MAX])?;
        let func = crate::QUANTIZE.function(dev, &format!("quantize_nf4_blocks_{suffix}"))?;
        let stream = dev.cuda_stream();
        let cfg = LaunchConfig {
            grid_dim: (
                blocks.div_ceil(BLOCKS_PASS_WARPS).min(MAX_GRID) as u32,
                1,
                1,
            ),
            block_dim: (32 * BLOCKS_PASS_WARPS as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let (blocksize, layout) = (self.blocksize as u32, self.layout.kernel_arg());
        let mut args = stream.launch_builder(&func);
        args.arg(&values)
            .arg(&self.numel)
            .arg(&blocksize)
            .arg(&mut packed)
            .arg(&layout)
            .arg(&mut absmax)
            .arg(&mut first_bad);
        // SAFETY: matches quantize_nf4_blocks_<suffix> in kernels/quantize_nf4.cu; `values` holds numel elements.
        unsafe { args.launch(cfg) }.w()?;
        let first_bad = dev.clone_dtoh(&first_bad)?[0];
        Ok((packed, absmax, first_bad))
    }
}

enum DoubleQuantError {
    Overflow,
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for DoubleQuantError {
    fn from(e: candle_core::Error) -> Self {
        DoubleQuantError::Candle(e)
    }
}

/// The second kernel: absmax minus its mean (computed on the host in torch's order, as the nf4 crate does) in
/// bitsandbytes' 8-bit dynamic code, blocks of 256.
fn double_quantize(
    dev: &CudaDevice,
    absmax: &CudaSlice<f32>,
) -> Result<DeviceAbsmax, DoubleQuantError> {
    let offset = nf4::torch_mean(&dev.clone_dtoh(absmax)?);
    if !offset.is_finite() {
        return Err(DoubleQuantError::Overflow);
    }
    let blocks = absmax.len();
    let nested_blocks = blocks.div_ceil(NESTED_BLOCKSIZE);
    let nested_map = dev.clone_htod(&dynamic_map_signed())?;
    // SAFETY: the kernel writes every code and every nested scale.
    let mut codes = unsafe { dev.alloc::<u8>(blocks)? };
    let mut nested_absmax = unsafe { dev.alloc::<f32>(nested_blocks)? };
    let func = crate::QUANTIZE.function(dev, "quantize_nf4_absmax")?;
    let stream = dev.cuda_stream();
    let cfg = LaunchConfig {
        grid_dim: (nested_blocks.min(MAX_GRID) as u32, 1, 1),
        block_dim: (NESTED_BLOCKSIZE as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut args = stream.launch_builder(&func);
    args.arg(absmax)
        .arg(&blocks)
        .arg(&offset)
        .arg(&nested_map)
        .arg(&mut codes)
        .arg(&mut nested_absmax);
    // SAFETY: matches quantize_nf4_absmax in kernels/quantize_nf4.cu (256 threads per block).
    unsafe { args.launch(cfg) }
        .w()
        .map_err(DoubleQuantError::Candle)?;
    Ok(DeviceAbsmax::Nested {
        codes,
        nested_absmax,
        nested_map,
        offset,
    })
}
