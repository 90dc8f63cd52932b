//! [`Linear`]: the one type every projection of the decoder goes through, dense or 4-bit.
//!
//! A weight is either a dense `[out, in]` tensor in the compute dtype or a 4-bit NF4 weight that stays
//! packed in bitsandbytes' layout. On the CPU a packed weight ([`nf4::Nf4Tensor`]) is dequantized to the
//! compute dtype inside `forward`, one layer at a time, so memory holds 4-bit weights only; on a CUDA
//! device it lives packed in device memory (`glm_kernels::CudaNf4Tensor`) and our kernels read the
//! codes inside the matmul (a GEMV for decode, a GEMM path for prefill), behind the same `forward`.

use candle_core::{DType, Device, Tensor};
use half::{bf16, f16};

use crate::error::{GlmError, Result};

/// The weight of a [`Linear`] layer.
// With CUDA a `Device` is large; a few hundred layers hold one weight each, so boxing saves nothing.
#[cfg_attr(feature = "cuda", allow(clippy::large_enum_variant))]
#[derive(Debug, Clone)]
pub enum LinearWeight {
    /// `[out, in]` in the compute dtype.
    Dense(Tensor),
    /// 4-bit packed (bitsandbytes layout), expanded to `dtype` when used.
    Nf4 {
        packed: nf4::Nf4Tensor,
        dtype: DType,
        device: Device,
    },
    /// 4-bit packed in CUDA device memory, multiplied by our kernels without expanding it.
    #[cfg(feature = "cuda")]
    CudaNf4 { packed: CudaNf4Weight, dtype: DType },
}

/// A [`glm_kernels::CudaNf4Tensor`] shared between clones of a layer.
#[cfg(feature = "cuda")]
#[derive(Clone)]
pub struct CudaNf4Weight(std::sync::Arc<glm_kernels::CudaNf4Tensor>);

#[cfg(feature = "cuda")]
impl CudaNf4Weight {
    pub fn tensor(&self) -> &glm_kernels::CudaNf4Tensor {
        &self.0
    }
}

#[cfg(feature = "cuda")]
impl std::fmt::Debug for CudaNf4Weight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaNf4Weight")
            .field("name", &self.0.name())
            .field("shape", self.0.shape())
            .field("blocksize", &self.0.blocksize())
            .finish()
    }
}

/// `y = x Wᵀ + b` over the last dimension of `x`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
    out_features: usize,
    in_features: usize,
}

impl Linear {
    /// A dense layer from a 2-D weight `[out, in]` and an optional bias `[out]` of the same dtype.
    pub fn dense(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (out_features, in_features) = weight.dims2()?;
        check_bias(bias.as_ref(), out_features)?;
        Ok(Self {
            weight: LinearWeight::Dense(weight),
            bias,
            out_features,
            in_features,
        })
    }

    /// A 4-bit layer computing in `dtype` on `device`; `packed` must be 2-D `[out, in]`.
    pub fn nf4(
        packed: nf4::Nf4Tensor,
        dtype: DType,
        device: &Device,
        bias: Option<Tensor>,
    ) -> Result<Self> {
        let &[out_features, in_features] = packed.shape() else {
            return Err(GlmError::Input(format!(
                "a 4-bit linear weight must be 2-D, got shape {:?}",
                packed.shape()
            )));
        };
        check_bias(bias.as_ref(), out_features)?;
        Ok(Self {
            weight: LinearWeight::Nf4 {
                packed,
                dtype,
                device: device.clone(),
            },
            bias,
            out_features,
            in_features,
        })
    }

