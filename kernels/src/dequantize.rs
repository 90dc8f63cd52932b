//! NF4 weights resident on a CUDA device, dequantized by kernels/dequantize.cu.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{
    CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{
    CpuStorage, CudaDevice, CudaStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor,
};
use half::{bf16, f16};
use nf4::{AbsmaxState, Nf4Tensor, QuantType};

use crate::{KernelError, DEQUANTIZE_PTX};

/// Name under which the PTX module is cached per device.
const MODULE: &str = "glm_kernels_dequantize";
/// bitsandbytes double-quantizes absmax in blocks of 256 (NF4_NESTED_BLOCKSIZE in common.cuh).
const NESTED_BLOCKSIZE: usize = 256;
/// Entries of bitsandbytes' signed 8-bit dynamic map.
const NESTED_MAP_LEN: usize = 256;
const THREADS_PER_BLOCK: u32 = 256;
/// The kernel loops grid-stride past this many thread blocks.
const MAX_GRID: usize = 1 << 20;

/// Per-block scales of an NF4 tensor, as bitsandbytes stores them.
#[derive(Debug, Clone, Copy)]
pub enum HostAbsmax<'a> {
    /// One f32 absmax per block (double quant off).
    Plain(&'a [f32]),
    /// Double quant: `absmax[b] = nested_map[codes[b]] * nested_absmax[b / nested_blocksize] + offset`.
    Nested {
        codes: &'a [u8],
        nested_absmax: &'a [f32],
        /// Codes per nested scale; the kernel handles bitsandbytes' 256.
        nested_blocksize: usize,
        nested_map: &'a [f32],
        offset: f32,
    },
}

/// An NF4 tensor in host memory, in bitsandbytes' layout: `packed` holds two 4-bit codes per byte (the earlier
/// element in the high nibble) over the flattened row-major tensor, one absmax per `blocksize` elements.
#[derive(Debug, Clone, Copy)]
pub struct HostNf4<'a> {
    /// Tensor name, for error messages.
    pub name: &'a str,
    pub shape: &'a [usize],
    pub blocksize: usize,
    pub packed: &'a [u8],
    pub absmax: HostAbsmax<'a>,
}

impl<'a> HostNf4<'a> {
    /// A view of an NF4 tensor from the nf4 crate (FP4 is refused: the kernels hold the NF4 codebook).
    pub fn from_nf4(name: &'a str, tensor: &'a Nf4Tensor) -> Result<Self, KernelError> {
        if tensor.quant_type() != QuantType::Nf4 {
            return Err(KernelError::InvalidNf4 {
                name: name.to_string(),
                problem: format!(
                    "quant type {} has no CUDA kernel; quantize it as nf4",
                    tensor.quant_type().as_str()
                ),
            });
        }
        let absmax = match tensor.absmax_state() {
            AbsmaxState::Plain(absmax) => HostAbsmax::Plain(absmax),
            AbsmaxState::DoubleQuant(dq) => HostAbsmax::Nested {
                codes: dq.codes(),
                nested_absmax: dq.nested_absmax(),
                nested_blocksize: dq.nested_blocksize(),
                nested_map: dq.nested_map(),
                offset: dq.offset(),
            },
        };
        Ok(Self {
            name,
            shape: tensor.shape(),
            blocksize: tensor.blocksize(),
            packed: tensor.packed(),
            absmax,
        })
    }
}

enum DeviceAbsmax {
    Plain(Tensor),
    Nested {
        codes: Tensor,
        nested_absmax: Tensor,
        nested_map: Tensor,
        offset: f32,
    },
}

/// An NF4 tensor whose packed codes and scales live on a CUDA device.
pub struct CudaNf4Tensor {
    name: String,
    shape: Shape,
    blocksize: usize,
    packed: Tensor,
    absmax: DeviceAbsmax,
}

