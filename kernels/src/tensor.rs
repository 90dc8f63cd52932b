//! `CudaNf4Tensor`: NF4 weights resident on a CUDA device (packed codes and scales), uploaded from the host or
//! quantized on the device, and downloaded back into the nf4 crate's `Nf4Tensor`.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Layout, Shape, Storage, Tensor};
use nf4::{AbsmaxState, Dtype, FloatDtype, Nf4Tensor, QuantType, TensorView};

use crate::decode::device_pointer;
use crate::launch::KernelArgs;
use crate::layout::PackedLayout;
use crate::KernelError;

/// bitsandbytes double-quantizes absmax in blocks of 256 (NF4_NESTED_BLOCKSIZE in common.cuh).
pub(crate) const NESTED_BLOCKSIZE: usize = 256;
/// Entries of bitsandbytes' signed 8-bit dynamic map.
const NESTED_MAP_LEN: usize = 256;

/// Per-block scales of an NF4 tensor, as bitsandbytes stores them.
#[derive(Debug, Clone, Copy)]
pub enum HostAbsmax<'a> {
    /// One f32 absmax per block (double quant off).
    Plain(&'a [f32]),
    /// Double quant: `absmax[b] = nested_map[codes[b]] * nested_absmax[b / nested_blocksize] + offset`.
    Nested {
        codes: &'a [u8],
        nested_absmax: &'a [f32],
        /// Codes per nested scale; the kernels handle bitsandbytes' 256.
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
    /// The dtype the weight had before quantization (kept for [`CudaNf4Tensor::to_host`]).
    pub dtype: FloatDtype,
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
            dtype: tensor.dtype(),
            blocksize: tensor.blocksize(),
            packed: tensor.packed(),
            absmax,
        })
    }
}

/// Scales on the device: plain f32 per block, or double-quantized.
pub(crate) enum DeviceAbsmax {
    Plain(CudaSlice<f32>),
    Nested {
        codes: CudaSlice<u8>,
        nested_absmax: CudaSlice<f32>,
        nested_map: CudaSlice<f32>,
        offset: f32,
    },
}

impl DeviceAbsmax {
    /// Infix of the kernel names that read this kind of scales.
    pub(crate) fn kernel_infix(&self) -> &'static str {
        match self {
            DeviceAbsmax::Plain(_) => "",
            DeviceAbsmax::Nested { .. } => "nested_",
        }
    }

    /// Pushes the scale arguments, in the order of PlainAbsmax / NestedAbsmax in common.cuh.
    pub(crate) fn push_args(&self, args: &mut KernelArgs, dev: &CudaDevice) {
        match self {
            DeviceAbsmax::Plain(absmax) => {
                args.arg(device_pointer(absmax, dev));
            }
            DeviceAbsmax::Nested {
                codes,
                nested_absmax,
                nested_map,
                offset,
            } => {
                args.arg(device_pointer(codes, dev))
                    .arg(device_pointer(nested_absmax, dev))
                    .arg(device_pointer(nested_map, dev))
                    .arg(*offset);
            }
        }
    }

    /// As many null scale arguments as [`Self::push_args`] pushes: an unused weight slot of a GEMV launch.
    pub(crate) fn push_null_args(&self, args: &mut KernelArgs) {
        match self {
            DeviceAbsmax::Plain(_) => {
                args.arg(0u64);
            }
            DeviceAbsmax::Nested { .. } => {
                args.arg(0u64).arg(0u64).arg(0u64).arg(0.0f32);
            }
        }
    }

    fn bytes(&self) -> usize {
        match self {
            DeviceAbsmax::Plain(absmax) => absmax.num_bytes(),
            DeviceAbsmax::Nested {
                codes,
                nested_absmax,
                nested_map,
                ..
            } => codes.num_bytes() + nested_absmax.num_bytes() + nested_map.num_bytes(),
        }
    }
}

/// An NF4 tensor whose packed codes and scales live on a CUDA device.
///
/// The scales are stored as bitsandbytes stores them. The packed codes of a 2-D weight `[N, K]` with
/// `N % 16 == 0`, `K % 64 == 0` and a blocksize of at least 64 are regrouped on upload into the tiled order the
/// matmul kernels read with 16-byte loads (see `PackedLayout`); every other tensor keeps bitsandbytes' order.
/// [`Self::to_host`] undoes the regrouping, so what goes up comes back byte for byte.
pub struct CudaNf4Tensor {
    pub(crate) name: String,
    pub(crate) shape: Shape,
    pub(crate) dtype: FloatDtype,
    pub(crate) blocksize: usize,
    pub(crate) layout: PackedLayout,
    pub(crate) device: Device,
    pub(crate) packed: CudaSlice<u8>,
    pub(crate) absmax: DeviceAbsmax,
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
        if nf4::check_blocksize(host.blocksize).is_err() {
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
                         the kernels handle"
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
        let Device::Cuda(cuda) = device else {
            return Err(KernelError::NotCuda {
                name,
                device: device.location(),
            });
        };
        let absmax = match host.absmax {
            HostAbsmax::Plain(absmax) => DeviceAbsmax::Plain(cuda.clone_htod(absmax)?),
            HostAbsmax::Nested {
                codes,
                nested_absmax,
                nested_map,
                offset,
                ..
            } => DeviceAbsmax::Nested {
                codes: cuda.clone_htod(codes)?,
                nested_absmax: cuda.clone_htod(nested_absmax)?,
                nested_map: cuda.clone_htod(nested_map)?,
                offset,
            },
        };
        let layout = PackedLayout::for_weight(host.shape, host.blocksize);
        let packed = layout.tile(cuda, cuda.clone_htod(host.packed)?)?;
        Ok(Self {
            packed,
            name,
            shape: Shape::from_dims(host.shape),
            dtype: host.dtype,
            blocksize: host.blocksize,
            layout,
            device: device.clone(),
            absmax,
        })
    }