    /// A 4-bit layer whose packed weight `[out, in]` is already on a CUDA device, computing in `dtype`.
    #[cfg(feature = "cuda")]
    pub fn cuda_nf4(
        packed: glm_kernels::CudaNf4Tensor,
        dtype: DType,
        bias: Option<Tensor>,
    ) -> Result<Self> {
        let &[out_features, in_features] = packed.shape().dims() else {
            return Err(GlmError::Input(format!(
                "4-bit linear weight {} must be 2-D, got shape {:?}",
                packed.name(),
                packed.shape()
            )));
        };
        check_bias(bias.as_ref(), out_features)?;
        Ok(Self {
            weight: LinearWeight::CudaNf4 {
                packed: CudaNf4Weight(std::sync::Arc::new(packed)),
                dtype,
            },
            bias,
            out_features,
            in_features,
        })
    }

    pub fn weight(&self) -> &LinearWeight {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn out_features(&self) -> usize {
        self.out_features
    }

    pub fn in_features(&self) -> usize {
        self.in_features
    }

    pub fn is_quantized(&self) -> bool {
        match self.weight {
            LinearWeight::Dense(_) => false,
            LinearWeight::Nf4 { .. } => true,
            #[cfg(feature = "cuda")]
            LinearWeight::CudaNf4 { .. } => true,
        }
    }

    /// Bytes the weight and bias occupy as held (packed codes, absmax and code maps for 4-bit).
    pub fn weight_bytes(&self) -> usize {
        let weight = match &self.weight {
            LinearWeight::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            LinearWeight::Nf4 { packed, .. } => packed.size().total(),
            #[cfg(feature = "cuda")]
            LinearWeight::CudaNf4 { packed, .. } => packed.tensor().device_bytes(),
        };
        weight
            + self
                .bias
                .as_ref()
                .map_or(0, |b| b.elem_count() * b.dtype().size_in_bytes())
    }

    /// The weight as a dense `[out, in]` tensor in the compute dtype (4-bit weights dequantized).
    pub fn dense_weight(&self) -> Result<Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => Ok(w.clone()),
            LinearWeight::Nf4 {
                packed,
                dtype,
                device,
            } => {
                let shape = (self.out_features, self.in_features);
                // bitsandbytes dequantizes straight to the compute dtype; so do we.
                let w = match dtype {
                    DType::F16 => {
                        Tensor::from_vec::<_, f16>(packed.dequantize_f16(), shape, device)?
                    }
                    DType::BF16 => {
                        Tensor::from_vec::<_, bf16>(packed.dequantize_bf16(), shape, device)?
                    }
                    _ => Tensor::from_vec::<_, f32>(packed.dequantize_f32(), shape, device)?
                        .to_dtype(*dtype)?,
                };
                Ok(w)
            }
            #[cfg(feature = "cuda")]
            LinearWeight::CudaNf4 { packed, dtype } => packed
                .tensor()
                .dequantize(*dtype)
                .map_err(crate::gpu::kernel_error),
        }
    }

    /// x `[..., in]` → `[..., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let Some((&last, lead)) = dims.split_last() else {
            return Err(GlmError::Input("linear layer input is a scalar".into()));
        };
        if last != self.in_features {
            return Err(GlmError::Input(format!(
                "linear layer expects {} input features, got shape {dims:?}",
                self.in_features
            )));
        }
        let mut out_shape = lead.to_vec();
        out_shape.push(self.out_features);
        let y = match &self.weight {
            // The kernels take [.., in] as it is and never expand the weight.
            #[cfg(feature = "cuda")]
            LinearWeight::CudaNf4 { packed, .. } => packed
                .tensor()
                .matmul(&x.contiguous()?)
                .map_err(crate::gpu::kernel_error)?,
            _ => {
                let rows: usize = lead.iter().product();
                let weight = self.dense_weight()?;
                x.reshape((rows, last))?
                    .matmul(&weight.t()?)?
                    .reshape(out_shape)?
            }
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

fn check_bias(bias: Option<&Tensor>, out_features: usize) -> Result<()> {
    match bias {
        Some(b) if b.dims() != [out_features] => Err(GlmError::Input(format!(
            "bias of shape {:?} does not match {out_features} output features",
            b.dims()
        ))),
        _ => Ok(()),
    }
}