impl CudaNf4Tensor {
    /// Checks the sizes of `host` against its shape and blocksize and copies it to `device`.
    pub fn upload(host: &HostNf4<'_>, device: &Device) -> Result<Self, KernelError> {
        let name = host.name.to_string();
        let invalid = |problem: String| KernelError::InvalidNf4 {
            name: name.clone(),
            problem,
        };
        let expect_len = |what: &str, got: usize, want: usize| {
            if got == want {
                Ok(())
            } else {
                Err(invalid(format!(
                    "{what} has {got} entries, its shape {:?} with blocksize {} needs {want}; \
                     the quantization state does not belong to this tensor",
                    host.shape, host.blocksize
                )))
            }
        };
        if !host.blocksize.is_power_of_two() || !(32..=4096).contains(&host.blocksize) {
            return Err(invalid(format!(
                "blocksize {} is not a power of two in 32..=4096 (bitsandbytes' range)",
                host.blocksize
            )));
        }
        let numel: usize = host.shape.iter().product();
        let blocks = numel.div_ceil(host.blocksize);
        expect_len("packed codes", host.packed.len(), numel.div_ceil(2))?;
        match host.absmax {
            HostAbsmax::Plain(absmax) => expect_len("absmax", absmax.len(), blocks)?,
            HostAbsmax::Nested {
                codes,
                nested_absmax,
                nested_blocksize,
                nested_map,
                ..
            } => {
                if nested_blocksize != NESTED_BLOCKSIZE {
                    return Err(invalid(format!(
                        "nested blocksize {nested_blocksize} is not bitsandbytes' {NESTED_BLOCKSIZE}, the only one \
                         the kernel handles"
                    )));
                }
                expect_len("absmax codes", codes.len(), blocks)?;
                expect_len(
                    "nested absmax",
                    nested_absmax.len(),
                    blocks.div_ceil(NESTED_BLOCKSIZE),
                )?;
                expect_len("nested quant map", nested_map.len(), NESTED_MAP_LEN)?;
            }
        }
        // Checked after the sizes so that a bad state is reported as such wherever it is uploaded.
        if !device.is_cuda() {
            return Err(KernelError::NotCuda {
                name,
                device: device.location(),
            });
        }
        let upload_u8 = |data: &[u8]| Tensor::from_slice(data, data.len(), device);
        let upload_f32 = |data: &[f32]| Tensor::from_slice(data, data.len(), device);
        let absmax = match host.absmax {
            HostAbsmax::Plain(absmax) => DeviceAbsmax::Plain(upload_f32(absmax)?),
            HostAbsmax::Nested {
                codes,
                nested_absmax,
                nested_map,
                offset,
                ..
            } => DeviceAbsmax::Nested {
                codes: upload_u8(codes)?,
                nested_absmax: upload_f32(nested_absmax)?,
                nested_map: upload_f32(nested_map)?,
                offset,
            },
        };
        Ok(Self {
            packed: upload_u8(host.packed)?,
            name,
            shape: Shape::from_dims(host.shape),
            blocksize: host.blocksize,
            absmax,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    pub fn blocksize(&self) -> usize {
        self.blocksize
    }

    /// Expands the tensor to `dtype` (f32, f16 or bf16) on its device, bit-identical to the nf4 crate's
    /// `dequantize_*` on the CPU.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor, KernelError> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(KernelError::UnsupportedDtype {
                name: self.name.clone(),
                dtype,
            });
        }
        if self.shape.elem_count() == 0 {
            return Ok(Tensor::zeros(&self.shape, dtype, self.packed.device())?);
        }
        Ok(self.packed.apply_op1_no_bwd(&DequantizeNf4 {
            tensor: self,
            dtype,
        })?)
    }
}

/// The custom op, applied to the packed codes; the scales come along in `tensor`.
struct DequantizeNf4<'a> {
    tensor: &'a CudaNf4Tensor,
    dtype: DType,
}

/// The device buffer behind a contiguous CUDA tensor's storage.
fn cuda_view<'a, T: CudaDType>(
    storage: &'a Storage,
    layout: &Layout,
) -> candle_core::Result<CudaView<'a, T>> {
    match storage {
        Storage::Cuda(storage) => Ok(storage.as_cuda_slice::<T>()?.slice(layout.start_offset()..)),
        _ => candle_core::bail!("dequantize-nf4: scales are not on the CUDA device"),
    }
}