    /// Downloads the tensor into the nf4 crate's host form, in bitsandbytes' layout (for tests and for saving a
    /// checkpoint quantized on the device).
    pub fn to_host(&self) -> Result<Nf4Tensor, KernelError> {
        let cuda = self.cuda_device();
        let packed = self.layout.download_bnb(cuda, &self.packed)?;
        let f32_bytes = |slice: &CudaSlice<f32>| -> Result<Vec<u8>, KernelError> {
            Ok(cuda
                .clone_dtoh(slice)?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect())
        };
        let mut stored: Vec<(String, Dtype, Vec<u8>)> = vec![
            (String::new(), Dtype::U8, packed),
            (
                ".quant_map".into(),
                Dtype::F32,
                nf4::NF4_CODEBOOK
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            ),
        ];
        let mut json = format!(
            r#"{{"quant_type": "nf4", "blocksize": {}, "dtype": "{}", "shape": {:?}"#,
            self.blocksize,
            self.dtype.as_str(),
            self.shape.dims()
        );
        match &self.absmax {
            DeviceAbsmax::Plain(absmax) => {
                stored.push((".absmax".into(), Dtype::F32, f32_bytes(absmax)?));
            }
            DeviceAbsmax::Nested {
                codes,
                nested_absmax,
                nested_map,
                offset,
            } => {
                stored.push((".absmax".into(), Dtype::U8, cuda.clone_dtoh(codes)?));
                stored.push((
                    ".nested_absmax".into(),
                    Dtype::F32,
                    f32_bytes(nested_absmax)?,
                ));
                stored.push((
                    ".nested_quant_map".into(),
                    Dtype::F32,
                    f32_bytes(nested_map)?,
                ));
                // An f32 printed as f64 reads back to the same f32.
                json += &format!(
                    r#", "nested_blocksize": {NESTED_BLOCKSIZE}, "nested_dtype": "float32", "nested_offset": {:?}"#,
                    f64::from(*offset)
                );
            }
        }
        json.push('}');
        stored.push((
            ".quant_state.bitsandbytes__nf4".into(),
            Dtype::U8,
            json.into_bytes(),
        ));
        let invalid = |problem: String| KernelError::InvalidNf4 {
            name: self.name.clone(),
            problem,
        };
        let views = stored
            .iter()
            .map(|(suffix, dtype, data)| {
                let len = match dtype {
                    Dtype::F32 => data.len() / 4,
                    _ => data.len(),
                };
                TensorView::new(*dtype, vec![len], data)
                    .map(|view| (format!("{}{suffix}", self.name), view))
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(format!("cannot view the downloaded state: {e}")))?;
        let read = Nf4Tensor::read(&self.name, |key| {
            views
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, view)| view.clone())
        })
        .map_err(|e| invalid(format!("downloaded state does not read back: {e}")))?;
        let tensor = read.ok_or_else(|| invalid("downloaded state has no quant state".into()))?;
        Ok(tensor)
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

    /// The dtype the weight had before quantization.
    pub fn dtype(&self) -> FloatDtype {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Device memory held by the tensor: packed codes plus scales (the tiled order has the same size as
    /// bitsandbytes').
    pub fn device_bytes(&self) -> usize {
        self.packed.num_bytes() + self.absmax.bytes()
    }

    pub(crate) fn cuda_device(&self) -> &CudaDevice {
        match &self.device {
            Device::Cuda(cuda) => cuda,
            _ => unreachable!("a CudaNf4Tensor is only built on a CUDA device"),
        }
    }
}

/// The device buffer behind a contiguous CUDA tensor's storage.
pub(crate) fn cuda_view<'a, T: CudaDType>(
    storage: &'a Storage,
    layout: &Layout,
) -> candle_core::Result<CudaView<'a, T>> {
    match storage {
        Storage::Cuda(storage) => Ok(storage.as_cuda_slice::<T>()?.slice(layout.start_offset()..)),
        _ => candle_core::bail!("glm-kernels: a kernel operand is not on the CUDA device"),
    }
}

/// A fresh contiguous tensor over a device buffer a kernel filled.
pub(crate) fn wrap<T: CudaDType>(slice: CudaSlice<T>, dev: &CudaDevice, shape: Shape) -> Tensor {
    Tensor::from_storage(
        Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone())),
        shape,
        BackpropOp::none(),
        false,
    )
}

/// The kernel-name suffix of a float dtype.
pub(crate) fn dtype_suffix(dtype: DType) -> Option<&'static str> {
    match dtype {
        DType::F32 => Some("f32"),
        DType::F16 => Some("f16"),
        DType::BF16 => Some("bf16"),
        _ => None,
    }
}