impl DequantizeNf4<'_> {
    fn launch<T: CudaDType + DeviceRepr>(
        &self,
        dev: &CudaDevice,
        packed: &CudaView<'_, u8>,
        suffix: &str,
    ) -> candle_core::Result<CudaStorage> {
        let numel = self.tensor.shape.elem_count();
        let blocksize_log2 = self.tensor.blocksize.trailing_zeros();
        let grid = numel
            .div_ceil(2)
            .div_ceil(THREADS_PER_BLOCK as usize)
            .min(MAX_GRID);
        let cfg = LaunchConfig {
            grid_dim: (grid as u32, 1, 1),
            block_dim: (THREADS_PER_BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the kernel writes all `numel` outputs.
        let out = unsafe { dev.alloc::<T>(numel)? };
        match &self.tensor.absmax {
            DeviceAbsmax::Plain(absmax) => {
                let (absmax, absmax_layout) = absmax.storage_and_layout();
                let absmax = cuda_view::<f32>(&absmax, absmax_layout)?;
                let func = dev.get_or_load_custom_func(
                    &format!("dequantize_nf4_{suffix}"),
                    MODULE,
                    DEQUANTIZE_PTX,
                )?;
                let mut args = func.builder();
                args.arg(packed)
                    .arg(&absmax)
                    .arg(&out)
                    .arg(&numel)
                    .arg(&blocksize_log2);
                // SAFETY: argument list matches dequantize_nf4_<suffix> in kernels/dequantize.cu; sizes were
                // checked in `upload`.
                unsafe { args.launch(cfg) }.w()?;
            }
            DeviceAbsmax::Nested {
                codes,
                nested_absmax,
                nested_map,
                offset,
            } => {
                let (codes, codes_layout) = codes.storage_and_layout();
                let (nested_absmax, nested_absmax_layout) = nested_absmax.storage_and_layout();
                let (nested_map, nested_map_layout) = nested_map.storage_and_layout();
                let codes = cuda_view::<u8>(&codes, codes_layout)?;
                let nested_absmax = cuda_view::<f32>(&nested_absmax, nested_absmax_layout)?;
                let nested_map = cuda_view::<f32>(&nested_map, nested_map_layout)?;
                let func = dev.get_or_load_custom_func(
                    &format!("dequantize_nf4_nested_{suffix}"),
                    MODULE,
                    DEQUANTIZE_PTX,
                )?;
                let mut args = func.builder();
                args.arg(packed)
                    .arg(&codes)
                    .arg(&nested_absmax)
                    .arg(&nested_map)
                    .arg(offset)
                    .arg(&out)
                    .arg(&numel)
                    .arg(&blocksize_log2);
                // SAFETY: as above, for dequantize_nf4_nested_<suffix>.
                unsafe { args.launch(cfg) }.w()?;
            }
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }
}

impl CustomOp1 for DequantizeNf4<'_> {
    fn name(&self) -> &'static str {
        "dequantize-nf4"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        // `upload` only accepts CUDA devices, so this is reached only by misuse of the op type.
        candle_core::bail!(
            "dequantize-nf4 of `{}` runs on CUDA only; on the CPU use the nf4 crate",
            self.tensor.name
        )
    }

    fn cuda_fwd(
        &self,
        storage: &CudaStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let dev = storage.device();
        let packed = storage
            .as_cuda_slice::<u8>()?
            .slice(layout.start_offset()..);
        let out = match self.dtype {
            DType::F32 => self.launch::<f32>(dev, &packed, "f32")?,
            DType::F16 => self.launch::<f16>(dev, &packed, "f16")?,
            DType::BF16 => self.launch::<bf16>(dev, &packed, "bf16")?,
            dtype => candle_core::bail!("dequantize-nf4: unsupported output {dtype:?}"),
        };
        Ok((out, self.tensor.shape.clone()))
    }
}
